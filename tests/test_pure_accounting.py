"""Analytic byte accounting (loft_hpc/exchange/accounting.py) on a tiny hand-made model, against
element counts worked out by hand in the comments (part of the mutation-testing selection,
``make mutation``)."""
from __future__ import annotations

import pytest
from torch import nn

from loft_hpc.exchange.accounting import dense_step_bytes, gpipe_bytes, loft_sync_bytes
from loft_hpc.models.groups import FilterGroup, Member, conv_group


class Tiny(nn.Module):
    """conv1 (3->4, 1x1, bias) -> bn1 -> conv2 (4->6, 1x1) -> flatten 6 x 2 x 2 -> fc (24->5).

    Tensors: conv1.weight 12, conv1.bias 4, bn1.{weight,bias,running_mean,running_var} 4 each
    (bn1.num_batches_tracked is an integer), conv2.weight 24, fc.weight 120, fc.bias 5."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 1, bias=False)
        self.fc = nn.Linear(24, 5)


def groups():
    g1 = conv_group("g1", "conv1", 4, bias=True, bn="bn1", consumers=("conv2",), partitioned=True)
    g2 = conv_group("g2", "conv2", 6, consumers=("fc",), consumer_repeat=4, partitioned=True)
    # a shared group (not dealt): its tensors stay in the averaged set
    g3 = FilterGroup("g3", 5, (Member("fc.bias", 0),), False, "fc.bias")
    return [g1, g2, g3]


def test_one_rank_communicates_nothing():
    for carry in (False, True):
        assert loft_sync_bytes(Tiny(), groups(), 1, 0, carry) == {
            "allgather_sent": 0, "allgather_received": 0, "allreduce_sent": 0, "allreduce_received": 0}


def test_two_ranks_even_deal():
    # each rank holds 2 of g1's 4 filters and 3 of g2's 6:
    #   conv1.weight 2x3 = 6, conv1.bias 2, bn1 weight/bias 2 + 2 (parameters),
    #   bn1 running_mean/var 2 + 2 (buffers), conv2.weight 3x2 = 6, fc.weight 5 x (3 x 4) = 60
    #   parameters 78, buffers 4 -> shard 82 (reset) or 2 x 78 + 4 = 160 (carry)
    # shared floating tensors: fc.bias (5, a parameter; momentum too with carry)
    m = Tiny()
    for rank in (0, 1):
        assert loft_sync_bytes(m, groups(), 2, rank, False) == {
            "allgather_sent": 4 * 82, "allgather_received": 4 * 82, "allreduce_sent": 4 * 5, "allreduce_received": 4 * 5}
        assert loft_sync_bytes(m, groups(), 2, rank, True) == {
            "allgather_sent": 4 * 160, "allgather_received": 4 * 160,
            "allreduce_sent": 4 * 10, "allreduce_received": 4 * 10}


def test_three_ranks_uneven_deal():
    # g1: 4 filters on 3 ranks -> 2, 1, 1; g2: 6 -> 2, 2, 2
    # rank 0: conv1.weight 6, bias 2, bn1 params 4, buffers 4, conv2.weight 2x2 = 4, fc 5 x 8 = 40
    #         = 60 (params 56 + buffers 4); carry: 2 x 56 + 4 = 116
    # rank 1, 2: conv1.weight 3, bias 1, bn1 params 2, buffers 2, conv2.weight 2x1 = 2, fc 40
    #         = 50 (params 48 + buffers 2); carry: 2 x 48 + 2 = 98
    m = Tiny()
    reset = [loft_sync_bytes(m, groups(), 3, r, False) for r in range(3)]
    assert [(b["allgather_sent"], b["allgather_received"]) for b in reset] == [
        (4 * 60, 4 * 100), (4 * 50, 4 * 110), (4 * 50, 4 * 110)]
    carry = [loft_sync_bytes(m, groups(), 3, r, True) for r in range(3)]
    assert [(b["allgather_sent"], b["allgather_received"]) for b in carry] == [
        (4 * 116, 4 * 196), (4 * 98, 4 * 214), (4 * 98, 4 * 214)]
    assert all(b["allreduce_sent"] == b["allreduce_received"] == 20 for b in reset)
    assert all(b["allreduce_sent"] == b["allreduce_received"] == 40 for b in carry)


def test_every_shared_float_tensor_is_averaged():
    # with only g2 dealt, g1's tensors are shared: conv1.weight 12 + conv1.bias 4 + bn1 4 x 4 = 32,
    # plus fc.bias 5 = 37 floats (num_batches_tracked is an integer and never averaged);
    # with carry the parameters among them (12 + 4 + 4 + 4 + 5 = 29) travel twice
    g = [gr for gr in groups() if gr.name != "g1"]
    # rank 0 of 2: conv2.weight 3 x 4 = 12, fc.weight 5 x 12 = 60
    assert loft_sync_bytes(Tiny(), g, 2, 0, False) == {
        "allgather_sent": 4 * 72, "allgather_received": 4 * 72, "allreduce_sent": 4 * 37, "allreduce_received": 4 * 37}
    assert loft_sync_bytes(Tiny(), g, 2, 0, True)["allreduce_sent"] == 4 * (37 + 29)
    # a group in the list that is not partitioned slices nothing
    shared_g1 = FilterGroup(groups()[0].name, 4, groups()[0].members, False, "conv1.weight")
    assert loft_sync_bytes(Tiny(), [shared_g1, *g], 2, 0, False) == loft_sync_bytes(Tiny(), g, 2, 0, False)


def test_dense_counts_trainable_parameters():
    m = Tiny()
    # 12 + 4 + 4 + 4 + 24 + 120 + 5 = 173 parameters; buffers are not gradients
    assert dense_step_bytes(m) == {"allreduce_sent": 4 * 173, "allreduce_received": 4 * 173}
    m.conv1.bias.requires_grad_(False)
    assert dense_step_bytes(m) == {"allreduce_sent": 4 * 169, "allreduce_received": 4 * 169}


@pytest.mark.parametrize("epochs, samples, boundaries, want", [
    (2, 3, [5, 7], 2 * 3 * 2 * 4 * 12),
    (1, 1, [1], 8),
    (20, 50000, [], 0),
])
def test_gpipe_bytes(epochs, samples, boundaries, want):
    assert gpipe_bytes(epochs, samples, boundaries) == want



# ------------------------------------------------------------------------------------------
# Both conventions (fair: over all links, each byte once per link it crosses; paper: LOFT_SPEC 6a),
# per sync, per step and per epoch, against hand counts on Tiny.
#
# Tiny with groups(): partitioned tensors (g1 and g2 are dealt; g3 is shared)
#   conv1.weight 12, conv1.bias 4, bn1.weight 4, bn1.bias 4, bn1.running_mean 4, bn1.running_var 4,
#   conv2.weight 24, fc.weight 120                        -> P = 176 (parameters 168, buffers 8)
# shared floating tensors: fc.bias 5 (a parameter)        -> Sh = 5 (parameters 5)
# trainable parameters N = 173; floating buffers N_buf = 8 (num_batches_tracked is an integer)
#
# Tiny with only g2 dealt (every partitioned tensor sliced on one dim: conv2.weight rows, fc.weight
# columns in blocks of 4):
#   P = 24 + 120 = 144 (all parameters); Sh = conv1 12 + 4, bn1 4 x 4, fc.bias 5 = 37 (parameters 29)
from fractions import Fraction  # noqa: E402

from loft_hpc.exchange.accounting import (  # noqa: E402
    MethodBytes, ModelFloats, comm_link_bytes, dense_eval_bytes, dense_eval_rank_bytes, dense_fair_step,
    dense_paper_step, gpipe_fair_step, gpipe_paper_step, gpipe_rank_step_bytes, link_bytes, loft_fair_sync,
    loft_fair_sync_bytes, loft_paper_sync, method_bytes, model_floats, steps_per_epoch)


def g2_only():
    return [gr for gr in groups() if gr.name != "g1"]


def test_model_floats_hand_count():
    assert model_floats(Tiny(), groups()) == ModelFloats(partitioned=176, shared=5, partitioned_params=168,
                                                         shared_params=5, params=173, buffers=8)
    f = model_floats(Tiny(), g2_only())
    assert f == ModelFloats(partitioned=144, shared=37, partitioned_params=144, shared_params=29, params=173, buffers=8)
    assert f.loft_floats(False) == (144, 37)
    assert f.loft_floats(True) == (144 + 144, 37 + 29)


def test_model_floats_of_the_paper_model():
    # PreResNet-34 at width 64, inner width 2x (CIFAR, 10 classes): the partitioned blocks are the
    # non-first blocks of stages 2-4 (3, 5 and 2 blocks); one block of stream width c holds
    # conv1 2c x c x 3 x 3 + bn2 4 x 2c (weight, bias, running mean, running var) + conv2 c x 2c x 3 x 3
    # = 36 c^2 + 8 c floats, of which 8 c - 4 c = 4 c are BN statistics
    import torch

    from loft_hpc.models.preresnet import preresnet34

    with torch.device("meta"):
        m = preresnet34(in_channels=3, num_classes=10, width=64, inner_width_factor=2, stem="cifar")
    blocks = {128: 3, 256: 5, 512: 2}
    p = sum(n * (36 * c * c + 8 * c) for c, n in blocks.items())
    stats = sum(n * 4 * c for c, n in blocks.items())
    f = model_floats(m, m.filter_groups())
    assert (f.partitioned, f.partitioned_params) == (p, p - stats) == (32_461_824, 32_451_072)  # LOFT_SPEC 6a: 32.46M
    assert f.shared == 9_935_050  # LOFT_SPEC 6a: 9.94M


def test_link_bytes_rule():
    # allgather: every rank's input reaches the S-1 others; uneven inputs 3 + 5 + 8 on 3 ranks
    assert link_bytes(3, allgather=16) == 2 * 16
    # allreduce of n floats: 2 (S-1) n over all links; the payload sent sums to S n
    assert link_bytes(4, allreduce=4 * 40) == 2 * 3 * 40
    # point-to-point and alltoall (counted only to other ranks): each byte crosses one link
    assert link_bytes(2, p2p=288) == 288 and link_bytes(4, alltoall=96) == 96
    # assembling the full model is an allgather
    assert link_bytes(4, assemble=10) == 30
    assert link_bytes(1, 100, 100, 100, 100, 100) == 0
    with pytest.raises(ValueError, match="not the same on every rank"):
        link_bytes(4, allreduce=41)
    rows = [{"allgather_sent": 8, "allreduce_sent": 20, "p2p_sent": 0, "alltoall_sent": 5, "assemble_sent": 1},
            {"allgather_sent": 4, "allreduce_sent": 20},  # a file without p2p, ... columns reads them as 0
            {"allgather_sent": 0, "allreduce_sent": 20, "p2p_sent": 6}]
    assert comm_link_bytes(rows, 3) == 2 * 12 + 2 * 2 * 20 + 6 + 5 + 2 * 1
    assert comm_link_bytes(rows, 3, kinds=("allgather",)) == 2 * 12


def test_loft_fair_sync_equals_the_link_rule_on_the_ranks_comm_columns():
    m = Tiny()
    # one-dim slicing: 4 (S-1) (P' + 2 Sh'), the closed form, equals the link rule on the ranks' columns
    # S = 2, reset: the shards (72 + 72) each cross one link, the 37 shared floats 2 (S-1) = 2 links
    #   -> 4 x (144 + 2 x 37) = 872 (at S = 2 the paper's P + S Sh as well)
    assert loft_fair_sync(144, 37, 2) == 872 == loft_fair_sync_bytes(m, g2_only(), 2, False)
    assert loft_paper_sync(144, 37, 2) == 872
    # carry: P' = 288, Sh' = 66 -> 4 x (288 + 132) = 1680
    assert loft_fair_sync(288, 66, 2) == 1680 == loft_fair_sync_bytes(m, g2_only(), 2, True)
    # S = 3: g2's 6 filters, 2 each: shard = conv2 2 x 4 + fc 5 x 8 = 48, all shards 144, each
    # reaching 2 others; the shared 37 cross 2 x 2 links -> 4 x (2 x 144 + 4 x 37) = 1744
    assert loft_fair_sync(144, 37, 3) == 1744 == loft_fair_sync_bytes(m, g2_only(), 3, False)
    # two-dim slicing (conv2.weight between g1 and g2): the shards cover only the diagonal blocks
    # (82 floats each), so the closed form over-counts; exact: 4 x (82 + 82 + 2 x 5)
    assert loft_fair_sync_bytes(m, groups(), 2, False) == 696 < loft_fair_sync(176, 5, 2) == 744
    for s in (0, 1):
        assert loft_fair_sync(144, 37, s) == 0
    assert loft_fair_sync_bytes(m, g2_only(), 1, True) == 0


def test_paper_convention_per_sync():
    # LoFT: a server hands each of S workers P/S + Sh: P + S Sh floats, one direction
    assert loft_paper_sync(144, 37, 2) == 4 * (144 + 2 * 37) == 872
    assert loft_paper_sync(144, 37, 4) == 4 * (144 + 4 * 37) == 1168
    assert loft_paper_sync(144, 37, 1) == 0
    # dense: each worker handed the N averaged gradients
    assert dense_paper_step(173, 2) == 4 * 2 * 173 == 1384
    assert dense_paper_step(173, 1) == 0


def test_dense_fair_and_evaluation():
    # the ring allreduce of N = 173 gradients: 2 (S-1) N floats over all links
    per_rank = dense_step_bytes(Tiny())
    assert per_rank == {"allreduce_sent": 4 * 173, "allreduce_received": 4 * 173}
    assert dense_fair_step(173, 2) == 4 * 2 * 173 == 1384 == link_bytes(2, allreduce=2 * per_rank["allreduce_sent"])
    assert dense_fair_step(173, 4) == 4 * 2 * 3 * 173 == 4152 == link_bytes(4, allreduce=4 * per_rank["allreduce_sent"])
    assert dense_fair_step(173, 1) == 0
    # an evaluation averages the 8 BN statistics: 2 (S-1) x 8 floats
    assert dense_eval_rank_bytes(Tiny()) == {"allreduce_sent": 32, "allreduce_received": 32}
    assert dense_eval_bytes(8, 2) == 64 and dense_eval_bytes(8, 4) == 192 and dense_eval_bytes(8, 1) == 0


def test_gpipe_per_rank_fair_and_paper():
    # 3 stages, boundaries of 5 and 7 floats per sample, batch 3:
    # stage 0 sends 3 x 5 activations, receives 3 x 5 gradients            -> 60 each way
    # stage 1 receives 3 x 5 activations + 3 x 7 gradients, sends the same  -> 144 each way
    # stage 2 receives 3 x 7 activations, sends 3 x 7 gradients             -> 84 each way
    per = [gpipe_rank_step_bytes(3, [5, 7], r) for r in range(3)]
    assert per == [{"p2p_sent": 60, "p2p_received": 60}, {"p2p_sent": 144, "p2p_received": 144},
                   {"p2p_sent": 84, "p2p_received": 84}]
    # paper: activation forward + gradient backward, once each: 2 x 4 x 3 x 12 = 288 = all sent
    assert gpipe_paper_step(3, [5, 7]) == 288 == sum(p["p2p_sent"] for p in per)
    # fair: each byte crosses its boundary's link once = the paper's count (the payload, sent +
    # received, is twice that)
    assert gpipe_fair_step(3, [5, 7]) == 288 == link_bytes(3, p2p=sum(p["p2p_sent"] for p in per))
    assert sum(sum(p.values()) for p in per) == 2 * 288
    assert gpipe_fair_step(3, []) == gpipe_paper_step(3, []) == 0
    assert gpipe_rank_step_bytes(3, [], 0) == {"p2p_sent": 0, "p2p_received": 0}
    with pytest.raises(ValueError):
        gpipe_rank_step_bytes(3, [5, 7], 3)
    # the paper table's formula: epochs x samples as one batch
    assert gpipe_bytes(2, 3, [5, 7]) == gpipe_paper_step(6, [5, 7])


@pytest.mark.parametrize("method, world, shard, want", [
    ("loft", 3, False, 12),   # every worker iterates all 100 samples: 100 // 8
    ("loft", 3, True, 4),     # its shard: (100 // 3) // 8 = 33 // 8
    ("dense", 3, False, 4),   # data parallel always shards
    ("dense", 1, False, 12),
    ("gpipe", 3, False, 12),  # the global batch of 8: 100 // 8
])
def test_steps_per_epoch(method, world, shard, want):
    assert steps_per_epoch(method, 100, 8, world, shard) == want


def test_steps_per_epoch_unknown_method():
    with pytest.raises(ValueError):
        steps_per_epoch("ring", 100, 8, 2)


def test_method_bytes_per_sync_step_epoch():
    m = Tiny()
    # LoFT on 2 ranks, K = 5, batch 8, 100 samples: 12 steps per epoch, 12/5 syncs
    lo = method_bytes("loft", m, g2_only(), world=2, batch=8, n_train=100, local_steps=5, carry_momentum=True)
    assert (lo.steps_per_epoch, lo.steps_per_sync, lo.samples_per_epoch) == (12, 5, 2 * 96)
    assert lo.fair_per_sync == 1680
    assert lo.paper_per_sync == 4 * (144 + 2 * 29) == 808  # parameters only: no BN statistics, no momentum
    assert lo.syncs_per_epoch == Fraction(12, 5)
    assert lo.fair_per_step == Fraction(1680, 5) and lo.paper_per_step == Fraction(808, 5)
    assert lo.fair_per_epoch == Fraction(1680 * 12, 5) and lo.paper_per_epoch == Fraction(808 * 12, 5)
    assert lo.fair_for_steps(12) == 3 * 1680  # rounds of 5, 5, 2 steps
    assert lo.fair_for_steps(10) == 2 * 1680
    # dense on 2 ranks: 50 samples each, 6 steps per epoch, one sync per step
    de = method_bytes("dense", m, g2_only(), world=2, batch=8, n_train=100)
    assert (de.steps_per_epoch, de.steps_per_sync, de.samples_per_epoch) == (6, 1, 96)
    assert de.fair_per_epoch == 6 * 1384 and de.paper_per_epoch == 6 * 1384  # equal at S = 2 only
    # GPipe on 3 stages: the global batch 8 through the pipeline, 12 steps per epoch
    gp = method_bytes("gpipe", m, g2_only(), world=3, batch=8, n_train=100, boundary_numels=[5, 7])
    assert (gp.steps_per_epoch, gp.samples_per_epoch) == (12, 96)
    assert gp.fair_per_sync == gp.paper_per_sync == 4 * 2 * 8 * 12
    assert gp.fair_per_epoch == 12 * 768 == gp.paper_per_epoch
    with pytest.raises(ValueError):
        method_bytes("gpipe", m, g2_only(), world=3, batch=8, n_train=100, boundary_numels=[5])
    assert isinstance(gp, MethodBytes)
