"""The round driver shared by LoFT pretraining, dense pretraining and ticket retraining.

A run is a sequence of *rounds* of local steps (LoFT: K steps then the shard exchange; dense: one
step). At each round boundary every rank holds the identical full model, so that is where the
driver takes its decisions, always in the same order on every rank:
filter-score snapshots, weight snapshots, evaluation, log line, signal agreement, checkpoint.
Subclasses implement :meth:`train_round` and the momentum accessors.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from loft_hpc.checkpoint.h5file import RunFile, check_model_state, read_run_file, rng_state, set_rng_state, write_run_file
from loft_hpc.checkpoint.paths import RunPaths
from loft_hpc.config import JobConfig, config_to_yaml
from loft_hpc.config.steps import Step
from loft_hpc.exchange.collectives import Collectives
from loft_hpc.models.groups import FilterGroup
from loft_hpc.train.evaluate import evaluate
from loft_hpc.train.scores import filter_scores
from loft_hpc.train.signals import EXIT_REQUEUE, StopRequest
from loft_hpc.train.stream import BatchStream
from loft_hpc.utils.dist import Dist
from loft_hpc.utils.log import log


def _fault_from_env():
    """``LOFT_FAULT_INJECT=RANK:ROUND[:STAGE]`` makes that rank raise when it starts that round
    (of that checkpoint stage, e.g. ``pretrain`` or ``retrain_p50``): the test hook for failure
    handling (one failing rank must end the whole job, never hang it) and for kill-and-resume."""
    v = os.environ.get("LOFT_FAULT_INJECT")
    if not v:
        return None
    parts = v.split(":")
    return int(parts[0]), int(parts[1]), (parts[2] if len(parts) > 2 else None)


class StopForRequeue(SystemExit):
    def __init__(self) -> None:
        super().__init__(EXIT_REQUEUE)


@dataclass
class History:
    metrics: list[dict] = field(default_factory=list)
    comm: list[dict] = field(default_factory=list)          # rank 0: rows of every rank, written so far
    pending_comm: list[dict] = field(default_factory=list)  # this rank's rows not yet sent to rank 0
    snap_index: list[tuple[int, int, int]] = field(default_factory=list)
    snap_scores: dict = field(default_factory=dict)
    weight_snapshots: dict[str, str] = field(default_factory=dict)


def crossed(prev: int, cur: int, interval: int) -> bool:
    """True when a multiple of ``interval`` lies in (prev, cur]."""
    return interval > 0 and cur // interval > prev // interval


@dataclass
class Context:
    cfg: JobConfig
    dist: Dist
    coll: Collectives
    paths: RunPaths
    stop: StopRequest
    train_set: object
    test_set: object


class RoundTrainer:
    stage = "pretrain"

    def __init__(self, ctx: Context, model: torch.nn.Module, groups: list[FilterGroup], *, ckpt_stage: str,
                 final_path: Path, duration: Step, steps_per_round: int, lr_fn, masks: dict | None = None,
                 mask_attrs: dict | None = None, sparsity: list | None = None, init: dict | None = None) -> None:
        self.ctx, self.cfg, self.dist, self.coll = ctx, ctx.cfg, ctx.dist, ctx.coll
        self.model, self.groups = model, groups
        self.ckpt_stage, self.final_path = ckpt_stage, Path(final_path)
        d = self.cfg.data
        self.stream = BatchStream(ctx.train_set, d.batch_size, seed=self.cfg.train.seed, rank=self.dist.rank,
                                  world=self.dist.size, shard=d.shard, num_workers=d.num_workers, device=self.dist.device)
        bpe = self.stream.batches_per_epoch
        self.bpe = bpe
        self.total = duration.iterations(bpe)
        self.K = steps_per_round
        self.lr_fn = lambda step: lr_fn(step, self.total, bpe)
        o, t = self.cfg.output, self.cfg.train
        self.every = {"eval": t.eval_every.iterations(bpe), "ckpt": o.checkpoint_every.iterations(bpe),
                      "snap": o.snapshot_every.iterations(bpe), "log": t.log_every}
        self.weight_steps = {s.iterations(bpe): str(s) for s in o.snapshot_weights}
        self.masks = masks
        self.mask_attrs = mask_attrs or {}
        self.sparsity = sparsity or []
        self.init = init
        self.step = 0
        self.round = 0
        self.wall = 0.0
        self.hist = History()
        # loss sum, correct, samples since the last row; kept on the device (no sync per step)
        self.run_stats = torch.zeros(3, dtype=torch.float64, device=self.dist.device)
        self._fault = _fault_from_env()
        self.bytes_total = [0, 0]  # this rank's sent / received since the start of the stage
        self.comm_seconds = 0.0     # this rank's wall time inside counted collectives

    # ------------------------------------------------------------------ subclass interface
    def train_round(self, n_steps: int) -> None:
        raise NotImplementedError

    def momentum_state(self) -> dict[str, torch.Tensor]:
        return {}

    def load_momentum(self, momentum: dict[str, torch.Tensor]) -> None:
        pass

    def on_fresh_start(self) -> None:
        """Hook: run once when the stage starts from scratch (not on resume), before step 0."""

    # ------------------------------------------------------------------ helpers for subclasses
    def forward_backward(self, net: torch.nn.Module, step: int):
        x, y = self.stream.batch(step)
        out = net(x)
        loss = F.cross_entropy(out, y)
        loss.backward()
        with torch.no_grad():
            self.run_stats += torch.stack([loss.detach().double() * y.numel(), (out.argmax(1) == y).sum().double(),
                                           torch.tensor(float(y.numel()), dtype=torch.float64, device=y.device)])
        return loss

    # ------------------------------------------------------------------ driver
    def run(self) -> None:
        resumed = self._maybe_resume()
        if not resumed:
            self.on_fresh_start()
            self._snapshot()
        self._record_comm()  # round 0: what moved before training (the dense initial broadcast)
        t0 = time.time() - self.wall
        bar = self._progress_bar()
        while self.step < self.total:
            prev = self.step
            n = min(self.K, self.total - self.step)
            fault = self._fault
            if fault and fault[:2] == (self.dist.rank, self.round) and fault[2] in (None, self.ckpt_stage):
                raise RuntimeError(f"injected fault (LOFT_FAULT_INJECT) on rank {self.dist.rank} in round {self.round}")
            self.train_round(n)
            self.step += n
            self.round += 1
            self.wall = time.time() - t0
            self._record_comm()
            if bar is not None:
                bar.update(n)
            self._after_round(prev)
        if bar is not None:
            bar.close()
        self._finish()

    _COMM_KEYS = ("allgather_sent", "allgather_received", "allreduce_sent", "allreduce_received")

    def _record_comm(self) -> None:
        """Move the counted bytes into this rank's row for the current round (merged when the
        round already has a row, e.g. BN statistics averaged before a checkpoint)."""
        c = self.coll.counter.take()
        c["allreduce_sent"] = c.get("allreduce_sent", 0) + c.get("broadcast_sent", 0)
        c["allreduce_received"] = c.get("allreduce_received", 0) + c.get("broadcast_received", 0)
        vals = {k: c.get(k, 0) for k in self._COMM_KEYS}
        pending = self.hist.pending_comm
        if pending and pending[-1]["round"] == self.round:
            for k, v in vals.items():
                pending[-1][k] += v
            pending[-1]["seconds"] += c["seconds"]
        elif any(vals.values()):
            pending.append({"round": self.round, "step": self.step, "rank": self.dist.rank, **vals, "seconds": c["seconds"]})
        self.comm_seconds += c["seconds"]
        self.bytes_total[0] += vals["allgather_sent"] + vals["allreduce_sent"]
        self.bytes_total[1] += vals["allgather_received"] + vals["allreduce_received"]

    def _progress_bar(self):
        if not (self.dist.is_root and self.cfg.train.progress and sys.stderr.isatty()):
            return None
        from tqdm import tqdm

        return tqdm(total=self.total, initial=self.step, desc=self.ckpt_stage, unit="step", leave=False)

    def _after_round(self, prev: int) -> None:
        # Same decisions in the same order on every rank: they depend only on (prev, step).
        last = self.step >= self.total
        if crossed(prev, self.step, self.every["snap"]) or last:
            self._snapshot()
        for s, label in self.weight_steps.items():
            if prev < s <= self.step:
                self._weight_snapshot(label)
        if crossed(prev, self.step, self.every["eval"]) or last:
            self._eval_row()
        elif crossed(prev, self.step, self.every["log"]) and self.dist.is_root:
            loss, correct, count = self.run_stats.cpu().tolist()
            log(f"{self.ckpt_stage} step {self.step}/{self.total} round {self.round} rank-0 loss "
                f"{loss / max(count, 1):.4f} acc {correct / max(count, 1):.4f} lr {self.lr_fn(self.step - 1):.4g}")
        stop = self.dist.any_flag(self.ctx.stop.received is not None)  # collective: every round
        if crossed(prev, self.step, self.every["ckpt"]) or stop:
            self._checkpoint()
        if stop and not last:
            log(f"{self.ckpt_stage}: stop requested ({self.ctx.stop.received or 'on another rank'}), "
                f"checkpoint written at step {self.step}; exiting for requeue", rank=self.dist.rank)
            raise StopForRequeue()

    def before_eval(self) -> None:
        """Hook: make the model identical on every rank before it is evaluated or saved."""

    def _eval_row(self) -> None:
        self.before_eval()
        ev = evaluate(self.model, self.ctx.test_set, rank=self.dist.rank, world=self.dist.size,
                      batch_size=self.cfg.data.eval_batch_size, device=self.dist.device, coll=self.coll,
                      num_workers=self.cfg.data.num_workers)
        stats = torch.cat([self.run_stats.cpu(), torch.tensor(self.bytes_total, dtype=torch.float64)])
        stats = self.coll.allreduce_sum(stats, name=f"stats.{self.ckpt_stage}.{self.step}", count=False)  # collective order: after eval
        loss, correct, count, sent, recv = stats.tolist()
        self.run_stats.zero_()
        row = {"step": self.step, "round": self.round, "epoch": self.step / self.bpe,
               "loss": loss / count if count else float("nan"), "train_acc": correct / count if count else float("nan"),
               "test_loss": ev["test_loss"], "test_acc": ev["test_acc"], "lr": self.lr_fn(max(self.step - 1, 0)),
               "bytes_sent": int(sent), "bytes_received": int(recv), "wall_time": self.wall}
        self.hist.metrics.append(row)
        log(f"{self.ckpt_stage} step {self.step}/{self.total} (epoch {row['epoch']:.2f}, round {self.round}) "
            f"loss {row['loss']:.4f} train_acc {row['train_acc']:.4f} test_acc {row['test_acc']:.4f} "
            f"lr {row['lr']:.4g} bytes {int(sent + recv):,} wall {self.wall:.1f}s", rank=self.dist.rank)

    def _snapshot(self) -> None:
        if not self.dist.is_root or (self.hist.snap_index and self.hist.snap_index[-1][0] == self.step):
            return
        idx = (self.step, self.round, self.step // self.bpe)
        self.hist.snap_index.append(idx)
        for g, sc in filter_scores(self.model.state_dict(), self.groups).items():
            per = self.hist.snap_scores.setdefault(g, {"l2": [], "l1": []})
            per["l2"].append(sc["l2"].numpy())
            per["l1"].append(sc["l1"].numpy())

    def _weight_snapshot(self, label: str) -> None:
        self.before_eval()
        if self.dist.is_root:
            p = self.ctx.paths.weights_snapshot(label)
            write_run_file(p, self._runfile(stage=f"{self.stage}-snapshot", complete=True, light=True))
            self.hist.weight_snapshots[label] = str(p.relative_to(self.ctx.paths.root))

    def _runfile(self, *, stage: str, complete: bool, light: bool = False, rng=None) -> RunFile:
        state = {n: t.detach().cpu() for n, t in self.model.state_dict().items()}
        return RunFile(
            stage=stage, config_yaml=config_to_yaml(self.cfg), arch=self.cfg.model.arch, world_size=self.dist.size,
            seed=self.cfg.train.seed, model=state,
            progress={"step": self.step, "round": self.round, "epoch": self.step // self.bpe, "total_steps": self.total,
                      "wall_time": self.wall, "bytes_sent": self.bytes_total[0], "bytes_received": self.bytes_total[1],
                      "comm_seconds": self.comm_seconds,
                      "batches_per_epoch": self.bpe},
            momentum={} if light else {n: t.detach().cpu() for n, t in self.momentum_state().items()},
            rng=[] if light else (rng or []), init={} if light else (self.init or {}),
            masks=self.masks or {}, mask_attrs=self.mask_attrs, sparsity=self.sparsity,
            snap_index=[] if light else self.hist.snap_index, snap_scores={} if light else self.hist.snap_scores,
            weight_snapshots=self.hist.weight_snapshots, metrics=[] if light else self.hist.metrics,
            comm=[] if light else self.hist.comm, complete=complete)

    def _gather_to_root(self):
        """Per-rank RNG states and pending comm rows to rank 0 (mpi4py control messages)."""
        self._record_comm()
        rngs = self.dist.comm.gather(rng_state(), root=0)  # collective order: at every checkpoint, all ranks
        rows = self.dist.comm.gather(self.hist.pending_comm, root=0)  # collective order: right after
        self.hist.pending_comm = []
        if self.dist.is_root:
            merged = [r for per in rows for r in per]
            self.hist.comm.extend(sorted(merged, key=lambda r: (r["round"], r["rank"])))
        return rngs

    def _checkpoint(self) -> None:
        self.before_eval()
        rngs = self._gather_to_root()
        if self.dist.is_root:
            p = self.ctx.paths.ckpt(self.ckpt_stage, self.step)
            write_run_file(p, self._runfile(stage=self.stage, complete=False, rng=rngs))
            self.ctx.paths.set_latest(self.ckpt_stage, p, self.cfg.output.keep_checkpoints)
        self.dist.comm.Barrier()

    def _finish(self) -> None:
        self.before_eval()
        rngs = self._gather_to_root()
        if self.dist.is_root:
            write_run_file(self.final_path, self._runfile(stage=self.stage, complete=True, rng=rngs))
            log(f"{self.ckpt_stage}: wrote {self.final_path}", rank=0)
        self.dist.comm.Barrier()

    def _maybe_resume(self) -> bool:
        if not self.cfg.output.resume:
            return False
        name = None
        if self.dist.is_root:
            latest = self.ctx.paths.latest(self.ckpt_stage)
            name = str(latest) if latest else None
        name = self.dist.comm.bcast(name, root=0)  # every rank loads the same checkpoint
        if name is None:
            return False
        rf = read_run_file(name)
        check_model_state(name, rf.model, self.model, self.cfg.model.arch, rf.arch)
        if rf.world_size != self.dist.size:
            from loft_hpc.checkpoint.h5file import CheckpointError

            raise CheckpointError(f"{name}: written by {rf.world_size} ranks, this job has {self.dist.size}: "
                                  f"resume with the same number of ranks (or start a new output.dir)")
        with torch.no_grad():
            for n, t in self.model.state_dict().items():
                t.copy_(rf.model[n].to(t.device))
        self.load_momentum({n: t.to(self.dist.device) for n, t in rf.momentum.items()})
        p = rf.progress
        self.step, self.round, self.wall = int(p["step"]), int(p["round"]), float(p["wall_time"])
        self.bytes_total = [int(p.get("bytes_sent", 0)), int(p.get("bytes_received", 0))]
        self.comm_seconds = float(p.get("comm_seconds", 0.0))
        if rf.init:
            self.init = rf.init
        if self.dist.rank < len(rf.rng):
            set_rng_state(rf.rng[self.dist.rank])
        h = self.hist
        h.metrics, h.comm = rf.metrics, rf.comm if self.dist.is_root else []
        h.snap_index = list(rf.snap_index)
        h.snap_scores = {g: {k: list(v) for k, v in per.items()} for g, per in rf.snap_scores.items()}
        h.weight_snapshots = dict(rf.weight_snapshots)
        log(f"{self.ckpt_stage}: resumed from {name} at step {self.step}/{self.total} (round {self.round})", rank=self.dist.rank)
        return True
