"""``loft-tools detect``: when did the ticket emerge? Offline ticket detection on a pretraining file.

    loft-tools detect PRETRAIN.h5 [--window W] [--threshold T] [--eb-threshold E] [--ratio P]
                                  [--csv OUT.csv] [--plot OUT.png]

Runs :func:`loft_hpc.metrics.ticket_detection.detect` for both criteria (``filter_distance``:
LoFT's normalised filter distance of every compared group below T against each of the previous W
snapshots; ``early_bird``: the normalised Hamming distance of the structured masks at pruning
ratio P at most E, You et al. 2020) on the file's ``/snapshots/scores/<group>/l2`` histories.

Parameters: the options, else the file's config (``train.ticket_window``, ``ticket_threshold``,
``ticket_eb_threshold``, ``ticket_ratio``), else this loft_hpc's defaults. Groups: those the
online detection compared (``/ticket`` attribute ``groups``) when the file has ``/ticket``, else
the groups LoFT partitions in the model rebuilt from the config
(:func:`~loft_hpc.metrics.ticket_detection.detection_groups`), else every stored group.

Prints one row per snapshot (step, epoch, the window distance of each criterion: the largest
distance between that snapshot and each of the previous W; NaN for the first W) and per criterion
the step, epoch and fraction of pretraining (step / total steps) at which the ticket emerged, or
"not detected". With ``/ticket`` in the file, the online result is printed beside it with
whether the two agree. ``--csv``: the table; ``--plot``: the window distances of both criteria
against the epoch, thresholds dashed, emergence marked.
"""
from __future__ import annotations

import csv
import json
import math

import numpy as np

from loft_hpc.config.steps import Step
from loft_hpc.metrics.ticket_detection import CRITERIA, detect, detection_groups
from loft_hpc.tools.reading import (ToolError, build_model, config_default, config_value, history, load_run,
                                    output_path, pyplot, run_label, save_figure, snapshot_axis,
                                    total_steps)

# option -> config key of the file (train section)
PARAMS = {"window": "train.ticket_window", "threshold": "train.ticket_threshold",
          "eb_threshold": "train.ticket_eb_threshold", "ratio": "train.ticket_ratio", "every": "train.ticket_every"}
WHAT = {"filter_distance": "the largest normalised filter distance over the groups",
        "early_bird": "the fraction of filters whose mask at ratio {ratio:g} differs"}
COLORS = {"filter_distance": "tab:blue", "early_bird": "tab:orange"}


def add_arguments(ap) -> None:
    ap.add_argument("run", help="pretraining file with filter-score snapshots (pretrain.h5 or its checkpoint)")
    ap.add_argument("--window", type=int, metavar="W",
                    help="snapshots each new one is compared with (default: the file's train.ticket_window)")
    ap.add_argument("--threshold", type=float, metavar="T",
                    help="filter_distance: every window distance below T (default: train.ticket_threshold)")
    ap.add_argument("--eb-threshold", type=float, metavar="E",
                    help="early_bird: every mask distance at most E (default: train.ticket_eb_threshold)")
    ap.add_argument("--ratio", type=float, metavar="P",
                    help="early_bird: pruning ratio of the compared masks (default: train.ticket_ratio)")
    ap.add_argument("--every", metavar="STEP",
                    help="cadence: compare snapshots about this far apart, e.g. 1ep or 20it; 0it = every snapshot "
                         "(default: train.ticket_every)")
    ap.add_argument("--csv", metavar="OUT", help="also write the table as CSV (step, epoch, one column per criterion)")
    ap.add_argument("--plot", metavar="OUT.png", help="also draw the window distances against the epoch")
    ap.add_argument("--dpi", type=int, default=130, help="resolution of --plot (default 130)")


# ------------------------------------------------------------------------------------ inputs
def parameters(rf, a) -> dict[str, tuple[float, str]]:
    """name -> (value, where it comes from): the option, the file's config, or the default."""
    out = {}
    for name, key in PARAMS.items():
        opt = getattr(a, name, None)
        if opt is not None:
            out[name] = (opt, "option")
            continue
        v = config_value(rf, key)
        out[name] = (v, "file config") if v is not None else (config_default(key), "default")
    w = out["window"][0]
    try:
        out["window"] = (int(w), out["window"][1])
        for k in ("threshold", "eb_threshold", "ratio"):
            out[k] = (float(out[k][0]), out[k][1])
    except (TypeError, ValueError):
        raise ToolError(f"{a.run}: ticket detection parameters in its config are not numbers ({w!r})") from None
    try:
        every = Step.parse(out["every"][0])
    except ValueError:
        raise ToolError(f"every {out['every'][0]!r} ({out['every'][1]}): not a step like '1ep' or '20it'") from None
    bpe = int(rf.progress.get("batches_per_epoch") or 0)
    if every.unit == "ep" and every.value and not bpe:
        raise ToolError(f"{a.run}: /progress has no batches_per_epoch to convert every={every}")
    out["every"] = (every.iterations(bpe), out["every"][1])
    if out["window"][0] < 1:
        raise ToolError(f"window {out['window'][0]} ({out['window'][1]}): must be >= 1")
    for k in ("threshold", "eb_threshold"):
        if not (out[k][0] > 0 and math.isfinite(out[k][0])):
            raise ToolError(f"{k.replace('_', '-')} {out[k][0]:g} ({out[k][1]}): must be > 0 and finite")
    if not 0.0 < out["ratio"][0] < 1.0:
        raise ToolError(f"ratio {out['ratio'][0]:g} ({out['ratio'][1]}): must be in (0, 1)")
    return out


def compared_groups(rf, path) -> tuple[list[str], str]:
    """The groups to compare and where that choice comes from."""
    if rf.ticket and rf.ticket.get("groups"):
        try:
            groups = [str(g) for g in json.loads(rf.ticket["groups"])]
        except (TypeError, ValueError):
            raise ToolError(f"{path}: /ticket attribute groups is not a JSON list") from None
        src = "the /ticket attribute groups (those the online detection compared)"
    else:
        built = build_model(rf)
        if built is not None:
            groups = detection_groups(built[0].filter_groups())
            src = "the groups LoFT partitions in the model rebuilt from the config"
        else:
            groups = sorted(rf.snap_scores)
            src = "every stored group (the model could not be rebuilt from the config)"
    missing = [g for g in groups if g not in rf.snap_scores]
    if missing:
        raise ToolError(f"{path}: no filter-score snapshots of group {', '.join(missing)} (from {src.split(' (')[0]})")
    if not groups:
        raise ToolError(f"{path}: no filter group to compare")
    return groups, src


def run_detection(rf, groups: list[str], params: dict) -> dict:
    """criterion -> :class:`~loft_hpc.metrics.ticket_detection.Detection` on the stored l2 histories."""
    ax = snapshot_axis(rf)
    hist = {g: history(rf, g, "l2") for g in groups}
    thresholds = {"filter_distance": params["threshold"][0], "early_bird": params["eb_threshold"][0]}
    return {c: detect(ax["step"], ax["epoch"], hist, criterion=c, window=params["window"][0],
                      threshold=thresholds[c], ratio=params["ratio"][0], every=params["every"][0]) for c in CRITERIA}


# ------------------------------------------------------------------------------------ output
def emergence_text(rf, d) -> str:
    if not d.emerged:
        finite = [x for x in d.distance if not math.isnan(x)]
        why = (f"fewer than {d.window + 1} snapshots" if not finite
               else f"smallest window distance {min(finite):.4f}, last {finite[-1]:.4f}")
        return f"not detected ({why})"
    total = total_steps(rf)
    frac = f", {d.emerged_step / total:.1%} of pretraining" if total else ""
    op = "<=" if d.criterion == "early_bird" else "<"
    return (f"emerged at step {d.emerged_step}{f' of {total}' if total else ''} (epoch {d.emerged_epoch:.2f}{frac}): "
            f"window distance {d.distance[d.emerged_index]:.4f} {op} {d.threshold:g}")


def table_lines(dets: dict) -> list[str]:
    ref = dets[CRITERIA[0]]
    lines = [f"{'step':>8} {'epoch':>7} " + " ".join(f"{c:>16}" for c in CRITERIA)]
    for i, step in enumerate(ref.steps):
        marks = [c for c in CRITERIA if dets[c].emerged_index == i]
        row = f"{step:>8d} {ref.epochs[i]:>7.2f} " + " ".join(f"{dets[c].distance[i]:>16.4f}" for c in CRITERIA)
        lines.append(row + (f"  <- ticket: {', '.join(marks)}" if marks else ""))
    return lines


def online_lines(rf, dets: dict, params: dict) -> tuple[list[str], bool]:
    """The /ticket record beside the offline result; whether every criterion agrees."""
    tk = rf.ticket
    crit = tk.get("criteria") or {}
    lines = [f"online (/ticket): deciding criterion {tk.get('criterion', '?')}, window {tk.get('window', '?')}, "
             f"stopped early: {'yes' if int(tk.get('stopped_early', 0)) else 'no'}"]
    agree, other_params = True, False
    for c in CRITERIA:
        d = dets[c]
        on = crit.get(c) or (tk if tk.get("criterion") == c else None)
        if on is None:
            lines.append(f"  {c:<16} online: not recorded")
            continue
        step = int(on.get("emerged_step", -1))
        on_text = "not detected" if step < 0 else f"step {step} (epoch {float(on.get('emerged_epoch', math.nan)):.2f})"
        off_text = "not detected" if not d.emerged else f"step {d.emerged_step} (epoch {d.emerged_epoch:.2f})"
        same = step == d.emerged_step
        extra = ""
        dist = np.asarray(on.get("distance", []), dtype=np.float64)
        if dist.size == len(d.distance) and dist.size:
            mine = np.asarray(d.distance, dtype=np.float64)
            nan_same = bool(np.array_equal(np.isnan(dist), np.isnan(mine)))
            both = ~np.isnan(dist) & ~np.isnan(mine)
            dev = float(np.max(np.abs(dist[both] - mine[both]))) if both.any() else 0.0
            extra = f"; window distances {'equal' if nan_same and dev <= 1e-9 else 'differ'} (max difference {dev:.2g})"
        elif dist.size:
            extra = f"; online distances for {dist.size} snapshots, {len(d.distance)} here"
        online_every = int(tk.get("every", 0))  # files written before the cadence used every snapshot
        params_same = (int(on.get("window", -1)) == d.window
                       and math.isclose(float(on.get("threshold", math.nan)), d.threshold, rel_tol=1e-9)
                       and online_every == params["every"][0])
        if not params_same:
            other_params = True
            extra += (f" (online window {on.get('window', '?')}, threshold {_num(on.get('threshold', '?'))}, every "
                      f"{online_every} steps: not the ones used here)")
        lines.append(f"  {c:<16} online {on_text}, offline {off_text}: {'agree' if same else 'DIFFER'}{extra}")
        agree &= same
    if abs(float(tk.get("ratio", params["ratio"][0])) - params["ratio"][0]) > 1e-12:
        other_params = True
        lines.append(f"  (online early-bird ratio {_num(tk.get('ratio'))}, {params['ratio'][0]:g} here)")
    lines.append("offline and online detection " + ("agree" if agree else "DIFFER")
                 + (" (with other parameters than the online detection's)" if other_params else ""))
    return lines, agree


def _num(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def write_csv(path: str, dets: dict) -> None:
    p = output_path(path, "--csv")
    ref = dets[CRITERIA[0]]
    try:
        with open(p, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["step", "epoch"] + list(CRITERIA))
            for i, step in enumerate(ref.steps):
                w.writerow([step, f"{ref.epochs[i]:.6g}"] + [f"{dets[c].distance[i]:.6f}" for c in CRITERIA])
    except OSError as e:
        raise ToolError(f"--csv {p}: cannot be written ({e.strerror or e.__class__.__name__})") from None


def detection_figure(rf, dets: dict, title: str, ratio: float):
    """Two panels (the criteria's scales differ), epoch on x: each window distance, its threshold
    dashed, both emergence points as vertical lines (solid: the panel's criterion), the snapshots
    without a full window shaded."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 1, figsize=(8.4, 6.8), sharex=True, constrained_layout=True)
    ylabels = {"filter_distance": "window distance\n(filter distance: 0 = same ranking)",
               "early_bird": "window distance\n(fraction of filters masked differently)"}
    for ax, c in zip(axes, CRITERIA):
        d = dets[c]
        x, y = np.asarray(d.epochs), np.asarray(d.distance, dtype=np.float64)
        nan = np.isnan(y)
        # snapshots skipped by the cadence (train.ticket_every) have no distance: join the used ones
        ax.plot(x[~nan], y[~nan], "-o", ms=3.5, lw=1.6, color=COLORS[c], label=f"{c} window distance")
        op = "<=" if c == "early_bird" else "<"
        ax.axhline(d.threshold, color=COLORS[c], ls="--", lw=1.1, label=f"threshold ({op} {d.threshold:g})")
        for other in CRITERIA:
            o = dets[other]
            if o.emerged:
                ax.axvline(o.emerged_epoch, color=COLORS[other], ls="-" if other == c else ":", lw=1.4, alpha=0.85,
                           label=f"{other}: ticket at epoch {o.emerged_epoch:.2f} (step {o.emerged_step})")
        if nan.any() and len(x) > 1:  # before the first full window: nothing to compare with yet
            end = x[int(np.flatnonzero(~nan)[0])] if (~nan).any() else x[-1]
            ax.axvspan(x[0], end, color="0.85", alpha=0.6, lw=0, label=f"no full window of W = {d.window} compared snapshots yet")
        if not d.emerged:
            ax.text(0.01, 0.97, f"{c}: not detected", transform=ax.transAxes, ha="left", va="top", fontsize=9,
                    color=COLORS[c])
        finite = y[~nan]
        top = max([d.threshold] + ([float(finite.max())] if finite.size else []))
        ax.set_ylim(0, 1.15 * top)
        ax.set_ylabel(ylabels[c], fontsize=9)
        ax.set_title(f"{c}: {WHAT[c].format(ratio=ratio)}, against each of the previous W = {d.window}",
                     fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7.5, loc="best", framealpha=0.85)
    if len(dets[CRITERIA[0]].epochs) > 1:
        e = dets[CRITERIA[0]].epochs
        pad = 0.02 * (e[-1] - e[0])
        axes[-1].set_xlim(e[0] - pad, e[-1] + pad)
    axes[-1].set_xlabel("epoch of pretraining")
    fig.suptitle(title, fontsize=10.5)
    return fig


# ------------------------------------------------------------------------------------------ run
def run(a) -> int:
    rf = load_run(a.run, needs=("pretraining", "snapshots"))
    params = parameters(rf, a)
    groups, src = compared_groups(rf, a.run)
    try:
        dets = run_detection(rf, groups, params)
    except ValueError as e:
        raise ToolError(f"{a.run}: {e}") from None
    total = total_steps(rf)
    print(f"run: {a.run} ({rf.stage}, {rf.arch}, {rf.world_size} rank(s), {len(rf.snap_index)} snapshots, "
          f"{total if total else '?'} steps of pretraining)")
    print(f"groups ({len(groups)}, l2 scores; {src}): {', '.join(groups)}")
    print(f"window {params['window'][0]} ({params['window'][1]}); filter_distance threshold "
          f"{params['threshold'][0]:g} ({params['threshold'][1]}); early_bird threshold {params['eb_threshold'][0]:g} "
          f"({params['eb_threshold'][1]}), ratio {params['ratio'][0]:g} ({params['ratio'][1]}); every "
          f"{params['every'][0]} steps ({params['every'][1]})")
    print("window distance: the largest distance between a snapshot and each of the previous W (nan: fewer before it)")
    for line in table_lines(dets):
        print(line)
    for c in CRITERIA:
        print(f"{c}: {emergence_text(rf, dets[c])}")
    if rf.ticket:
        for line in online_lines(rf, dets, params)[0]:
            print(line)
    else:
        print("online: no /ticket in this file")
    if a.csv:
        write_csv(a.csv, dets)
        print(f"wrote {a.csv}")
    if a.plot:
        title = (f"{run_label(a.run)}: ticket detection ({rf.arch}, {rf.world_size} rank(s), "
                 f"{len(groups)} groups, {len(rf.snap_index)} snapshots)")
        save_figure(detection_figure(rf, dets, title, params["ratio"][0]), a.plot, "--plot", a.dpi)
        print(f"wrote {a.plot}")
    return 0
