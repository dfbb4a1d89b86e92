"""The offline tools on real run files, against values computed here from the files themselves
(issue 18, item 5g-i).

g. ``loft-tools comm`` (run as tools/comm_table.py, the README's command) on a dense pretraining
   file and on a retraining file: per-rank byte totals equal the sums of the file's /comm rows; a
   dense step moves 4 bytes per trainable parameter (counted from the file's /model), plus the BN
   statistics averaged at an evaluation.
h. ``loft-tools heatmap`` (loft_hpc.tools.heatmap): the matrices and curves it draws equal filter
   distances computed by brute force from /snapshots/scores (and the scores are the producers'
   squared L2 / L1 row norms).
(i. the benchmark on a tiny setting: tests/test_bench.py.)

Two byte-record checks of dense files were strict xfails against 65a39db, where they failed: the
BN averaging of an evaluation that is not a checkpoint was booked in the next step's /comm row, and
a /metrics row's byte counters missed the BN averaging of its own evaluation (comm_table said
DIFFERENT). The engine split (5bcea23: the ledger records an evaluation's bytes before its
/metrics row) fixed both; they are plain tests now.
"""
from __future__ import annotations

import copy
import math
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from loft_hpc.checkpoint.h5file import read_run_file
from loft_hpc.config import load_config
from loft_hpc.data import build_datasets
from loft_hpc.stages.common import make_model
from loft_hpc.tools import heatmap as heat
from loft_hpc.tools.reading import pyplot
from tests.mpi_util import PY, REPO, TINY, ok, run_job

TOOLS = REPO / "tools"
CONFIG = str(REPO / "configs" / "default.yaml")
BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
plt = pyplot()


def run_tool(args: list, timeout: float = 180) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", MPLBACKEND="Agg")
    p = subprocess.run([PY, *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


# ------------------------------------------------------------- one dense job for (g) and (h)
# Dense pretraining of the tiny PreResNet-18 (it has BN: every evaluation averages the BN
# statistics over the ranks) on 2 ranks, 12 steps (6 batches per epoch and rank), evaluations every
# 4 steps and checkpoints every 6 (not aligned on purpose), filter-score snapshots every 2 steps; a
# structured ticket at p = 0.5; masked retraining for 6 steps (evaluations at 4 and 6).
JOB = TINY + ["train.method=dense", "train.duration=12it", "train.eval_every=4it", "output.checkpoint_every=6it",
              "output.snapshot_every=2it", "train.seed=2", "prune.ratios=[0.5]", "retrain.duration=6it"]
EVAL_STEPS = {"pretrain.h5": [4, 8, 12], "retrain_p50.h5": [4, 6]}
COLS = ("allgather_sent", "allgather_received", "allreduce_sent", "allreduce_received")


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dense_tools")
    ok(run_job(2, ["--stage", "all", *JOB, f"output.dir={out}"]))
    return out


def trainable_and_bn(state: dict) -> tuple[int, int]:
    """From a file's /model alone: the number of parameters (every tensor but BN's running
    statistics and batch counters: all of them are trainable in these models) and the number of
    floating-point BN statistics."""
    params = sum(t.numel() for n, t in state.items() if not n.endswith(BN_BUFFERS))
    stats = sum(t.numel() for n, t in state.items() if n.endswith(("running_mean", "running_var")))
    return params, stats


def comm_sums(rows: list[dict]) -> dict:
    """Per rank from /comm rows: sent, received, round-0 bytes, bytes of rounds >= 1; rounds >= 1."""
    per, rounds = {}, set()
    for r in rows:
        d = per.setdefault(int(r["rank"]), {"sent": 0, "received": 0, "round0": 0, "sync": 0})
        s = int(r["allgather_sent"]) + int(r["allreduce_sent"])
        v = int(r["allgather_received"]) + int(r["allreduce_received"])
        d["sent"] += s
        d["received"] += v
        if int(r["round"]) == 0:
            d["round0"] += s + v
        else:
            d["sync"] += s + v
            rounds.add(int(r["round"]))
    return {"per_rank": per, "rounds": rounds}


def parse_rank_lines(text: str) -> dict:
    """comm_table's per-rank table: rank -> [sent, received, total, total G, round 0, per sync]."""
    out = {}
    for ln in text.splitlines():
        f = ln.split()
        if len(f) == 7 and (f[0].isdigit() or f[0] == "all") and re.fullmatch(r"[\d,]+", f[1]):
            out[f[0]] = [float(x.replace(",", "")) for x in f[1:]]
    return out


def step_rows(rf) -> list[dict]:
    return [r for r in rf.comm if r["round"] >= 1]


@pytest.mark.parametrize("name", ["pretrain.h5", "retrain_p50.h5"])
def test_comm_table_on_dense_and_retrain_files(dense_dir, name):
    """(g) Every step moves the gradients, 4 bytes per trainable parameter (allreduce, sent and
    received), and nothing else but, once per evaluation, the BN statistics (4 bytes each); the
    tool's per-rank and all-rank totals are the sums of the /comm rows, its analytic figure per row
    is 2 x 4 bytes per parameter, plus the BN statistics at the evaluation steps, which every row
    then equals."""
    path = dense_dir / name
    rf = read_run_file(path)
    assert rf.world_size == 2 and rf.stage == ("pretrain" if name == "pretrain.h5" else "retrain")
    n_params, n_stats = trainable_and_bn(rf.model)
    assert n_params > 0 and n_stats > 0
    grad, bn = 4 * n_params, 4 * n_stats
    steps = step_rows(rf)
    assert sorted((r["round"], r["rank"]) for r in steps) == [(k, q) for k in range(1, rf.progress["step"] + 1)
                                                             for q in (0, 1)]
    for r in steps:
        got = tuple(r[k] for k in COLS)
        assert got in ((0, 0, grad, grad), (0, 0, grad + bn, grad + bn)), \
            f"{name} step {r['step']} rank {r['rank']}: {got}; gradients {grad}, BN statistics {bn}"
    for q in (0, 1):  # one BN averaging per evaluation and rank
        assert sum(r["allreduce_sent"] == grad + bn for r in steps if r["rank"] == q) == len(EVAL_STEPS[name])

    p = run_tool([TOOLS / "comm_table.py", path])
    lines = parse_rank_lines(p.stdout)
    s = comm_sums(rf.comm)
    nsync = len(s["rounds"])
    assert nsync == rf.progress["step"] and sorted(lines) == ["0", "1", "all"]
    for q, d in s["per_rank"].items():
        got = lines[str(q)]
        assert got[:3] == [d["sent"], d["received"], d["sent"] + d["received"]], (q, got, d)
        assert got[4] == d["round0"]
        assert f"{d['sync'] / nsync:,.0f}" == f"{got[5]:,.0f}"
    tot = {k: sum(d[k] for d in s["per_rank"].values()) for k in ("sent", "received", "round0")}
    assert lines["all"][:3] == [tot["sent"], tot["received"], tot["sent"] + tot["received"]]
    assert lines["all"][4] == tot["round0"]
    b = 2 * grad
    assert f"dense_step_bytes {b:,} B per step" in p.stdout, p.stdout
    # every row equals it once the BN averaging is added at the evaluation steps (and only there)
    assert f"+ dense_eval_rank_bytes {2 * bn:,} B at an evaluation or weight snapshot" in p.stdout, p.stdout
    assert f"{len(steps)}/{len(steps)} rows equal it" in p.stdout, p.stdout


@pytest.mark.parametrize("name", ["pretrain.h5", "retrain_p50.h5"])
def test_comm_rows_book_the_bn_averaging_at_its_evaluation(dense_dir, name):
    """The BN statistics averaged by an evaluation are in the /comm row of that evaluation's step,
    also where no checkpoint follows (evaluations at 4 and 8, checkpoints at 6 and 12)."""
    rf = read_run_file(dense_dir / name)
    n_params, n_stats = trainable_and_bn(rf.model)
    with_bn = sorted({r["step"] for r in step_rows(rf) if r["allreduce_sent"] == 4 * (n_params + n_stats)})
    assert with_bn == EVAL_STEPS[name]


@pytest.mark.parametrize("name", ["pretrain.h5", "retrain_p50.h5"])
def test_metrics_byte_counters_agree_with_comm(dense_dir, name):
    """Each /metrics row's bytes (all ranks, cumulative) are the bytes of the /comm rows up to its
    step, evaluations included (they happened before the row was written); comm_table says equal."""
    rf = read_run_file(dense_dir / name)
    assert [m["step"] for m in rf.metrics] == EVAL_STEPS[name]
    for m in rf.metrics:
        upto = [r for r in rf.comm if r["step"] <= m["step"]]
        assert (m["bytes_sent"], m["bytes_received"]) == (
            sum(r["allgather_sent"] + r["allreduce_sent"] for r in upto),
            sum(r["allgather_received"] + r["allreduce_received"] for r in upto)), f"/metrics row at step {m['step']}"
    p = run_tool([TOOLS / "comm_table.py", dense_dir / name])
    assert re.search(r"^\s+/metrics at step \d+: .*: equal$", p.stdout, re.M), p.stdout


# ------------------------------------------------------------------------------------- (h)
def bf_sigma(ref, snap) -> list[int]:
    """sigma(i), i = 1..C: the rank at the snapshot of the filter the reference ranks i-th, by the
    rule of loft_hpc/metrics/filter_distance.py's notes ("Ties"): each ranking orders its ties as
    the other score vector does, ties in both by filter index; largest score = rank 1."""
    c = len(ref)
    r_order = sorted(range(c), key=lambda f: (-ref[f], -snap[f], f))
    s_order = sorted(range(c), key=lambda f: (-snap[f], -ref[f], f))
    s_rank = {f: i + 1 for i, f in enumerate(s_order)}
    return [s_rank[f] for f in r_order]


def bf_F(sigma) -> float:
    """F(sigma) = sum_i (1/i) |ln i - ln sigma(i)|."""
    return sum(abs(math.log(i) - math.log(s)) / i for i, s in enumerate(sigma, 1))


def bf_distance(ref, snap, normalize: bool = True) -> float:
    """F, divided (normalize) by F of the reversed ranking sigma(i) = C + 1 - i of the same width;
    0 for a single filter."""
    c = len(ref)
    raw = bf_F(bf_sigma(list(map(float, ref)), list(map(float, snap))))
    if not normalize:
        return raw
    return 0.0 if c == 1 else raw / bf_F([c + 1 - i for i in range(1, c + 1)])


def bf_matrix(h: np.ndarray, normalize: bool = True) -> np.ndarray:
    """D[a, b] = distance with snapshot a as the reference and b as the snapshot."""
    return np.array([[bf_distance(h[a], h[b], normalize) for b in range(len(h))] for a in range(len(h))])


def _fewest_discordant(ref, snap) -> float:
    """The notes' definition of the tie rule, by enumeration (tiny C only): over every ordering of
    the ties of both rankings, those with the fewest oppositely ordered pairs; their F."""
    import itertools

    c = len(ref)

    def extensions(s):
        return [p for p in itertools.permutations(range(c)) if all(s[p[i]] >= s[p[i + 1]] for i in range(c - 1))]

    best, vals = None, set()
    for r in extensions(ref):
        pr = {f: i for i, f in enumerate(r)}
        for q in extensions(snap):
            pq = {f: i for i, f in enumerate(q)}
            disc = sum((pr[f] < pr[g]) != (pq[f] < pq[g]) for f, g in itertools.combinations(range(c), 2))
            v = round(bf_F([pq[f] + 1 for f in r]), 12)
            if best is None or disc < best:
                best, vals = disc, {v}
            elif disc == best:
                vals.add(v)
    assert len(vals) == 1
    return vals.pop()


def test_brute_force_tie_rule_is_the_documented_definition():
    """The constructive tie rule of bf_sigma equals the notes' definition (fewest discordant pairs)
    on small cases with ties in the reference, the snapshot, or both."""
    rng = np.random.default_rng(7)
    cases = [([3.0, 0.0, 2.0, 0.0, 1.0], [0.4, 0.5, 0.9, 0.1, 0.2]), ([1.0, 1.0, 1.0, 2.0], [4.0, 3.0, 3.0, 1.0])]
    cases += [(list(rng.integers(0, 3, 5).astype(float)), list(rng.integers(0, 3, 5).astype(float))) for _ in range(8)]
    for ref, snap in cases:
        assert bf_distance(ref, snap, normalize=False) == pytest.approx(_fewest_discordant(ref, snap), abs=1e-9)


def panel_arrays(fig) -> list[np.ndarray]:
    """The arrays the heatmap figure draws, one per panel, left to right."""
    return [np.asarray(ax.images[0].get_array(), dtype=np.float64) for ax in fig.axes if ax.images]


def test_heatmap_numbers_are_brute_force_filter_distances(dense_dir):
    path = dense_dir / "pretrain.h5"
    rf = read_run_file(path)
    cfg = load_config(CONFIG, [*JOB, f"output.dir={dense_dir}"])
    groups = make_model(cfg, build_datasets(cfg.data)).filter_groups()
    names = [g.name for g in groups]
    assert sorted(rf.snap_scores) == sorted(names)
    assert [s for s, _, _ in rf.snap_index] == [0, 2, 4, 6, 8, 10, 12]
    # the stored scores are the producers' squared L2 / L1 row norms: the last snapshot is of the
    # final weights (/model) and the first of theta_0 (/init)
    for g in groups:
        for row, state in ((-1, rf.model), (0, rf.init)):
            w = state[g.producer].double().reshape(g.size, -1)
            np.testing.assert_allclose(rf.snap_scores[g.name]["l2"][row], (w * w).sum(1).numpy(), rtol=1e-6)
            np.testing.assert_allclose(rf.snap_scores[g.name]["l1"][row], w.abs().sum(1).numpy(), rtol=1e-6)
    partitioned = {g.name for g in groups if g.partitioned}
    moved = 0  # panels in which some ranking changed (the numbers are not all 0)
    for score in ("l2", "l1"):
        for normalize in (True, False):
            fig = heat.heatmap_figure(rf, names, partitioned, score, "epoch", normalize, "t")
            drawn = panel_arrays(fig)
            plt.close(fig)
            assert len(drawn) == len(names)
            for g, got in zip(names, drawn):
                h = np.stack([np.asarray(r, dtype=np.float64) for r in rf.snap_scores[g][score]])
                want = bf_matrix(h, normalize)
                assert got.shape == want.shape == (7, 7)
                np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12, err_msg=f"{g} {score} norm={normalize}")
                moved += want.max() > 0
    assert moved >= len(names)
    # the curve: distance of every snapshot to the last one, per group
    fig = heat.curve_figure(rf, names, partitioned, "l2", "step", True, "t")
    # one line per group, labelled "<group>[*] (<C>)"; the random-ranking levels are unlabelled
    lines = {ln.get_label().split("*")[0].split(" (")[0]: ln for ln in fig.axes[0].lines
             if not ln.get_label().startswith("_")}
    for g in names:
        h = np.stack([np.asarray(r, dtype=np.float64) for r in rf.snap_scores[g]["l2"]])
        np.testing.assert_allclose(np.asarray(lines[g].get_ydata(), dtype=np.float64),
                                   [bf_distance(h[-1], h[b]) for b in range(len(h))], rtol=1e-9, atol=1e-12)
        np.testing.assert_array_equal(lines[g].get_xdata(), [s for s, _, _ in rf.snap_index])
    plt.close(fig)


def test_heatmap_numbers_with_tied_scores(dense_dir):
    """Scores of a ticket tie (its pruned filters score 0): the same file with half of every
    group's filters zeroed in some snapshots, and a few equal scores elsewhere."""
    rf = read_run_file(dense_dir / "pretrain.h5")
    tied = copy.deepcopy(rf)
    rng = np.random.default_rng(0)
    for g, per in tied.snap_scores.items():
        rows = [np.array(r, dtype=np.float32) for r in per["l2"]]
        c = rows[0].size
        for t in (1, 3, len(rows) - 1):
            rows[t][rng.permutation(c)[: c // 2]] = 0.0
        rows[2][rng.permutation(c)[:3]] = rows[2].max()
        per["l2"] = rows
    names = sorted(tied.snap_scores)
    fig = heat.heatmap_figure(tied, names, set(), "l2", "step", True, "t")
    for g, got in zip(names, panel_arrays(fig)):
        h = np.stack([np.asarray(r, dtype=np.float64) for r in tied.snap_scores[g]["l2"]])
        np.testing.assert_allclose(got, bf_matrix(h), rtol=1e-9, atol=1e-12, err_msg=g)
    plt.close(fig)
