"""``loft-tools`` (the installed console script) as a user runs it: from a folder that is not the
repository, on bad input files and on a real pretraining file.

Bad input: for every command (summary, distance, heatmap, comm, detect) a missing file, a folder, a
truncated loft_hpc file, a file that is not HDF5, an HDF5 file that is not a loft_hpc file, and a
loft_hpc file lacking what the command needs: exit status 2 and exactly one line on stderr,
``loft-tools CMD: error: ...``, naming the file.

Real file: one LoFT pretraining run on 2 ranks (tiny model, synthetic data, a few seconds) made
once for the module; each command's key output is checked against values computed here from the
file itself (h5py, and the metric functions for the brute-force detection).
"""
from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest

from loft_hpc.metrics.filter_distance import filter_distance
from tests.mpi_util import PY, TINY, ok, run_job

LOFT_TOOLS = Path(PY).parent / "loft-tools"
COMMANDS = ("summary", "distance", "heatmap", "comm", "detect")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
WINDOW = 2  # train.ticket_window of the run: detect must take it from the file's config
# LoFT on 2 ranks, K = 2, 12 batches per epoch: 16 steps; a snapshot every round (9), an evaluation
# every 8 steps (2), full weights at step 8; light evaluations (few BN recalibration batches)
JOB = TINY + ["train.method=loft", "train.local_steps=2", "train.duration=16it", "output.snapshot_every=2it",
              "train.eval_every=8it", "output.checkpoint_every=16it", "output.snapshot_weights=[8it]",
              f"train.ticket_window={WINDOW}", "train.ticket_every=0it",  # every snapshot (cadence: test_pure_ticket_detection)
              "train.seed=3", "train.bn_recalibration=2",
              "train.train_eval_samples=64"]
SNAPSHOTS = 9


def loft_tools(args: list, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", MPLBACKEND="Agg")
    return subprocess.run([str(LOFT_TOOLS), *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def done(p: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert p.returncode == 0, f"exit {p.returncode}\n--- stdout\n{p.stdout[-3000:]}\n--- stderr\n{p.stderr[-3000:]}"
    return p


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    if not LOFT_TOOLS.is_file():
        pytest.fail(f"{LOFT_TOOLS} is not installed: pip install -e . (setup.cfg declares the console script)",
                    pytrace=False)
    out = tmp_path_factory.mktemp("cli_run")
    ok(run_job(2, ["--stage", "pretrain", *JOB, f"output.dir={out}"], timeout=240))
    assert (out / "pretrain.h5").is_file() and (out / "snapshots" / "weights@8it.h5").is_file()
    return out


@pytest.fixture()
def work(tmp_path) -> Path:
    """The folder the commands run in (not the repository)."""
    d = tmp_path / "work"
    d.mkdir()
    return d


def _copy_without(src: Path, dst: Path, *members: str) -> Path:
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        for m in members:
            del f[m]
    return dst


@pytest.fixture(scope="module")
def bad_files(run_dir, tmp_path_factory) -> dict[str, Path]:
    """One folder of bad inputs; name -> path."""
    d = tmp_path_factory.mktemp("bad_inputs")
    real = run_dir / "pretrain.h5"
    (d / "folder.h5").mkdir()
    data = real.read_bytes()
    (d / "truncated.h5").write_bytes(data[: len(data) // 2])
    (d / "notes.h5").write_text("step,loss\n1,2.3\n")
    with h5py.File(d / "other.h5", "w") as f:
        f.create_dataset("x", data=np.arange(5))
        f.attrs["format"] = "something_else"
    shutil.copy(run_dir / "snapshots" / "weights@8it.h5", d / "weights.h5")  # a real file without snapshots
    _copy_without(real, d / "no_config.h5", "config")
    _copy_without(real, d / "no_comm.h5", "comm")
    return {"missing": d / "missing.h5", "folder": d / "folder.h5", "truncated": d / "truncated.h5",
            "not_hdf5": d / "notes.h5", "not_loft": d / "other.h5", "weights": d / "weights.h5",
            "no_config": d / "no_config.h5", "no_comm": d / "no_comm.h5"}


# what each command needs that a (readable) loft_hpc file can lack, and the words of its error
LACKING = {"summary": ("no_config", "no /config"), "distance": ("weights", "no filter-score snapshots"),
           "heatmap": ("weights", "no filter-score snapshots"), "comm": ("no_comm", "no /comm"),
           "detect": ("weights", "not a pretraining file")}
CASES = {"missing": "no such file", "folder": "is a folder", "truncated": "truncated or corrupt",
         "not_hdf5": "not an HDF5 file", "not_loft": "not a loft_hpc file", "lacking": None}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("cmd", COMMANDS)
def test_bad_input_is_one_line_and_exit_2(cmd, case, bad_files, work):
    name, words = LACKING[cmd] if case == "lacking" else (case, CASES[case])
    path = bad_files[name]
    extra = ["--out", work / "x.png"] if cmd == "heatmap" else []
    p = loft_tools([cmd, path, *extra], cwd=work)
    lines = p.stderr.splitlines()
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith(f"loft-tools {cmd}: error: "), lines[0]
    assert str(path) in lines[0] and words in lines[0], lines[0]
    assert not (work / "x.png").exists()


# ------------------------------------------------------------------------ values from the file
def read_h5(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        return {"index": np.array(f["snapshots/index"][()]),
                "scores": {g: np.array(f[f"snapshots/scores/{g}/l2"][()], dtype=np.float64)
                           for g in f["snapshots/scores"]},
                "metrics": np.array(f["metrics"][()]), "comm": np.array(f["comm"][()]),
                "progress": {k: v.item() for k, v in f["progress"].attrs.items()},
                "ranks": {int(q): {k: int(v) for k, v in f["ranks"][q].attrs.items() if k.startswith("bytes")}
                          for q in f["ranks"]}}


def partitioned_groups(run_dir: Path) -> list[str]:
    """The groups LoFT partitions in this run's model, from the package's model (not the tool)."""
    from loft_hpc.config import load_config
    from loft_hpc.data import build_datasets
    from loft_hpc.stages.common import make_model

    cfg = load_config(str(Path(__file__).resolve().parent.parent / "configs" / "default.yaml"),
                      [*JOB, f"output.dir={run_dir}"])
    groups = make_model(cfg, build_datasets(cfg.data)).filter_groups()
    return sorted(g.name for g in groups if g.partitioned) or sorted(g.name for g in groups)


def bf_window_distance(scores: dict[str, np.ndarray], window: int, criterion: str, ratio: float = 0.5) -> list[float]:
    """Per snapshot t >= W: the largest distance between snapshot t and each of t-1 .. t-W (NaN
    before): filter_distance(newest, older) maxed over the groups, or the fraction of filters
    whose kept/pruned state at ``ratio`` differs (masks of all groups together)."""
    t_all = len(next(iter(scores.values())))

    def mask(t):
        keep = []
        for g in sorted(scores):
            s = scores[g][t]
            k = max(1, round((1 - ratio) * len(s)))
            top = set(sorted(range(len(s)), key=lambda f: (-s[f], f))[:k])
            keep += [f in top for f in range(len(s))]
        return np.array(keep)

    out = []
    for t in range(t_all):
        if t < window:
            out.append(math.nan)
        elif criterion == "filter_distance":
            out.append(max(filter_distance(h[t], h[t - j]) for h in scores.values() for j in range(1, window + 1)))
        else:
            out.append(max(float(np.mean(mask(t) != mask(t - j))) for j in range(1, window + 1)))
    return out


def first(dist: list[float], holds) -> int | None:
    return next((t for t, d in enumerate(dist) if not math.isnan(d) and holds(d)), None)


def low_threshold(dist: list[float]) -> float:
    """A threshold between the smallest window distance and the next: the ticket emerges at the
    (first) smallest one, wherever it is (and equality never decides)."""
    v = sorted(set(d for d in dist if not math.isnan(d)))
    return (v[0] + v[1]) / 2 if len(v) > 1 else v[0] + 1e-6


def test_detect_on_a_real_file(run_dir, work):
    run = run_dir / "pretrain.h5"
    h = read_h5(run)
    steps, bpe, total = h["index"][:, 0], h["progress"]["batches_per_epoch"], h["progress"]["total_steps"]
    with h5py.File(run, "r") as f:
        groups = json.loads(f["ticket"].attrs["groups"]) if "ticket" in f else partitioned_groups(run_dir)
    assert len(steps) == SNAPSHOTS and 0 < len(groups) < len(h["scores"])
    scores = {g: h["scores"][g] for g in groups}
    fd = bf_window_distance(scores, WINDOW, "filter_distance")
    eb = bf_window_distance(scores, WINDOW, "early_bird")
    thr, eb_thr = low_threshold(fd), low_threshold(eb)
    fd_at, eb_at = first(fd, lambda d: d < thr), first(eb, lambda d: d <= eb_thr)
    assert fd_at is not None and fd_at > WINDOW - 1

    p = done(loft_tools(["detect", run, "--threshold", thr, "--eb-threshold", eb_thr, "--csv", "d.csv",
                         "--plot", "plots/detect.png"], cwd=work))
    out = p.stdout
    assert f"window {WINDOW} (file config)" in out and "ratio 0.5 (file config)" in out
    assert re.search(r"^groups \(\d+, .*\): (.*)$", out, re.M).group(1).split(", ") == groups
    m = re.search(rf"^filter_distance: emerged at step (\d+) of {total} \(epoch ([\d.]+), ([\d.]+)% of pretraining",
                  out, re.M)
    assert m, out
    assert int(m.group(1)) == steps[fd_at]
    assert float(m.group(2)) == pytest.approx(steps[fd_at] / bpe, abs=0.005)
    assert float(m.group(3)) == pytest.approx(100 * steps[fd_at] / total, abs=0.05)
    if eb_at is None:
        assert re.search(r"^early_bird: not detected", out, re.M), out
    else:
        assert re.search(rf"^early_bird: emerged at step {steps[eb_at]} of {total} \(", out, re.M), out
    with open(work / "d.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == steps.tolist()
    np.testing.assert_allclose([float(r["filter_distance"]) for r in rows], fd, atol=2e-6)
    np.testing.assert_allclose([float(r["early_bird"]) for r in rows], eb, atol=2e-6)
    png = (work / "plots" / "detect.png").read_bytes()
    assert png[:8] == PNG_MAGIC and len(png) > 5000


def add_ticket_and_masks(run: Path, dst: Path, groups: list[str], fd_step: int, eb_step: int, thr: float,
                         eb_thr: float) -> dict:
    """A copy of ``run`` with a hand-written /ticket (the online record) and masks of two tensors;
    the mask counts."""
    shutil.copy(run, dst)
    rng = np.random.default_rng(0)
    kept = total = 0
    with h5py.File(dst, "r+") as f:
        if "ticket" in f:
            del f["ticket"]
        bpe = f["progress"].attrs["batches_per_epoch"]
        g = f.create_group("ticket")
        g.attrs.update(emerged_step=fd_step, emerged_epoch=fd_step / bpe, criterion="filter_distance",
                       window=WINDOW, threshold=thr, stopped_early=0, score="l2", groups=json.dumps(groups), ratio=0.5)
        for c, step, t in (("filter_distance", fd_step, thr), ("early_bird", eb_step, eb_thr)):
            cg = g.create_group(c)
            cg.create_dataset("distance", data=np.zeros(len(f["snapshots/index"])))
            cg.attrs.update(emerged_step=step, emerged_epoch=step / bpe if step >= 0 else np.nan, window=WINDOW,
                            threshold=t)
        m = f.create_group("masks")
        for name in [n for n in f["model"] if n.endswith("conv1.weight")][:2]:
            mask = (rng.random(f["model"][name].shape) < 0.4).astype(np.uint8)
            m.create_dataset(name, data=mask)
            kept, total = kept + int(mask.sum()), total + mask.size
        m.attrs.update(ratio=0.6, method="unstructured", scope="layerwise", mask_from="end", rewind="init")
    return {"kept": kept, "total": total}


def test_detect_against_the_online_record_and_summary(run_dir, work):
    """detect on a file with /ticket: its groups are the ones compared, the online result is
    printed beside the offline one with the verdict; summary of the same file: best / last
    accuracies, the ticket, the masks and the bytes, each against the file's own numbers."""
    run = run_dir / "pretrain.h5"
    h = read_h5(run)
    steps, bpe, total = h["index"][:, 0], h["progress"]["batches_per_epoch"], h["progress"]["total_steps"]
    groups = sorted(h["scores"])[-2:]  # not the groups the online detection compares
    scores = {g: h["scores"][g] for g in groups}
    fd = bf_window_distance(scores, WINDOW, "filter_distance")
    eb = bf_window_distance(scores, WINDOW, "early_bird")
    thr, eb_thr = low_threshold(fd), low_threshold(eb)
    fd_at, eb_at = first(fd, lambda d: d < thr), first(eb, lambda d: d <= eb_thr)
    fd_step = int(steps[fd_at])
    eb_online = -1 if eb_at is not None else int(steps[-1])  # the online record disagrees on early_bird
    f = add_ticket_and_masks(run, work / "ticket.h5", groups, fd_step, eb_online, thr, eb_thr)

    p = done(loft_tools(["detect", "ticket.h5", "--threshold", thr, "--eb-threshold", eb_thr], cwd=work))
    assert re.search(r"^groups \(2, l2 scores; the /ticket attribute groups", p.stdout, re.M), p.stdout
    assert re.search(rf"^  filter_distance +online step {fd_step} .*, offline step {fd_step} .*: agree", p.stdout, re.M)
    assert re.search(r"^  early_bird +online .*: DIFFER", p.stdout, re.M), p.stdout
    assert p.stdout.rstrip().endswith("offline and online detection DIFFER")

    p = done(loft_tools(["summary", "ticket.h5"], cwd=work))
    out = p.stdout
    acc = h["metrics"]["test_acc"]
    best = int(np.argmax(acc))  # the first of equal bests
    m = re.search(r"^  test_acc +best ([\d.]+) at step (\d+) .*; last ([\d.]+) at step (\d+)", out, re.M)
    assert m, out
    assert float(m.group(1)) == pytest.approx(acc.max(), abs=5e-5) and int(m.group(2)) == h["metrics"]["step"][best]
    assert float(m.group(3)) == pytest.approx(acc[-1], abs=5e-5) and int(m.group(4)) == h["metrics"]["step"][-1]
    tr = h["metrics"]["train_acc"]
    m = re.search(r"^  train_acc +best ([\d.]+) at step (\d+)", out, re.M)
    assert float(m.group(1)) == pytest.approx(tr.max(), abs=5e-5) and int(m.group(2)) == h["metrics"]["step"][np.argmax(tr)]
    assert f"progress: step {total} of {total} (100%)" in out
    assert f"snapshots: {len(steps)} (steps 0..{steps[-1]}" in out and "8it -> snapshots/weights@8it.h5" in out
    # ticket: the deciding criterion's step, epoch, fraction; early_bird not detected online
    m = re.search(r"^  filter_distance +\d+ +\S+ +step (\d+) \(epoch ([\d.]+), ([\d.]+)% of pretraining\) \(deciding\)",
                  out, re.M)
    assert m, out
    assert int(m.group(1)) == fd_step and float(m.group(2)) == pytest.approx(fd_step / bpe, abs=0.005)
    assert float(m.group(3)) == pytest.approx(100 * fd_step / total, abs=0.05)
    assert re.search(r"^  early_bird .*" + ("not detected" if eb_online < 0 else f"step {eb_online} "), out, re.M)
    # masks: counted from /masks
    pruned = 1 - f["kept"] / f["total"]
    assert f"kept {f['kept']:,} of {f['total']:,} masked weights, pruned {pruned:.2%}" in out, out
    assert "ratio 0.6, method unstructured, scope layerwise, mask_from end, rewind init" in out
    # bytes: all ranks from the last /metrics row, per rank from /ranks, per collective from /comm
    last = h["metrics"][-1]
    assert re.search(rf"all ranks \(last /metrics row, step {last['step']} .*\): sent {last['bytes_sent']:,} B"
                     rf".*received {last['bytes_received']:,} B", out), out
    for q, c in h["ranks"].items():
        assert re.search(rf"rank {q} \(/ranks/{q}\): sent {c['bytes_sent']:,} B.*received {c['bytes_received']:,} B",
                         out), out
    comm = h["comm"]
    assert f"allgather sent {int(comm['allgather_sent'].sum()):,} B" in out
    assert f"allreduce sent {int(comm['allreduce_sent'].sum()):,} B" in out
    assert sum(c["bytes_sent"] for c in h["ranks"].values()) == int(comm["allgather_sent"].sum() +
                                                                       comm["allreduce_sent"].sum()) > 0
    S = len(h["ranks"])
    links = (S - 1) * int(comm["allgather_sent"].sum()) + 2 * (S - 1) * int(comm["allreduce_sent"].sum()) // S
    assert f"over all links (the fair convention, each byte once per link it crosses): {links:,} B" in out, out


def test_distance_on_a_real_file(run_dir, work):
    run = run_dir / "pretrain.h5"
    h = read_h5(run)
    p = done(loft_tools(["distance", run, "--csv", "fd.csv", "--plot", "fd.png"], cwd=work))
    assert "reference: last snapshot" in p.stdout
    with open(work / "fd.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == h["index"][:, 0].tolist()
    for g, s in h["scores"].items():
        np.testing.assert_allclose([float(r[g]) for r in rows], [filter_distance(s[-1], x) for x in s], atol=2e-6)
    assert (work / "fd.png").read_bytes()[:8] == PNG_MAGIC


def test_heatmap_on_a_real_file(run_dir, work):
    p = done(loft_tools(["heatmap", run_dir / "pretrain.h5", "--out", "heat.png", "--curve", "c/curve.png"], cwd=work))
    # 3 partitioned groups (< 4): the 2nd and 4th filter groups of the model
    assert "groups: layer1.1.inner, layer2.1.inner" in p.stdout
    for f in (work / "heat.png", work / "c" / "curve.png"):
        data = f.read_bytes()
        assert data[:8] == PNG_MAGIC and int.from_bytes(data[16:20], "big") > 300


def test_comm_on_a_real_file(run_dir, work):
    run = run_dir / "pretrain.h5"
    comm = read_h5(run)["comm"]
    p = done(loft_tools(["comm", run], cwd=work))
    line = next(ln.split() for ln in p.stdout.splitlines() if ln.split()[:1] == ["all"])
    sent = int(comm["allgather_sent"].sum() + comm["allreduce_sent"].sum())
    recv = int(comm["allgather_received"].sum() + comm["allreduce_received"].sum())
    assert [int(x.replace(",", "")) for x in line[1:4]] == [sent, recv, sent + recv] and sent > 0
    assert "DIFFERENT" not in p.stdout and f"{int((comm['round'] >= 1).sum())}/{len(comm)} rows equal it" in p.stdout
