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

