"""Tensors sliced on both dims (every hidden layer of the LTH models partitioned): which entries a
round trains (loft_hpc.partition.coverage, against a brute-force count), and what the exchange
does with the untrained ones on real MPI ranks: weights and momentum left as they were (rule
'keep': an entry returns with the momentum of the last round it was trained in)."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from loft_hpc.checkpoint.h5file import read_run_file
from loft_hpc.config import load_config
from loft_hpc.data import build_datasets
from loft_hpc.models.lth import ConvNet, LeNet300100
from loft_hpc.partition.coverage import (mean_trained_fraction, partially_trained, trained_fraction,
                                         trained_mask)
from loft_hpc.partition.plan import PartitionPlan
from loft_hpc.partition.slicing import TensorSlicer, subnetwork
from loft_hpc.stages.common import make_model
from loft_hpc.train.stream import BatchStream
from tests.mpi_util import REPO, TINY, ok, run_job


# Uneven group sizes: LeNet at width 7 has 33 and 11 hidden units; Conv-4 at width 5 has
# 5, 5, 10, 10 channels and 20, 20 hidden units, and its fc1 consumes 10 x (2 x 2) features
# (a member with repeat 4).
def _lenet():
    return LeNet300100(in_channels=1, image_size=8, num_classes=10, width=7)


def _conv4():
    return ConvNet(2, in_channels=3, image_size=8, num_classes=10, width=5)


MODELS = {"lenet300_100": _lenet, "conv4": _conv4}


def brute_force_mask(model, groups, plan: PartitionPlan, tensor: str) -> torch.Tensor:
    """Entry by entry: mark every index tuple in each rank's cross product of its index sets."""
    shape = tuple(model.state_dict()[tensor].shape)
    mask = torch.zeros(shape, dtype=torch.bool)
    members = [(m.dim, m, g.name) for g in groups for m in g.members if m.tensor == tensor]
    for s in range(plan.world):
        per_dim = {}
        for d, m, gname in members:
            per_dim[d] = m.entries(plan.assignment[gname][s]).tolist()
        axes = [per_dim.get(d, list(range(n))) for d, n in enumerate(shape)]
        for ix in itertools.product(*axes):
            mask[ix] = True
    return mask


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("world", [2, 3, 4])
def test_trained_fraction_matches_brute_force(arch, world):
    model = MODELS[arch]()
    groups = [g for g in model.filter_groups() if g.partitioned]
    assert any(g.size % world for g in groups), "the deal must be uneven somewhere"
    slicer = TensorSlicer(groups)
    state = model.state_dict()
    for round_ in (0, 1):
        plan = PartitionPlan.draw(11, round_, groups, world)
        frac = trained_fraction(slicer, plan)
        assert set(frac) == {m.tensor for g in groups for m in g.members}
        two_dim = set(partially_trained(slicer, plan))
        assert two_dim, f"{arch} has no tensor sliced on two dims"
        for t, f in frac.items():
            want = brute_force_mask(model, groups, plan, t)
            n = int(want.sum())
            assert f == n / want.numel(), f"{t}: {f} != brute force {n}/{want.numel()}"
            assert torch.equal(trained_mask(slicer, plan, t, state[t].shape), want), t
            assert (f < 1.0) == (t in two_dim), t
    # the product formula for one two-dim tensor, and rounds changing only which entries
    sizes = {g.name: g.size for g in groups}
    t = "fc2.weight"
    (_, _, g_row), (_, _, g_col) = slicer.by_tensor[t]
    share = lambda c, s: c // world + (s < c % world)  # noqa: E731
    expect = sum(share(sizes[g_row], s) * share(sizes[g_col], s) for s in range(world)) / (sizes[g_row] * sizes[g_col])
    assert frac[t] == pytest.approx(expect, rel=1e-15)
    mean = mean_trained_fraction(model.filter_groups(), 11, 3, world)
    assert mean[t] == pytest.approx(expect, rel=1e-12)
    masks = [trained_mask(slicer, PartitionPlan.draw(11, r, groups, world), t, state[t].shape) for r in range(3)]
    assert not torch.equal(masks[0], masks[1])


def test_mean_over_rounds_matches_brute_force():
    model = _conv4()
    groups = model.filter_groups()
    part = [g for g in groups if g.partitioned]
    got = mean_trained_fraction(groups, 4, 3, 3)
    for t, f in got.items():
        counts = [brute_force_mask(model, part, PartitionPlan.draw(4, r, part, 3), t) for r in range(3)]
        want = sum(int(m.sum()) / m.numel() for m in counts) / 3
        assert f == pytest.approx(want, rel=1e-12), t
    with pytest.raises(ValueError):
        mean_trained_fraction(groups, 4, 0, 3)


# ---- real LoFT on 2 ranks
SEED, K = 5, 3
ARGS = TINY + ["model.arch=lenet300_100", "model.width=7", "model.inner_width_factor=1", f"train.local_steps={K}",
               "train.momentum_mode=carry", "train.momentum=0.9", "train.schedule=constant", "train.lr=0.05",
               "train.weight_decay=5e-4", "train.bn_recalibration=0", f"train.seed={SEED}", "train.check_sync=true",
               "output.snapshot_weights=[]"]


def _reference(cfg, world: int, rounds: int):
    """The rule written independently of the exchange: S workers one after another in this
    process; owned slices (weights and momentum) copied back entry by entry, entries no worker
    trained left untouched; shared tensors averaged."""
    torch.set_num_threads(1)
    bundle = build_datasets(cfg.data)
    model = make_model(cfg, bundle)
    groups = [g for g in model.filter_groups() if g.partitioned]
    slicer = TensorSlicer(groups)
    t = cfg.train
    streams = [BatchStream(bundle.train, cfg.data.batch_size, seed=t.seed, rank=s, world=world, shard=False)
               for s in range(world)]
    dims = {}  # tensor -> [(dim, group)]
    for g in groups:
        for m in g.members:
            assert m.repeat == 1
            dims.setdefault(m.tensor, []).append((m.dim, g.name))
    mom = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for rnd in range(rounds):
        plan = PartitionPlan.draw(t.seed, rnd, groups, world)
        results = []
        for s in range(world):
            keep = plan.keep(s)
            sub = subnetwork(model, slicer, keep)
            opt = torch.optim.SGD(sub.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
            for pn, p in sub.named_parameters():
                buf = mom[pn]
                for d, g in dims.get(pn, ()):
                    buf = buf.index_select(d, keep[g])
                opt.state[p]["momentum_buffer"] = buf.clone()
            for i in range(K):
                opt.zero_grad()
                x, y = streams[s].batch(rnd * K + i)
                F.cross_entropy(sub(x), y).backward()
                opt.step()
            results.append((keep, sub.state_dict(), {pn: opt.state[p]["momentum_buffer"] for pn, p in sub.named_parameters()}))
        with torch.no_grad():
            for tn, full in model.state_dict().items():
                if tn not in dims:
                    full.copy_(torch.stack([st[tn] for _, st, _ in results]).mean(0))
                    if tn in mom:
                        mom[tn].copy_(torch.stack([sm[tn] for _, _, sm in results]).mean(0))
                    continue
                for keep, st, sm in results:
                    # every (full index, slice index) pair of the sliced dims, one entry at a time
                    pairs = [list(enumerate(keep[g].tolist())) for _, g in dims[tn]]
                    for combo in itertools.product(*pairs):
                        dst, src = [slice(None)] * full.dim(), [slice(None)] * full.dim()
                        for (d, _), (k, i) in zip(dims[tn], combo):
                            dst[d], src[d] = i, k
                        full[tuple(dst)] = st[tn][tuple(src)]
                        if tn in mom:
                            mom[tn][tuple(dst)] = sm[tn][tuple(src)]
    return model.state_dict(), mom


def test_two_ranks_untrained_entries_keep_weights_and_momentum(tmp_path):
    world, rounds = 2, 3
    runs = {}
    for r in (rounds - 1, rounds):
        out = tmp_path / f"r{r}"
        p = ok(run_job(world, ["--stage", "pretrain", *ARGS, f"train.duration={r * K}it", f"output.dir={out}"]))
        assert f"sync check: {r} rounds" in p.stdout
        runs[r] = read_run_file(out / "pretrain.h5")
    last, before = runs[rounds], runs[rounds - 1]
    assert last.progress["round"] == rounds
    cfg = load_config(str(REPO / "configs" / "default.yaml"), ARGS + [f"train.duration={rounds * K}it", f"output.dir={tmp_path}"])
    model = make_model(cfg, build_datasets(cfg.data))
    groups = [g for g in model.filter_groups() if g.partitioned]
    slicer = TensorSlicer(groups)
    plan = PartitionPlan.draw(SEED, rounds - 1, groups, world)  # the last round's plan
    assert partially_trained(slicer, plan) == ["fc2.weight"]
    frac = trained_fraction(slicer, plan)
    assert frac["fc2.weight"] == (17 * 6 + 16 * 5) / (33 * 11)  # 33 = 17 + 16 units, 11 = 6 + 5
    # the pretraining file records it per tensor (/coverage), counted here by hand
    cov = {r["name"]: r["trained_fraction"] for r in last.coverage}
    assert cov["fc2.weight"] == (17 * 6 + 16 * 5) / (33 * 11) and cov["fc1.weight"] == 1.0
    assert "train only the ranks' diagonal blocks each round" in p.stdout and "fc2.weight 0.501" in p.stdout
    t = "fc2.weight"
    trained = trained_mask(slicer, plan, t, last.model[t].shape)
    assert int(trained.sum()) == 17 * 6 + 16 * 5
    # untrained in the last round: weights and momentum exactly as before that round ...
    assert torch.equal(last.model[t][~trained], before.model[t][~trained])
    assert torch.equal(last.momentum[t][~trained], before.momentum[t][~trained])
    # ... and that momentum is the live value of earlier rounds, not zero (rule 'keep')
    assert (last.momentum[t][~trained] != 0).float().mean() > 0.5
    # the round did train the diagonal blocks: every entry of them moved
    assert bool((last.model[t][trained] != before.model[t][trained]).all())
    assert bool((last.momentum[t][trained] != before.momentum[t][trained]).all())
    # tensors sliced on one dim are trained in full: every entry moved
    for n in ("fc1.weight", "classifier.weight"):
        assert frac[n] == 1.0
        assert bool((last.model[n] != before.model[n]).all()), n
    # the whole run against an independent reference with the same rule (entries that return
    # after a round untrained resume with their old momentum: trajectories depend on the rule)
    ref, ref_mom = _reference(cfg, world, rounds)
    for n, v in ref.items():
        if v.is_floating_point():
            torch.testing.assert_close(last.model[n], v, rtol=1e-5, atol=1e-6, msg=f"{n} differs from the reference")
    for n, v in ref_mom.items():
        torch.testing.assert_close(last.momentum[n], v, rtol=1e-5, atol=1e-6, msg=f"momentum of {n} differs")
