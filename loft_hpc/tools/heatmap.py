"""``loft-tools heatmap``: the LoFT poster's filter-distance heatmaps, and the distance-to-final curve.

    loft-tools heatmap RUN.h5 [--group NAME ...] --out fig.png [--curve fig2.png]
                              [--score l2|l1] [--axis epoch|step] [--curve-all] [--raw]

Heatmap (``--out``): for each group one panel holding the snapshot x snapshot distance matrix
``D[a, b]`` (:func:`loft_hpc.metrics.filter_distance.distance_matrix`): row ``a`` (y axis) is the
reference snapshot, column ``b`` (x axis) the snapshot compared with it; darker = smaller distance,
one colour scale for all panels. Once the ranking settles, the late rows turn dark from some
column on: the earlier that column, the earlier the ticket (the final top filters) appeared;
compare with the random-ranking level in each panel's title. Default groups: the 2nd and 4th
partitioned groups in model order when the model has at least four, else the 2nd and 4th filter
groups of any kind (the poster shows "conv layers 2 and 4").

Curve (``--curve``): distance of every snapshot to the final ranking (the last snapshot) for the
same groups (``--curve-all``: every group), with the test loss of ``/metrics`` on a twin axis:
shows whether the ranking settles before the loss converges. Dotted lines: the distance of a
random ranking of that width.
"""
from __future__ import annotations

import numpy as np

from loft_hpc.metrics.filter_distance import chance_distance, distance_matrix, distance_to_reference
from loft_hpc.tools.reading import (SCORE_TEXT, ToolError, group_info, history, load_run, pyplot,
                                    require_snapshots, run_label, save_figure, select_groups, snapshot_axis)

CMAP = "viridis"  # low values dark


def add_arguments(ap) -> None:
    ap.add_argument("run", help="loft_hpc run file with filter-score snapshots (pretrain.h5)")
    ap.add_argument("--group", action="append", metavar="NAME",
                    help="filter group, one panel each (repeatable; default: 2nd and 4th partitioned, else any)")
    ap.add_argument("--out", required=True, help="heatmap PNG (or any matplotlib format by suffix)")
    ap.add_argument("--curve", metavar="FIG2", help="also draw the distance-to-final curve with the test loss")
    ap.add_argument("--curve-all", action="store_true", help="curve: every filter group, not just the selected ones")
    ap.add_argument("--score", choices=("l2", "l1"), default="l2", help="filter score (default: l2, as pruning)")
    ap.add_argument("--axis", choices=("epoch", "step"), default="epoch", help="label snapshots by epoch or step")
    ap.add_argument("--raw", action="store_true", help="F itself instead of F / F(reversed ranking)")
    ap.add_argument("--dpi", type=int, default=130, help="resolution of the figures (default 130)")


def default_groups(ordered: list[str], partitioned: set[str]) -> list[str]:
    part = [g for g in ordered if g in partitioned]
    pool = part if len(part) >= 4 else ordered
    picks = [pool[i] for i in (1, 3) if i < len(pool)]
    return picks or pool[:1]


def _ticks(values: np.ndarray, kind: str, n_max: int = 8) -> tuple[np.ndarray, list[str]]:
    """Tick positions (snapshot indices) and labels; on the epoch axis whole epochs when there are some."""
    t = len(values)
    cand = np.arange(t)
    if kind == "epoch":
        whole = np.flatnonzero(np.isclose(values, np.round(values)))
        if whole.size >= 2:
            cand = whole
    pos = cand[np.unique(np.linspace(0, len(cand) - 1, min(len(cand), n_max)).round().astype(int))]
    if kind == "epoch":
        labels = [f"{values[p]:g}" if np.isclose(values[p], round(values[p])) else f"{values[p]:.2f}" for p in pos]
    else:
        labels = [f"{int(values[p])}" for p in pos]
    return pos, labels


def heatmap_figure(rf, groups: list[str], partitioned: set[str], score: str, axis_kind: str, normalize: bool,
                   title: str):
    plt = pyplot()
    ax_vals = snapshot_axis(rf)[axis_kind]
    mats = {g: distance_matrix(history(rf, g, score), normalize=normalize) for g in groups}
    vmax = max(float(m.max()) for m in mats.values()) or 1.0
    n = len(groups)
    fig, axes = plt.subplots(1, n, figsize=(4.3 * n + 1.3, 5.6), squeeze=False, constrained_layout=True)
    im = None
    unit = "epoch" if axis_kind == "epoch" else "step (local SGD steps per rank)"
    for ax, g in zip(axes[0], groups):
        m = mats[g]
        im = ax.imshow(m, cmap=CMAP, vmin=0.0, vmax=vmax, origin="upper", interpolation="nearest", aspect="equal")
        pos, labels = _ticks(ax_vals, axis_kind)
        ax.set_xticks(pos, labels, rotation=45 if len(pos) > 5 and max(map(len, labels)) > 3 else 0)
        ax.set_yticks(pos, labels)
        ax.set_xlabel(f"compared snapshot ({unit})")
        ax.set_ylabel(f"reference snapshot ({unit})")
        c = history(rf, g, score).shape[1]
        kind = "partitioned" if g in partitioned else ("shared" if partitioned else "")
        ax.set_title(f"group {g}\n{c} filters" + (f", {kind}" if kind else "")
                     + f"; random ranking: {chance_distance(c, normalize):.2f}", fontsize=10)
    cb = fig.colorbar(im, ax=axes[0].tolist(), shrink=0.85)
    cb.set_label("filter distance" + (" (0 = same ranking, 1 = reversed)" if normalize else " F (raw)"))
    fig.suptitle(title, fontsize=11)
    return fig


def curve_figure(rf, groups: list[str], partitioned: set[str], score: str, axis_kind: str, normalize: bool,
                 title: str):
    plt = pyplot()
    ax_vals = snapshot_axis(rf)[axis_kind]
    fig, ax = plt.subplots(figsize=(7.5, 5.2), constrained_layout=True)
    colors = plt.get_cmap("tab10" if len(groups) <= 10 else "viridis")
    handles = []
    top = 0.0
    chances = []
    for k, g in enumerate(groups):
        h = history(rf, g, score)
        d = distance_to_reference(h, h[-1], normalize=normalize)
        col = colors(k if len(groups) <= 10 else k / max(len(groups) - 1, 1))
        star = "*" if g in partitioned else ""
        (ln,) = ax.plot(ax_vals, d, "-o", ms=3.5, lw=1.6, color=col, label=f"{g}{star} ({h.shape[1]})")
        handles.append(ln)
        top = max(top, float(d.max()))
        chances.append((chance_distance(h.shape[1], normalize), col))
    ymax = 1.15 * top if top > 0 else 1.0
    shown = [c for c in chances if c[0] <= 3 * ymax]
    if shown:  # random-ranking levels, when they are on a comparable scale
        ymax = max(ymax, 1.05 * max(c for c, _ in shown))
        for c, col in shown:
            ax.axhline(c, color=col, ls=":", lw=0.9, alpha=0.7)
    lo, hi = min(c for c, _ in chances), max(c for c, _ in chances)
    rand = f"random ranking: {lo:.2f}" + (f" to {hi:.2f}" if hi - lo > 0.005 else "")
    rand += " (dotted)" if shown else " (off scale)"
    ax.set_xlabel("epoch" if axis_kind == "epoch" else "step (local SGD steps per rank)")
    ax.set_ylabel("distance to the final ranking" + (" (0 = same, 1 = reversed)" if normalize else " (raw F)"))
    ax.set_ylim(0, ymax)
    ax.grid(alpha=0.3)
    rows = [m for m in rf.metrics if np.isfinite(m.get("test_loss", np.nan))]
    if rows:
        bpe = rf.progress.get("batches_per_epoch")
        xs = np.array([m["step"] / bpe if (axis_kind == "epoch" and bpe) else
                       (m["epoch"] if axis_kind == "epoch" else m["step"]) for m in rows], dtype=float)
        ax2 = ax.twinx()
        (lt,) = ax2.plot(xs, [m["test_loss"] for m in rows], "-s", color="black", lw=1.4, ms=4, alpha=0.8,
                         label="test loss")
        handles.append(lt)
        # the assembled model's loss on the fixed training sample (not the sub-networks' step loss)
        train = [m.get("train_loss", np.nan) for m in rows]
        if np.isfinite(train).any():
            (lr_,) = ax2.plot(xs, train, "--", color="gray", lw=1.2, label="train loss (full model)")
            handles.append(lr_)
        ax2.set_ylabel("loss (cross-entropy, nats)")
        ax2.set_ylim(bottom=0)
    note = ("group* = partitioned; " if partitioned else "") + rand
    ax.legend(handles=handles, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14),
              ncol=min(4, len(handles)), title=note, title_fontsize=8, frameon=False)
    ax.set_title(title, fontsize=11)
    return fig


def run(a) -> int:
    rf = load_run(a.run, needs=("snapshots",))
    ordered, partitioned = group_info(rf)
    groups = select_groups(rf, a.group, ordered, a.run) if a.group else default_groups(ordered, partitioned)
    if not groups:
        raise ToolError(f"{a.run}: no filter-score snapshots")
    require_snapshots(rf, a.run, at_least=2)  # a heatmap compares pairs
    normalize = not a.raw
    name = run_label(a.run)
    title = f"{name}: {rf.arch}, {rf.world_size} rank(s), {len(rf.snap_index)} snapshots, {a.score} scores"
    fig = heatmap_figure(rf, groups, partitioned, a.score, a.axis, normalize,
                         f"{title} ({SCORE_TEXT[a.score]})\nfilter distance between every pair of snapshots")
    save_figure(fig, a.out, "--out", a.dpi)
    print(f"wrote {a.out} (groups: {', '.join(groups)})")
    if a.curve:
        cgroups = ordered if a.curve_all else groups
        fig = curve_figure(rf, cgroups, partitioned, a.score, a.axis, normalize, title)
        save_figure(fig, a.curve, "--curve", a.dpi)
        print(f"wrote {a.curve} (groups: {', '.join(cgroups)})")
    return 0
