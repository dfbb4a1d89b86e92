"""The round driver shared by LoFT pretraining, dense pretraining and ticket retraining.

A run is a sequence of *rounds* of local steps (LoFT: K steps then the shard exchange; dense: one
step). At each round boundary every rank holds the identical full model (parameters), so that is
where the driver takes its decisions, always in the same order on every rank: filter-score
snapshots, weight snapshots, evaluation, log line, signal agreement, checkpoint. Subclasses
implement :meth:`RoundTrainer.train_round` and the momentum accessors.
"""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from loft_hpc.checkpoint.paths import RunPaths
from loft_hpc.config import JobConfig
from loft_hpc.config.steps import Step
from loft_hpc.exchange.collectives import Collectives
from loft_hpc.metrics.ticket_detection import CRITERIA, TicketDetector, detection_groups
from loft_hpc.models.groups import FilterGroup
from loft_hpc.train import callbacks, persistence
from loft_hpc.train.evaluate import evaluate, train_eval_subset
from loft_hpc.train.events import EventPolicy
from loft_hpc.train.ledger import ByteLedger
from loft_hpc.train.persistence import History
from loft_hpc.train.scores import filter_scores
from loft_hpc.train.signals import EXIT_REQUEUE, StopRequest
from loft_hpc.train.stream import BatchStream
from loft_hpc.utils.dist import Dist
from loft_hpc.utils.log import log
from loft_hpc.utils.seeding import derive_seed


class StopForRequeue(SystemExit):
    def __init__(self) -> None:
        super().__init__(EXIT_REQUEUE)


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
    """One stage's training loop; the pieces it is made of:
    :class:`~loft_hpc.train.events.EventPolicy` (when to snapshot, evaluate, log, checkpoint),
    :class:`~loft_hpc.train.ledger.ByteLedger` (bytes per round and rank),
    :mod:`~loft_hpc.train.persistence` (run files, checkpoints, resume),
    :mod:`~loft_hpc.train.callbacks` (hooks for tests and tools; none in production)."""

    stage = "pretrain"
    step_loss_name = "step_loss"  # LoFT: "sub_loss", the sub-networks' loss during the local steps
    single_stream = False  # GPipe: every rank draws the same batches (one stream for the pipeline)
    stats_rank = 0         # the rank whose running loss the periodic log line shows (-1: the last)

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
        one = self.single_stream
        self.stream = BatchStream(ctx.train_set, d.batch_size, seed=self.cfg.train.seed, rank=0 if one else self.dist.rank,
                                  world=1 if one else self.dist.size, shard=shard and not one,
                                  num_workers=d.num_workers, device=self.dist.device)
        self.bpe = self.stream.batches_per_epoch
        self.total = duration.iterations(self.bpe)
        self.K = steps_per_round
        self._lr_fn = lr_fn
        self.events = EventPolicy(self.cfg, self.bpe, self.total)
        self.ledger = ByteLedger(self.coll.counter, self.dist.rank)
        self.train_sample = train_eval_subset(ctx.train_set, self.cfg.train.train_eval_samples, self.cfg.train.seed)
        self.masks = masks
        self.mask_attrs = mask_attrs or {}
        self.sparsity = sparsity or []
        self.coverage: list[dict] = []  # LoFT: fraction of each sliced tensor trained per round
        self.init = init
        self.step = 0
        self.round = 0
        self.wall = 0.0
        self.hist = History()
        # loss sum, correct, samples since the last row; kept on the device (no sync per step)
        self.run_stats = torch.zeros(3, dtype=torch.float64, device=self.dist.device)
        self._assembled_cache = None  # (step, buffers of the assembled model at that step)
        self.stopped_early = False  # train.stop_at_ticket ended pretraining at the detection
        self.detectors: dict[str, TicketDetector] = {}
        self.detect_groups: list[str] = []

    def _new_detectors(self) -> None:
        """Ticket detection (pretraining only): one detector per criterion over the pruned groups."""
        if self.stage != "pretrain" or not self.groups:
            return
        t = self.cfg.train
        self.detect_groups = detection_groups(self.groups)
        every = t.ticket_every.iterations(self.bpe)
        self.detectors = {c: TicketDetector(c, t.ticket_window, t.ticket_eb_threshold if c == "early_bird"
                                            else t.ticket_threshold, t.ticket_ratio, every) for c in CRITERIA}

    def _detect(self, step: int, scores: dict, quiet: bool = False) -> bool:
        """Feed one snapshot's l2 scores to the detectors; True when the deciding criterion
        (train.ticket_criterion) declares the ticket at this snapshot. Every rank holds the same
        weights at a round boundary, so every rank reaches the same verdict without communicating."""
        fired = {}
        for c, det in self.detectors.items():
            fired[c] = det.update(step, step / self.bpe, {g: scores[g]["l2"] for g in self.detect_groups})
            if fired[c] and not quiet:
                d = det.detection
                log(f"{self.ckpt_stage}: ticket detected by {c} at step {step} (epoch {step / self.bpe:.2f}, "
                    f"{step / max(self.total, 1):.0%} of pretraining): window distance {d.distance[-1]:.4f} "
                    f"{'<=' if c == 'early_bird' else '<'} {d.threshold:g} against the previous {d.window} snapshots",
                    rank=self.dist.rank)
        return fired.get(self.cfg.train.ticket_criterion, False)

    def _replay_detection(self) -> None:
        """Rebuild the detectors from the snapshot history (after a resume)."""
        self._new_detectors()
        h = self.hist
        for i, (step, _r, _e) in enumerate(h.snap_index):
            self._detect(step, {g: {"l2": h.snap_scores[g]["l2"][i]} for g in self.detect_groups}, quiet=True)
        d = self.detectors.get(self.cfg.train.ticket_criterion)
        if self.cfg.train.stop_at_ticket and d is not None and d.detection.emerged:
            self.stopped_early = True  # a resume after the detection (the final file was not written)

    def ticket_record(self) -> dict:
        """The /ticket group of the stage's files (layout: /ticket)."""
        if not self.detectors:
            return {}
        import json

        t = self.cfg.train
        main = self.detectors[t.ticket_criterion].detection
        crit = {c: {"emerged_step": d.detection.emerged_step, "emerged_epoch": d.detection.emerged_epoch,
                    "window": d.detection.window, "threshold": d.detection.threshold,
                    "distance": list(d.detection.distance)}
                for c, d in self.detectors.items()}
        return {"emerged_step": main.emerged_step, "emerged_epoch": main.emerged_epoch, "criterion": main.criterion,
                "window": main.window, "threshold": main.threshold, "stopped_early": int(self.stopped_early),
                "score": "l2", "groups": json.dumps(self.detect_groups), "ratio": t.ticket_ratio,
                "every": t.ticket_every.iterations(self.bpe), "criteria": crit}

    def lr(self, step: int) -> float:
        return self._lr_fn(step, self.total, self.bpe)

    def request_weight_snapshot(self, step) -> None:
        self.events.request_weight_snapshot(step)

    # ------------------------------------------------------------------ subclass interface
    def train_round(self, n_steps: int) -> None:
        raise NotImplementedError

    def momentum_state(self) -> dict[str, torch.Tensor]:
        return {}

    def load_momentum(self, momentum: dict[str, torch.Tensor]) -> None:
        pass

    def on_fresh_start(self) -> None:
        """Hook: run once when the stage starts from scratch (not on resume), before step 0."""

    def before_boundary(self) -> None:
        """Hook, on every rank: make the full model current on every rank before a boundary that
        snapshots, evaluates or saves (GPipe gathers its stages; the others hold it already)."""

    def before_save(self) -> None:
        """Hook, on every rank, before a checkpoint or the final file is written (after
        :meth:`before_boundary`): the lean exchange gathers the full momentum."""

    def before_eval(self) -> None:
        """Hook: make the model identical on every rank before it is evaluated or saved (dense:
        average the BN statistics; LoFT: recalibrate them). Runs inside :meth:`assembled`, which
        restores the training state afterwards."""

    # ------------------------------------------------------------------ helpers for subclasses
    def forward_backward(self, net: torch.nn.Module, step: int):
        callbacks.fire("step", self, step)
        x, y = self.stream.batch(step)
        out = net(x)
        loss = F.cross_entropy(out, y)
        loss.backward()
        with torch.no_grad():
            self.run_stats += torch.stack([loss.detach().double() * y.numel(), (out.argmax(1) == y).sum().double(),
                                           torch.tensor(float(y.numel()), dtype=torch.float64, device=y.device)])
        return loss

    # ------------------------------------------------------------------ the loop
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
        if persistence.try_resume(self):
            self._replay_detection()
        else:
            self._new_detectors()
            self.seed_global_rngs()
            self.on_fresh_start()
            self._snapshot()
            at_start = sorted(self.events.weight_steps.get(0, ()))
            if at_start:  # a weight snapshot requested at step 0 ('0it', '0ep'): theta_0 itself
                persistence.save_weight_snapshot(self, at_start)
        self.ledger.record(self.round, self.step)  # round 0: whatever moved before the first step
        t0 = time.time() - self.wall
        bar = self._progress_bar()
        while self.step < self.total and not self.stopped_early:
            prev = self.step
            n = min(self.K, self.total - self.step)
            callbacks.fire("round_start", self)
            self.train_round(n)
            self.step += n
            self.round += 1
            self.wall = time.time() - t0
            self.ledger.record(self.round, self.step)
            if bar is not None:
                bar.update(n)
            self._after_round(prev)
        if bar is not None:
            bar.close()
        self._finish()

    def _progress_bar(self):
        if not (self.dist.is_root and self.cfg.train.progress and sys.stderr.isatty()):
            return None
        from tqdm import tqdm

        return tqdm(total=self.total, initial=self.step, desc=self.ckpt_stage, unit="step", leave=False)

    def _after_round(self, prev: int) -> None:
        # Same decisions in the same order on every rank: they depend only on (prev, step).
        due = self.events.due(prev, self.step)
        last = self.step >= self.total
        if due.snapshot or due.weight_labels or due.evaluate or due.checkpoint or last:
            self.before_boundary()
            self.ledger.record(self.round, self.step)  # its assembly belongs to this round's row
        fired = self._snapshot() if due.snapshot else False
        # One collective per round agrees on the stop signal and, under train.stop_at_ticket, on
        # the ticket verdict (bit 1: some rank received a signal; 2: some rank's detection fired
        # here; 4: some rank's did not). Every rank holds the same weights at a round boundary, so
        # the verdicts agree; if they ever did not, every rank stops (said in one line).
        flags = 1 if self.ctx.stop.received is not None else 0
        if self.cfg.train.stop_at_ticket and due.snapshot:
            flags |= 2 if fired else 4
        agreed = self.dist.agree_bits(flags)  # collective: every rank, every round
        stop = bool(agreed & 1)
        if agreed & 2 and not last:
            if agreed & 4:
                log(f"{self.ckpt_stage}: warning: the ranks' ticket detections disagree at step {self.step} "
                    f"(their weights differ in the last bits): stopping on every rank", rank=self.dist.rank)
            # the ticket has emerged: this boundary ends pretraining (evaluated and saved as the last)
            log(f"{self.ckpt_stage}: stopping pretraining at step {self.step} of {self.total} "
                f"(train.stop_at_ticket)", rank=self.dist.rank)
            self.stopped_early, last = True, True
            due.evaluate, due.log = True, False
        if due.weight_labels:
            persistence.save_weight_snapshot(self, due.weight_labels)
            self.ledger.record(self.round, self.step)  # e.g. the dense BN averaging it needed
        if due.evaluate:
            self._eval_row()
        elif due.log and self.dist.rank == self.stats_rank % self.dist.size:
            loss, correct, count = self.run_stats.cpu().tolist()
            log(f"{self.ckpt_stage} step {self.step}/{self.total} round {self.round} rank-{self.dist.rank} "
                f"{self.step_loss_name} {loss / max(count, 1):.4f} acc {correct / max(count, 1):.4f} "
                f"lr {self.lr(self.step - 1):.4g}", all_ranks=True)
        # at the last step the final file follows at once: a periodic checkpoint there would only
        # make a resume that skips the last evaluation's assembled state (a stop still writes one)
        if (due.checkpoint and not last) or stop:
            persistence.save_checkpoint(self)
        if stop and not last:
            log(f"{self.ckpt_stage}: stop requested ({self.ctx.stop.received or 'on another rank'}), "
                f"checkpoint written at step {self.step}; exiting for requeue", rank=self.dist.rank)
            raise StopForRequeue()

    def _finish(self) -> None:
        persistence.save_final(self)

    # ------------------------------------------------------------------ the assembled model
    @contextmanager
    def assembled(self):
        """The model as it is evaluated and saved (after :meth:`before_eval`), for the duration of
        the block; then every buffer is put back as training left it. Evaluating or taking a
        weight snapshot therefore never changes the training trajectory. Yields this rank's
        training buffers."""
        raw = {n: b.detach().clone() for n, b in self.model.named_buffers()}
        bufs = dict(self.model.named_buffers())
        if self._assembled_cache and self._assembled_cache[0] == self.step:
            with torch.no_grad():  # same step (evaluation + final file): same result, computed once
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
        self.ledger.record(self.round, self.step)  # e.g. the BN averaging of this evaluation
        stats = torch.cat([self.run_stats.cpu(), torch.tensor([self.ledger.sent, self.ledger.received], dtype=torch.float64)])
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
            f"lr {row['lr']:.4g} payload {int(sent + recv):,} B wall {self.wall:.1f}s", rank=self.dist.rank)

    def _snapshot(self) -> bool:
        """Append the filter scores of this boundary to the history (every rank keeps it: the
        weights are the same on every rank, and the ticket detection reads it) and run the ticket
        detection on them; True when the deciding criterion declares the ticket here."""
        if self.hist.snap_index and self.hist.snap_index[-1][0] == self.step:
            return False
        self.hist.snap_index.append((self.step, self.round, self.step // self.bpe))
        scores = {}
        for g, sc in filter_scores(self.model.state_dict(), self.groups).items():
            per = self.hist.snap_scores.setdefault(g, {"l2": [], "l1": []})
            scores[g] = {"l2": sc["l2"].numpy(), "l1": sc["l1"].numpy()}
            per["l2"].append(scores[g]["l2"])
            per["l1"].append(scores[g]["l1"])
        return self._detect(self.step, scores) if self.detectors else False
