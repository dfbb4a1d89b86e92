"""Learning-rate schedules as pure functions of the global step (exact on resume)."""
from __future__ import annotations

import bisect
import math

from loft_hpc.config.steps import Step


def lr_at(step: int, *, base: float, schedule: str, milestones: list[Step], gamma: float,
          total: int, batches_per_epoch: int) -> float:
    if schedule == "constant":
        return base
    if schedule == "multistep":
        its = sorted(m.iterations(batches_per_epoch) for m in milestones)
        return base * gamma ** bisect.bisect_right(its, step)
    if schedule == "cosine":
        return 0.5 * base * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))
    raise ValueError(f"unknown schedule {schedule!r}")


def set_lr(optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr
