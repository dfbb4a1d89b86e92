"""The LoFT paper's filter distance between two rankings of one layer's filters (LOFT_SPEC section 5).

Rankings. ``ranking(scores)`` lists the filter indices by score, largest first: entry ``i - 1`` is
the filter at rank ``i`` (rank 1 = largest score). For one score vector on its own, equal scores
are ordered by filter index (a stable sort), so the ranking is a pure function of the scores. The
distance does not use that rule for ties (see "Ties" below).

Distance. ``R`` is the ranking of a *reference* score vector (e.g. the final / winning ticket), ``R^``
the ranking at a *snapshot*; ``sigma(i)`` is the rank in ``R^`` of the filter that has rank ``i`` in
``R``. Then

    F(sigma) = sum_{i=1..C} (1/i) |ln i - ln sigma(i)|

``|ln i - ln sigma(i)|`` grows with how far (in ratio) a filter moved and ``1/i`` weights the filters
the *reference* ranks highest most: a swap of the top two filters costs ``ln 2 (1 + 1/2) = 1.04``, a
swap of the bottom two of 64 about ``(1/63 + 1/64) ln(64/63) = 0.0005``.

F is not symmetric. Exchanging the roles gives ``F(sigma^-1)``, which weights by the *snapshot's*
ranks instead. In this module the first argument is always the reference: ``filter_distance(ref,
snap)`` and ``distance_matrix(h)[a, b] = filter_distance(h[a], h[b])`` (row ``a`` = reference,
column ``b`` = the snapshot compared with it), i.e. "how well does snapshot b keep the filters that
snapshot a ranks first".

Normalisation (``normalize=True``, the default). The paper compares layers of different widths but
does not say how it normalises. Here F is divided by the value of the *reversed* ranking,
``sigma(i) = C + 1 - i``, of the same width C (``reversed_distance(C)``): 0 = identical ranking,
1 = the reference order turned upside down. The reversed ranking is **not** the maximum of F: F
is a linear assignment problem and its maximiser moves the top few filters to the bottom and keeps
the rest in order (for C = 3: sigma = (3, 1, 2), F = 1.580 vs 1.465 reversed). The normalised
value is therefore a scale, not a bound: it can exceed 1, by at most the ratio max F / F(reversed),
which is 1 for C <= 2, 1.079 for C = 3 (the largest for every C <= 512, checked with a linear
assignment solver), 1.036 (C = 16), 1.026 (C = 64), 1.022 (C = 128), 1.015 (C = 512). The
reversed ranking was chosen over the exact maximum because it has a closed form, is the natural
"opposite ranking", needs no assignment solver, and is within 8% (3.1% for C >= 32) of the maximum.
For C = 1 there is only one ranking and the distance is defined as 0.

Ties. A pruned ticket gives all its pruned filters the score 0 (and any two filters can tie), so
the order among tied filters carries no information. Rule: **a tie is never counted as a
disagreement**. In each ranking, filters with equal scores are ordered as the *other* score vector
orders them; filters tied in both are ordered by filter index, which cannot change F (they have the
same scores in both vectors, so exchanging them exchanges their labels only). Equivalently: of all
the ways to order the tied filters of both rankings, F is taken at one that orders every pair the
way the other ranking does wherever one of the two has a tie, i.e. with the fewest discordant pairs;
all such ways give the same F (tested by brute force). Consequences:

- F = 0 exactly when no pair of filters is ordered strictly oppositely by the two score vectors: a
  ticket (pruned filters at 0) against the weights it was pruned from (the same order of its kept
  filters, the pruned ones below them in any order) is at distance 0;
- F does not depend on how the filters are numbered (the index order of the old rule did);
- a tie block costs nothing among its own members; its members still count where the other
  ranking puts them above or below filters outside the block. Against a reference with a tie
  block, a random ranking therefore scores below ``chance_distance(C)`` (the block's internal
  order is adopted from the snapshot).

Chance level. ``chance_distance(C)`` is the expected (normalised) distance of a uniformly random
ranking: E F = sum_i (1/i) (1/C) sum_j |ln i - ln j|. Normalised it is 0.50 (C = 2), 0.71 (C = 16),
0.75 (C = 64), 0.79 (C = 512): distances near it mean "no relation between the two rankings".

Pure numpy; scores may be any real array of shape ``(C,)`` without NaNs.
"""
from __future__ import annotations

import numpy as np

__all__ = ["ranking", "rank_positions", "filter_distance", "distance_matrix", "distance_to_reference",
           "reversed_distance", "chance_distance"]


def _scores(x, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D score vector, got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"{name}: empty score vector")
    a = a.astype(np.float64, copy=False)
    if np.isnan(a).any():
        raise ValueError(f"{name}: scores contain NaN")
    return a


def _history(h, name: str = "history") -> np.ndarray:
    a = np.asarray(h)
    if a.ndim != 2 or a.shape[1] == 0:
        raise ValueError(f"{name}: expected an array of shape (T, C) with C >= 1, got shape {a.shape}")
    a = a.astype(np.float64, copy=False)
    if np.isnan(a).any():
        raise ValueError(f"{name}: scores contain NaN")
    return a


def ranking(scores) -> np.ndarray:
    """Filter indices sorted by score, largest first (ties: lower filter index first).

    ``ranking(s)[i - 1]`` is the filter with rank ``i``. For a ``(T, C)`` array, one ranking per row.
    """
    a = np.asarray(scores, dtype=np.float64)
    if a.ndim == 1:
        a = _scores(a, "scores")
    elif a.ndim == 2:
        a = _history(a, "scores")
    else:
        raise ValueError(f"scores: expected shape (C,) or (T, C), got {a.shape}")
    return np.argsort(-a, axis=-1, kind="stable")


def rank_positions(scores) -> np.ndarray:
    """The 1-based rank of every filter: ``rank_positions(s)[f]`` = rank of filter ``f`` (the
    inverse permutation of :func:`ranking`). Accepts ``(C,)`` or ``(T, C)``."""
    order = ranking(scores)
    pos = np.empty_like(order)
    c = order.shape[-1]
    ranks = np.arange(1, c + 1)
    np.put_along_axis(pos, order, np.broadcast_to(ranks, order.shape), axis=-1)
    return pos


def _weights(c: int) -> tuple[np.ndarray, np.ndarray]:
    i = np.arange(1, c + 1, dtype=np.float64)
    return 1.0 / i, np.log(i)


def _raw_from_sigma(sigma: np.ndarray) -> np.ndarray:
    """F for ``sigma`` of shape (..., C) holding 1-based ranks."""
    w, li = _weights(sigma.shape[-1])
    return (w * np.abs(li - np.log(sigma.astype(np.float64)))).sum(axis=-1)


def reversed_distance(c: int) -> float:
    """F of the reversed ranking of ``c`` filters (the normaliser); 0 for ``c == 1``."""
    if c < 1:
        raise ValueError(f"number of filters must be >= 1, got {c}")
    return float(_raw_from_sigma(np.arange(c, 0, -1)))


def chance_distance(c: int, normalize: bool = True) -> float:
    """Expected distance between a fixed reference and a uniformly random ranking of ``c`` filters."""
    if c < 1:
        raise ValueError(f"number of filters must be >= 1, got {c}")
    if c == 1:
        return 0.0
    w, li = _weights(c)
    raw = float((w * np.abs(li[:, None] - li[None, :]).mean(axis=1)).sum())
    return raw / reversed_distance(c) if normalize else raw


def _normalise(raw, c: int, normalize: bool):
    if not normalize:
        return raw
    if c == 1:
        return raw * 0.0
    return raw / reversed_distance(c)


def filter_distance(ref_scores, snap_scores, normalize: bool = True) -> float:
    """F(sigma) between the ranking of ``ref_scores`` (the reference R) and of ``snap_scores`` (R^),
    ties ordered as the other vector orders them (module notes, "Ties").

    ``normalize``: divide by :func:`reversed_distance` of the width (see the module notes: a scale
    in which reversed = 1, not an upper bound)."""
    ref = _scores(ref_scores, "ref_scores")
    snap = _scores(snap_scores, "snap_scores")
    if ref.shape != snap.shape:
        raise ValueError(f"ref_scores has {ref.size} filters, snap_scores {snap.size}")
    return float(_normalise(_raw_from_sigma(_sigma(ref, snap)), ref.size, normalize))


def _order_by(primary: np.ndarray, secondary: np.ndarray) -> np.ndarray:
    """Indices sorted by ``primary`` descending, ties by ``secondary`` descending, then by index
    (along the last axis; the two arrays broadcast)."""
    primary, secondary = np.broadcast_arrays(primary, secondary)
    return np.lexsort((-secondary, -primary), axis=-1)  # lexsort is stable: index order last


def _positions(order: np.ndarray) -> np.ndarray:
    pos = np.empty_like(order)
    np.put_along_axis(pos, order, np.broadcast_to(np.arange(1, order.shape[-1] + 1), order.shape), axis=-1)
    return pos


def _sigma(ref: np.ndarray, snap: np.ndarray) -> np.ndarray:
    """sigma(i) for every reference rank i, ties broken by the other vector (module notes, "Ties");
    ``ref`` and ``snap`` broadcast to (..., C)."""
    ref_order = _order_by(ref, snap)
    snap_pos = _positions(_order_by(snap, ref))
    return np.take_along_axis(snap_pos, ref_order, axis=-1)


def _has_ties(h: np.ndarray) -> np.ndarray:
    """Per row of a (T, C) array: does any score occur twice?"""
    return (np.diff(np.sort(h, axis=-1), axis=-1) == 0).any(axis=-1)


def distance_to_reference(history, ref, normalize: bool = True) -> np.ndarray:
    """``out[t] = filter_distance(ref, history[t])`` for a ``(T, C)`` history and a ``(C,)`` reference."""
    h = _history(history)
    r = _scores(ref, "ref")
    if r.size != h.shape[1]:
        raise ValueError(f"reference has {r.size} filters, history rows have {h.shape[1]}")
    sigma = _sigma(r[None, :], h)  # (T, C): rank at snapshot t of the reference's rank-i filter
    return _normalise(_raw_from_sigma(sigma), r.size, normalize)


def distance_matrix(history, normalize: bool = True) -> np.ndarray:
    """``D[a, b] = filter_distance(history[a], history[b])`` for every pair of rows of a ``(T, C)``
    history: row ``a`` is the reference, column ``b`` the snapshot. Zero diagonal; not symmetric."""
    h = _history(history)
    order = ranking(h)          # (T, C); without ties in a pair, the index rule is never used
    pos = rank_positions(h)     # (T, C)
    tied = np.nonzero(_has_ties(h))[0]
    t = h.shape[0]
    out = np.empty((t, t), dtype=np.float64)
    for a in range(t):
        if a in tied:  # the reference's tie order depends on each snapshot
            out[a] = _raw_from_sigma(_sigma(h[a][None, :], h))
            continue
        sigma = pos[:, order[a]]
        if tied.size:  # snapshots with ties: their tie order follows reference a
            sigma[tied] = _sigma(h[a][None, :], h[tied])
        out[a] = _raw_from_sigma(sigma)
    return _normalise(out, h.shape[1], normalize)
