"""GPipe pretraining on 2 real MPI ranks (torch.distributed.pipelining over gloo): the weights
equal single-process SGD with gradient accumulation over the same micro-batches; the bytes across
the stage boundary are counted exactly; the file goes through prune and retrain; a killed run
and a run stopped by SIGTERM resume bit-exactly."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from loft_hpc.checkpoint.h5file import read_run_file
from loft_hpc.config import load_config
from loft_hpc.data import build_datasets
from loft_hpc.exchange.accounting import gpipe_assemble_bytes
from loft_hpc.models.pipeline import boundary_shapes, pipeline_blocks, stage_state_names
from loft_hpc.stages.common import lr_function, make_model
from loft_hpc.train.gpipe import resolve_cuts
from loft_hpc.train.stream import BatchStream
from tests.mpi_util import REPO, TINY, assert_same_run, ok, run_job, stop_and_resume

# synthetic: 192 images, global batch 16 in 4 micro-batches of 4: 12 steps per epoch
GP = TINY + ["train.method=gpipe", "train.microbatches=4", "train.duration=12it", "train.eval_every=6it",
             "output.checkpoint_every=4it", "output.snapshot_every=4it", "train.seed=11", "train.lr=0.05",
             "train.momentum=0.9", "train.weight_decay=5e-4", "train.schedule=cosine", "data.augment=true",
             "prune.ratios=[0.5]", "retrain.duration=4it"]


def _cfg(extra=()):
    return load_config(str(REPO / "configs" / "default.yaml"), GP + list(extra))


@pytest.fixture(scope="module")
def gpipe_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpipe")
    p = ok(run_job(2, ["--stage", "pretrain", *GP, f"output.dir={out}"]))
    return out, p


def _reference(cfg, steps: int):
    """Single-process SGD on the same batches: each batch cut into the same micro-batches, their
    mean losses' gradients accumulated and divided by their number; BN in training mode per
    micro-batch (as the pipeline: every stage sees micro-batches). On one thread, as every rank
    runs: with two, the kernels' summation order differs and 12 steps amplify it to ~5e-4."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _reference_steps(cfg, steps)
    finally:
        torch.set_num_threads(threads)


def _reference_steps(cfg, steps: int):
    bundle = build_datasets(cfg.data)
    model = make_model(cfg, bundle)
    model.train()
    stream = BatchStream(bundle.train, cfg.data.batch_size, seed=cfg.train.seed, rank=0, world=1, shard=False)
    t = cfg.train
    opt = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    lr = lr_function(t)
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr(step, steps, stream.batches_per_epoch)
        opt.zero_grad()
        x, y = stream.batch(step)
        for xm, ym in zip(x.chunk(t.microbatches), y.chunk(t.microbatches)):
            (F.cross_entropy(model(xm), ym) / t.microbatches).backward()
        opt.step()
    momentum = {n: opt.state[p]["momentum_buffer"] for n, p in model.named_parameters()}
    return model, momentum


def test_weights_equal_sgd_with_gradient_accumulation_over_the_micro_batches(gpipe_run):
    out, p = gpipe_run
    rf = read_run_file(out / "pretrain.h5")
    model, momentum = _reference(_cfg(), 12)
    ref = model.state_dict()
    assert rf.progress["step"] == 12 and set(rf.model) == set(ref)
    worst = max(float((rf.model[n].double() - ref[n].double()).abs().max()) for n in ref if ref[n].is_floating_point())
    assert worst < 2e-5, worst
    assert all(torch.equal(rf.model[n], ref[n]) for n in ref if not ref[n].is_floating_point())  # BN batch counts
    # the momentum of both stages is in the file, equal to the reference optimiser's
    assert set(rf.momentum) == set(momentum)
    assert max(float((rf.momentum[n] - momentum[n]).abs().max()) for n in momentum) < 2e-5


def test_boundary_bytes_are_counted_exactly(gpipe_run):
    out, p = gpipe_run
    rf = read_run_file(out / "pretrain.h5")
    cfg = _cfg()
    bundle = build_datasets(cfg.data)
    model = make_model(cfg, bundle)
    blocks = pipeline_blocks(model)
    sample = torch.zeros(1, bundle.in_channels, bundle.image_size, bundle.image_size)
    cuts = resolve_cuts(cfg, blocks, 2, sample)
    (shape,) = boundary_shapes(blocks, cuts, sample)
    per_step = cfg.data.batch_size * math.prod(shape) * 4  # one direction: the batch's activations (or gradients)
    assert f"stages begin at stem, {blocks[cuts[0]][0]}" in p.stdout
    rows = [r for r in rf.comm if r["round"] >= 1]
    assert len(rows) == 2 * 12  # every rank, every step
    # the assembly (MPI allgather of the stages), counted as its own kind: the weights (parameters
    # and buffers) of each stage at every step that snapshots, evaluates or saves (4, 6, 8, 12),
    # their momentum at every checkpoint and the file (4, 8, 12)
    state, params = model.state_dict(), dict(model.named_parameters())
    names = stage_state_names(model, blocks, cuts)
    weights = [sum(state[n].numel() * state[n].element_size() for n in ns) for ns in names]
    mom = [sum(4 * params[n].numel() for n in ns if n in params) for ns in names]
    assemble = {4: [w + m for w, m in zip(weights, mom)], 6: weights, 8: [w + m for w, m in zip(weights, mom)]}
    assemble[12] = assemble[4]
    for r in rows:
        # rank 0 sends activations and receives gradients, rank 1 the opposite: both ways per step
        assert (r["p2p_sent"], r["p2p_received"]) == (per_step, per_step), r
        assert r["allgather_sent"] == r["allreduce_sent"] == r["alltoall_sent"] == 0
        q, other = r["rank"], 1 - r["rank"]
        want = (assemble[r["step"]][q], assemble[r["step"]][other]) if r["step"] in assemble else (0, 0)
        assert (r["assemble_sent"], r["assemble_received"]) == want, r
        assert r["seconds"] > 0  # the schedule's waits on those transfers, timed
    # the last evaluation (step 12) counts the weights gathered for it, not the momentum gathered after it for the file
    total = 2 * 12 * per_step + sum(weights) * 4 + sum(mom) * 2
    last = rf.metrics[-1]
    assert last["bytes_sent"] == last["bytes_received"] == total
    assert [st["bytes_sent"] for st in rf.ranks] == [12 * per_step + 4 * w + 3 * m for w, m in zip(weights, mom)]
    # the installed comm tool rebuilds the same count from the file alone, from another folder
    tool = subprocess.run([str(Path(sys.executable).parent / "loft-tools"), "comm", str(out / "pretrain.h5")],
                          cwd=out.parent, capture_output=True, text=True, timeout=300)
    assert tool.returncode == 0, tool.stderr[-2000:]
    assert "24/24 rows equal it" in tool.stdout and "DIFFERENT" not in tool.stdout, tool.stdout


def test_gpipe_pretraining_goes_through_prune_and_retrain(gpipe_run, tmp_path):
    import shutil

    src, _ = gpipe_run
    out = tmp_path / "chain"
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("ckpt"))
    p = ok(run_job(2, ["--stage", "prune,retrain", *GP, f"output.dir={out}"]))
    ticket, retrained = read_run_file(out / "tickets_p50.h5"), read_run_file(out / "retrain_p50.h5")
    assert ticket.mask_attrs["mask_from_step"] == 12 and retrained.complete and retrained.progress["step"] == 4
    assert "pretrained GPipe-2 (unpruned)" in p.stdout


def test_killed_gpipe_resumes_bit_exactly(gpipe_run, tmp_path):
    src, _ = gpipe_run
    out = tmp_path / "killed"
    p = run_job(2, ["--stage", "pretrain", *GP, f"output.dir={out}"], env={"LOFT_FAULT_INJECT": "1:6:pretrain:kill"})
    assert p.returncode != 0 and not (out / "pretrain.h5").exists()
    p = ok(run_job(2, ["--stage", "pretrain", *GP, f"output.dir={out}"]))
    assert "resumed from" in p.stdout and "at step 4/12" in p.stdout
    assert_same_run(read_run_file(src / "pretrain.h5"), read_run_file(out / "pretrain.h5"))


def test_sigterm_to_a_gpipe_stage_checkpoints_exits_3_and_resumes_exactly(gpipe_run, tmp_path):
    """SIGTERM reaches stage 1 when it starts round 6 (one step per round: step 6-7): both stages
    agree to stop after it, the stages' weights are gathered and a checkpoint is written at step 7
    (the periodic ones are 4 and 8), the job exits 3; the same command resumes at step 7 and ends
    with exactly the uninterrupted run's file, but for the bytes of that checkpoint's assembly."""
    src, _ = gpipe_run
    out = tmp_path / "stopped"
    cfg = _cfg()
    bundle = build_datasets(cfg.data)
    model = make_model(cfg, bundle)
    blocks = pipeline_blocks(model)
    sample = torch.zeros(1, bundle.in_channels, bundle.image_size, bundle.image_size)
    names = stage_state_names(model, blocks, resolve_cuts(cfg, blocks, 2, sample))
    both = [sum(gpipe_assemble_bytes(model, names, q, mom)["assemble_sent"] for mom in (False, True)) for q in (0, 1)]
    stop_and_resume(2, ["--stage", "pretrain", *GP, f"output.dir={out}"], out, "1:6:pretrain:term", 7, 12,
                    src / "pretrain.h5", assembles=[(both[0], both[1]), (both[1], both[0])])


@pytest.mark.parametrize("extra,needle", [
    (["train.microbatches=3"], "train.microbatches=3: data.batch_size=16 is not a multiple"),
    (["train.pipeline_cuts=[layer9.0]"], "train.pipeline_cuts: 'layer9.0' is not a pipeline block"),
    (["train.pipeline_cuts=[layer2.0,layer3.0]"], "train.pipeline_cuts: 2 cut(s) for 2 stages"),
    (["train.pipeline_cuts=[stem]"], "train.pipeline_cuts: ['stem'] do not split the blocks into 2 non-empty stages in order"),
    (["model.arch=conv2", "model.inner_width_factor=1"], "train.method=gpipe: model.arch=conv2: ConvNet has no pipeline layout (GPipe cuts the ResNets"),
])
def test_bad_gpipe_settings_one_line_exit_2(tmp_path, extra, needle):
    p = run_job(2, ["--stage", "pretrain", *GP, *extra, f"output.dir={tmp_path / 'o'}"], timeout=120)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1 and needle in lines[0], p.stderr


def test_gpipe_on_one_rank_is_refused_in_one_line(tmp_path):
    p = run_job(0, ["--stage", "pretrain", *GP, f"output.dir={tmp_path / 'o'}"], timeout=120)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and lines == ["loft_hpc: error: train.method=gpipe: needs at least 2 ranks (one pipeline "
                                           "stage per rank); on one rank use train.method=dense"], p.stderr


def test_the_periodic_log_line_comes_from_the_last_stage(gpipe_run, tmp_path):
    out = tmp_path / "log"
    p = ok(run_job(2, ["--stage", "pretrain", *GP, "train.log_every=5", "train.eval_every=12it",
                       f"output.dir={out}"]))
    lines = [ln for ln in p.stdout.splitlines() if "pretrain step 5/12 round 5" in ln]
    assert len(lines) == 1 and "rank-1 step_loss" in lines[0] and "step_loss 0.0000" not in lines[0], p.stdout


def test_three_stages_with_given_cuts_middle_stage_counts_both_boundaries(tmp_path):
    """S = 3 with train.pipeline_cuts: the middle stage receives activations and sends gradients
    at the first cut, sends activations and receives gradients at the second; the weights still
    equal SGD with gradient accumulation."""
    out = tmp_path / "s3"
    cuts = ["train.pipeline_cuts=[layer2.0,layer4.0]", "train.duration=6it", "train.eval_every=6it",
            "output.checkpoint_every=6it"]
    p = ok(run_job(3, ["--stage", "pretrain", *GP, *cuts, f"output.dir={out}"]))
    assert "stages begin at stem, layer2.0, layer4.0" in p.stdout
    cfg = _cfg(cuts)
    bundle = build_datasets(cfg.data)
    blocks = pipeline_blocks(make_model(cfg, bundle))
    sample = torch.zeros(1, bundle.in_channels, bundle.image_size, bundle.image_size)
    a, b = (cfg.data.batch_size * math.prod(s) * 4 for s in boundary_shapes(blocks, resolve_cuts(cfg, blocks, 3, sample), sample))
    rf = read_run_file(out / "pretrain.h5")
    expect = {0: (a, a), 1: (a + b, a + b), 2: (b, b)}  # (sent, received) per step
    for r in (r for r in rf.comm if r["round"] >= 1):
        assert (r["p2p_sent"], r["p2p_received"]) == expect[r["rank"]], r
    model, _ = _reference(cfg, 6)
    ref = model.state_dict()
    assert max(float((rf.model[n].double() - ref[n].double()).abs().max()) for n in ref if ref[n].is_floating_point()) < 2e-5
