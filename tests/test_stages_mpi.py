"""Stages on real MPI ranks: what an epoch is per method, IMP over several levels, snapshot labels,
the metrics' loss columns, and a signal-stopped data-parallel retraining resumed exactly."""
from __future__ import annotations

import shutil
import signal

import pytest
import torch
import torch.nn.functional as F

from loft_hpc.checkpoint.h5file import read_run_file
from loft_hpc.config import load_config
from loft_hpc.data import build_datasets
from loft_hpc.models import build_model
from loft_hpc.utils.seeding import generator
from tests.mpi_util import REPO, TINY, assert_same_run, ok, run_job

# synthetic: 192 training images, batch 16
PIPE = TINY + ["train.duration=16it", "train.local_steps=4", "train.eval_every=8it", "output.checkpoint_every=8it",
               "output.snapshot_every=4it", "output.snapshot_weights=[10it]", "retrain.duration=8it",
               "retrain.lr=0.05", "train.seed=5"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A LoFT-2 pretraining folder; tests copy what they need and never write here."""
    out = tmp_path_factory.mktemp("pre")
    ok(run_job(2, ["--stage", "pretrain", *PIPE, f"output.dir={out}"]))
    return out


def copy_run(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("ckpt"))
    return dst


@pytest.mark.parametrize("world,method,bpe", [(1, "dense", 12), (2, "dense", 6), (4, "dense", 3), (2, "loft", 12)])
def test_an_epoch_is_one_pass_in_total_for_data_parallel_methods(tmp_path, world, method, bpe):
    """Dense (gradient-averaged) training: ranks take disjoint shards, an epoch is 192 images in
    total whatever S. LoFT keeps the paper's every-rank-the-whole-set default."""
    out = tmp_path / "r"
    ok(run_job(world if world > 1 else 0, ["--stage", "pretrain", *TINY, f"train.method={method}",
                                            "train.duration=1ep", "train.local_steps=3", f"output.dir={out}"]))
    rf = read_run_file(out / "pretrain.h5")
    assert rf.progress["batches_per_epoch"] == bpe
    assert rf.progress["step"] == bpe


def test_imp_three_levels_on_two_ranks(pretrained, tmp_path):
    out = copy_run(pretrained, tmp_path / "imp")
    ok(run_job(2, ["--stage", "prune", *PIPE, "prune.levels=3", "prune.ratios=[0.6]", "retrain.duration=4it",
                   f"output.dir={out}"]))
    levels = [read_run_file(out / "imp" / f"tickets_p60_level{k}.h5") for k in (1, 2)]
    t = read_run_file(out / "tickets_p60.h5")
    prev = None
    for k, rf in enumerate(levels + [t], start=1):
        if prev is not None:
            for n, m in rf.masks.items():
                assert not (m & ~prev[n]).any(), f"level {k} revived weights of {n}"
        prev = rf.masks
    assert t.mask_attrs["levels"] == 3
    assert levels[1].identity["inputs"].keys() >= {"pretrain.h5", "tickets_p60_level1.h5"}


def test_weight_snapshot_is_named_by_the_step_taken(pretrained, tmp_path):
    """Requested at 10it, LoFT with K = 4 takes it at the round boundary 12: the file says 12, the
    pretraining file maps the request to it, and the ticket records the step its weights are from."""
    pre = read_run_file(pretrained / "pretrain.h5")
    assert pre.weight_snapshots == {"10it": "snapshots/weights@12it.h5"}
    snap = read_run_file(pretrained / "snapshots" / "weights@12it.h5")
    assert snap.progress["step"] == 12 and snap.progress["requested"] == "10it"
    assert not (pretrained / "snapshots" / "weights@10it.h5").exists()
    out = copy_run(pretrained, tmp_path / "snap")
    p = ok(run_job(0, ["--stage", "prune", *PIPE, "prune.mask_from=10it", "prune.rewind=10it", "prune.ratios=[0.5]",
                       f"output.dir={out}"]))
    assert "taken at step 12" in p.stdout
    t = read_run_file(out / "tickets@10it_p50.h5")
    assert t.mask_attrs["mask_from_step"] == 12 and t.mask_attrs["rewind_step"] == 12
    for n, m in t.masks.items():
        assert torch.equal(t.model[n], snap.model[n] * m)


def test_metrics_name_the_loss_they_measure(pretrained):
    """step_loss: the sub-networks during local steps; train_loss: the assembled model (the file's
    own weights at the last row) on the fixed training sample, recomputed here from the weights."""
    rf = read_run_file(pretrained / "pretrain.h5")
    last = rf.metrics[-1]
    assert {"step_loss", "step_acc", "train_loss", "train_acc", "test_loss", "test_acc"} <= set(last)
    assert "loss" not in last
    cfg = load_config(str(REPO / "configs" / "default.yaml"), PIPE)
    bundle = build_datasets(cfg.data)
    model = build_model(cfg.model, num_classes=bundle.num_classes, in_channels=bundle.in_channels,
                        image_size=bundle.image_size, dataset=cfg.data.name)
    model.load_state_dict(rf.model)
    model.eval()
    data = bundle.train
    data.augment = False
    n = min(len(data), cfg.train.train_eval_samples)
    idx = torch.randperm(len(data), generator=generator(cfg.train.seed, "train-eval"))[:n]
    x = torch.stack([data[int(i)][0] for i in idx])
    y = torch.tensor([data[int(i)][1] for i in idx])
    with torch.no_grad():
        out = model(x)
    assert last["train_loss"] == pytest.approx(F.cross_entropy(out, y).item(), rel=1e-5)
    assert last["train_acc"] == pytest.approx((out.argmax(1) == y).float().mean().item())
    assert last["step_loss"] != pytest.approx(last["train_loss"], rel=1e-3)


def test_retraining_stopped_by_a_signal_to_one_rank_resumes_exactly(pretrained, tmp_path):
    """Dense, data-parallel, masked retraining: SIGUSR1 reaches rank 1 only; every rank stops after
    the same step, checkpoints (BN statistics averaged only for the saved copy) and exits 3; the
    resumed run equals one that was never stopped."""
    base = copy_run(pretrained, tmp_path / "base")
    ok(run_job(0, ["--stage", "prune", *PIPE, "prune.ratios=[0.5]", f"output.dir={base}"]))
    runs = {}
    for name in ("straight", "stopped"):
        d = copy_run(base, tmp_path / name)
        args = ["--stage", "retrain", *PIPE, "prune.ratios=[0.5]", "output.checkpoint_every=100it", f"output.dir={d}"]
        if name == "stopped":
            p = run_job(2, args, env={"LOFT_FAULT_INJECT": "1:3:retrain_p50:usr1"})
            assert p.returncode == 3, p.stderr[-2000:]
            assert "stop requested" in p.stdout and "checkpoint written at step 4" in p.stdout
            assert not (d / "retrain_p50.h5").exists()
        p = ok(run_job(2, args))
        if name == "stopped":
            assert "at step 4/8" in p.stdout
        runs[name] = read_run_file(d / "retrain_p50.h5")
    assert_same_run(runs["straight"], runs["stopped"])


def test_stop_signal_to_the_wrapper_reaches_every_rank(tmp_path):
    """``scripts/mpirun.sh`` runs mpirun as a child: a SIGUSR1 sent to the wrapper (what a user or
    a batch shell signals) must be forwarded, so the ranks checkpoint and the job exits 3."""
    from tests.mpi_util import LiveJob, job_command

    out = tmp_path / "wrapped"
    job = LiveJob(job_command(2, ["--stage", "pretrain", *TINY, "train.duration=4000it", "train.local_steps=4",
                                  "train.eval_every=4000it", f"output.dir={out}"]))
    try:
        assert job.wait_for("job: stages", timeout=180), job.stderr[-2000:]
        job.proc.send_signal(signal.SIGUSR1)  # the wrapper's pid (bash), not mpirun's
        code = job.finish(timeout=180)
    finally:
        job.close()
    assert code == 3, job.stdout[-2000:] + job.stderr[-2000:]
    assert "stop requested (SIGUSR1)" in job.stdout
    assert (out / "ckpt" / "pretrain" / "LATEST").is_file() and not (out / "pretrain.h5").exists()
