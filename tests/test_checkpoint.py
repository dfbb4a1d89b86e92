"""HDF5 run files: layout round trip, safe writes, load checks, and exact resume under mpirun."""
from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import threading

import h5py
import numpy as np
import pytest
import torch

from loft_hpc.checkpoint.h5file import (CheckpointError, RunFile, check_model_state, read_run_file, rng_state,
                                        write_run_file)
from loft_hpc.checkpoint.layout import FORMAT_VERSION
from loft_hpc.checkpoint.paths import RunPaths
from tests.mpi_util import PY, TINY, LiveJob, assert_same_run, job_command, ok, run_job, session_pids


def sample_runfile() -> RunFile:
    g = torch.Generator().manual_seed(0)
    model = {"conv.weight": torch.randn(4, 3, 3, 3, generator=g), "bn.running_mean": torch.randn(4, generator=g),
             "bn.num_batches_tracked": torch.tensor(7)}
    return RunFile(
        stage="pretrain", config_yaml="train:\n  seed: 1\n", arch="preresnet18", world_size=2, seed=1, model=model,
        progress={"step": 40, "round": 10, "epoch": 2, "wall_time": 1.5},
        momentum={"conv.weight": torch.randn(4, 3, 3, 3, generator=g)},
        ranks=[dict(rng_state(), bytes_sent=10 + r, bytes_received=20 + r, comm_seconds=0.5, run_stats=np.array([1.5, 2, 3.0]),
                    buffers={"bn.running_mean": torch.full((4,), float(r))}) for r in range(2)],
        identity={"kind": "pretrain", "config": {"train.lr": 0.1}, "inputs": {}},
        init={k: v.clone() for k, v in model.items()},
        masks={"conv.weight": torch.rand(4, 3, 3, 3, generator=g) > 0.5}, mask_attrs={"ratio": 0.5},
        snap_index=[(0, 0, 0), (8, 2, 0)],
        snap_scores={"layer2.1.inner": {"l2": [np.arange(4.0), np.arange(4.0) + 1], "l1": [np.ones(4), np.zeros(4)]}},
        weight_snapshots={"2ep": "snapshots/weights@16it.h5"},
        metrics=[{"step": 8, "round": 2, "epoch": 0.5, "step_loss": 1.0, "step_acc": 0.6, "train_loss": 0.9, "train_acc": 0.5, "test_loss": 1.1,
                  "test_acc": 0.4, "lr": 0.1, "bytes_sent": 10, "bytes_received": 20, "wall_time": 0.3}],
        comm=[{"round": 1, "step": 4, "rank": r, "allgather_sent": 100 + r, "allgather_received": 101,
               "allreduce_sent": 50, "allreduce_received": 50, "seconds": 0.01} for r in range(2)],
        sparsity=[{"name": "conv.weight", "kept": 50, "total": 108}], complete=True)


def test_round_trip_every_field(tmp_path):
    rf = sample_runfile()
    p = tmp_path / "a.h5"
    write_run_file(p, rf)
    back = read_run_file(p)
    for name in ("model", "momentum", "init"):
        a, b = getattr(rf, name), getattr(back, name)
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(back.masks["conv.weight"], rf.masks["conv.weight"])
    assert back.ranks[1]["numpy"] == rf.ranks[1]["numpy"] and torch.equal(back.ranks[0]["torch"], rf.ranks[0]["torch"])
    assert [(x["bytes_sent"], x["bytes_received"]) for x in back.ranks] == [(10, 20), (11, 21)]
    assert np.array_equal(back.ranks[1]["run_stats"], [1.5, 2, 3.0])
    assert torch.equal(back.ranks[1]["buffers"]["bn.running_mean"], torch.ones(4))
    assert back.identity == rf.identity
    assert back.metrics[0]["step_loss"] == 1.0 and back.metrics[0]["train_loss"] == 0.9
    assert back.snap_index == rf.snap_index
    assert np.array_equal(back.snap_scores["layer2.1.inner"]["l2"][1], np.arange(4.0) + 1)
    assert back.metrics[0]["test_acc"] == pytest.approx(0.4) and back.comm[1]["allgather_sent"] == 101
    assert back.weight_snapshots == rf.weight_snapshots and back.mask_attrs["ratio"] == 0.5
    assert back.sparsity[0]["name"] == "conv.weight" and back.complete
    with h5py.File(p) as f:
        assert f.attrs["format_version"] == FORMAT_VERSION and "torch" in f.attrs["versions"]
        assert f["masks/conv.weight"].dtype == np.uint8 and f["masks/conv.weight"].compression == "gzip"
        assert f["metrics"].maxshape == (None,) and f["snapshots/scores/layer2.1.inner/l2"].maxshape[0] is None
        assert "seed: 1" in f["config"][()].decode()


def test_h5dump_reads_the_file(tmp_path):
    # the set-up (scripts/setup_env.sh) installs hdf5-tools: its absence is a failure, not a skip
    assert shutil.which("h5dump") is not None, "h5dump is not on PATH: run scripts/setup_env.sh (hdf5-tools)"
    p = tmp_path / "a.h5"
    write_run_file(p, sample_runfile())
    out = subprocess.run(["h5dump", "-H", str(p)], capture_output=True, text=True, check=True).stdout
    for name in ("/model", "/masks", "/snapshots", "/metrics", "/comm", "format_version"):
        assert name.strip("/") in out


# A writer of RunFiles in a loop, generation g = 1, 2, ...: the file's "big" tensor (8 MB) is all
# g and its progress step is g; "wrote g" is printed once write_run_file has returned. argv[2]
# lists pauses "g:point,...": at each the writer prints "paused g point" and waits for a line on
# stdin. Points: "mid" (the big tensor is written, the rest of the file is not), "before" (about
# to os.replace the finished file to the real name), "after" (just replaced).
WRITER = """
import os
import sys
import h5py
import torch
from loft_hpc.checkpoint.h5file import write_run_file
from tests.test_checkpoint import sample_runfile
path = sys.argv[1]
pauses = {tuple(x.split(":")) for x in sys.argv[2].split(",") if x}
rf, big, gen = sample_runfile(), torch.empty(2_000_000), 0
def pause(point):
    if (str(gen), point) in pauses:
        print(f"paused {gen} {point}", flush=True)
        sys.stdin.readline()
real_create, real_replace = h5py.Group.create_dataset, os.replace
def create_dataset(self, name, *a, **kw):
    ds = real_create(self, name, *a, **kw)
    if name == "big":
        pause("mid")
    return ds
def replace(src, dst):
    pause("before")
    real_replace(src, dst)
    pause("after")
h5py.Group.create_dataset, os.replace = create_dataset, replace
while True:
    gen += 1
    rf.model["big"] = big.fill_(float(gen))
    rf.progress = dict(rf.progress, step=gen)
    write_run_file(path, rf)
    print(f"wrote {gen}", flush=True)
"""


def _generation(path) -> int:
    """The generation of a complete writer file (every field read back, the tensor all one value)."""
    rf = read_run_file(path)
    g = rf.progress["step"]
    assert rf.complete and torch.equal(rf.model["big"], torch.full((2_000_000,), float(g)))
    assert set(rf.model) == set(sample_runfile().model) | {"big"} and rf.identity == sample_runfile().identity
    return g


def test_writer_killed_mid_write_leaves_the_previous_file(tmp_path):
    """A real writer stopped inside write_run_file at every phase: before the first file exists
    (nothing under the real name), half-way through writing (the previous file, complete), with
    the new file finished but not yet renamed (still the previous one), just after the rename (the
    new one, complete); then SIGKILLed half-way through a write: the previous file, complete, is
    under the real name, and what was cut off is a partial file under a temporary name only."""
    p = tmp_path / "a.h5"
    stops = [(1, "mid", None), (2, "mid", 1), (3, "before", 2), (3, "after", 3), (4, "mid", 3), (5, "mid", 4)]
    job = LiveJob([PY, "-c", WRITER, str(p), ",".join(f"{g}:{pt}" for g, pt, _ in stops)], stdin=subprocess.PIPE)
    try:
        for g, point, want in stops:
            assert job.wait_for(f"paused {g} {point}", 120), (g, point, job.stdout + job.stderr)
            if want is None:
                assert not p.exists()
            else:
                assert _generation(p) == want, (g, point)
            temps = [q for q in tmp_path.iterdir() if q.name != "a.h5"]
            assert len(temps) == (0 if point == "after" else 1), (g, point, temps)
            if (g, point) != stops[-1][:2]:
                job.proc.stdin.write("go\n")
                job.proc.stdin.flush()
    finally:
        job.close()  # SIGKILL, half-way through writing generation 5
    assert job.proc.returncode == -signal.SIGKILL
    assert _generation(p) == 4
    with pytest.raises(CheckpointError):  # what was cut off really is a partial file
        read_run_file(temps[0])


def test_writer_killed_at_any_moment_leaves_a_complete_file(tmp_path):
    """SIGKILL at an arbitrary moment of a writer in a loop: the real name holds the last generation
    reported written or the next one, always complete, never a partial file."""
    p = tmp_path / "a.h5"
    job = LiveJob([PY, "-c", WRITER, str(p), ""])
    try:
        assert job.wait_for("wrote 2", 120), job.stdout + job.stderr
        threading.Event().wait(random.uniform(0.0, 0.5))  # a moment inside one of the next writes
    finally:
        job.close()  # SIGKILL
    assert job.proc.returncode == -signal.SIGKILL
    last = max(int(ln.split()[1]) for ln in job.out if ln.startswith("wrote"))
    assert _generation(p) in (last, last + 1)


def test_load_checks_are_one_line(tmp_path):
    p = tmp_path / "a.h5"
    write_run_file(p, sample_runfile())
    with h5py.File(p, "r+") as f:
        f.attrs["format_version"] = 99
    with pytest.raises(CheckpointError, match="format_version 99") as e:
        read_run_file(p)
    assert "\n" not in str(e.value)
    (tmp_path / "junk.h5").write_text("not hdf5")
    with pytest.raises(CheckpointError, match="cannot open"):
        read_run_file(tmp_path / "junk.h5")
    model = torch.nn.Conv2d(3, 5, 3)
    with pytest.raises(CheckpointError, match="holds a resnet34"):
        check_model_state("f.h5", {}, model, "preresnet18", "resnet34")
    with pytest.raises(CheckpointError, match=r"weight has shape \(4, 3, 3, 3\)"):
        check_model_state("f.h5", {"weight": torch.zeros(4, 3, 3, 3), "bias": torch.zeros(5)}, model, "a", "a")


def test_latest_pointer_and_retention(tmp_path):
    paths = RunPaths(tmp_path)
    assert paths.latest("pretrain") is None
    for step in (4, 8, 12):
        f = paths.ckpt("pretrain", step)
        write_run_file(f, sample_runfile())
        paths.set_latest("pretrain", f, keep=2)
        assert paths.latest("pretrain") == f
    assert sorted(q.name for q in paths.ckpt_dir("pretrain").glob("*.h5")) == [
        "ckpt-0000000008.h5", "ckpt-0000000012.h5"]


# ---------------------------------------------------------------- exact resume under mpirun
RESUME = TINY + ["model.width=5", "train.duration=32it", "train.local_steps=4", "train.eval_every=16it",
                 "output.checkpoint_every=8it", "output.snapshot_every=8it", "train.seed=7",
                 "train.momentum_mode=carry", "data.augment=true"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    ok(run_job(2, ["--stage", "pretrain", *RESUME, f"output.dir={out}"]))
    return read_run_file(out / "pretrain.h5")


def test_killed_and_resumed_equals_uninterrupted(tmp_path, uninterrupted):
    """Killed after the checkpoint at step 8, which is not an evaluation step (those are 16, 32):
    the running loss sums and every rank's byte counters must come back from the checkpoint for
    the /metrics row at 16 to equal the uninterrupted one."""
    out = tmp_path / "killed"
    p = run_job(2, ["--stage", "pretrain", *RESUME, f"output.dir={out}"], env={"LOFT_FAULT_INJECT": "1:3"})
    assert p.returncode == 1 and "injected fault" in p.stderr
    assert not (out / "pretrain.h5").exists()
    assert RunPaths(out).latest("pretrain").name == "ckpt-0000000008.h5"  # rounds 1-2 done, checkpoint at 8it
    ck = read_run_file(RunPaths(out).latest("pretrain"))
    assert all(r["run_stats"][2] > 0 for r in ck.ranks)  # 8 steps of samples not yet in a row
    sent = [r["bytes_sent"] for r in ck.ranks]
    assert sent[0] != sent[1]  # uneven shards: the ranks' counters differ, each is restored
    p = ok(run_job(2, ["--stage", "pretrain", *RESUME, f"output.dir={out}"]))
    assert "resumed from" in p.stdout and "at step 8/32" in p.stdout
    assert_same_run(uninterrupted, read_run_file(out / "pretrain.h5"))


def test_truncated_newest_checkpoint_falls_back_to_the_previous(tmp_path, uninterrupted):
    out = tmp_path / "truncated"
    p = run_job(2, ["--stage", "pretrain", *RESUME, f"output.dir={out}"], env={"LOFT_FAULT_INJECT": "0:7"})
    assert p.returncode == 1
    paths = RunPaths(out)
    newest = paths.latest("pretrain")
    assert [q.name for q in paths.checkpoints("pretrain")] == ["ckpt-0000000016.h5", "ckpt-0000000024.h5"]
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])
    p = ok(run_job(2, ["--stage", "pretrain", *RESUME, f"output.dir={out}"]))
    warn = [line for line in p.stdout.splitlines() if "warning:" in line]
    assert len(warn) == 1 and "ckpt-0000000024.h5" in warn[0] and "ckpt-0000000016.h5" in warn[0], p.stdout
    assert "at step 16/32" in p.stdout
    assert_same_run(uninterrupted, read_run_file(out / "pretrain.h5"))


def test_dangling_latest_is_an_error_not_a_restart(tmp_path):
    paths = RunPaths(tmp_path)
    f = paths.ckpt("retrain_p50", 8)
    write_run_file(f, sample_runfile())
    paths.set_latest("retrain_p50", f, keep=2)
    f.unlink()  # e.g. deleted by another job writing the same folder
    with pytest.raises(CheckpointError, match="LATEST names ckpt-0000000008.h5, which does not exist") as e:
        paths.latest("retrain_p50")
    assert "\n" not in str(e.value)


def test_latest_temp_name_is_unique_per_writer(tmp_path):
    """Two writers of one folder never share the temporary pointer name (it carries host and pid)."""
    paths = RunPaths(tmp_path)
    f = paths.ckpt("s", 4)
    write_run_file(f, sample_runfile())
    seen = []
    real_replace = os.replace

    def spy(src, dst):
        seen.append(os.path.basename(src))
        return real_replace(src, dst)

    os.replace = spy
    try:
        paths.set_latest("s", f, keep=2)
    finally:
        os.replace = real_replace
    import socket

    assert f".LATEST.{socket.gethostname()}.{os.getpid()}.tmp" in seen


def test_files_honour_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_run_file(tmp_path / "a.h5", sample_runfile())
    finally:
        os.umask(old)
    assert (tmp_path / "a.h5").stat().st_mode & 0o777 == 0o644


def test_sigusr1_checkpoints_exits_3_and_resumes_exactly(tmp_path, uninterrupted):
    out = tmp_path / "signalled"
    job = LiveJob(job_command(2, ["--stage", "pretrain", *RESUME, f"output.dir={out}"]))
    try:
        # printed after Horovod init: every rank has its handler installed by now
        assert job.wait_for("job: stages", 120), f"no job line\n{job.stdout[-3000:]}\n{job.stderr[-3000:]}"
        # SIGUSR1 to mpirun itself (not to the scripts/mpirun.sh wrapper): it forwards it to every rank
        mpirun = session_pids(job.proc.pid, "mpirun")
        assert len(mpirun) == 1, mpirun
        os.kill(mpirun[0], signal.SIGUSR1)
        rc = job.finish(timeout=120)
    finally:
        job.close()
    assert rc == 3, f"exit {rc}\n{job.stdout[-3000:]}\n{job.stderr[-3000:]}"
    assert "stop requested" in job.stdout
    assert not (out / "pretrain.h5").exists()
    stopped_at = RunPaths(out).latest("pretrain")
    assert stopped_at is not None and stopped_at.name < "ckpt-0000000032.h5"
    step = read_run_file(stopped_at).progress["step"]
    p = ok(run_job(2, ["--stage", "pretrain", *RESUME, f"output.dir={out}"]))
    assert "resumed from" in p.stdout and f"at step {step}/32" in p.stdout
    assert_same_run(uninterrupted, read_run_file(out / "pretrain.h5"))


def test_resume_refuses_other_world_size(tmp_path):
    out = tmp_path / "ws"
    p = run_job(2, ["--stage", "pretrain", *RESUME, f"output.dir={out}"], env={"LOFT_FAULT_INJECT": "0:3"})
    assert p.returncode == 1 and "injected fault" in p.stderr, p.stderr[-2000:]
    p = run_job(0, ["--stage", "pretrain", *RESUME, f"output.dir={out}"])
    assert p.returncode == 2 and "written by 2 ranks" in p.stderr and "Traceback" not in p.stderr
