"""When has the ticket emerged? Two criteria on the filter-score snapshots of pretraining
(LOFT_SPEC sections 5 and 6b).

Both look at a sliding window: the newest snapshot is compared with each of the ``window`` (W)
snapshots before it, and the ticket is declared at the first snapshot where every comparison is
within the threshold. The value recorded per snapshot is the *window distance*: the largest of
those comparisons (NaN while fewer than W earlier snapshots exist).

- ``filter_distance`` (LoFT's metric): for every pruned filter group, the normalised filter
  distance F(sigma) (:func:`loft_hpc.metrics.filter_distance.filter_distance`) with the newest
  snapshot as the reference (its top-ranked filters weigh most: they are the ticket that would be
  drawn now) and the older snapshot as the compared ranking. The window distance is the maximum
  over groups and over the window; the ticket has emerged when it is **below** ``threshold``.
- ``early_bird`` (You et al., ICLR 2020, ``EarlyBird`` in their main.py): the structured masks
  at the pruning ratio ``ratio`` (per group, the ``max(1, round((1 - ratio) C))`` filters of
  largest score are kept, as the prune stage's layer-wise structured masks), concatenated over the
  groups; the normalised Hamming distance between the newest mask and each older one (the fraction
  of filters whose kept/pruned state differs). Declared when every distance is **at most**
  ``threshold`` (their code: 0.1, returned False as soon as one distance exceeds it). Their FIFO
  holds 5 masks, i.e. the newest compared with W = 4 older ones; they rank channels by the BN
  scale |gamma| with one global threshold, this package by the filters' weight norms per group,
  the masks its prune stage draws.

Cadence (``every``, steps): the criteria compare snapshots at least about that far apart, as
Early-Bird checks once per epoch: a snapshot is *used* when it is the first at or after the next
multiple of ``every`` (step 0 always); the others get a NaN window distance and are skipped.
Snapshots taken much closer together (``output.snapshot_every=5it`` for a heatmap) barely differ
early in training, while the weights have hardly left theta_0, and would declare a ticket at
once.

The detector is a pure function of the sequence of snapshots: fed one snapshot at a time during
pretraining (on every rank, which all hold the same weights at a round boundary, so no
communication is needed) it gives exactly what :func:`detect` gives on the stored history
afterwards; a resumed run replays the stored history to rebuild its window.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from loft_hpc.metrics.filter_distance import filter_distance

CRITERIA = ("filter_distance", "early_bird")
EB_THRESHOLD = 0.1


def detection_groups(groups) -> list[str]:
    """Names of the filter groups the detection compares: those LoFT partitions (the groups the
    prune stage prunes by default), or every group when the model partitions none."""
    part = [g.name for g in groups if g.partitioned]
    return part or [g.name for g in groups]


def keep_mask(scores: np.ndarray, ratio: float) -> np.ndarray:
    """The layer-wise structured mask at pruning ratio ``ratio``: the ``max(1, round((1-ratio) C))``
    filters of largest score are kept (ties: lower index first, as a stable sort)."""
    s = np.asarray(scores, dtype=np.float64)
    k = max(1, round((1.0 - ratio) * s.size))
    keep = np.zeros(s.size, dtype=bool)
    keep[np.argsort(-s, kind="stable")[:k]] = True
    return keep


def hamming(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of entries where two boolean masks differ."""
    return float(np.count_nonzero(a != b)) / a.size


@dataclass
class Detection:
    """The outcome of one criterion on a run's snapshots."""
    criterion: str
    window: int
    threshold: float
    steps: list[int] = field(default_factory=list)       # step of every snapshot seen
    epochs: list[float] = field(default_factory=list)    # its (fractional) epoch
    distance: list[float] = field(default_factory=list)  # window distance per snapshot (NaN before W)
    emerged_index: int | None = None                     # first snapshot where the criterion holds

    @property
    def emerged(self) -> bool:
        return self.emerged_index is not None

    @property
    def emerged_step(self) -> int:
        return self.steps[self.emerged_index] if self.emerged else -1

    @property
    def emerged_epoch(self) -> float:
        return self.epochs[self.emerged_index] if self.emerged else math.nan


class TicketDetector:
    """Feed snapshots in order with :meth:`update`; ``detection`` holds the result so far.

    ``scores`` of a snapshot: {group name: (C,) scores} of the groups that are pruned (the same
    groups, in any order, at every snapshot)."""

    def __init__(self, criterion: str, window: int, threshold: float, ratio: float = 0.5, every: int = 0) -> None:
        if criterion not in CRITERIA:
            raise ValueError(f"ticket criterion {criterion!r} is not one of {', '.join(CRITERIA)}")
        if window < 1:
            raise ValueError(f"ticket window must be >= 1, got {window}")
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"early-bird ratio must be in (0, 1), got {ratio}")
        if every < 0:
            raise ValueError(f"ticket detection cadence must be >= 0 steps, got {every}")
        self.ratio, self.every, self._next = ratio, int(every), 0
        self.detection = Detection(criterion, int(window), float(threshold))
        self._fifo: deque = deque(maxlen=int(window))

    def _item(self, scores: dict[str, np.ndarray]):
        names = sorted(scores)
        if self.detection.criterion == "early_bird":
            return np.concatenate([keep_mask(scores[n], self.ratio) for n in names])
        return {n: np.asarray(scores[n], dtype=np.float64) for n in names}

    def _distance(self, new, old) -> float:
        if self.detection.criterion == "early_bird":
            return hamming(new, old)
        return max(filter_distance(new[n], old[n]) for n in new)

    def update(self, step: int, epoch: float, scores: dict[str, np.ndarray]) -> bool:
        """Add a snapshot; True exactly when the ticket is declared at this snapshot (the first
        time the criterion holds)."""
        if not scores:
            raise ValueError("ticket detection needs the scores of at least one filter group")
        d = self.detection
        if step < self._next:  # closer than ``every`` to the last snapshot used: skipped
            d.steps.append(int(step))
            d.epochs.append(float(epoch))
            d.distance.append(math.nan)
            return False
        if self.every > 0:
            self._next = (step // self.every + 1) * self.every
        item = self._item(scores)
        dist = math.nan
        if len(self._fifo) == d.window:
            dist = max(self._distance(item, old) for old in self._fifo)
        self._fifo.append(item)
        d.steps.append(int(step))
        d.epochs.append(float(epoch))
        d.distance.append(dist)
        holds = not math.isnan(dist) and (dist <= d.threshold if d.criterion == "early_bird" else dist < d.threshold)
        if holds and not d.emerged:
            d.emerged_index = len(d.steps) - 1
            return True
        return False


def detect(steps, epochs, histories: dict[str, np.ndarray], *, criterion: str, window: int, threshold: float,
           ratio: float = 0.5, every: int = 0) -> Detection:
    """The detection on a whole stored history: ``histories`` = {group: (T, C) scores}, row t
    taken at ``steps[t]`` / ``epochs[t]``; ``every``: the cadence in steps (module notes)."""
    det = TicketDetector(criterion, window, threshold, ratio, every)
    t = len(steps)
    for name, h in histories.items():
        if np.asarray(h).shape[0] != t:
            raise ValueError(f"group {name}: {np.asarray(h).shape[0]} snapshots, the index has {t}")
    for i in range(t):
        det.update(int(steps[i]), float(epochs[i]), {n: np.asarray(h)[i] for n, h in histories.items()})
    return det.detection
