#!/usr/bin/env python
"""Filter distance of every snapshot of a run to a reference ranking (LOFT_SPEC section 5).

    python tools/filter_distance.py RUN.h5 [--group NAME ...] [--score l2|l1]
                                    [--reference last|FILE.h5] [--raw] [--csv OUT.csv]

For each filter group stored under ``/snapshots/scores`` of RUN.h5 (a pretraining file, or a
checkpoint of one), the distance (:mod:`loft_hpc.metrics.filter_distance`) between the reference
ranking and the ranking at each snapshot, one row per snapshot with its step, round and epoch.

Reference: ``last`` (default) = the last snapshot of RUN.h5, i.e. the ranking of the final
weights, which are the ones the winning ticket is pruned from; ``FILE.h5`` = the scores of the
final weights (``/model``) of another loft_hpc file with the same model, e.g. a retrained ticket
(``retrain_p50.h5``) or another run's ``pretrain.h5``; pruned filters of a ticket score 0 and rank
last, and a tie never counts as a disagreement (tied filters take the snapshot's order, see the
metric's notes): a ticket is at distance 0 from the weights it was pruned from. Distances are normalised by the reversed ranking (0 = same order,
1 = reversed, see the metric's notes); ``--raw`` prints F itself. The ``random`` line gives the
expected distance of a random ranking of that width.

This file is also the reading helper of ``tools/heatmap.py``.
"""
from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from loft_hpc.checkpoint.h5file import CheckpointError, RunFile, read_run_file  # noqa: E402
from loft_hpc.metrics.filter_distance import chance_distance, distance_to_reference  # noqa: E402

SCORE_TEXT = {"l2": "squared L2 norm", "l1": "L1 norm"}


class ToolError(RuntimeError):
    """A one-line problem with the command line or the input files."""


# ---------------------------------------------------------------------------------------- reading
def load_run(path: str | Path) -> RunFile:
    if not Path(path).is_file():
        raise ToolError(f"{path}: no such file")
    try:
        return read_run_file(path)
    except CheckpointError as e:
        raise ToolError(str(e)) from None


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def build_model(rf: RunFile):
    """The model described by the file's config, shapes checked against ``/model``; None when
    that is not possible (a config this version cannot read, a data module that is missing)."""
    try:
        import importlib

        import yaml

        from loft_hpc.config import config_from_dict
        from loft_hpc.data.datasets import REGISTRY
        from loft_hpc.models import build_model as _build

        cfg = config_from_dict(yaml.safe_load(rf.config_yaml))
        num_classes = int(rf.model["classifier.weight"].shape[0])
        try:
            native = getattr(importlib.import_module(REGISTRY[cfg.data.name]), "NATIVE_SIZE", 32)
        except Exception:  # noqa: BLE001 - only the size guess depends on it
            native = 224 if cfg.data.name == "imagenet" else 32
        size = cfg.data.image_size or native
        for in_ch in (3, 1):
            try:
                m = _build(cfg.model, num_classes=num_classes, in_channels=in_ch, image_size=size,
                           dataset=cfg.data.name)
            except ValueError:
                continue
            st = m.state_dict()
            if set(st) == set(rf.model) and all(tuple(st[n].shape) == tuple(rf.model[n].shape) for n in st):
                return m, cfg
    except Exception:  # noqa: BLE001 - the tools fall back to what the file itself holds
        pass
    return None


def group_info(rf: RunFile) -> tuple[list[str], set[str]]:
    """Snapshot group names in the model's group order, and the partitioned ones (empty when the
    model cannot be rebuilt; the order is then the natural sort of the names)."""
    names = list(rf.snap_scores)
    built = build_model(rf)
    if built is None:
        return sorted(names, key=_natural_key), set()
    groups = built[0].filter_groups()
    order = {g.name: i for i, g in enumerate(groups)}
    ordered = sorted(names, key=lambda n: (order.get(n, len(order)), _natural_key(n)))
    return ordered, {g.name for g in groups if g.partitioned}


def history(rf: RunFile, group: str, score: str) -> np.ndarray:
    """(T, C) float64 scores of ``group`` at every snapshot."""
    rows = rf.snap_scores[group].get(score)
    if not rows:
        raise ToolError(f"group {group}: no {score} scores stored")
    return np.stack([np.asarray(r, dtype=np.float64) for r in rows])


def snapshot_axis(rf: RunFile) -> dict[str, np.ndarray]:
    """step, round and (fractional where batches per epoch is known) epoch of every snapshot."""
    idx = np.array(rf.snap_index, dtype=np.int64).reshape(-1, 3)
    bpe = rf.progress.get("batches_per_epoch")
    epoch = idx[:, 0] / float(bpe) if bpe else idx[:, 2].astype(np.float64)
    return {"step": idx[:, 0], "round": idx[:, 1], "epoch": epoch}


def select_groups(rf: RunFile, wanted: list[str] | None, ordered: list[str]) -> list[str]:
    """``wanted`` (checked against the file) or every group in ``ordered``."""
    if not ordered:
        raise ToolError("the file holds no filter-score snapshots (/snapshots/scores is empty)")
    if not wanted:
        return ordered
    missing = [g for g in wanted if g not in rf.snap_scores]
    if missing:
        raise ToolError(f"no filter group {', '.join(missing)}; the file has: {', '.join(ordered)}")
    return list(dict.fromkeys(wanted))


def reference_scores(rf: RunFile, reference: str, groups: list[str], score: str) -> tuple[dict[str, np.ndarray], str]:
    """Per group the reference score vector, and a line describing the reference."""
    if reference == "last":
        if not rf.snap_index:
            raise ToolError("the file holds no snapshots")
        step, _, _ = rf.snap_index[-1]
        ep = snapshot_axis(rf)["epoch"][-1]
        return ({g: history(rf, g, score)[-1] for g in groups},
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
        c = history(rf, g, score).shape[1]
        if v.size != c:
            raise ToolError(f"{reference}: group {g} has {v.size} filters, {c} in the run file")
        out[g] = v
    what = f"stage {other.stage}, step {other.progress.get('step', '?')}"
    if other.mask_attrs:
        what += f", masks ratio {other.mask_attrs.get('ratio', '?')}"
    return out, f"final weights of {reference} ({what})"


# ---------------------------------------------------------------------------------------- table
def distance_table(rf: RunFile, groups: list[str], ref: dict[str, np.ndarray], score: str,
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
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["step", "round", "epoch"] + groups)
        for t in range(len(axis["step"])):
            w.writerow([int(axis["step"][t]), int(axis["round"][t]), f"{axis['epoch'][t]:.6g}"]
                       + [f"{dist[g][t]:.6f}" for g in groups])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="loft_hpc run file with filter-score snapshots (pretrain.h5 or a checkpoint)")
    ap.add_argument("--group", action="append", metavar="NAME", help="filter group (repeatable; default: all)")
    ap.add_argument("--score", choices=("l2", "l1"), default="l2",
                    help="filter score that ranks the filters: squared L2 norm (default, as pruning) or L1 norm")
    ap.add_argument("--reference", default="last", metavar="last|FILE.h5",
                    help="reference ranking: the run's last snapshot (default) or the final weights of FILE.h5")
    ap.add_argument("--raw", action="store_true", help="print F itself instead of F / F(reversed ranking)")
    ap.add_argument("--csv", metavar="OUT", help="also write the table as CSV (step, round, epoch, one column per group)")
    a = ap.parse_args(argv)
    try:
        rf = load_run(a.run)
        ordered, partitioned = group_info(rf)
        groups = select_groups(rf, a.group, ordered)
        ref, ref_text = reference_scores(rf, a.reference, groups, a.score)
        normalize = not a.raw
        dist = distance_table(rf, groups, ref, a.score, normalize)
    except ToolError as e:
        print(f"filter_distance: {e}", file=sys.stderr)
        return 2
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
