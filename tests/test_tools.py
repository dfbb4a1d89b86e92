"""The filter-distance metric on hand-made cases, and the analysis CLIs on a real (tiny) run file.

tools/filter_distance.py, tools/heatmap.py and tools/comm_table.py (the README's commands: thin entry
points of ``loft-tools distance``, ``heatmap`` and ``comm``, loft_hpc.tools.*) run as subprocesses on
one pretraining file made once per module (two ranks, synthetic data, ~10 s). tests/test_tools_cli.py
runs the installed ``loft-tools`` itself, on bad inputs too."""
from __future__ import annotations

import csv
import itertools
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from tests.mpi_util import ok, run_job

from loft_hpc.metrics import (chance_distance, distance_matrix, distance_to_reference, filter_distance,
                              rank_positions, ranking, reversed_distance)

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
TOOLS = REPO / "tools"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def F(sigma) -> float:
    """The paper's formula, written out: sum_i (1/i) |ln i - ln sigma(i)|."""
    return sum(abs(math.log(i) - math.log(s)) / i for i, s in enumerate(sigma, 1))


def F_scores(ref, snap, normalize: bool = True) -> float:
    """F between the rankings of two score vectors without ties, from the formula alone: the filter
    at rank i of ``ref`` (largest score first) has rank sigma(i) in ``snap``."""
    ref, snap = np.asarray(ref, dtype=np.float64), np.asarray(snap, dtype=np.float64)
    c = len(ref)
    assert len(set(ref.tolist())) == c and len(set(snap.tolist())) == c, "F_scores is for vectors without ties"
    order_ref = sorted(range(c), key=lambda f: -ref[f])
    rank_snap = {f: i for i, f in enumerate(sorted(range(c), key=lambda f: -snap[f]), 1)}
    raw = F([rank_snap[f] for f in order_ref])
    return raw / F(range(c, 0, -1)) if normalize and c > 1 else raw


def chance_by_linearity(c: int, normalize: bool = True) -> float:
    """E[F] over uniformly random rankings: sigma(i) is uniform on 1..c for every i, so
    E[F] = sum_i (1/i) mean_j |ln i - ln j|."""
    raw = sum(sum(abs(math.log(i) - math.log(j)) for j in range(1, c + 1)) / (c * i) for i in range(1, c + 1))
    return raw / F(range(c, 0, -1)) if normalize and c > 1 else raw


def scores_for(sigma) -> tuple[np.ndarray, np.ndarray]:
    """(reference, snapshot) scores whose rankings give ``sigma`` (1-based): the filter at rank i of
    the reference has rank sigma(i) at the snapshot."""
    c = len(sigma)
    ref = np.arange(c, 0, -1, dtype=float)          # filter f has reference rank f + 1
    snap = np.empty(c)
    for f, s in enumerate(sigma):
        snap[f] = c + 1 - s                         # filter f has snapshot rank sigma(f + 1)
    return ref, snap


# ------------------------------------------------------------------------------------------ metric
def test_ranking_and_positions():
    s = np.array([0.3, 2.0, 0.3, 5.0, -1.0])
    assert ranking(s).tolist() == [3, 1, 0, 2, 4]          # ties 0 and 2: lower index first
    assert rank_positions(s).tolist() == [3, 2, 4, 1, 5]
    h = np.stack([s, -s])
    assert ranking(h)[1].tolist() == [4, 0, 2, 1, 3]
    assert (rank_positions(h)[np.arange(2)[:, None], ranking(h)] == np.arange(1, 6)).all()


def test_identical_ranking_is_zero():
    rng = np.random.default_rng(0)
    s = rng.random(64)
    assert filter_distance(s, s) == 0.0
    assert filter_distance(s, s ** 2 + 3.0) == 0.0          # only the order matters
    assert filter_distance(s, s, normalize=False) == 0.0


def test_hand_computed_value():
    sigma = (2, 3, 1)
    ref, snap = scores_for(sigma)
    want = math.log(2) + 0.5 * abs(math.log(2) - math.log(3)) + math.log(3) / 3
    assert filter_distance(ref, snap, normalize=False) == pytest.approx(want, rel=1e-12)
    assert filter_distance(ref, snap) == pytest.approx(want / F((3, 2, 1)), rel=1e-12)


def test_top_swap_costs_more_than_bottom_swap():
    c = 16
    ref = np.arange(c, 0, -1, dtype=float)
    top = ref.copy()
    top[[0, 1]] = top[[1, 0]]
    bottom = ref.copy()
    bottom[[c - 2, c - 1]] = bottom[[c - 1, c - 2]]
    d_top, d_bottom = filter_distance(ref, top, normalize=False), filter_distance(ref, bottom, normalize=False)
    assert d_top == pytest.approx(1.5 * math.log(2))
    assert d_bottom == pytest.approx((1 / 15 + 1 / 16) * math.log(16 / 15))
    assert d_top > 10 * d_bottom > 0


def test_reversed_is_one_when_normalised():
    for c in (2, 3, 16, 64, 513):
        ref = np.linspace(1, 2, c)
        assert filter_distance(ref, -ref) == pytest.approx(1.0, rel=1e-12)
        assert filter_distance(ref, -ref, normalize=False) == pytest.approx(reversed_distance(c))
        assert reversed_distance(c) == pytest.approx(F(range(c, 0, -1)))


def test_reversed_is_a_scale_not_a_bound():
    # documented: for C = 3 the maximiser is sigma = (3, 1, 2), 7.9% above the reversed ranking
    best = max(itertools.permutations((1, 2, 3)), key=F)
    assert best == (3, 1, 2)
    assert filter_distance(*scores_for(best)) == pytest.approx(F(best) / F((3, 2, 1)))
    assert 1.07 < filter_distance(*scores_for(best)) < 1.08
    # no permutation of 6 goes beyond the documented ratio
    assert max(filter_distance(*scores_for(p)) for p in itertools.permutations(range(1, 7))) < 1.079


def _linear_extensions(scores) -> list[tuple[int, ...]]:
    """Every ranking (filter indices, best first) that orders ``scores`` descending, ties in any order."""
    return [p for p in itertools.permutations(range(len(scores)))
            if all(scores[p[i]] >= scores[p[i + 1]] for i in range(len(p) - 1))]


def brute_force_distance(ref, snap) -> float:
    """F by the definition of the module notes, found by enumeration: over every way to order the
    tied filters of both rankings, those with the fewest pairs ordered oppositely; all of them must
    give the same F, which is the distance."""
    best, values = None, set()
    for r in _linear_extensions(ref):
        pos_r = {f: i for i, f in enumerate(r)}
        for s in _linear_extensions(snap):
            pos_s = {f: i for i, f in enumerate(s)}
            discordant = sum((pos_r[f] < pos_r[g]) != (pos_s[f] < pos_s[g])
                             for f, g in itertools.combinations(range(len(ref)), 2))
            f_value = round(F([pos_s[f] + 1 for f in r]), 12)
            if best is None or discordant < best:
                best, values = discordant, {f_value}
            elif discordant == best:
                values.add(f_value)
    assert len(values) == 1, values
    return values.pop()


def test_ties_count_as_agreement():
    ref = np.array([2.0, 2.0, 1.0])
    assert filter_distance(ref, np.array([5.0, 5.0, 5.0])) == 0.0     # all tied: no disagreement
    assert filter_distance(ref, np.array([2.0, 3.0, 1.0])) == 0.0     # the reference's tie, ordered by the snapshot
    assert filter_distance(np.array([2.0, 3.0, 1.0]), ref) == 0.0     # the snapshot's tie, ordered by the reference
    # a strict disagreement still costs the same as without ties: the top two swapped
    assert filter_distance(np.array([3.0, 2.0, 1.0]), np.array([2.0, 3.0, 1.0]), normalize=False) == pytest.approx(1.5 * math.log(2))
    assert filter_distance(np.zeros(8), np.zeros(8)) == 0.0
    # one score vector on its own: zero scores rank last, by index
    assert ranking(np.array([0.0, 3.0, 0.0, 1.0])).tolist() == [1, 3, 0, 2]


def test_pruned_ticket_reference_with_a_block_of_zeros():
    rng = np.random.default_rng(3)
    c = 32
    weights = rng.random(c) + 0.1                      # the scores the ticket was pruned from
    ticket = np.where(weights >= np.median(weights), weights, 0.0)   # half the filters pruned: a tie block at 0
    assert (ticket == 0).sum() == c // 2
    # the ticket against the weights it was pruned from (its tie block in another order): 0
    assert filter_distance(ticket, weights) == 0.0
    assert filter_distance(weights, ticket) == 0.0
    # against itself with any tie order: every other order of the pruned filters is 0 as well
    for _ in range(5):
        other = weights.copy()
        pruned = np.nonzero(ticket == 0)[0]
        other[pruned] = rng.permutation(other[pruned])  # the pruned filters in another order below the kept ones
        assert filter_distance(ticket, other) == 0.0
    # the distance does not depend on how the filters are numbered
    snap = rng.random(c)
    d = filter_distance(ticket, snap)
    assert d > 0
    for _ in range(5):
        perm = rng.permutation(c)
        assert filter_distance(ticket[perm], snap[perm]) == pytest.approx(d, abs=1e-12)
    # the vectorised forms agree, with the tie block in the reference, in the snapshots, or both
    h = np.stack([snap, ticket, weights, rng.random(c), np.where(snap > 0.5, snap, 0.0)])
    np.testing.assert_allclose(distance_to_reference(h, ticket), [filter_distance(ticket, r) for r in h], atol=1e-12)
    dm = distance_matrix(h)
    for a in range(len(h)):
        for b in range(len(h)):
            assert dm[a, b] == pytest.approx(filter_distance(h[a], h[b]), abs=1e-12)
    assert dm[1, 2] == 0.0 and dm[2, 1] == 0.0


def test_ties_match_brute_force():
    rng = np.random.default_rng(5)
    cases = [
        (np.array([3.0, 0.0, 2.0, 0.0, 1.0, 0.0]), np.array([0.4, 0.5, 0.9, 0.1, 0.2, 0.3])),  # ticket vs dense
        (np.array([0.4, 0.5, 0.9, 0.1, 0.2, 0.3]), np.array([3.0, 0.0, 2.0, 0.0, 1.0, 0.0])),  # dense vs ticket
        (np.array([2.0, 2.0, 0.0, 1.0, 0.0, 2.0]), np.array([1.0, 0.0, 1.0, 0.0, 3.0, 1.0])),  # ties in both
    ]
    for _ in range(20):
        cases.append((rng.integers(0, 3, 6).astype(float), rng.integers(0, 3, 6).astype(float)))
    for ref, snap in cases:
        want = brute_force_distance(ref, snap)
        assert filter_distance(ref, snap, normalize=False) == pytest.approx(want, abs=1e-9), (ref, snap)
    # ordering the reference's tie block by filter index instead would count a disagreement
    assert F(rank_positions(cases[0][1])[ranking(cases[0][0])]) > brute_force_distance(*cases[0]) + 0.05


def test_single_filter_and_bad_input():
    assert filter_distance([1.0], [2.0]) == 0.0
    assert distance_matrix(np.ones((3, 1))).tolist() == [[0.0] * 3] * 3
    with pytest.raises(ValueError):
        filter_distance(np.ones(3), np.ones(4))
    with pytest.raises(ValueError):
        filter_distance(np.array([1.0, np.nan]), np.ones(2))
    with pytest.raises(ValueError):
        distance_matrix(np.ones(5))
    with pytest.raises(ValueError):
        distance_to_reference(np.ones((2, 3)), np.ones(4))


def test_distance_matrix_properties():
    rng = np.random.default_rng(1)
    h = rng.random((7, 24))
    d = distance_matrix(h)
    assert d.shape == (7, 7)
    assert np.all(np.diag(d) == 0.0)
    assert np.all(d >= 0.0)
    for a in range(7):
        for b in range(7):
            assert d[a, b] == pytest.approx(F_scores(h[a], h[b]), abs=1e-12)  # by the formula
    assert not np.allclose(d, d.T)                 # F is not symmetric: row = reference
    np.testing.assert_allclose(distance_to_reference(h, h[3]), [F_scores(h[3], r) for r in h], atol=1e-12)
    np.testing.assert_allclose(distance_matrix(h, normalize=False), [[F_scores(a, b, normalize=False) for b in h] for a in h],
                               atol=1e-12)


def test_vectorised_forms_match_brute_force_with_ties():
    """distance_matrix and distance_to_reference on small cases with tie blocks (a pruned ticket's
    zeros, repeated scores), against the enumeration of every tie order (brute_force_distance)."""
    rng = np.random.default_rng(11)
    h = np.stack([np.array([3.0, 0.0, 2.0, 0.0, 1.0, 0.0]), np.array([0.4, 0.5, 0.9, 0.1, 0.2, 0.3]),
                  *[rng.integers(0, 3, 6).astype(float) for _ in range(4)]])
    want = np.array([[brute_force_distance(a, b) for b in h] for a in h])
    np.testing.assert_allclose(distance_matrix(h, normalize=False), want, atol=1e-9)
    np.testing.assert_allclose(distance_matrix(h), want / F(range(6, 0, -1)), atol=1e-9)
    for k in range(len(h)):
        np.testing.assert_allclose(distance_to_reference(h, h[k], normalize=False), want[k], atol=1e-9)


def test_chance_distance_is_the_mean_over_all_rankings():
    for c in (2, 4, 5):
        perms = list(itertools.permutations(range(1, c + 1)))
        mean = sum(F(p) for p in perms) / len(perms)
        assert chance_distance(c, normalize=False) == pytest.approx(mean, rel=1e-12)
        assert chance_distance(c) == pytest.approx(mean / F(range(c, 0, -1)), rel=1e-12)
    assert chance_distance(1) == 0.0
    for c in (7, 64, 513):
        assert chance_distance(c) == pytest.approx(chance_by_linearity(c), rel=1e-12)
    assert 0.7 < chance_distance(64) < 0.8


# ------------------------------------------------------------------------------------------ CLIs
def _env() -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", MPLBACKEND="Agg")
    e["PATH"] = f"{Path(PY).parent}:{e.get('PATH', '')}"
    return e


def _run(args: list, *, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    p = subprocess.run([PY, *map(str, args)], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    if check:
        assert p.returncode == 0, f"exit {p.returncode}\n--- stdout\n{p.stdout[-3000:]}\n--- stderr\n{p.stderr[-3000:]}"
    return p


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    # two real ranks, so that /comm holds real traffic (one rank communicates nothing)
    out = tmp_path_factory.mktemp("tools_run")
    ok(run_job(2, ["--stage", "pretrain", "data.name=synthetic", "data.synthetic_train_size=256",
                   "data.synthetic_test_size=128", "data.batch_size=32", "model.width=8", "train.duration=4ep",
                   "train.local_steps=4", "output.snapshot_every=8it", "train.eval_every=1ep",
                   "output.snapshot_weights=[2ep]", "train.progress=false", f"output.dir={out}"], timeout=240))
    assert (out / "pretrain.h5").is_file()
    return out


def _h5_scores(path: Path, group: str, score: str = "l2") -> tuple[np.ndarray, np.ndarray]:
    with h5py.File(path, "r") as f:
        return np.array(f["snapshots/index"][()]), np.array(f[f"snapshots/scores/{group}/{score}"][()], dtype=np.float64)


def _table_rows(stdout: str) -> list[list[str]]:
    return [ln.split() for ln in stdout.splitlines() if re.match(r"^\s*\d+\s+\d+\s+\d+\.\d+", ln)]


def _weight_scores(weights: dict, group: str, c: int) -> dict[str, np.ndarray]:
    """l2 (squared L2 norm) and l1 of each filter of a PreResNet inner group, from the weights
    themselves: the rows of the block's conv1 (the group's producer), one row per filter."""
    w = weights[group.replace(".inner", ".conv1.weight")].double().numpy().reshape(c, -1)
    return {"l2": (w * w).sum(1), "l1": np.abs(w).sum(1)}


def _no_near_ties(v: np.ndarray) -> bool:
    """No two scores so close that float32 storage could order them otherwise."""
    s = np.sort(v)
    return bool(np.all(np.diff(s) > 1e-5 * np.abs(s[1:])))


def test_filter_distance_cli(run_dir, tmp_path):
    """Every number the tool prints, recomputed here by the formula (F_scores) from the scores the
    run stored, and those scores checked against the weights they were taken from."""
    run = run_dir / "pretrain.h5"
    out_csv = tmp_path / "fd.csv"
    p = _run([TOOLS / "filter_distance.py", run, "--csv", out_csv])
    with h5py.File(run, "r") as f:
        groups = list(f["snapshots/scores"])
    idx, _ = _h5_scores(run, groups[0])
    rows = _table_rows(p.stdout)
    assert len(rows) == len(idx) >= 3
    assert [int(r[0]) for r in rows] == idx[:, 0].tolist()
    assert "*" in p.stdout        # partitioned groups are marked
    with open(out_csv) as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == len(idx)
    assert sorted(k for k in table[0] if k not in ("step", "round", "epoch")) == sorted(groups)
    for g in groups:
        _, h = _h5_scores(run, g)
        want = [F_scores(h[-1], r) for r in h]
        got = np.array([float(r[g]) for r in table])
        np.testing.assert_allclose(got, want, atol=1e-6)
        assert got[-1] == 0.0
    assert [int(r["step"]) for r in table] == idx[:, 0].tolist()
    # the 'random' line: the expected distance of a random ranking, by linearity of expectation
    random_line = next(ln.split() for ln in p.stdout.splitlines() if ln.split()[:1] == ["random"])
    widths = [int(x) for x in next(ln.split() for ln in p.stdout.splitlines() if ln.split()[:1] == ["filters"])[1:]]
    assert [float(x) for x in random_line[1:]] == pytest.approx([chance_by_linearity(c) for c in widths], abs=5e-5)

    # --group / --score / --raw and a reference file: the weight snapshot at epoch 2 (step 16)
    g = groups[3]
    ref = run_dir / "snapshots" / "weights@16it.h5"  # requested as 2ep, named by the step taken
    with h5py.File(ref, "r") as f:
        ref_weights = {n: torch.from_numpy(np.array(f["model"][n][()])) for n in f["model"]}
    idx, h1 = _h5_scores(run, g, "l1")
    ref_scores = _weight_scores(ref_weights, g, h1.shape[1])
    at16 = int(np.flatnonzero(idx[:, 0] == 16)[0])
    for kind in ("l1", "l2"):  # the run stored, at step 16, the scores of the step-16 weights
        np.testing.assert_allclose(_h5_scores(run, g, kind)[1][at16], ref_scores[kind], rtol=1e-5)
    assert _no_near_ties(ref_scores["l1"])  # float32 and float64 scores of these weights rank alike
    p = _run([TOOLS / "filter_distance.py", run, "--group", g, "--score", "l1", "--reference", ref])
    rows = _table_rows(p.stdout)
    assert len(rows) == len(idx) and all(len(r) == 4 for r in rows)
    np.testing.assert_allclose([float(r[3]) for r in rows], [F_scores(ref_scores["l1"], r) for r in h1], atol=1e-4)
    assert float(rows[at16][3]) == 0.0                     # the snapshot of the same weights
    p = _run([TOOLS / "filter_distance.py", run, "--group", g, "--raw"])
    _, h = _h5_scores(run, g)
    np.testing.assert_allclose([float(r[3]) for r in _table_rows(p.stdout)],
                               [F_scores(h[-1], r, normalize=False) for r in h], atol=1e-4)

    bad = _run([TOOLS / "filter_distance.py", run, "--group", "no.such.group"], check=False)
    assert bad.returncode == 2 and "no filter group no.such.group" in bad.stderr
    lines = bad.stderr.splitlines()  # one line, naming the command and the file
    assert len(lines) == 1 and lines[0].startswith("loft-tools distance: error: ") and str(run) in lines[0]


def test_filter_distance_cli_ties_by_brute_force(tmp_path):
    """The tool on a hand-made file of 6 filters whose snapshots have tie blocks (a ticket's zeros,
    repeated scores): every distance printed is the enumeration's (brute_force_distance)."""
    from loft_hpc.checkpoint.h5file import RunFile, write_run_file

    hist = [np.array(v, dtype=float) for v in ([0.4, 0.5, 0.9, 0.1, 0.2, 0.3], [2.0, 2.0, 0.0, 1.0, 0.0, 2.0],
                                                 [1.0, 0.0, 1.0, 0.0, 3.0, 1.0], [3.0, 0.0, 2.0, 0.0, 1.0, 0.0])]
    rf = RunFile(stage="pretrain", config_yaml="{}", arch="none", world_size=1, seed=0, model={},
                 progress={"step": 40}, snap_index=[(10 * k, k, 0) for k in range(len(hist))],
                 snap_scores={"toy.inner": {"l2": hist, "l1": hist}}, complete=True)
    f = tmp_path / "toy.h5"
    write_run_file(f, rf)
    for raw in (False, True):
        p = _run([TOOLS / "filter_distance.py", f] + (["--raw"] if raw else []))
        got = [float(r[3]) for r in _table_rows(p.stdout)]
        want = [brute_force_distance(hist[-1], r) / (1.0 if raw else F(range(6, 0, -1))) for r in hist]
        np.testing.assert_allclose(got, want, atol=1e-4)
    assert got[-1] == 0.0 and min(got[:-1]) > 0


def test_heatmap_cli(run_dir, tmp_path):
    run = run_dir / "pretrain.h5"
    fig, curve = tmp_path / "heat.png", tmp_path / "sub" / "curve.png"
    p = _run([TOOLS / "heatmap.py", run, "--out", fig, "--curve", curve])
    # tiny run: 3 of 8 groups partitioned (< 4) -> the 2nd and 4th groups of any kind
    assert "groups: layer1.1.inner, layer2.1.inner" in p.stdout
    for f in (fig, curve):
        data = f.read_bytes()
        assert len(data) > 5000 and data[:8] == PNG_MAGIC
        w, h = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        assert w > 300 and h > 300
    three = tmp_path / "three.png"
    p = _run([TOOLS / "heatmap.py", run, "--group", "layer2.1.inner", "--group", "layer3.1.inner",
              "--group", "layer4.1.inner", "--axis", "step", "--out", three])
    assert three.read_bytes()[:8] == PNG_MAGIC
    assert int.from_bytes(three.read_bytes()[16:20], "big") > int.from_bytes(fig.read_bytes()[16:20], "big")


def test_comm_table_cli(run_dir, tmp_path):
    run = run_dir / "pretrain.h5"
    with h5py.File(run, "r") as f:
        comm = np.array(f["comm"][()])
    sent = int(comm["allgather_sent"].sum() + comm["allreduce_sent"].sum())
    recv = int(comm["allgather_received"].sum() + comm["allreduce_received"].sum())
    assert len(comm) > 0 and sent > 0

    # a copy with three ranks of different traffic, to check the per-rank sums
    multi = tmp_path / "multi.h5"
    shutil.copy(run, multi)
    rows = []
    for r in comm[comm["rank"] == 0]:
        for q in range(3):
            row = np.zeros((), dtype=comm.dtype)  # every other column (p2p, alltoall, assemble) 0
            row["round"], row["step"], row["rank"], row["seconds"] = r["round"], r["step"], q, r["seconds"]
            row["allgather_sent"], row["allgather_received"] = r["allgather_sent"] * (q + 1), r["allgather_received"] + q
            row["allreduce_sent"], row["allreduce_received"] = r["allreduce_sent"], r["allreduce_received"] * (q + 2)
            rows.append(row)
    with h5py.File(multi, "r+") as f:
        del f["comm"]
        f.create_dataset("comm", data=np.array(rows, dtype=comm.dtype), maxshape=(None,))
        f.attrs["world_size"] = 3
        multi_comm = np.array(f["comm"][()])

    p = _run([TOOLS / "comm_table.py", run, multi, "--per-round"])
    sections = p.stdout.split("== ")
    single = next(s for s in sections if s.startswith(str(run)))
    three = next(s for s in sections if s.startswith(str(multi)))

    def all_line(text):
        ln = next(ln for ln in text.splitlines() if ln.split()[:1] == ["all"])
        return [int(x.replace(",", "")) for x in ln.split()[1:4]]

    assert all_line(single) == [sent, recv, sent + recv]
    assert f"{int((comm['round'] >= 1).sum())}/{len(comm)} rows equal it" in single  # analytic check, every rank
    assert "equal" in single and "DIFFERENT" not in single                              # /metrics agrees
    ms = int(multi_comm["allgather_sent"].sum() + multi_comm["allreduce_sent"].sum())
    mr = int(multi_comm["allgather_received"].sum() + multi_comm["allreduce_received"].sum())
    assert all_line(three) == [ms, mr, ms + mr]
    for q in range(3):
        sel = multi_comm[multi_comm["rank"] == q]
        want = int(sum(sel[k].sum() for k in ("allgather_sent", "allreduce_sent", "allgather_received",
                                               "allreduce_received")))
        ln = next(ln for ln in three.splitlines() if ln.split()[:1] == [str(q)] and len(ln.split()) >= 7)
        assert int(ln.split()[3].replace(",", "")) == want
    # bytes over all links: allgather (S-1) x sent, allreduce 2 (S-1)/S x sent (the same on every rank)
    links1 = int(comm["allgather_sent"].sum() + comm["allreduce_sent"].sum())  # S = 2: every byte crosses one link
    assert f"over all links (fair convention" in single and f": {links1:,} B = " in single
    links3 = 2 * int(multi_comm["allgather_sent"].sum()) + 4 * int(multi_comm["allreduce_sent"].sum()) // 3
    assert f": {links3:,} B = " in three
    table = {ln.split()[0]: ln.split() for ln in p.stdout.splitlines()[-4:] if ln.split()}
    assert int(table[str(run)[-40:]][4].replace(",", "")) == links1
    assert int(table[str(multi)[-40:]][4].replace(",", "")) == links3
    # per-round view: one line per round, cumulative total at the end
    per_round = [ln.split() for ln in single.splitlines() if re.match(r"^\s+\d+\s+\d+(\s+[\d,]+){3,}$", ln)]
    assert len(per_round) == len(set(comm["round"].tolist()))
    assert int(per_round[-1][-1].replace(",", "")) == sent + recv
    assert "file" in p.stdout.splitlines()[-4]          # comparison table of the two files


def test_comm_table_paper():
    p = _run([TOOLS / "comm_table.py", "--paper"])
    rows = [ln for ln in p.stdout.splitlines() if re.search(r"(CIFAR-10|CIFAR-100|ImageNet)\s+[24]\s", ln)]
    s2 = [ln for ln in rows if re.search(r"(CIFAR-10|CIFAR-100|ImageNet)\s+2\s", ln)]
    assert len(s2) == 5 and len(rows) >= 10
    for ln in s2:
        err_g = float(re.findall(r"([+-]\d+\.\d+)%", ln)[0])
        assert abs(err_g) < 2.0, ln
    # GPipe-2 CIFAR: 20 x 50,000 x 2 x 4 x 256*8*8 bytes = 131.07 G (paper 131.88 G)
    assert "131.07" in s2[0] and "131.88" in s2[0]
