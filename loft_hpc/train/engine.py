"""The round driver shared by LoFT pretraining, dense pretraining and ticket retraining.

A run is a sequence of *rounds* of local steps (LoFT: K steps then the shard exchange; dense: one
step). At each round boundary every rank holds the identical full model, so that is where the
driver takes its decisions, always in the same order on every rank:
filter-score snapshots, weight snapshots, evaluation, log line, signal agreement, checkpoint.
Subclasses implement :meth:`train_round` and the momentum accessors.
"""
from __future__ import annotations

import copy
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from loft_hpc.checkpoint.h5file import (CheckpointError, RunFile, check_model_state, read_run_file, rng_state,
                                        set_rng_state, write_run_file)
from loft_hpc.checkpoint.identity import differences
from loft_hpc.checkpoint.paths import RunPaths
from loft_hpc.config import JobConfig, config_to_yaml
from loft_hpc.config.steps import Step
from loft_hpc.exchange.collectives import Collectives
from loft_hpc.models.groups import FilterGroup
from loft_hpc.train.evaluate import evaluate, train_eval_subset
from loft_hpc.train.scores import filter_scores
from loft_hpc.train.signals import EXIT_REQUEUE, StopRequest
from loft_hpc.train.stream import BatchStream
from loft_hpc.utils.dist import Dist
from loft_hpc.utils.log import log
from loft_hpc.utils.seeding import derive_seed


def _fault_from_env():
    """``LOFT_FAULT_INJECT=RANK:ROUND[:STAGE[:ACTION]]`` makes that rank, when it starts that round
    (of that checkpoint stage, e.g. ``pretrain`` or ``retrain_p50``; empty = any), raise
    (ACTION ``raise``, the default) or send itself SIGUSR1 / SIGTERM (``usr1`` / ``term``): the test
    hook for failure handling (one failing rank must end the whole job, never hang it), for
    kill-and-resume, and for a stop signal that reaches one rank only."""
    v = os.environ.get("LOFT_FAULT_INJECT")
    if not v:
        return None
    parts = v.split(":") + ["", ""]
    return int(parts[0]), int(parts[1]), (parts[2] or None), (parts[3] or "raise")


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
                 final_path: Path, duration: Step, steps_per_round: int, lr_fn, shard: bool, identity: dict,
                 masks: dict | None = None, mask_attrs: dict | None = None, sparsity: list | None = None,
                 init: dict | None = None) -> None:
        self.ctx, self.cfg, self.dist, self.coll = ctx, ctx.cfg, ctx.dist, ctx.coll
        self.model, self.groups = model, groups
        self.ckpt_stage, self.final_path = ckpt_stage, Path(final_path)
        self.identity = identity
        d = self.cfg.data
        # shard: data-parallel stages split the training set (an epoch is one pass in total);
        # LoFT pretraining by default lets every rank iterate the whole set (the paper's code).
        self.stream = BatchStream(ctx.train_set, d.batch_size, seed=self.cfg.train.seed, rank=self.dist.rank,
                                  world=self.dist.size, shard=shard, num_workers=d.num_workers, device=self.dist.device)
        bpe = self.stream.batches_per_epoch
        self.bpe = bpe
        self.total = duration.iterations(bpe)
        self.K = steps_per_round
        self._lr_fn = lr_fn
        self.train_sample = train_eval_subset(ctx.train_set, self.cfg.train.train_eval_samples, self.cfg.train.seed)
        o, t = self.cfg.output, self.cfg.train
        self.every = {"eval": t.eval_every.iterations(bpe), "ckpt": o.checkpoint_every.iterations(bpe),
                      "snap": o.snapshot_every.iterations(bpe), "log": t.log_every}
        self.weight_steps = {}  # requested step -> its labels ('500it', '2ep')
        for s in o.snapshot_weights:
            self.request_weight_snapshot(s)
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
        self._assembled_cache = None  # (step, buffers of the assembled model at that step)

    def lr(self, step: int) -> float:
        return self._lr_fn(step, self.total, self.bpe)

    def request_weight_snapshot(self, step) -> None:
        """Store the full weights at the first round boundary at or after ``step`` ('500it', '2ep')."""
        st = Step.parse(step)
        self.weight_steps.setdefault(st.iterations(self.bpe), set()).add(str(st))

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
    def seed_global_rngs(self) -> None:
        """Seed the global torch / numpy / python generators from (seed, stage, rank): whatever
        draws from them (dropout) is then a pure function of the config, and a resume restores
        them from the checkpoint."""
        import random

        import numpy as np

        s = derive_seed(self.cfg.train.seed, "global", self.ckpt_stage, self.dist.rank)
        torch.manual_seed(s)
        np.random.seed(s % 2**32)
        random.seed(s)

    def run(self) -> None:
        resumed = self._maybe_resume()
        if not resumed:
            self.seed_global_rngs()
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
                if fault[3] == "raise":
                    raise RuntimeError(f"injected fault (LOFT_FAULT_INJECT) on rank {self.dist.rank} in round {self.round}")
                import signal

                os.kill(os.getpid(), {"usr1": signal.SIGUSR1, "term": signal.SIGTERM}[fault[3]])
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
        labels = sorted(lab for s, labs in self.weight_steps.items() if prev < s <= self.step for lab in labs)
        if labels:
            self._weight_snapshot(labels)
        if crossed(prev, self.step, self.every["eval"]) or last:
            self._eval_row()
        elif crossed(prev, self.step, self.every["log"]) and self.dist.is_root:
            loss, correct, count = self.run_stats.cpu().tolist()
            log(f"{self.ckpt_stage} step {self.step}/{self.total} round {self.round} rank-0 loss "
                f"{loss / max(count, 1):.4f} acc {correct / max(count, 1):.4f} lr {self.lr(self.step - 1):.4g}")
        stop = self.dist.any_flag(self.ctx.stop.received is not None)  # collective: every round
        if crossed(prev, self.step, self.every["ckpt"]) or stop:
            self._checkpoint()
        if stop and not last:
            log(f"{self.ckpt_stage}: stop requested ({self.ctx.stop.received or 'on another rank'}), "
                f"checkpoint written at step {self.step}; exiting for requeue", rank=self.dist.rank)
            raise StopForRequeue()

    def before_eval(self) -> None:
        """Hook: make the model identical on every rank before it is evaluated or saved (dense:
        average the BN statistics; LoFT: recalibrate them). Runs inside :meth:`assembled`, which
        restores the training state afterwards."""

    @contextmanager
    def assembled(self):
        """The model as it is evaluated and saved (after :meth:`before_eval`), for the duration of
        the block; then every buffer is put back as training left it. Evaluating or taking a
        weight snapshot therefore never changes the training trajectory. Yields this rank's
        training buffers."""
        raw = {n: b.detach().clone() for n, b in self.model.named_buffers()}
        bufs = dict(self.model.named_buffers())
        if self._assembled_cache and self._assembled_cache[0] == self.step:
            with torch.no_grad():  # same step (eval + checkpoint): same result, computed once
                for n, b in self._assembled_cache[1].items():
                    bufs[n].copy_(b)
        else:
            self.before_eval()
            self._assembled_cache = (self.step, {n: b.detach().clone() for n, b in self.model.named_buffers()})
        try:
            yield raw
        finally:
            with torch.no_grad():
                for n, b in raw.items():
                    bufs[n].copy_(b)

    def _eval_row(self) -> None:
        with self.assembled():
            ev = evaluate(self.model, self.ctx.test_set, rank=self.dist.rank, world=self.dist.size,
                          batch_size=self.cfg.data.eval_batch_size, device=self.dist.device, coll=self.coll,
                          num_workers=self.cfg.data.num_workers)
            tr = evaluate(self.model, self.train_sample, rank=self.dist.rank, world=self.dist.size,
                          batch_size=self.cfg.data.eval_batch_size, device=self.dist.device, coll=self.coll,
                          num_workers=self.cfg.data.num_workers) if self.train_sample is not None else None
        stats = torch.cat([self.run_stats.cpu(), torch.tensor(self.bytes_total, dtype=torch.float64)])
        stats = self.coll.allreduce_sum(stats, name=f"stats.{self.ckpt_stage}.{self.step}", count=False)  # collective order: after eval
        loss, correct, count, sent, recv = stats.tolist()
        self.run_stats.zero_()
        nan = float("nan")
        row = {"step": self.step, "round": self.round, "epoch": self.step / self.bpe,
               "step_loss": loss / count if count else nan, "step_acc": correct / count if count else nan,
               "train_loss": tr["loss"] if tr else nan, "train_acc": tr["acc"] if tr else nan,
               "test_loss": ev["loss"], "test_acc": ev["acc"], "lr": self.lr(max(self.step - 1, 0)),
               "bytes_sent": int(sent), "bytes_received": int(recv), "wall_time": self.wall}
        self.hist.metrics.append(row)
        log(f"{self.ckpt_stage} step {self.step}/{self.total} (epoch {row['epoch']:.2f}, round {self.round}) "
            f"{self.step_loss_name} {row['step_loss']:.4f} train_loss {row['train_loss']:.4f} "
            f"train_acc {row['train_acc']:.4f} test_acc {row['test_acc']:.4f} "
            f"lr {row['lr']:.4g} bytes {int(sent + recv):,} wall {self.wall:.1f}s", rank=self.dist.rank)

    step_loss_name = "step_loss"  # LoFT: the sub-networks' loss during the local steps

    def _snapshot(self) -> None:
        if not self.dist.is_root or (self.hist.snap_index and self.hist.snap_index[-1][0] == self.step):
            return
        idx = (self.step, self.round, self.step // self.bpe)
        self.hist.snap_index.append(idx)
        for g, sc in filter_scores(self.model.state_dict(), self.groups).items():
            per = self.hist.snap_scores.setdefault(g, {"l2": [], "l1": []})
            per["l2"].append(sc["l2"].numpy())
            per["l1"].append(sc["l1"].numpy())

    def _weight_snapshot(self, labels: list[str]) -> None:
        """Full weights at this round boundary, requested as ``labels``: the file is named by the
        step actually taken; every label maps to it in the stage's file."""
        with self.assembled():
            if self.dist.is_root:
                p = self.ctx.paths.weights_snapshot(self.step)
                rf = self._runfile(stage=f"{self.stage}-snapshot", complete=True, light=True)
                rf.progress["requested"] = ",".join(labels)
                write_run_file(p, rf)
                for lab in labels:
                    self.hist.weight_snapshots[lab] = str(p.relative_to(self.ctx.paths.root))
                if any(Step.parse(lab).iterations(self.bpe) != self.step for lab in labels):
                    log(f"{self.ckpt_stage}: weight snapshot for {', '.join(labels)} taken at step {self.step} "
                        f"(the first round boundary at or after it): {p.name}", rank=0)

    def _runfile(self, *, stage: str, complete: bool, light: bool = False, ranks=None) -> RunFile:
        state = {n: t.detach().cpu() for n, t in self.model.state_dict().items()}
        return RunFile(
            stage=stage, config_yaml=config_to_yaml(self.cfg), arch=self.cfg.model.arch, world_size=self.dist.size,
            seed=self.cfg.train.seed, model=state, identity=self.identity,
            progress={"step": self.step, "round": self.round, "epoch": self.step // self.bpe, "total_steps": self.total,
                      "wall_time": self.wall, "batches_per_epoch": self.bpe},
            momentum={} if light else {n: t.detach().cpu() for n, t in self.momentum_state().items()},
            ranks=[] if light else (ranks or []), init={} if light else (self.init or {}),
            masks=self.masks or {}, mask_attrs=self.mask_attrs, sparsity=self.sparsity,
            snap_index=[] if light else self.hist.snap_index, snap_scores={} if light else self.hist.snap_scores,
            weight_snapshots=self.hist.weight_snapshots, metrics=[] if light else self.hist.metrics,
            comm=[] if light else self.hist.comm, complete=complete)

    def _gather_to_root(self, buffers: dict) -> list[dict] | None:
        """Every rank's own state (RNG, byte counters, running loss sums, training buffers) and its
        pending comm rows to rank 0 (mpi4py control messages)."""
        self._record_comm()
        mine = rng_state()
        mine.update(bytes_sent=self.bytes_total[0], bytes_received=self.bytes_total[1], comm_seconds=self.comm_seconds,
                    run_stats=self.run_stats.cpu().numpy(),
                    buffers={n: b.cpu() for n, b in buffers.items() if b.is_floating_point()})
        ranks = self.dist.comm.gather(mine, root=0)  # collective order: at every checkpoint, all ranks
        rows = self.dist.comm.gather(self.hist.pending_comm, root=0)  # collective order: right after
        self.hist.pending_comm = []
        if self.dist.is_root:
            merged = [r for per in rows for r in per]
            self.hist.comm.extend(sorted(merged, key=lambda r: (r["round"], r["rank"])))
        return ranks

    def _checkpoint(self) -> None:
        """A checkpoint is for resuming: the model as training holds it (rank 0's; parameters
        are identical on every rank at a round boundary) and every rank's own buffers. It
        neither assembles (no BN averaging, no recalibration) nor communicates model data, so a
        checkpoint taken only because of a stop signal leaves no trace in the results."""
        ranks = self._gather_to_root(dict(self.model.named_buffers()))
        if self.dist.is_root:
            p = self.ctx.paths.ckpt(self.ckpt_stage, self.step)
            write_run_file(p, self._runfile(stage=self.stage, complete=False, ranks=ranks))
            self.ctx.paths.set_latest(self.ckpt_stage, p, self.cfg.output.keep_checkpoints)
        self.dist.comm.Barrier()

    def _finish(self) -> None:
        with self.assembled() as raw:
            ranks = self._gather_to_root(raw)
            if self.dist.is_root:
                write_run_file(self.final_path, self._runfile(stage=self.stage, complete=True, ranks=ranks))
                log(f"{self.ckpt_stage}: wrote {self.final_path}", rank=0)
            # the file holds the assembled model: leave the trainer's model that way too
            self._assembled_cache = None
            raw.clear()
        self.dist.comm.Barrier()

    def _find_checkpoint(self) -> tuple[Path, RunFile] | None:
        """Rank 0 picks the newest readable checkpoint of the stage: LATEST, or, when that file is
        truncated or corrupt, the newest older one (with one warning line naming both)."""
        latest = self.ctx.paths.latest(self.ckpt_stage)
        if latest is None:
            return None
        try:
            return latest, read_run_file(latest)
        except CheckpointError as e:
            for older in reversed(self.ctx.paths.checkpoints(self.ckpt_stage)):
                if older.name >= latest.name:
                    continue
                try:
                    rf = read_run_file(older)
                except CheckpointError:
                    continue
                log(f"warning: {latest} cannot be read ({str(e).split(': ', 1)[-1]}); resuming from the previous "
                    f"checkpoint {older.name}", rank=0)
                return older, rf
            raise

    def _maybe_resume(self) -> bool:
        if not self.cfg.output.resume:
            return False
        verdict = None  # (path, error or None): rank 0 decides, every rank learns it
        if self.dist.is_root:
            try:
                found = self._find_checkpoint()
                if found is not None:
                    path, rf = found
                    diff = differences(rf.identity, self.identity)
                    err = None
                    if diff and self.cfg.output.on_mismatch == "refuse":
                        err = (f"{path} was written by another run ({'; '.join(diff)}): resuming it would mix the "
                               f"two; delete {path.parent} to start this stage over, or set output.on_mismatch=restart")
                    elif diff and self.cfg.output.on_mismatch == "restart":
                        log(f"{self.ckpt_stage}: {path} was written by another run ({'; '.join(diff)}): "
                            f"starting this stage over (output.on_mismatch=restart)", rank=0)
                        path = None
                    verdict = (str(path) if path else None, err)
            except CheckpointError as e:
                verdict = (None, str(e))
        verdict = self.dist.comm.bcast(verdict, root=0)  # every rank loads the same checkpoint
        if verdict is None or verdict[0] is None and verdict[1] is None:
            return False
        name, err = verdict
        if err:
            raise CheckpointError(err, agreed=True)
        rf = read_run_file(name)
        check_model_state(name, rf.model, self.model, self.cfg.model.arch, rf.arch)
        if rf.world_size != self.dist.size:
            raise CheckpointError(f"{name}: written by {rf.world_size} ranks, this job has {self.dist.size}: "
                                  f"resume with the same number of ranks (or start a new output.dir)", agreed=True)
        mine = rf.ranks[self.dist.rank]
        with torch.no_grad():
            for n, t in self.model.state_dict().items():
                t.copy_(rf.model[n].to(t.device))
            # the saved model is the assembled one; training continues from this rank's own buffers
            bufs = dict(self.model.named_buffers())
            for n, b in mine["buffers"].items():
                bufs[n].copy_(b.to(bufs[n].device))
        self.load_momentum({n: t.to(self.dist.device) for n, t in rf.momentum.items()})
        p = rf.progress
        self.step, self.round, self.wall = int(p["step"]), int(p["round"]), float(p["wall_time"])
        self.bytes_total = [int(mine["bytes_sent"]), int(mine["bytes_received"])]
        self.comm_seconds = float(mine["comm_seconds"])
        self.run_stats.copy_(torch.as_tensor(mine["run_stats"], dtype=torch.float64))
        if rf.init:
            self.init = rf.init
        set_rng_state(mine)
        h = self.hist
        h.metrics, h.comm = rf.metrics, rf.comm if self.dist.is_root else []
        h.snap_index = list(rf.snap_index)
        h.snap_scores = {g: {k: list(v) for k, v in per.items()} for g, per in rf.snap_scores.items()}
        h.weight_snapshots = dict(rf.weight_snapshots)
        log(f"{self.ckpt_stage}: resumed from {name} at step {self.step}/{self.total} (round {self.round})", rank=self.dist.rank)
        return True
