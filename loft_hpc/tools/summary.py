"""``loft-tools summary``: what one loft_hpc file holds, in one screen.

    loft-tools summary RUN.h5

Any file of any stage (pretraining, ticket, retraining, a checkpoint or a weight snapshot):

- the file: stage, complete or not (a checkpoint), arch, ranks, seed, when and by which loft_hpc;
- the key config values: pretraining method, K, duration, learning rate, data, the prune settings;
- progress: step of total steps, round, epoch, wall time;
- snapshots: how many, their step and epoch range, the groups, the full-weight snapshots;
- masks (ticket and retraining files): their attributes (ratio, method, scope, mask_from, rewind,
  ...) and the sparsity, overall and per tensor (from /sparsity, else counted in /masks);
- accuracies from /metrics: the best and the last test_acc and train_acc, each with its step;
- ticket detection (/ticket of pretraining files): per criterion the step and epoch at which the
  ticket emerged and which fraction of pretraining that is, or "not detected"; the deciding
  criterion, window, thresholds and whether pretraining stopped there;
- communication: payload sent and received over all ranks (the last /metrics row), per rank (the
  /ranks counters) and per collective (allgather / allreduce / p2p, the sums of /comm), and the
  bytes over all links (the fair convention, from /comm).
"""
from __future__ import annotations

import json
import math

import numpy as np

from loft_hpc.tools.reading import (config_dict, load_run, root_attrs, snapshot_axis, step_epoch, total_steps)

MASK_ATTR_ORDER = ("ratio", "method", "scope", "levels", "level", "mask_from", "mask_from_step", "rewind",
                   "rewind_step", "pruned_fraction", "control", "control_seed")


def add_arguments(ap) -> None:
    ap.add_argument("run", help="loft_hpc file of any stage (pretrain.h5, prune/ticket files, retrain_*.h5, "
                                "checkpoints, weight snapshots)")


def _num(v) -> str:
    """A config or attribute value as text (floats without noise)."""
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:g}"
    return str(v)


def _bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{int(n):,} B ({n / size:.2f} {unit})"
    return f"{int(n):,} B"


def _at(rf, step) -> str:
    ep = step_epoch(rf, int(step))
    return f"step {int(step)}" + ("" if math.isnan(ep) else f" (epoch {ep:.2f})")


# ---------------------------------------------------------------------------------- sections
def file_lines(path, rf) -> list[str]:
    attrs = root_attrs(path)
    state = "complete (the stage's final file)" if rf.complete else "incomplete (a checkpoint, or an interrupted stage)"
    out = [f"file: {path}",
           f"  stage {rf.stage}, {state}",
           f"  arch {rf.arch}, world size {rf.world_size}, seed {rf.seed}"]
    made = []
    if attrs.get("created"):
        made.append(f"created {attrs['created']}")
    try:
        import yaml

        versions = yaml.safe_load(attrs.get("versions", "")) or {}
    except Exception:  # noqa: BLE001 - informative only
        versions = {}
    if isinstance(versions, dict) and versions.get("loft_hpc"):
        made.append(f"by loft_hpc {versions['loft_hpc']} (torch {versions.get('torch', '?')})")
    made.append(f"format version {attrs.get('format_version', '?')}")
    out.append("  " + ", ".join(made))
    if rf.identity.get("kind"):
        inputs = ", ".join(sorted(rf.identity.get("inputs", {}))) or "none"
        out.append(f"  identity: {rf.identity['kind']}; input files: {inputs}")
    return out


def config_lines(rf) -> list[str]:
    cfg = config_dict(rf)
    if not cfg:
        return ["config: (not readable as YAML)"]
    t, p, r, d = (cfg.get(s) or {} for s in ("train", "prune", "retrain", "data"))

    def g(sec, key):
        return _num(sec[key]) if key in sec else "?"

    method = t.get("method", "?")
    line = f"  train: method {method}"
    if method == "loft":
        line += f", K {g(t, 'local_steps')} (train.local_steps), momentum {g(t, 'momentum_mode')}"
    line += (f", duration {g(t, 'duration')}, lr {g(t, 'lr')} ({g(t, 'schedule')}), "
             f"batch {g(d, 'batch_size')} {'global (split into micro-batches)' if method == 'gpipe' else 'per rank'}, "
             f"data {g(d, 'name')}")
    prune = (f"  prune: {g(p, 'method')} {g(p, 'scope')}, ratios {g(p, 'ratios')}, levels {g(p, 'levels')}, "
             f"mask_from {g(p, 'mask_from')}, rewind {g(p, 'rewind')}; retrain: duration {g(r, 'duration')}")
    ticket = (f"  ticket detection: criterion {g(t, 'ticket_criterion')}, window {g(t, 'ticket_window')}, "
              f"threshold {g(t, 'ticket_threshold')}, early-bird threshold {g(t, 'ticket_eb_threshold')}, "
              f"ratio {g(t, 'ticket_ratio')}, stop_at_ticket {g(t, 'stop_at_ticket')}")
    return ["config:", line, prune, ticket]


def progress_lines(rf) -> list[str]:
    pr = rf.progress
    if not pr:
        return ["progress: (none recorded)"]
    step, total = pr.get("step"), total_steps(rf)
    text = f"progress: step {step}"
    if total:
        text += f" of {total} ({int(step or 0) / total:.0%})"
    parts = [text]
    if "round" in pr:
        parts.append(f"round {pr['round']}")
    ep = step_epoch(rf, int(step or 0))
    if not math.isnan(ep):
        parts.append(f"epoch {ep:.2f} ({pr['batches_per_epoch']} batches per epoch)")
    if "wall_time" in pr:
        parts.append(f"wall time {float(pr['wall_time']):.1f} s")
    if "requested" in pr:
        parts.append(f"weight snapshot requested as {pr['requested']}")
    return [", ".join(parts)]


def snapshot_lines(rf) -> list[str]:
    n = len(rf.snap_index)
    if n == 0:
        out = ["snapshots: none (no /snapshots/index rows)"]
    else:
        ax = snapshot_axis(rf)
        kinds = sorted({k for per in rf.snap_scores.values() for k in per})
        out = [f"snapshots: {n} (steps {int(ax['step'][0])}..{int(ax['step'][-1])}, epochs {ax['epoch'][0]:.2f}.."
               f"{ax['epoch'][-1]:.2f}), {len(rf.snap_scores)} filter group(s), scores {', '.join(kinds) or 'none'}"]
    if rf.weight_snapshots:
        items = ", ".join(f"{k} -> {v}" for k, v in sorted(rf.weight_snapshots.items()))
        out.append(f"  weight snapshots ({len(rf.weight_snapshots)}): {items}")
    else:
        out.append("  weight snapshots: none")
    if rf.coverage:
        fr = [float(c["trained_fraction"]) for c in rf.coverage]
        out.append(f"  coverage: {len(fr)} sliced tensor(s), trained fraction per round {min(fr):.3f}..{max(fr):.3f}")
    return out


def sparsity_rows(rf) -> list[dict]:
    """/sparsity rows, else counted from /masks."""
    if rf.sparsity:
        return [{"name": r["name"], "kept": int(r["kept"]), "total": int(r["total"])} for r in rf.sparsity]
    return [{"name": n, "kept": int(m.sum()), "total": int(m.numel())} for n, m in sorted(rf.masks.items())]


def mask_lines(rf) -> list[str]:
    if not rf.masks and not rf.sparsity:
        return ["masks: none (a dense file)"]
    keys = [k for k in MASK_ATTR_ORDER if k in rf.mask_attrs] + sorted(set(rf.mask_attrs) - set(MASK_ATTR_ORDER))
    attrs = ", ".join(f"{k} {_num(rf.mask_attrs[k])}" for k in keys) or "no attributes"
    rows = sparsity_rows(rf)
    kept, total = sum(r["kept"] for r in rows), sum(r["total"] for r in rows)
    src = "/sparsity" if rf.sparsity else "/masks"
    out = [f"masks: {len(rf.masks)} tensor(s); {attrs}",
           f"  sparsity ({src}): kept {kept:,} of {total:,} masked weights, pruned {1 - kept / total if total else 0:.2%}"]
    w = max([len(r["name"]) for r in rows] + [6])
    out.append(f"  {'tensor':<{w}} {'kept':>12} {'total':>12} {'pruned':>8}")
    for r in rows:
        pruned = 1 - r["kept"] / r["total"] if r["total"] else 0.0
        out.append(f"  {r['name']:<{w}} {r['kept']:>12,} {r['total']:>12,} {pruned:>8.2%}")
    return out


def accuracy_lines(rf) -> list[str]:
    if not rf.metrics:
        return ["accuracy: no /metrics rows (no evaluation recorded)"]
    out = [f"accuracy (/metrics, {len(rf.metrics)} evaluation(s)):"]
    for key in ("test_acc", "train_acc"):
        rows = [m for m in rf.metrics if m.get(key) is not None and np.isfinite(m[key])]
        if not rows:
            out.append(f"  {key:<9}  (not measured)")
            continue
        best = max(rows, key=lambda m: m[key])  # the first of equal bests
        last = rows[-1]
        out.append(f"  {key:<9}  best {best[key]:.4f} at {_at(rf, best['step'])}; "
                   f"last {last[key]:.4f} at {_at(rf, last['step'])}")
    return out


def ticket_lines(rf) -> list[str]:
    tk = rf.ticket
    if not tk:
        return ["ticket detection: no /ticket (not a pretraining file, or one written without detection)"]
    total = total_steps(rf)
    try:
        groups = json.loads(tk.get("groups", "[]"))
    except (TypeError, ValueError):
        groups = []
    out = [f"ticket detection (/ticket): deciding criterion {tk.get('criterion', '?')}, score {tk.get('score', '?')}, "
           f"window {tk.get('window', '?')}, stopped early: {'yes' if int(tk.get('stopped_early', 0)) else 'no'}",
           f"  groups compared ({len(groups)}): {', '.join(groups) if groups else '?'}; early-bird ratio "
           f"{_num(tk.get('ratio', '?'))}"]
    crit = dict(tk.get("criteria") or {})
    if not crit and "criterion" in tk:
        crit = {tk["criterion"]: tk}
    out.append(f"  {'criterion':<16} {'window':>6} {'threshold':>9}  emerged")
    for name in sorted(crit, key=lambda c: (c != tk.get("criterion"), c)):
        c = crit[name]
        step = int(c.get("emerged_step", -1))
        if step < 0:
            when = "not detected"
        else:
            ep = float(c.get("emerged_epoch", math.nan))
            frac = f", {step / total:.1%} of pretraining" if total else ""
            when = f"step {step} (epoch {ep:.2f}{frac})"
        mark = " (deciding)" if name == tk.get("criterion") else ""
        out.append(f"  {name:<16} {_num(c.get('window', '?')):>6} {_num(c.get('threshold', '?')):>9}  {when}{mark}")
    return out


def comm_lines(rf) -> list[str]:
    out = ["communication:"]
    if rf.metrics:
        m = rf.metrics[-1]
        out.append(f"  all ranks (last /metrics row, {_at(rf, m['step'])}): sent {_bytes(m.get('bytes_sent', 0))}, "
                   f"received {_bytes(m.get('bytes_received', 0))}")
    else:
        out.append("  all ranks: no /metrics rows")
    counted = [(q, st) for q, st in enumerate(rf.ranks) if "bytes_sent" in st]
    for q, st in counted:
        secs = st.get("comm_seconds")
        out.append(f"  rank {q} (/ranks/{q}): sent {_bytes(st['bytes_sent'])}, received "
                   f"{_bytes(st.get('bytes_received', 0))}" + (f", {float(secs):.2f} s in collectives" if secs is not None else ""))
    if not counted:
        out.append("  per rank: no /ranks counters in this file")
    if rf.comm:
        from loft_hpc.train.ledger import KINDS as kinds  # files from before a kind existed read it as 0

        s = {f"{k}_{d}": sum(int(r.get(f"{k}_{d}", 0)) for r in rf.comm) for k in kinds for d in ("sent", "received")}
        out.append(f"  /comm ({len(rf.comm)} rows): " + "; ".join(
            f"{k} sent {_bytes(s[k + '_sent'])}, received {_bytes(s[k + '_received'])}" for k in kinds
            if k in ("allgather", "allreduce") or s[k + "_sent"] or s[k + "_received"]))
        from loft_hpc.exchange.accounting import comm_link_bytes

        try:
            links = _bytes(comm_link_bytes(rf.comm, rf.world_size))
        except ValueError as e:  # a hand-edited or damaged table
            links = f"not countable ({e})"
        out.append(f"  over all links (the fair convention, each byte once per link it crosses): {links}")
    else:
        out.append("  /comm: no rows")
    return out


def run(a) -> int:
    rf = load_run(a.run)
    lines = file_lines(a.run, rf) + config_lines(rf) + progress_lines(rf) + snapshot_lines(rf) + mask_lines(rf) \
        + accuracy_lines(rf) + ticket_lines(rf) + comm_lines(rf)
    print("\n".join(lines))
    return 0
