"""Are two run files of the same job identical? Everything but wall-clock times must be.

Used by the resume and fault tests and by ``tools/fault_trials.py``: weights and buffers,
momentum, theta_0, masks, every column of ``/metrics``, ``/comm`` and ``/sparsity``, the snapshot
index and scores, the ticket detection (/ticket), the weight snapshots, progress, identity, mask attributes, and every rank's RNG
states, byte counters, running loss sums and buffers.
"""
from __future__ import annotations

import numpy as np
import torch

WALL_CLOCK = {"wall_time", "seconds", "comm_seconds"}  # the only fields two identical runs may differ in


def _same(x, y) -> bool:
    return x == y or (isinstance(x, float) and isinstance(y, float) and x != x and y != y)  # NaN == NaN


def _rows(what: str, ra: list[dict], rb: list[dict]) -> list[str]:
    if len(ra) != len(rb):
        return [f"{what}: {len(ra)} rows against {len(rb)}"]
    out = []
    for x, y in zip(ra, rb):
        for k in sorted(set(x) | set(y)):
            if k not in WALL_CLOCK and not _same(x.get(k), y.get(k)):
                out.append(f"{what} row {x.get('step', x.get('name'))}: {k} = {x.get(k)!r} against {y.get(k)!r}")
    return out


def _tensors(what: str, a: dict, b: dict) -> list[str]:
    if set(a) != set(b):
        return [f"{what}: tensors {sorted(set(a) ^ set(b))[:4]} in only one run"]
    return [f"{what}: {n} differs" for n in a if not torch.equal(a[n], b[n])]


def _ticket(ta: dict, tb: dict) -> list[str]:
    """The /ticket groups: every attribute and every criterion's distance series (NaN = NaN)."""
    ca, cb = ta.get("criteria", {}), tb.get("criteria", {})
    xa = {k: v for k, v in ta.items() if k != "criteria"}
    xb = {k: v for k, v in tb.items() if k != "criteria"}
    d = [f"/ticket: {k} = {xa.get(k)!r} against {xb.get(k)!r}" for k in sorted(set(xa) | set(xb))
         if not _same(xa.get(k), xb.get(k))]
    if set(ca) != set(cb):
        return d + [f"/ticket: criteria {sorted(ca)} against {sorted(cb)}"]
    for name in ca:
        for k in sorted(set(ca[name]) | set(cb[name])):
            x, y = ca[name].get(k), cb[name].get(k)
            same = np.array_equal(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64), equal_nan=True) \
                if k == "distance" else _same(x, y)
            if not same:
                d.append(f"/ticket/{name}: {k} differs")
    return d


def run_differences(a, b) -> list[str]:
    """Everything two RunFiles differ in, but wall-clock times (empty = the same run)."""
    d = []
    d += _tensors("model", a.model, b.model)
    d += _tensors("momentum", a.momentum, b.momentum)
    d += _tensors("init", a.init, b.init)
    d += _tensors("masks", a.masks, b.masks)
    d += _rows("/metrics", a.metrics, b.metrics)
    d += _rows("/comm", a.comm, b.comm)
    d += _rows("/sparsity", a.sparsity, b.sparsity)
    d += _rows("/coverage", a.coverage, b.coverage)
    if a.snap_index != b.snap_index:
        d.append("snapshot index differs")
    if set(a.snap_scores) != set(b.snap_scores):
        d.append("snapshot score groups differ")
    else:
        for g, per in a.snap_scores.items():
            for kind, rows in per.items():
                if not np.array_equal(np.stack(rows), np.stack(b.snap_scores[g][kind])):
                    d.append(f"snapshot scores {g}/{kind} differ")
    d += _ticket(a.ticket, b.ticket)
    for what in ("weight_snapshots", "identity", "mask_attrs", "world_size"):
        if getattr(a, what) != getattr(b, what):
            d.append(f"{what} differs")
    pa = {k: v for k, v in a.progress.items() if k not in WALL_CLOCK}
    pb = {k: v for k, v in b.progress.items() if k not in WALL_CLOCK}
    if pa != pb:
        d.append(f"progress differs: {pa} against {pb}")
    if len(a.ranks) != len(b.ranks):
        return d + [f"{len(a.ranks)} rank states against {len(b.ranks)}"]
    for r, (x, y) in enumerate(zip(a.ranks, b.ranks)):
        if not torch.equal(x["torch"], y["torch"]) or (x["numpy"], x["python"]) != (y["numpy"], y["python"]):
            d.append(f"rank {r}: RNG state differs")
        for k in ("bytes_sent", "bytes_received"):
            if x[k] != y[k]:
                d.append(f"rank {r}: {k} {x[k]} against {y[k]}")
        if not np.array_equal(x["run_stats"], y["run_stats"]):
            d.append(f"rank {r}: running loss sums differ")
        d += _tensors(f"rank {r} buffers", x["buffers"], y["buffers"])
    return d
