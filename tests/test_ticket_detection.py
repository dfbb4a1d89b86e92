"""Ticket detection on real runs (LoFT-2 under mpirun): what the ranks decide online equals what
the offline detection computes from the stored snapshots; ``train.stop_at_ticket`` stops exactly
there and the chain prunes and retrains from it; the snapshot tickets are retrained and collected
by ``loft-tools tickets``."""
from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from loft_hpc.checkpoint.h5file import read_run_file
from loft_hpc.config import load_config
from loft_hpc.data import build_datasets
from loft_hpc.metrics.ticket_detection import detect, detection_groups
from loft_hpc.stages.common import make_model
from tests.mpi_util import PY, REPO, TINY, ok, run_job

# synthetic: 192 images, batch 16, LoFT (every rank the whole set): 12 batches per epoch; 13 snapshots
PRE = TINY + ["train.duration=48it", "train.local_steps=4", "train.eval_every=12it", "output.checkpoint_every=24it",
              "output.snapshot_every=4it", "train.ticket_window=2", "train.ticket_every=8it", "train.seed=3", "train.lr=0.05",
              "prune.ratios=[0.5]", "retrain.duration=8it", "retrain.lr=0.02"]
TOOLS = str(Path(PY).parent / "loft-tools")


def _offline(rf, criterion: str, threshold: float, window: int = 2):
    t = json.loads(rf.ticket["groups"])
    idx = np.array(rf.snap_index)
    bpe = rf.progress["batches_per_epoch"]
    return detect(idx[:, 0], idx[:, 0] / bpe, {g: np.stack(rf.snap_scores[g]["l2"]) for g in t},
                  criterion=criterion, window=window, threshold=threshold, ratio=0.5, every=8)


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """LoFT-2 pretraining to the end, with weight snapshots for the snapshot tickets."""
    out = tmp_path_factory.mktemp("full")
    ok(run_job(2, ["--stage", "pretrain", *PRE, "output.snapshot_weights=[12it,24it]", f"output.dir={out}"]))
    return out


def test_online_detection_equals_the_offline_one(full):
    rf = read_run_file(full / "pretrain.h5")
    cfg = load_config(str(REPO / "configs" / "default.yaml"), PRE)
    groups = make_model(cfg, build_datasets(cfg.data)).filter_groups()
    assert json.loads(rf.ticket["groups"]) == detection_groups(groups) == [g.name for g in groups if g.partitioned]
    assert len(rf.snap_index) == 13 and rf.ticket["stopped_early"] == 0 and rf.ticket["window"] == 2
    assert rf.ticket["every"] == 8  # every other snapshot is used: the odd ones have no distance
    for c in rf.ticket["criteria"].values():
        assert np.isnan(c["distance"][1::2]).all() and not np.isnan(c["distance"][4::2]).any()
    for name, eps in (("filter_distance", cfg.train.ticket_threshold), ("early_bird", cfg.train.ticket_eb_threshold)):
        off = _offline(rf, name, eps)
        on = rf.ticket["criteria"][name]
        np.testing.assert_array_equal(on["distance"], np.array(off.distance))  # NaN where NaN, bit for bit
        assert on["emerged_step"] == off.emerged_step and on["threshold"] == eps
        assert _same_float(on["emerged_epoch"], off.emerged_epoch)
    assert rf.ticket["criterion"] == "filter_distance"
    assert rf.ticket["emerged_step"] == rf.ticket["criteria"]["filter_distance"]["emerged_step"]


def _same_float(a, b):
    return a == b or (math.isnan(a) and math.isnan(b))


def _middle_threshold(rf) -> tuple[float, int]:
    """A threshold at which the offline detection on the full run fires in the middle of it."""
    d = np.array(rf.ticket["criteria"]["filter_distance"]["distance"])
    for eps in np.unique(d[~np.isnan(d)]) * (1 + 1e-6):
        det = _offline(rf, "filter_distance", float(eps))
        if det.emerged and 3 <= det.emerged_index <= 11:
            return float(eps), det.emerged_index
    pytest.fail(f"no threshold makes the detection fire mid-run; window distances {d}")


def test_stop_at_ticket_stops_where_the_full_run_detects_and_the_chain_continues(full, tmp_path):
    rf_full = read_run_file(full / "pretrain.h5")
    eps, k = _middle_threshold(rf_full)
    stop_step = rf_full.snap_index[k][0]
    out = tmp_path / "stop"
    # with the snapshot tickets: 4it is before the stop, 47it (taken at 48) after it: skipped
    p = ok(run_job(2, ["--stage", "all,snapshots", *PRE, "train.stop_at_ticket=true", f"train.ticket_threshold={eps!r}",
                       "output.snapshot_weights=[4it,47it]", f"output.dir={out}"]))
    assert f"holds no weight snapshot at 47it; pretraining stopped early at step {stop_step}" in p.stdout
    assert read_run_file(out / "retrain@4it_p50.h5").complete and not (out / "tickets@47it_p50.h5").exists()
    assert p.stdout.count("\nsummary: ") == 2  # summary.txt once (not again by the snapshots stage), summary@4it.txt
    rf = read_run_file(out / "pretrain.h5")
    t = rf.ticket
    assert (t["stopped_early"], t["emerged_step"], t["criterion"]) == (1, stop_step, "filter_distance")
    assert rf.progress["step"] == stop_step and rf.progress["total_steps"] == 48
    assert rf.metrics[-1]["step"] == stop_step  # the last boundary was evaluated as the end
    assert f"stopping pretraining at step {stop_step} of 48" in p.stdout
    # the same trajectory as the full run up to the stop: every snapshot equal
    assert rf.snap_index == rf_full.snap_index[:k + 1]
    for g, per in rf.snap_scores.items():
        np.testing.assert_array_equal(np.stack(per["l2"]), np.stack(rf_full.snap_scores[g]["l2"][:k + 1]))
    # pruning continued from the stopped weights
    ticket = read_run_file(out / "tickets_p50.h5")
    assert ticket.mask_attrs["mask_from"] == "end" and ticket.mask_attrs["mask_from_step"] == stop_step
    retrained = read_run_file(out / "retrain_p50.h5")
    assert retrained.complete and retrained.progress["step"] == 8
    # running the job again skips everything (the stopped file is the finished pretraining)
    again = ok(run_job(2, ["--stage", "all", *PRE, "train.stop_at_ticket=true", f"train.ticket_threshold={eps!r}",
                           "output.snapshot_weights=[4it,47it]", f"output.dir={out}"]))
    for f in ("pretrain.h5", "tickets_p50.h5", "retrain_p50.h5"):
        assert f"{out / f} exists, skipping" in again.stdout, f


def test_a_window_longer_than_the_run_is_refused_before_training(tmp_path):
    p = run_job(0, ["--stage", "pretrain", *PRE, "train.stop_at_ticket=true", "train.ticket_window=13",
                    f"output.dir={tmp_path / 'o'}"], timeout=120)
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "train.stop_at_ticket: the detection sees 7 filter-score snapshot(s)" in lines[0], lines
    assert "train.ticket_window=13" in lines[0]


def test_snapshot_tickets_stage_and_the_collector(full, tmp_path):
    out = tmp_path / "snaps"
    shutil.copytree(full, out, ignore=shutil.ignore_patterns("ckpt"))
    # retraining runs past the snapshot steps: only pretraining may write snapshots/weights@<N>it.h5
    ok(run_job(2, ["--stage", "snapshots", *PRE, "output.snapshot_weights=[12it,24it]", "prune.rewind=mask_from",
                   "retrain.duration=24it", f"output.dir={out}"]))
    snaps = sorted(p.name for p in (out / "snapshots").iterdir())
    assert snaps == ["weights@12it.h5", "weights@24it.h5"]
    assert {read_run_file(out / "snapshots" / n).stage for n in snaps} == {"pretrain-snapshot"}
    names = sorted(p.name for p in out.glob("retrain*.h5"))
    assert names == ["retrain@12it_p50.h5", "retrain@24it_p50.h5", "retrain_p50.h5"]
    pre = read_run_file(out / "pretrain.h5")
    for label in ("12it", "24it"):
        tk = read_run_file(out / f"tickets@{label}_p50.h5")
        snap = read_run_file(out / pre.weight_snapshots[label])
        assert tk.mask_attrs["mask_from_step"] == tk.mask_attrs["rewind_step"] == snap.progress["step"]
        for n, w in tk.model.items():  # rewound to its own snapshot: the snapshot's weights, masked
            m = tk.masks.get(n)
            expect = snap.model[n] if m is None else snap.model[n] * m.to(snap.model[n].dtype)
            assert np.array_equal(w.numpy(), expect.numpy()), n
        assert (out / f"summary@{label}.txt").read_text().startswith(f"tickets found at pretraining snapshot {label};")
    csv_path, png = tmp_path / "t.csv", tmp_path / "t.png"
    p = subprocess.run([TOOLS, "tickets", str(out), "--csv", str(csv_path), "--plot", str(png)], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    rows = list(csv.DictReader(open(csv_path)))
    assert [(r["mask_from"], int(r["mask_from_step"])) for r in rows] == [("12it", 12), ("24it", 24), ("end", 48)]
    for r in rows:
        rf = read_run_file(out / r["file"])
        assert float(r["final_test_acc"]) == rf.metrics[-1]["test_acc"]
        assert float(r["best_test_acc"]) == max(m["test_acc"] for m in rf.metrics)
        assert float(r["epoch"]) == int(r["mask_from_step"]) / 12
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "ticket detection filter_distance (deciding)" in p.stdout


@pytest.mark.parametrize("case", ["missing", "no_pretrain", "no_retrain"])
def test_tickets_tool_error_lines(full, tmp_path, case):
    d = tmp_path / "d"
    if case == "no_pretrain":
        d.mkdir()
    elif case == "no_retrain":
        d.mkdir()
        shutil.copy(full / "pretrain.h5", d / "pretrain.h5")
    p = subprocess.run([TOOLS, "tickets", str(d)], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    lines = p.stderr.splitlines()
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("loft-tools tickets: error:"), p.stderr
    assert str(d) in lines[0]
