"""``train.exchange: alltoall`` (loft_hpc/exchange/lean.py, loft_hpc/train/loft_lean.py) under real
mpirun: the same seed gives bit-identical weights and momentum to the allgather exchange after
every round (a checkpoint every round, each compared: model, momentum, BN statistics, every
/metrics column but the byte counters, snapshots, ticket detection, every rank's state), on 2
ranks, on 4 with an uneven deal, and on 3 with tensors sliced on two dims; what moves differs:
allgather and alltoall/assemble columns. A killed lean run resumes bit-exactly.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from loft_hpc.checkpoint.h5file import read_run_file
from loft_hpc.config import load_config
from loft_hpc.data import build_datasets
from loft_hpc.exchange.accounting import assemble_bytes, loft_alltoall_bytes
from loft_hpc.partition.plan import PartitionPlan
from loft_hpc.stages.common import make_model
from loft_hpc.testing.compare import run_differences
from tests.mpi_util import REPO, TINY, assert_same_run, ok, run_job, stop_and_resume

K = 4
BASE = TINY + ["train.duration=12it", f"train.local_steps={K}", "train.eval_every=8it", "output.snapshot_every=4it",
               f"output.checkpoint_every={K}it", "output.keep_checkpoints=100", "train.seed=3", "train.check_sync=true"]
BYTES = ("bytes_sent", "bytes_received", "allgather", "alltoall", "assemble")


def _pair(tmp_path, np_: int, extra: list[str]) -> dict:
    out = {}
    for ex in ("allgather", "alltoall"):
        d = tmp_path / ex
        ok(run_job(np_, ["--stage", "pretrain", *BASE, *extra, f"train.exchange={ex}", f"output.dir={d}"]))
        out[ex] = d
    return out


def _same_arithmetic(runs: dict) -> int:
    """Every checkpoint and the final file of the two runs agree in everything but bytes moved;
    returns how many files were compared."""
    ckpts = sorted((runs["allgather"] / "ckpt" / "pretrain").glob("ckpt-*.h5"))
    names = [p.name for p in ckpts] + ["pretrain.h5"]
    for name in names:
        rel = f"ckpt/pretrain/{name}" if name != "pretrain.h5" else name
        a, b = (read_run_file(runs[ex] / rel) for ex in ("allgather", "alltoall"))
        diff = [d for d in run_differences(a, b) if not any(k in d for k in BYTES)]
        assert not diff, f"{name}: {diff[:6]}"
        assert set(a.momentum) == set(b.momentum) and a.momentum  # momentum carried and compared
    return len(names)


def _moved(path) -> dict:
    rf = read_run_file(path)
    return {k: sum(int(r.get(f"{k}_sent", 0)) for r in rf.comm) for k in ("allgather", "alltoall", "assemble")}


@pytest.mark.parametrize("np_, extra", [
    (2, []),
    (4, []),                                               # inner width 6 over 4 ranks: shares 2, 2, 1, 1
    (3, ["model.arch=lenet300_100", "model.width=7", "model.inner_width_factor=1"]),  # sliced on two dims
])
def test_alltoall_equals_allgather_after_every_round(tmp_path, np_, extra):
    runs = _pair(tmp_path, np_, extra)
    assert _same_arithmetic(runs) == 12 // K  # checkpoints at rounds 1, 2 and the final file
    ag, at = _moved(runs["allgather"] / "pretrain.h5"), _moved(runs["alltoall"] / "pretrain.h5")
    assert ag["allgather"] > 0 and ag["alltoall"] == ag["assemble"] == 0
    assert at["allgather"] == 0 and at["alltoall"] > 0 and at["assemble"] > 0
    assert at["alltoall"] < ag["allgather"]
    _bytes_equal_the_plans(runs["alltoall"] / "pretrain.h5", np_, extra)
    # the installed comm tool rebuilds the same count from the file alone, from another folder
    tool = subprocess.run([str(Path(sys.executable).parent / "loft-tools"), "comm", str(runs["alltoall"] / "pretrain.h5")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert tool.returncode == 0, tool.stderr[-2000:]
    assert "LoFT lean exchange" in tool.stdout and f"{3 * np_}/{3 * np_} rows equal it" in tool.stdout, tool.stdout
    assert "DIFFERENT" not in tool.stdout, tool.stdout


def _model_and_deals(world: int, extra: list[str], rounds: int):
    """The runs' model, its groups and every rank's filters in rounds 0..rounds-1."""
    cfg = load_config(str(REPO / "configs" / "default.yaml"), [*BASE, *extra, "output.dir=unused"])
    model = make_model(cfg, build_datasets(cfg.data))
    groups = model.filter_groups()
    part = [g for g in groups if g.partitioned]
    keeps = {r: [PartitionPlan.draw(cfg.train.seed, r, part, world).keep(s) for s in range(world)] for r in range(rounds)}
    return model, groups, keeps


def _bytes_equal_the_plans(path, world: int, extra: list[str]) -> None:
    """Every rank's /comm row of every round equals the analytic count from the two plans: the
    alltoall from round r-1's deal to round r's, the shared allreduce, and the assembly of the
    weights and the momentum (every round here ends at a snapshot and a checkpoint or the file)
    under round r's deal."""
    model, groups, keeps = _model_and_deals(world, extra, rounds=4)
    rows = [r for r in read_run_file(path).comm if r["round"] >= 1]
    assert len(rows) == 3 * world
    for row in rows:
        r, q = row["round"], row["rank"]
        want = loft_alltoall_bytes(model, groups, keeps[r - 1], keeps[r], q, True)
        for mom in (False, True):
            for k, v in assemble_bytes(model, groups, keeps[r], q, mom).items():
                want[k] = want.get(k, 0) + v
        got = {k: row[k] for k in want}
        assert got == want, (r, q, got, want)
        assert row["allgather_sent"] == row["allgather_received"] == row["p2p_sent"] == 0


def test_killed_lean_run_resumes_bit_exactly(tmp_path):
    args = ["--stage", "pretrain", *BASE, "train.exchange=alltoall"]
    ok(run_job(2, [*args, f"output.dir={tmp_path / 'straight'}"]))
    out = tmp_path / "killed"
    p = run_job(2, [*args, f"output.dir={out}"], env={"LOFT_FAULT_INJECT": "1:2:pretrain:kill"})
    assert p.returncode != 0 and not (out / "pretrain.h5").exists()
    p = ok(run_job(2, [*args, f"output.dir={out}"]))
    assert "resumed from" in p.stdout and "at step 8/12" in p.stdout, p.stdout[-1500:]
    assert_same_run(read_run_file(tmp_path / "straight" / "pretrain.h5"), read_run_file(out / "pretrain.h5"))


def test_sigterm_to_a_lean_run_checkpoints_and_resumes_exactly(tmp_path):
    """SIGTERM reaches rank 1 when it starts round 2 (steps 8-12): the ranks agree to stop at its end,
    assemble the weights and momentum for a checkpoint at step 12 (the periodic ones: 8 and 16),
    exit 3; the same command resumes at step 12 and ends with the uninterrupted run's file, but for
    the bytes of that checkpoint's assembly."""
    args = ["--stage", "pretrain", *BASE, "train.duration=16it", "output.checkpoint_every=8it",
            "output.snapshot_every=8it", "train.exchange=alltoall"]
    ok(run_job(2, [*args, f"output.dir={tmp_path / 'straight'}"]))
    out = tmp_path / "stopped"
    model, groups, keeps = _model_and_deals(2, [], rounds=4)
    extra = [tuple(sum(assemble_bytes(model, groups, keeps[3], q, mom)[f"assemble_{d}"] for mom in (False, True))
                   for d in ("sent", "received")) for q in (0, 1)]  # the weights and momentum under round 3's deal
    stop_and_resume(2, [*args, f"output.dir={out}"], out, "1:2:pretrain:term", 12, 16,
                    tmp_path / "straight" / "pretrain.h5", assembles=extra)


def test_an_assembly_for_a_score_snapshot_is_booked_in_its_own_round(tmp_path):
    """Snapshots every round, evaluation and checkpoints only at the end: rounds 1 and 2 assemble
    the weights alone (for the filter scores), and their rows hold exactly that; the last row
    holds the weights and the momentum for the file. The installed comm tool agrees on every row."""
    out = tmp_path / "snap"
    ok(run_job(2, ["--stage", "pretrain", *BASE, "output.checkpoint_every=12it", "train.eval_every=12it",
                   "train.exchange=alltoall", f"output.dir={out}"]))
    model, groups, keeps = _model_and_deals(2, [], rounds=4)
    rows = [r for r in read_run_file(out / "pretrain.h5").comm if r["round"] >= 1]
    assert len(rows) == 6
    for row in rows:
        r, q = row["round"], row["rank"]
        want = assemble_bytes(model, groups, keeps[r], q, False)
        if r == 3:
            for k, v in assemble_bytes(model, groups, keeps[r], q, True).items():
                want[k] += v
        assert {k: row[k] for k in want} == want, (r, q)
    tool = subprocess.run([str(Path(sys.executable).parent / "loft-tools"), "comm", str(out / "pretrain.h5")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert "6/6 rows equal it" in tool.stdout and "DIFFERENT" not in tool.stdout, tool.stdout


def test_an_allgather_checkpoint_resumes_under_alltoall(tmp_path):
    """train.exchange is not part of the run's identity (the arithmetic is the same): a run killed
    under allgather and resumed under alltoall ends with the uninterrupted allgather run's weights,
    momentum and metrics; only what moved after the resume differs."""
    ok(run_job(2, ["--stage", "pretrain", *BASE, f"output.dir={tmp_path / 'straight'}"]))
    out = tmp_path / "switched"
    p = run_job(2, ["--stage", "pretrain", *BASE, f"output.dir={out}"], env={"LOFT_FAULT_INJECT": "1:2:pretrain:kill"})
    assert p.returncode != 0
    p = ok(run_job(2, ["--stage", "pretrain", *BASE, "train.exchange=alltoall", f"output.dir={out}"]))
    assert "resumed from" in p.stdout and "at step 8/12" in p.stdout, p.stdout[-1500:]
    a, b = read_run_file(tmp_path / "straight" / "pretrain.h5"), read_run_file(out / "pretrain.h5")
    diff = [d for d in run_differences(a, b) if not any(k in d for k in BYTES)]
    assert not diff, diff[:6]
    assert _moved(out / "pretrain.h5")["alltoall"] > 0 and _moved(out / "pretrain.h5")["allgather"] > 0
