"""When a round boundary snapshots, evaluates, logs and checkpoints.

The decisions are a pure function of (step before the round, step after it), so every rank takes
the same ones in the same order without talking. Intervals are steps (``Step`` converted with the
stage's batches per epoch); under LoFT an event falls on the first round boundary at or after its
step.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from loft_hpc.config.steps import Step


def crossed(prev: int, cur: int, interval: int) -> bool:
    """True when a multiple of ``interval`` lies in (prev, cur]."""
    return interval > 0 and cur // interval > prev // interval


@dataclass
class Due:
    snapshot: bool = False
    weight_labels: list[str] = field(default_factory=list)
    evaluate: bool = False
    log: bool = False
    checkpoint: bool = False


class EventPolicy:
    def __init__(self, cfg, batches_per_epoch: int, total: int) -> None:
        o, t = cfg.output, cfg.train
        self.bpe, self.total = batches_per_epoch, total
        self.every = {"eval": t.eval_every.iterations(batches_per_epoch),
                      "ckpt": o.checkpoint_every.iterations(batches_per_epoch),
                      "snap": o.snapshot_every.iterations(batches_per_epoch), "log": t.log_every}
        # requested step -> its labels ('500it', '2ep'); only the stages that want weight snapshots
        # ask (pretraining: output.snapshot_weights and the rewind / mask_from steps), never a
        # retraining, whose own steps would name the same snapshot files
        self.weight_steps: dict[int, set[str]] = {}

    def request_weight_snapshot(self, step) -> None:
        """Store the full weights at the first round boundary at or after ``step`` ('500it', '2ep')."""
        st = Step.parse(step)
        self.weight_steps.setdefault(st.iterations(self.bpe), set()).add(str(st))

    def due(self, prev: int, step: int) -> Due:
        last = step >= self.total
        ev = crossed(prev, step, self.every["eval"]) or last
        return Due(snapshot=crossed(prev, step, self.every["snap"]) or last,
                   weight_labels=sorted(lab for s, labs in self.weight_steps.items() if prev < s <= step for lab in labs),
                   evaluate=ev, log=not ev and crossed(prev, step, self.every["log"]),
                   checkpoint=crossed(prev, step, self.every["ckpt"]))
