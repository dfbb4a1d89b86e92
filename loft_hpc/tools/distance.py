"""``loft-tools distance``: filter distance of every snapshot of a run to a reference ranking
(LOFT_SPEC section 5).

    loft-tools distance RUN.h5 [--group NAME ...] [--score l2|l1] [--reference last|FILE.h5]
                               [--raw] [--csv OUT.csv] [--plot OUT.png]

For each filter group stored under ``/snapshots/scores`` of RUN.h5 (a pretraining file, or a
checkpoint of one), the distance (:mod:`loft_hpc.metrics.filter_distance`) between the reference
ranking and the ranking at each snapshot, one row per snapshot with its step, round and epoch.

Reference: ``last`` (default) = the last snapshot of RUN.h5, i.e. the ranking of the final
weights, which are the ones the winning ticket is pruned from; ``FILE.h5`` = the scores of the
final weights (``/model``) of another loft_hpc file with the same model, e.g. a retrained ticket
(``retrain_p50.h5``) or another run's ``pretrain.h5``; pruned filters of a ticket score 0 and rank
last, and a tie never counts as a disagreement (tied filters take the snapshot's order, see the
metric's notes): a ticket is at distance 0 from the weights it was pruned from. Distances are
normalised by the reversed ranking (0 = same order, 1 = reversed, see the metric's notes);
``--raw`` prints F itself. The ``random`` line gives the expected distance of a random ranking of
that width. ``--plot``: the same distances against the epoch, one line per group.
"""
from __future__ import annotations

import csv

import numpy as np

from loft_hpc.metrics.filter_distance import chance_distance, distance_to_reference
from loft_hpc.tools.reading import (SCORE_TEXT, ToolError, build_model, group_info, history, load_run,
                                    output_path, pyplot, require_snapshots, run_label, save_figure, select_groups,
                                    snapshot_axis)


def add_arguments(ap) -> None:
    ap.add_argument("run", help="loft_hpc run file with filter-score snapshots (pretrain.h5 or a checkpoint)")
    ap.add_argument("--group", action="append", metavar="NAME", help="filter group (repeatable; default: all)")
    ap.add_argument("--score", choices=("l2", "l1"), default="l2",
                    help="filter score that ranks the filters: squared L2 norm (default, as pruning) or L1 norm")
    ap.add_argument("--reference", default="last", metavar="last|FILE.h5",
                    help="reference ranking: the run's last snapshot (default) or the final weights of FILE.h5")
    ap.add_argument("--raw", action="store_true", help="print F itself instead of F / F(reversed ranking)")
    ap.add_argument("--csv", metavar="OUT", help="also write the table as CSV (step, round, epoch, one column per group)")
    ap.add_argument("--plot", metavar="OUT.png", help="also draw the distances against the epoch (PNG, or any "
                                                       "matplotlib format by suffix)")
    ap.add_argument("--dpi", type=int, default=130, help="resolution of --plot (default 130)")


# ------------------------------------------------------------------------------------ reference
def reference_scores(rf, reference: str, groups: list[str], score: str, path=None) -> tuple[dict[str, np.ndarray], str]:
    """Per group the reference score vector, and a line describing the reference."""
    if reference == "last":
        require_snapshots(rf, path)
        step, _, _ = rf.snap_index[-1]
        ep = snapshot_axis(rf)["epoch"][-1]
        return ({g: history(rf, g, score, path)[-1] for g in groups},
                f"last snapshot (step {step}, epoch {ep:.2f}): the final ranking")
    other = load_run(reference)
    built = build_model(other) or build_model(rf)
    if built is None:
        raise ToolError(f"{reference}: cannot rebuild the model from its config to find the filter groups")
    from loft_hpc.train.scores import filter_scores

    by_name = {g.name: g for g in built[0].filter_groups()}
    missing = [g for g in groups if g not in by_name or by_name[g].producer not in other.model]
    if missing:
        raise ToolError(f"{reference}: has no filter group {', '.join(missing)}")
    scores = filter_scores(other.model, [by_name[g] for g in groups])
    out = {}
    for g in groups:
        v = scores[g][score].numpy().astype(np.float64)
        c = history(rf, g, score, path).shape[1]
        if v.size != c:
            raise ToolError(f"{reference}: group {g} has {v.size} filters, {c} in the run file {path}")
        out[g] = v
    what = f"stage {other.stage}, step {other.progress.get('step', '?')}"
    if other.mask_attrs:
        what += f", masks ratio {other.mask_attrs.get('ratio', '?')}"
    return out, f"final weights of {reference} ({what})"


# ---------------------------------------------------------------------------------------- table
def distance_table(rf, groups: list[str], ref: dict[str, np.ndarray], score: str,
                   normalize: bool = True) -> dict[str, np.ndarray]:
    return {g: distance_to_reference(history(rf, g, score), ref[g], normalize=normalize) for g in groups}


def format_table(axis: dict, groups: list[str], dist: dict[str, np.ndarray], widths: dict[str, int],
                 partitioned: set[str], normalize: bool) -> list[str]:
    heads = [g + ("*" if g in partitioned else "") for g in groups]
    cols = [max(len(h), 8) for h in heads]
    lines = ["  ".join([f"{'step':>8}", f"{'round':>6}", f"{'epoch':>7}"] + [f"{h:>{w}}" for h, w in zip(heads, cols)]),
             "  ".join([f"{'filters':>8}", f"{'':>6}", f"{'':>7}"] + [f"{widths[g]:>{w}}" for g, w in zip(groups, cols)])]
    for t in range(len(axis["step"])):
        lines.append("  ".join([f"{axis['step'][t]:>8d}", f"{axis['round'][t]:>6d}", f"{axis['epoch'][t]:>7.2f}"]
                               + [f"{dist[g][t]:>{w}.4f}" for g, w in zip(groups, cols)]))
    lines.append("  ".join([f"{'random':>8}", f"{'':>6}", f"{'':>7}"]
                           + [f"{chance_distance(widths[g], normalize):>{w}.4f}" for g, w in zip(groups, cols)]))
    return lines


def write_csv(path: str, axis: dict, groups: list[str], dist: dict[str, np.ndarray]) -> None:
    p = output_path(path, "--csv")
    try:
        with open(p, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["step", "round", "epoch"] + groups)
            for t in range(len(axis["step"])):
                w.writerow([int(axis["step"][t]), int(axis["round"][t]), f"{axis['epoch'][t]:.6g}"]
                           + [f"{dist[g][t]:.6f}" for g in groups])
    except OSError as e:
        raise ToolError(f"--csv {p}: cannot be written ({e.strerror or e.__class__.__name__})") from None


# ----------------------------------------------------------------------------------------- plot
def distance_figure(rf, axis: dict, groups: list[str], dist: dict[str, np.ndarray], widths: dict[str, int],
                    partitioned: set[str], normalize: bool, score: str, ref_text: str, title: str):
    """Distance to the reference against the epoch, one line per group; a grey band: the expected
    distance of a random ranking of the groups' widths (when it is on the scale of the data)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5.2), constrained_layout=True)
    colors = plt.get_cmap("tab10" if len(groups) <= 10 else "viridis")
    top = 0.0
    for k, g in enumerate(groups):
        col = colors(k if len(groups) <= 10 else k / max(len(groups) - 1, 1))
        star = "*" if g in partitioned else ""
        ax.plot(axis["epoch"], dist[g], "-o", ms=3.5, lw=1.6, color=col, label=f"{g}{star} ({widths[g]} filters)")
        if len(dist[g]) and np.isfinite(dist[g]).any():
            top = max(top, float(np.nanmax(dist[g])))
    chance = [chance_distance(widths[g], normalize) for g in groups]
    lo, hi = min(chance), max(chance)
    rand = f"random ranking: {lo:.2f}" + (f" to {hi:.2f}" if hi - lo > 0.005 else "")
    ymax = 1.15 * top if top > 0 else 1.0
    if hi <= 3 * ymax:  # on the scale of the data: draw it
        ax.axhspan(lo, max(hi, lo + 0.004 * max(hi, ymax)), color="0.6", alpha=0.35, lw=0)
        ymax = max(ymax, 1.05 * hi)
        rand += " (grey band)"
    else:
        rand += " (off scale)"
    ax.set_xlabel("epoch (of pretraining)")
    ax.set_ylabel("filter distance to the reference\n" + ("(0 = same ranking, 1 = reversed)" if normalize
                                                          else "(raw F)"))
    ax.set_ylim(0, ymax)
    ax.grid(alpha=0.3)
    note = ("group* = partitioned by LoFT; " if partitioned & set(groups) else "") + rand
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=min(3, len(groups)),
              title=note, title_fontsize=8, frameon=False)
    ax.set_title(f"{title}\nreference: {ref_text}; {score} = {SCORE_TEXT[score]}", fontsize=10)
    return fig


# ------------------------------------------------------------------------------------------ run
def run(a) -> int:
    rf = load_run(a.run, needs=("snapshots",))
    ordered, partitioned = group_info(rf)
    groups = select_groups(rf, a.group, ordered, a.run)
    ref, ref_text = reference_scores(rf, a.reference, groups, a.score, a.run)
    normalize = not a.raw
    dist = distance_table(rf, groups, ref, a.score, normalize)
    axis = snapshot_axis(rf)
    widths = {g: ref[g].size for g in groups}
    print(f"run: {a.run} ({rf.stage}, {rf.arch}, {rf.world_size} rank(s), {len(rf.snap_index)} snapshots)")
    print(f"reference: {ref_text}")
    print(f"score: {a.score} ({SCORE_TEXT[a.score]} of each filter); distance: "
          + ("F raw" if a.raw else "F / F(reversed ranking): 0 = same ranking, 1 = reversed"))
    if partitioned & set(groups):
        print("groups marked * are partitioned by LoFT; 'random' = expected distance of a random ranking")
    for line in format_table(axis, groups, dist, widths, partitioned, normalize):
        print(line)
    if a.csv:
        write_csv(a.csv, axis, groups, dist)
        print(f"wrote {a.csv}")
    if a.plot:
        title = f"{run_label(a.run)}: filter distance per group ({rf.arch}, {rf.world_size} rank(s))"
        fig = distance_figure(rf, axis, groups, dist, widths, partitioned, normalize, a.score, ref_text, title)
        save_figure(fig, a.plot, "--plot", a.dpi)
        print(f"wrote {a.plot}")
    return 0
