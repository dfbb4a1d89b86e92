"""Training behaviours under real ``mpirun``, each against a reference written independently of the
code under test (issue 18, item 5a-f).

a. BN recalibration: the running statistics of the saved model are the mean / variance of every BN's
   input over the seeded recalibration batches (forward hooks on a copy, cumulative average); the
   weights and the training trajectory are untouched.
b. Momentum carried across rounds on 4 ranks with an uneven deal, and with Nesterov momentum.
c. Dense data-parallel training (pretraining and masked retraining) against single-process SGD on
   the concatenated batches of all ranks.
d. Stops: SIGTERM to one rank checkpoints, exits 3 and resumes exactly; a stop in the last round.
e. Rewinding to an early step (``prune.rewind=8it``) with ``mask_from=end``.
f. ``data.shard=true`` for LoFT, and ``data.num_workers=2`` in a real run.

The references take from the package only the data set, the model with theta_0 (``make_model``),
the filter groups' membership and, for (e), nothing but the files; batches, deals, learning rates,
the exchange, BN statistics and pruning masks are restated here from the documented rules.
"""
from __future__ import annotations

import copy
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from loft_hpc.checkpoint.h5file import read_run_file
from loft_hpc.config import load_config
from loft_hpc.data import build_datasets
from loft_hpc.stages.common import make_model
from tests.mpi_util import REPO, TINY, assert_same_run, ok, run_job, stop_and_resume
from tests.test_loft_mpi import _derive_seed, _gen, ref_batch, ref_deal, ref_lr, reference_loft

CONFIG = str(REPO / "configs" / "default.yaml")
BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def config(args: list[str], out) -> object:
    return load_config(CONFIG, [*args, f"output.dir={out}"])


# ---------------------------------------------------------------------------------- references
def ref_shard_batch(dataset, *, seed: int, rank: int, world: int, step: int, batch_size: int):
    """The mini-batch of ``rank`` at global ``step`` when the training set is sharded (data-parallel
    stages always; LoFT with data.shard=true), by the rule of loft_hpc/train/stream.py: one common
    permutation per epoch, randperm(N) from (seed, 'order', epoch); rank r takes perm[r::S], cut to
    N // S samples; B = (N // S) // batch_size batches per epoch (drop_last); augmentation seeded
    per epoch by (seed, 'augment', rank, epoch)."""
    per_rank = len(dataset) // world
    bpe = per_rank // batch_size
    epoch, b = divmod(step, bpe)
    order = torch.randperm(len(dataset), generator=_gen(seed, "order", epoch))[rank::world][:per_rank]
    ds = copy.copy(dataset)
    ds.set_augment_seed(_derive_seed(seed, "augment", rank, epoch))
    items = [ds[i] for i in order[b * batch_size:(b + 1) * batch_size].tolist()]
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


def reference_loft_ext(cfg, world: int, *, wrong_momentum_slice=None, stop_at: int | None = None) -> tuple[dict, dict]:
    """tests.test_loft_mpi.reference_loft, copied and extended: Nesterov momentum
    (train.nesterov), sharded data (data.shard, ref_shard_batch) and BN recalibration allowed
    (the reference never recalibrates: recalibration must not change the trajectory).

    ``wrong_momentum_slice = (round, group index j, rank s)`` injects one wrong slice: in that
    round, rank s's momentum of group j is written back to its filters in reversed order (the kind
    of bug a slice or layout error makes). Used to show the tolerance would catch it.
    ``stop_at``: stop after that many steps (a round boundary), the schedule unchanged."""
    torch.set_num_threads(1)
    t = cfg.train
    bundle = build_datasets(cfg.data)
    model = make_model(cfg, bundle)
    model.train()
    part = [g for g in model.filter_groups() if g.partitioned]
    sliced = {}
    for j, g in enumerate(part):
        for m in g.members:
            assert m.repeat == 1 and m.tensor not in sliced
            sliced[m.tensor] = (m.dim, j)
    full = model.state_dict()
    param_names = {n for n, _ in model.named_parameters()}
    carry = t.momentum_mode == "carry" and t.momentum > 0
    mom = {n: torch.zeros_like(full[n]) for n in param_names}
    bs = cfg.data.batch_size
    n_train = len(bundle.train)
    bpe = (n_train // world if cfg.data.shard else n_train) // bs
    total = t.duration.iterations(bpe)

    def batch(s, step):
        if cfg.data.shard:
            return ref_shard_batch(bundle.train, seed=t.seed, rank=s, world=world, step=step, batch_size=bs)
        return ref_batch(bundle.train, seed=t.seed, rank=s, step=step, batch_size=bs)

    step, rnd = 0, 0
    while step < (total if stop_at is None else stop_at):
        n = min(t.local_steps, total - step)
        deal = ref_deal(t.seed, rnd, [g.size for g in part], world)

        def take(name, tensor, s):
            if name not in sliced:
                return tensor.clone()
            d, j = sliced[name]
            return tensor.index_select(d, deal[j][s])

        results = []
        for s in range(world):
            w = {name: take(name, v, s) for name, v in full.items()}
            params = [w[name].requires_grad_() for name in sorted(param_names)]
            opt = torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay,
                                  nesterov=t.nesterov)
            if carry:
                for name in sorted(param_names):
                    opt.state[w[name]]["momentum_buffer"] = take(name, mom[name], s)
            for i in range(n):
                for pg in opt.param_groups:
                    pg["lr"] = ref_lr(t, step + i, total)
                opt.zero_grad()
                x, y = batch(s, step + i)
                F.cross_entropy(functional_call(model, w, (x,)), y).backward()
                opt.step()
            m = {name: opt.state[w[name]]["momentum_buffer"] for name in param_names} if carry else {}
            results.append(({k: v.detach() for k, v in w.items()}, m))
        with torch.no_grad():
            for name, v in full.items():
                if name in sliced:
                    d, j = sliced[name]
                    for s, (w, m) in enumerate(results):
                        v.index_copy_(d, deal[j][s], w[name])
                        if carry and name in mom:
                            idx = deal[j][s]
                            if wrong_momentum_slice == (rnd, j, s):
                                idx = idx.flip(0)
                            mom[name].index_copy_(d, idx, m[name])
                elif v.is_floating_point():
                    v.copy_(torch.stack([w[name] for w, _ in results]).mean(0))
                    if carry and name in mom:
                        mom[name].copy_(torch.stack([m[name] for _, m in results]).mean(0))
                else:
                    v.copy_(results[0][0][name])
        step += n
        rnd += 1
    return {k: v.clone() for k, v in model.state_dict().items()}, (mom if carry else {})


def reference_dense(cfg, world: int, sec, start: dict, masks: dict | None = None) -> tuple[dict, dict]:
    """Single-process SGD on the concatenated batches of all ``world`` ranks: at step t the batch is
    the S x batch_size samples that ranks 0..S-1 take at t (ref_shard_batch), the loss the mean over
    all of them, i.e. the average of the ranks' gradients. ``sec``: the config section that holds
    lr / momentum / weight decay / schedule / duration (train or retrain). With ``masks``: the
    gradient of every masked weight is multiplied by its mask before the step and the weights by
    it after every step (pruned weights stay exactly 0)."""
    torch.set_num_threads(1)
    bundle = build_datasets(cfg.data)
    model = make_model(cfg, bundle)
    model.load_state_dict(start)
    model.train()
    bs = cfg.data.batch_size
    bpe = (len(bundle.train) // world) // bs
    total = sec.duration.iterations(bpe)
    nesterov = bool(getattr(sec, "nesterov", False))
    opt = torch.optim.SGD(model.parameters(), lr=sec.lr, momentum=sec.momentum, weight_decay=sec.weight_decay,
                          nesterov=nesterov)
    params = dict(model.named_parameters())
    for step in range(total):
        for pg in opt.param_groups:
            pg["lr"] = ref_lr(sec, step, total)
        opt.zero_grad()
        xs, ys = zip(*(ref_shard_batch(bundle.train, seed=cfg.train.seed, rank=r, world=world, step=step,
                                       batch_size=bs) for r in range(world)))
        F.cross_entropy(model(torch.cat(xs)), torch.cat(ys)).backward()
        if masks:
            for n, m in masks.items():
                params[n].grad.mul_(m.to(params[n].dtype))
        opt.step()
        if masks:
            with torch.no_grad():
                for n, m in masks.items():
                    params[n].mul_(m.to(params[n].dtype))
    mom = {n: opt.state[p]["momentum_buffer"].clone() for n, p in params.items()
           if p in opt.state and "momentum_buffer" in opt.state[p]}
    return {k: v.clone() for k, v in model.state_dict().items()}, mom


def max_diff(a: dict, b: dict, names=None) -> tuple[float, str]:
    worst, where = 0.0, ""
    for n in (names if names is not None else a):
        if not a[n].is_floating_point():
            continue
        d = float((a[n].double() - b[n].double()).abs().max()) if a[n].numel() else 0.0
        if d > worst:
            worst, where = d, n
    return worst, where


def assert_close_states(got: dict, want: dict, tol: float, what: str, names=None) -> None:
    for n in (names if names is not None else want):
        if want[n].is_floating_point():
            torch.testing.assert_close(got[n], want[n], rtol=tol, atol=tol, msg=lambda m: f"{what}: {n}: {m}")
        else:
            assert torch.equal(got[n], want[n]), f"{what}: {n} differs"


# ------------------------------------------------------ one LoFT job for (a), (d), (e) and (f)
# 2 ranks, data.shard=true (96 samples per rank, 6 batches per epoch: 16 steps cross two epoch
# boundaries), momentum carried, K = 4 (4 rounds), BN recalibrated over 3 batches at every
# evaluation (8, 16), the rewind snapshot (8) and the final file; prune.rewind=8it stores
# snapshots/weights@8it.h5 automatically. lr 0.2: large enough that the filter ranking at step 8
# differs from the final one (at 0.05 it does not yet), so (e) can tell which weights ranked.
BASE = TINY + ["model.width=5", "train.duration=16it", "train.local_steps=4", "train.eval_every=8it",
               "output.checkpoint_every=8it", "output.snapshot_every=4it", "train.seed=11", "train.lr=0.2",
               "train.weight_decay=5e-4", "train.momentum_mode=carry", "data.shard=true",
               "train.bn_recalibration=3", "prune.rewind=8it", "prune.mask_from=end", "prune.ratios=[0.3, 0.5]"]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """The uninterrupted run, num_workers=0 (read only: tests copy it before adding to it)."""
    out = tmp_path_factory.mktemp("base")
    ok(run_job(2, ["--stage", "pretrain", *BASE, f"output.dir={out}"]))
    return out


@pytest.fixture(scope="module")
def base_reference(base_run):
    return reference_loft_ext(config(BASE, base_run), 2)


# 2 ranks: every average is of two numbers, exact in any order, so the package and the reference
# agree bit for bit (measured: max difference 0 on weights, momentum and training BN statistics).
TOL_2RANKS = 0.0


def test_sharded_loft_matches_the_reference_and_recalibration_leaves_training_alone(base_run, base_reference):
    """(f) data.shard=true for LoFT, and (a) 'weights untouched': the saved weights, momentum and
    every rank's training BN statistics equal the reference, which shards by the documented rule
    and never recalibrates, although this run recalibrated at steps 8 (evaluation and weight
    snapshot) and 16 (evaluation and final file)."""
    rf = read_run_file(base_run / "pretrain.h5")
    ref, ref_mom = base_reference
    params = [n for n in ref if not n.endswith(BN_BUFFERS)]
    bufs = [n for n in ref if n.endswith(("running_mean", "running_var"))]
    assert params and bufs
    assert_close_states(rf.model, ref, TOL_2RANKS, "weights", params)
    assert_close_states(rf.momentum, ref_mom, TOL_2RANKS, "momentum")
    nbt = [n for n in ref if n.endswith("num_batches_tracked")]
    assert all(torch.equal(rf.model[n], ref[n]) and int(ref[n]) == 16 for n in nbt)
    assert len(rf.ranks) == 2
    for r, st in enumerate(rf.ranks):
        assert sorted(st["buffers"]) == sorted(bufs)
        assert_close_states(st["buffers"], ref, TOL_2RANKS, f"rank {r} training BN statistics", bufs)
    # the saved BN statistics are not the training ones: recalibration did happen
    assert max_diff(rf.model, ref, bufs)[0] > 1e-3
    # sharding is real: the reference of the same job without data.shard ends elsewhere
    unsharded, _ = reference_loft_ext(config([*BASE, "data.shard=false"], base_run), 2)
    assert max_diff(rf.model, unsharded, params)[0] > 1e-3


def recalibration_reference(model, dataset, *, batches: int, batch_size: int, seed: int, tag) -> dict:
    """BN running statistics by their definition: the seeded recalibration batches (the first
    batches * batch_size entries of randperm(N) from (seed, 'bn-recalibration', tag), in that order,
    augmented with the seed derived from (seed, 'bn-recalibration', tag)) go through a copy of the
    model in train mode; a forward pre-hook on every BN records its input; each BN's statistics are
    the plain average over the batches of the batch mean and the (unbiased) batch variance per
    channel (a cumulative average, PyTorch's momentum=None)."""
    net = copy.deepcopy(model)
    net.train()
    bns = {n: m for n, m in net.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    seen = {n: [] for n in bns}
    hooks = [m.register_forward_pre_hook(lambda mod, inp, n=n: seen[n].append(inp[0].detach().double()))
             for n, m in bns.items()]
    ds = copy.copy(dataset)
    ds.set_augment_seed(_derive_seed(seed, "bn-recalibration", tag))
    idx = torch.randperm(len(ds), generator=_gen(seed, "bn-recalibration", tag))[:batches * batch_size].tolist()
    with torch.no_grad():
        for b in range(0, len(idx), batch_size):
            net(torch.stack([ds[i][0] for i in idx[b:b + batch_size]]))
    for h in hooks:
        h.remove()
    out = {}
    for n, xs in seen.items():
        assert len(xs) == batches
        dims = [0] + list(range(2, xs[0].dim()))
        out[f"{n}.running_mean"] = torch.stack([x.mean(dims) for x in xs]).mean(0)
        out[f"{n}.running_var"] = torch.stack([x.var(dims, unbiased=True) for x in xs]).mean(0)
    return out


# float32 batch statistics accumulated by BN against float64 ones here: measured max |difference|
# 1.1e-7 on means, 5.2e-7 on variances (of order 1); the statistics of other batches (step 8's
# recalibration batches) differ by 0.63.
TOL_BN = 1e-5


def test_bn_recalibration_equals_the_statistics_of_the_seeded_batches(base_run):
    """(a) The final file's BN running statistics (every BN, shared and partitioned) are the
    statistics of its input over the 3 seeded recalibration batches of step 16, computed here with
    forward hooks on a copy of the saved weights."""
    cfg = config(BASE, base_run)
    rf = read_run_file(base_run / "pretrain.h5")
    bundle = build_datasets(cfg.data)
    model = make_model(cfg, bundle)
    model.load_state_dict(rf.model)
    want = recalibration_reference(model, bundle.train, batches=cfg.train.bn_recalibration,
                                   batch_size=cfg.data.batch_size, seed=cfg.train.seed, tag=rf.progress["step"])
    assert rf.progress["step"] == 16 and len(want) == 2 * sum(
        isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    for kind in ("running_mean", "running_var"):
        print(f"BN recalibration, {kind}: max |difference| "
              f"{max(float((rf.model[n].double() - v).abs().max()) for n, v in want.items() if n.endswith(kind)):.2e}")
    for n, v in want.items():
        torch.testing.assert_close(rf.model[n].double(), v, rtol=TOL_BN, atol=TOL_BN, msg=lambda m: f"{n}: {m}")
    # the tolerance separates: the statistics of another tag's batches are far off
    other = recalibration_reference(model, bundle.train, batches=3, batch_size=cfg.data.batch_size,
                                    seed=cfg.train.seed, tag=8)
    far = max(float((rf.model[n].double() - v).abs().max()) for n, v in other.items())
    print(f"BN recalibration over step 8's batches instead: max |difference| {far:.2e}")
    assert far > 100 * TOL_BN


# ------------------------------------------------------------------------------------- (f)
def test_loader_workers_change_nothing(base_run, tmp_path):
    """(f) data.num_workers=2 (two DataLoader processes per rank, for training batches and
    evaluation) writes exactly what num_workers=0 writes, and the run identity ignores it."""
    out = tmp_path / "workers"
    ok(run_job(2, ["--stage", "pretrain", *BASE, "data.num_workers=2", f"output.dir={out}"]))
    got = read_run_file(out / "pretrain.h5")
    assert "num_workers: 2" in got.config_yaml
    assert_same_run(got, read_run_file(base_run / "pretrain.h5"))


# ------------------------------------------------------------------------------------- (d)
def test_sigterm_checkpoints_exits_3_and_resumes_exactly(base_run, tmp_path):
    """(d) SIGTERM reaches rank 1 when it starts round 2 (steps 8-12): that round is finished,
    every rank agrees to stop at its end, a checkpoint is written at step 12 (not a periodic
    checkpoint step: those are 8 and 16), the job exits 3 without a final file; the same command
    again resumes at step 12 and ends with exactly what the uninterrupted run wrote."""
    out = tmp_path / "stopped"
    stop_and_resume(2, ["--stage", "pretrain", *BASE, f"output.dir={out}"], out, "1:2:pretrain:term", 12, 16,
                    base_run / "pretrain.h5")


def test_stop_in_the_last_round_finishes_the_stage(base_run, tmp_path):
    """(d) A stop requested during the last round (round 3, steps 12-16): loft_hpc/train/engine.py
    checkpoints at the agreed stop but raises StopForRequeue only when the stage is not done
    (``if stop and not last``), so the job writes its final file and exits 0. Nothing is lost: the
    file equals the uninterrupted run's, and running the command again only finds the stage done."""
    out = tmp_path / "last"
    args = ["--stage", "pretrain", *BASE, f"output.dir={out}"]
    p = ok(run_job(2, args, env={"LOFT_FAULT_INJECT": "0:3:pretrain:term"}))
    assert "stop requested" not in p.stdout
    final = out / "pretrain.h5"
    rf = read_run_file(final)
    assert rf.complete and rf.progress["step"] == 16
    assert_same_run(rf, read_run_file(base_run / "pretrain.h5"))
    before = final.read_bytes()
    p = ok(run_job(2, args))
    assert "exists, skipping" in p.stdout
    assert final.read_bytes() == before


# ------------------------------------------------------------------------------------- (e)
def expected_structured_masks(model, state: dict, ratio: float) -> dict[str, torch.Tensor]:
    """The documented structured rule, restated: in every partitioned filter group of C filters
    keep max(1, round((1 - p) C)) filters, those with the largest squared L2 norm of the
    producer's row (the group's ``producer`` tensor, row f = filter f); a pruned filter zeroes its
    entries along ``dim`` of every *parameter* member (producer rows, BN gamma/beta, consumer input
    channels; running statistics are buffers and carry no mask)."""
    params = dict(model.named_parameters())
    masks = {}
    for g in model.filter_groups():
        if not g.partitioned:
            continue
        rows = state[g.producer].double().reshape(g.size, -1)
        score = (rows * rows).sum(1)
        k = max(1, round((1 - ratio) * g.size))
        keep = sorted(range(g.size), key=lambda f: -float(score[f]))[:k]
        assert float(score[keep[-1]]) > float(max((score[f] for f in range(g.size) if f not in keep), default=-1))
        for m in g.members:
            if m.tensor not in params:
                continue
            mask = masks.setdefault(m.tensor, torch.ones(params[m.tensor].shape, dtype=torch.bool))
            for f in range(g.size):
                if f not in keep:
                    mask.narrow(m.dim, f * m.repeat, m.repeat).fill_(False)
    return masks


def test_rewind_to_an_early_step_with_masks_from_the_end(base_run, tmp_path):
    """(e) prune.rewind=8it, mask_from=end, K = 4: pretraining stored snapshots/weights@8it.h5 by
    itself (listed in pretrain.h5); each ticket's masks rank the END weights (pretrain.h5's /model)
    by the rule restated above, and its weights are the step-8 snapshot times the mask."""
    out = tmp_path / "prune"
    shutil.copytree(base_run, out)
    ok(run_job(0, ["--stage", "prune", *BASE, f"output.dir={out}"]))
    cfg = config(BASE, out)
    pre = read_run_file(out / "pretrain.h5")
    assert pre.weight_snapshots == {"8it": "snapshots/weights@8it.h5"}
    snap = read_run_file(out / "snapshots" / "weights@8it.h5")
    assert snap.progress["step"] == 8
    # the snapshot is the model at step 8: the reference stopped there (schedule of 16 steps)
    at8, _ = reference_loft_ext(cfg, 2, stop_at=8)
    params = [n for n in at8 if not n.endswith(BN_BUFFERS)]
    assert_close_states(snap.model, at8, TOL_2RANKS, "weights@8it", params)
    model = make_model(cfg, build_datasets(cfg.data))
    for ratio, tag in ((0.3, "p30"), (0.5, "p50")):
        ticket = read_run_file(out / f"tickets_{tag}.h5")
        want = expected_structured_masks(model, pre.model, ratio)
        assert sorted(ticket.masks) == sorted(want)
        for n, m in want.items():
            assert torch.equal(ticket.masks[n], m), f"p={ratio}: mask {n} is not the END weights' ranking"
        # the masks tell which weights ranked: those of the step-8 snapshot would rank differently
        assert any(not torch.equal(m, want[n]) for n, m in expected_structured_masks(model, snap.model, ratio).items())
        for n, v in ticket.model.items():
            w = snap.model[n] * want[n].to(v.dtype) if n in want else snap.model[n]
            assert torch.equal(v, w), f"p={ratio}: ticket {n} is not weights@8it x mask"
        assert any(not torch.equal(ticket.model[n], pre.model[n] * m.to(pre.model[n].dtype)) for n, m in want.items())
        a = ticket.mask_attrs
        assert (a["rewind"], a["rewind_step"], a["mask_from"], a["mask_from_step"]) == ("8it", 8, "end", 16)
        assert a["ratio"] == pytest.approx(ratio)
    # round((1-p) C) with C = 15, 30, 60: p = 0.3 keeps 10 (10.5 rounds to even), 21, 42
    kept = {g.name: int(expected_structured_masks(model, pre.model, 0.3)[g.producer].reshape(g.size, -1).any(1).sum())
            for g in model.filter_groups() if g.partitioned}
    assert sorted(kept.values()) == [10, 21, 42]


# ------------------------------------------------------------------------------------- (c)
# Conv-2 has no BatchNorm, so data-parallel training is exactly SGD on the concatenated batch (a
# model with BN would normalise each rank's batch on its own). Dense pretraining from theta_0, an
# unstructured ticket at p = 0.5 (end weights), masked retraining from it; 2 ranks, 6 batches per
# epoch each (96 samples), so both stages cross an epoch boundary. Unstructured, because a
# structured ticket of a ReLU network without BN keeps itself: a zeroed filter outputs 0 and its
# weights get no gradient, so masks would not be needed and the test could not see them work.
DENSE = ["data.name=synthetic", "data.synthetic_train_size=192", "data.synthetic_test_size=64",
         "data.batch_size=16", "data.eval_batch_size=64", "model.arch=conv2", "model.width=8",
         "model.inner_width_factor=1", "train.method=dense", "train.duration=10it", "train.lr=0.05",
         "train.weight_decay=5e-4", "train.seed=5", "train.eval_every=5it", "output.checkpoint_every=5it",
         "output.snapshot_every=5it", "train.progress=false", "train.log_every=1000", "output.snapshot_weights=[]",
         "prune.method=unstructured", "prune.ratios=[0.5]", "retrain.duration=8it", "retrain.lr=0.05"]


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dense")
    ok(run_job(2, ["--stage", "all", *DENSE, f"output.dir={out}"]))
    return out


# Measured: pretraining 10 steps, max |difference| 3.0e-8 (weights) and 3.0e-8 (momentum); masked
# retraining 8 steps, 1.5e-8 / 3.5e-8 (float32 sums of 32 per-sample losses in another order than
# the mean of two ranks' means). TOL_DENSE is 50x that; the tests assert that SGD on rank 0's
# batches alone, and retraining without the masks, end more than 100 x TOL_DENSE away.
TOL_DENSE = 2e-6


def test_dense_pretraining_is_sgd_on_the_concatenated_batches(dense_run):
    cfg = config(DENSE, dense_run)
    rf = read_run_file(dense_run / "pretrain.h5")
    theta0 = make_model(cfg, build_datasets(cfg.data)).state_dict()
    assert_close_states(rf.init, theta0, 0.0, "theta_0")
    want, want_mom = reference_dense(cfg, 2, cfg.train, theta0)
    print("dense pretrain: max |difference|", max_diff(rf.model, want), max_diff(rf.momentum, want_mom))
    assert_close_states(rf.model, want, TOL_DENSE, "dense pretraining")
    assert_close_states(rf.momentum, want_mom, TOL_DENSE, "dense momentum")
    # the tolerance separates: SGD on rank 0's batches alone ends far away
    alone, _ = reference_dense(cfg, 1, cfg.train, theta0)
    assert max_diff(rf.model, alone)[0] > 100 * TOL_DENSE


def test_masked_retraining_is_masked_sgd_on_the_concatenated_batches(dense_run):
    cfg = config(DENSE, dense_run)
    ticket = read_run_file(dense_run / "tickets_p50.h5")
    rf = read_run_file(dense_run / "retrain_p50.h5")
    assert ticket.masks and all(not m.all() for m in ticket.masks.values())
    # pruned weights are exactly zero in the retrained file, and so is their momentum
    for n, m in ticket.masks.items():
        assert torch.equal(rf.masks[n], m)
        assert not rf.model[n][~m].any(), f"{n}: a pruned weight is not 0 after retraining"
        assert not rf.momentum[n][~m].any(), f"{n}: a pruned weight has momentum"
        assert rf.model[n][m].ne(ticket.model[n][m]).any(), f"{n}: kept weights did not train"
    want, want_mom = reference_dense(cfg, 2, cfg.retrain, ticket.model, ticket.masks)
    print("masked retraining: max |difference|", max_diff(rf.model, want), max_diff(rf.momentum, want_mom))
    assert_close_states(rf.model, want, TOL_DENSE, "masked retraining")
    assert_close_states(rf.momentum, want_mom, TOL_DENSE, "masked retraining momentum")
    # the masks matter: without masking gradients and weights the reference ends elsewhere
    free, _ = reference_dense(cfg, 2, cfg.retrain, ticket.model)
    assert max_diff(rf.model, free)[0] > 100 * TOL_DENSE


# ------------------------------------------------------------------------------------- (b)
# 4 ranks, width 5: partitioned groups of 15, 30 and 60 filters; 15 = 4 + 4 + 4 + 3 (rank 3 holds
# one filter less), 30 = 8 + 8 + 7 + 7. Three rounds of K = 4, momentum carried.
#
# Tolerance. With 4 ranks the shared tensors (and shared momentum) are averaged by an MPI sum in
# another order than torch.stack(...).mean(0): about 1 ulp per round, amplified by training.
# Measured against the references below (the same numbers on repeated runs, the deal and the
# batches being deterministic): carry, 3 rounds: max |difference| 2.4e-7 on weights, 2.2e-7 on
# momentum; carry + Nesterov, 3 rounds: 3.6e-7 / 1.8e-7 (tests/test_loft_mpi.py documents up to
# 1e-3 with momentum reset, which re-creates SGD every round). One wrong slice (one rank's
# momentum written back to its filters in reversed order, for one group in one round; injected
# into the reference, every group x rank 0 / 3 x first / last round) gives 0.08 to 0.33 on the
# momentum, and 0.011 to 0.041 on the weights when it happens before the last round. TOL_4RANKS
# is 30x the largest measured difference and 1,000x below the smallest wrong-slice weight error.
TOL_4RANKS = 1e-5
CARRY4 = TINY + ["model.width=5", "train.duration=12it", "train.local_steps=4", "train.eval_every=12it",
                 "output.checkpoint_every=12it", "output.snapshot_every=12it", "train.seed=3", "train.lr=0.05",
                 "train.weight_decay=5e-4", "train.bn_recalibration=0", "train.momentum_mode=carry",
                 "train.check_sync=true"]


@pytest.mark.parametrize("nesterov", [False, True], ids=["carry", "carry-nesterov"])
def test_momentum_carried_on_four_ranks_with_an_uneven_deal(tmp_path, nesterov):
    extra = [f"train.nesterov={str(nesterov).lower()}"]
    out = tmp_path / "carry4"
    p = ok(run_job(4, ["--stage", "pretrain", *CARRY4, *extra, f"output.dir={out}"], timeout=300))
    assert "sync check: 3 rounds" in p.stdout
    cfg = config([*CARRY4, *extra], out)
    assert cfg.train.nesterov is nesterov and cfg.train.momentum_mode == "carry"
    part = [g for g in make_model(cfg, build_datasets(cfg.data)).filter_groups() if g.partitioned]
    assert [g.size for g in part] == [15, 30, 60]
    assert [len(x) for x in ref_deal(cfg.train.seed, 0, [15], 4)[0]] == [4, 4, 4, 3]
    # without Nesterov the reference of tests/test_loft_mpi.py itself; with it, the extended copy
    ref, ref_mom = reference_loft_ext(cfg, 4) if nesterov else reference_loft(cfg, 4)
    rf = read_run_file(out / "pretrain.h5")
    print(f"4 ranks, nesterov={nesterov}: max |difference| weights {max_diff(rf.model, ref)}, "
          f"momentum {max_diff(rf.momentum, ref_mom)}")
    assert sorted(rf.momentum) == sorted(ref_mom)
    assert_close_states(rf.model, ref, TOL_4RANKS, "weights")
    assert_close_states(rf.momentum, ref_mom, TOL_4RANKS, "momentum")
    if not nesterov:
        # the tolerance would catch one wrong slice: rank 3's momentum of the 15-filter group
        # reversed in round 0 (so the weights are off from round 1 on, the momentum too)
        bad, bad_mom = reference_loft_ext(cfg, 4, wrong_momentum_slice=(0, 0, 3))
        assert max_diff(rf.momentum, bad_mom)[0] > 1000 * TOL_4RANKS
        assert max_diff(rf.model, bad)[0] > 1000 * TOL_4RANKS
    else:
        # Nesterov is really on: the plain-momentum reference ends elsewhere
        plain, _ = reference_loft(config(CARRY4, out), 4)
        assert max_diff(rf.model, plain)[0] > 100 * TOL_4RANKS
