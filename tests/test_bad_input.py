"""Bad input, one real job per case on 2 ranks (issue: 'a mistake gets one clear line').

Every case must end the whole job with the documented non-zero code, print exactly one line
(``loft_hpc: error: ...``) naming the problem, no traceback, and leave every file that existed
before the job exactly as it was (SHA-256 of the whole folder before and after; new files, such
as ``config.2.yaml`` for a job with another config, are allowed).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess

import h5py
import numpy as np
import pytest

from tests.datafiles import write_cifar, write_imagefolder
from tests.mpi_util import TINY, ok, run_job

BASE = TINY + ["train.duration=8it", "train.local_steps=4", "output.checkpoint_every=4it", "retrain.duration=4it",
               "prune.ratios=[0.5]"]


def digests(folder) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished pretrain + prune folder on 2 ranks (cases copy it; it is never written)."""
    out = tmp_path_factory.mktemp("finished")
    ok(run_job(2, ["--stage", "pretrain,prune", *BASE, f"output.dir={out}"]))
    return out


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """A pretraining on 2 ranks killed after its checkpoint at step 4 (one checkpoint, no final file)."""
    out = tmp_path_factory.mktemp("killed")
    p = run_job(2, ["--stage", "pretrain", *BASE, f"output.dir={out}"], env={"LOFT_FAULT_INJECT": "0:1:pretrain:kill"})
    assert p.returncode == 137, p.stderr
    assert (out / "ckpt" / "pretrain" / "ckpt-0000000004.h5").is_file()
    return out


def copy(src, tmp_path):
    """A copy of a fixture's folder, without the lock the killed job left (taken over, and so
    deleted, by the next job: tested in test_a_stale_lock_of_a_dead_job_is_taken_over)."""
    dst = tmp_path / "out"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock-*"))
    return dst


def write(tmp_path, name: str, data: bytes) -> str:
    p = tmp_path / name
    p.write_bytes(data)
    return str(p)


def case(tmp_path, request, name):
    """(args, env, expected exit code, text the one line must contain, np, preexec) of one case."""
    out = tmp_path / "out"
    o = [f"output.dir={out}"]
    if name == "malformed_yaml":
        return ["--config", write(tmp_path, "c.yaml", b"train: [unclosed\n"), *BASE, *o], None, 2, "not valid YAML"
    if name == "non_utf8_config":
        return ["--config", write(tmp_path, "c.yaml", b"train:\n  lr: 0.1 \xff\xfe\n"), *BASE, *o], None, 2, "not UTF-8"
    if name == "missing_config":
        return ["--config", str(tmp_path / "nope.yaml"), *BASE, *o], None, 2, "no such file"
    if name == "unknown_key":
        return ["--stage", "pretrain", *BASE, "train.lcoal_steps=3", *o], None, 2, "did you mean 'local_steps'"
    if name == "wrong_type":
        return ["--stage", "pretrain", *BASE, "train.local_steps=many", *o], None, 2, "train.local_steps"
    if name == "k_zero":
        return ["--stage", "pretrain", *BASE, "train.local_steps=0", *o], None, 2, "train.local_steps: 0 must be > 0"
    if name == "k_negative":
        return ["--stage", "pretrain", *BASE, "train.local_steps=-5", *o], None, 2, "train.local_steps"
    if name == "more_ranks_than_filters":
        return (["--stage", "pretrain", *BASE, "model.width=1", "model.inner_width_factor=1", *o], None, 2,
                "fewer than the 4 ranks", 4)
    if name == "lr_infinite":
        return ["--stage", "pretrain", *BASE, "train.lr=inf", *o], None, 2, "train.lr"
    if name == "lr_negative":
        return ["--stage", "pretrain", *BASE, "train.lr=-0.1", *o], None, 2, "train.lr"
    if name == "milestone_beyond_duration":
        return (["--stage", "pretrain", *BASE, "train.schedule=multistep", "train.milestones=[100it]", *o], None, 2,
                "train.milestones: 100it is at or beyond the end of pretraining")
    if name == "rewind_at_step_zero":
        return ["--stage", "pretrain", *BASE, "prune.rewind=0it", *o], None, 2, "use prune.rewind=init"
    if name == "ratio_out_of_range":
        return ["--stage", "prune", *BASE, "prune.ratios=[1.5]", *o], None, 2, "prune.ratios"
    if name == "unknown_stage":
        return ["--stage", "pretrian", *BASE, *o], None, 2, "--stage: 'pretrian'"
    if name == "unknown_data_set":
        return ["--stage", "pretrain", *BASE, "data.name=mnist", *o], None, 2, "data.name"
    if name == "batch_larger_than_shard":
        return ["--stage", "pretrain", *BASE, "data.batch_size=5000", *o], None, 2, "data.batch_size: 5000"
    if name == "missing_data_root":
        return (["--stage", "pretrain", *BASE, "data.name=cifar10", f"data.root={tmp_path / 'nowhere'}", *o], None, 2,
                "data.root=")
    if name == "cifar_batch_wrong_shape":
        import pickle

        root = write_cifar(tmp_path / "cifar", n_train=20, n_test=10)
        f = os.path.join(str(root), "cifar-10-batches-py", "data_batch_1")
        with open(f, "rb") as fh:
            d = pickle.load(fh, encoding="latin1")
        d["data"] = np.zeros((len(d["labels"]), 100), np.uint8)  # rows of 100 bytes, not 3x32x32
        with open(f, "wb") as fh:
            pickle.dump(d, fh)
        return (["--stage", "pretrain", *BASE, "data.name=cifar10", f"data.root={root}", "data.verify_checksums=false",
                 "data.batch_size=4", *o], None, 2, "could not read the CIFAR10 files")
    if name == "corrupt_image":
        root = write_imagefolder(tmp_path / "imnet", classes=2, per_class=4, size=24)
        bad = sorted((tmp_path / "imnet" / "val").rglob("*.JPEG"))[-1]
        bad.write_bytes(b"this is not a JPEG")
        return (["--stage", "pretrain", *BASE, "data.name=imagenet", f"data.root={root}", "data.image_size=16",
                 "data.batch_size=2", "data.eval_batch_size=2", *o], None, 1, bad.name)
    if name == "truncated_checkpoint":
        out = copy(request.getfixturevalue("killed"), tmp_path)
        ck = out / "ckpt" / "pretrain" / "ckpt-0000000004.h5"
        ck.write_bytes(ck.read_bytes()[:2000])
        return ["--stage", "pretrain", *BASE, f"output.dir={out}"], None, 2, "ckpt-0000000004.h5"
    if name == "checkpoint_of_another_architecture":
        out = copy(request.getfixturevalue("killed"), tmp_path)
        return (["--stage", "pretrain", *BASE, "model.arch=resnet34", f"output.dir={out}"], None, 2,
                "model.arch preresnet18 -> resnet34")
    if name == "resume_with_other_ranks":
        out = copy(request.getfixturevalue("killed"), tmp_path)
        return ["--stage", "pretrain", *BASE, f"output.dir={out}"], None, 2, "written by 2 ranks, this job has 1", 1
    if name == "mask_of_wrong_shape":
        out = copy(request.getfixturevalue("finished"), tmp_path)
        with h5py.File(out / "tickets_p50.h5", "r+") as f:
            name0 = sorted(f["masks"])[0]
            shape = f["masks"][name0].shape
            del f["masks"][name0]
            f["masks"].create_dataset(name0, data=np.ones((shape[0] + 1, *shape[1:]), np.uint8))
        return ["--stage", "retrain", *BASE, f"output.dir={out}"], None, 2, f"mask {name0!r} has shape"
    if name == "pretrain_file_not_hdf5":
        out = tmp_path / "out"
        out.mkdir()
        (out / "pretrain.h5").write_text("not an HDF5 file")
        return ["--stage", "prune", *BASE, f"output.dir={out}"], None, 2, "pretrain.h5: cannot be read as HDF5"
    if name == "missing_pretrain_for_prune":
        return ["--stage", "prune", *BASE, *o], None, 2, "pretrain.h5 does not exist"
    if name == "missing_ticket_for_retrain":
        return ["--stage", "retrain", *BASE, *o], None, 2, "tickets_p50.h5 does not exist"
    if name == "snapshot_never_stored":
        out = copy(request.getfixturevalue("finished"), tmp_path)
        # rewinding to 4it needs the weight snapshot that pretraining stores when the rewind point
        # is set before it: this pretraining did not have it
        return (["--stage", "prune", *BASE, "prune.rewind=4it", f"output.dir={out}"], None, 2,
                "prune.rewind=4it: ")
    if name == "stage_file_of_another_config":
        out = copy(request.getfixturevalue("finished"), tmp_path)
        return (["--stage", "pretrain", *BASE, "train.lr=0.02", f"output.dir={out}"], None, 2,
                "pretrain.h5 was made by another run (train.lr")
    if name == "output_dir_not_writable":
        blocker = tmp_path / "a_file"
        blocker.write_text("x")
        return ["--stage", "pretrain", *BASE, f"output.dir={blocker / 'sub'}"], None, 2, "cannot be created or written"
    if name == "two_jobs_on_one_folder":
        out = tmp_path / "out"
        out.mkdir()
        holder = subprocess.Popen(["sleep", "300"])
        request.addfinalizer(holder.kill)
        (out / ".lock-pretrain").write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid,
                                                        "job": "4242", "since": "2026-01-01T00:00:00"}))
        return ["--stage", "pretrain", *BASE, f"output.dir={out}"], None, 2, f"pid {holder.pid} on {socket.gethostname()}, SLURM job 4242"
    if name == "disk_full":
        # a real full file system: a 64 KiB tmpfs holds the lock and config.yaml, not a checkpoint
        full = tmp_path / "full"
        full.mkdir()
        m = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(full)], capture_output=True, text=True)
        if m.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs to fill (needs root): {m.stderr.strip()}")
        request.addfinalizer(lambda: subprocess.run(["umount", "-l", str(full)], check=False))
        return (["--stage", "pretrain", *BASE, f"output.dir={full}"], None, 1,
                "cannot write " + str(full / "ckpt" / "pretrain"))
    raise AssertionError(name)


CASES = ["malformed_yaml", "non_utf8_config", "missing_config", "unknown_key", "wrong_type", "k_zero", "k_negative",
         "more_ranks_than_filters", "lr_infinite", "lr_negative", "milestone_beyond_duration", "rewind_at_step_zero",
         "ratio_out_of_range", "unknown_stage", "unknown_data_set", "batch_larger_than_shard", "missing_data_root",
         "cifar_batch_wrong_shape", "corrupt_image", "truncated_checkpoint", "checkpoint_of_another_architecture",
         "resume_with_other_ranks", "mask_of_wrong_shape", "pretrain_file_not_hdf5", "missing_pretrain_for_prune",
         "missing_ticket_for_retrain", "snapshot_never_stored", "stage_file_of_another_config",
         "output_dir_not_writable", "two_jobs_on_one_folder", "disk_full"]


@pytest.mark.parametrize("name", CASES)
def test_bad_input_one_line_nonzero_nothing_damaged(tmp_path, request, name):
    spec = case(tmp_path, request, name)
    args, env, code, needle = spec[:4]
    np_ = spec[4] if len(spec) > 4 else 2
    before = digests(tmp_path)
    p = run_job(np_, args, env=env, timeout=180)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == code, f"exit {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("loft_hpc: error: "), p.stderr[-3000:]
    assert needle in lines[0], lines[0]
    after = digests(tmp_path)
    changed = [k for k, v in before.items() if after.get(k) != v]
    assert not changed, f"modified or deleted: {changed}"


def test_a_stale_lock_of_a_dead_job_is_taken_over(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    (out / ".lock-pretrain").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "job": "",
                                                    "since": "2026-01-01T00:00:00"}))
    p = ok(run_job(2, ["--stage", "pretrain", *BASE, f"output.dir={out}"]))
    assert f"took over the stale lock .lock-pretrain of pid {dead.pid}" in p.stdout
    assert not (out / ".lock-pretrain").exists()  # released at the end
    assert (out / "pretrain.h5").is_file()


def test_snapshot_tasks_and_the_chain_lock_different_scopes(tmp_path):
    """A job on the tickets found at a snapshot may run while another job holds the end tickets;
    a second job on the end tickets may not."""
    from loft_hpc.checkpoint.lock import LockError, RunLock, job_scopes

    holder = subprocess.Popen(["sleep", "60"])
    try:
        (tmp_path / ".lock-tickets-end").write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid,
                                                                "job": "", "since": "x"}))
        b = RunLock(tmp_path, job_scopes(["prune", "retrain"], "5ep")).acquire()
        assert b.held == [tmp_path / ".lock-tickets-5ep"]
        with pytest.raises(LockError, match=f"pid {holder.pid}"):
            RunLock(tmp_path, job_scopes(["retrain"], "end")).acquire()
        b.release()
        assert not (tmp_path / ".lock-tickets-5ep").exists() and (tmp_path / ".lock-tickets-end").exists()
    finally:
        holder.kill()
