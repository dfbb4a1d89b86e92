"""Partition plans and tensor slicing on small hand-made groups and models,
against values worked out by hand (or entry by entry), single process.

Part of the mutation-testing selection (``make mutation``): every assertion here names a behaviour
of loft_hpc/partition/{plan,slicing}.py that a wrong operator or constant would break."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from loft_hpc.models.groups import FilterGroup, Member, conv_group
from loft_hpc.partition.plan import PartitionPlan, check_partitionable, share_size
from loft_hpc.partition.slicing import TensorSlicer, subnetwork, zero_channels
from loft_hpc.utils.seeding import generator


def group(name: str, size: int, partitioned: bool = True, members=None) -> FilterGroup:
    members = members or (Member(f"{name}.weight", 0),)
    return FilterGroup(name, size, tuple(members), partitioned, members[0].tensor)


# ------------------------------------------------------------------------------------- plan.py
@pytest.mark.parametrize("channels, world, sizes", [
    (10, 4, [3, 3, 2, 2]),   # 10 = 4 * 2 + 2: ranks 0 and 1 take the two extra filters
    (8, 4, [2, 2, 2, 2]),
    (3, 4, [1, 1, 1, 0]),
    (7, 1, [7]),
    (5, 2, [3, 2]),
    (0, 3, [0, 0, 0]),
])
def test_share_size_by_hand(channels, world, sizes):
    assert [share_size(channels, world, s) for s in range(world)] == sizes


def test_check_partitionable_names_group_size_and_world():
    assert check_partitionable([group("a", 4), group("b", 9)], 4) is None          # size == world is enough
    assert check_partitionable([group("small", 2, partitioned=False)], 4) is None  # shared groups never dealt
    assert check_partitionable([], 8) is None
    msg = check_partitionable([group("a", 4), group("layer2.0", 3), group("c", 1)], 4)
    assert msg.startswith("filter group layer2.0 has 3 filters, fewer than the 4 ranks: ")
    assert "model.width" in msg and "model.partition_rule" in msg


def _reference_deal(seed, round_, j, size, world):
    """The module docstring's recipe, written out: randperm with the derived generator, dealt
    round-robin, each share sorted."""
    perm = torch.randperm(size, generator=generator(seed, "partition", round_, j)).tolist()
    return [sorted(perm[s::world]) for s in range(world)]


def test_plan_is_the_documented_deal():
    groups = [group("shared", 6, partitioned=False), group("a", 10), group("b", 7)]
    plan = PartitionPlan.draw(3, 5, groups, 4)
    assert plan.round == 5 and plan.world == 4
    assert list(plan.assignment) == ["a", "b"]          # shared groups are not dealt
    # the shared group still takes index 0: "a" is drawn with j = 1, "b" with j = 2
    assert [p.tolist() for p in plan.assignment["a"]] == _reference_deal(3, 5, 1, 10, 4)
    assert [p.tolist() for p in plan.assignment["b"]] == _reference_deal(3, 5, 2, 7, 4)
    for name, size in (("a", 10), ("b", 7)):
        parts = plan.assignment[name]
        assert [len(p) for p in parts] == [share_size(size, 4, s) for s in range(4)]
        assert sorted(sum((p.tolist() for p in parts), [])) == list(range(size))  # disjoint and covering
        assert all(p.dtype == torch.long for p in parts)


def test_plan_keep_and_fresh_rounds():
    groups = [group("a", 12), group("b", 5)]
    plan = PartitionPlan.draw(0, 0, groups, 3)
    for s in range(3):
        keep = plan.keep(s)
        assert set(keep) == {"a", "b"}
        assert torch.equal(keep["a"], plan.assignment["a"][s]) and torch.equal(keep["b"], plan.assignment["b"][s])
    again = PartitionPlan.draw(0, 0, groups, 3)
    assert all(torch.equal(x, y) for x, y in zip(plan.assignment["a"], again.assignment["a"]))
    other = [PartitionPlan.draw(0, r, groups, 3).assignment["a"][0].tolist() for r in range(1, 6)]
    assert any(o != plan.assignment["a"][0].tolist() for o in other)   # a fresh deal every round


# ------------------------------------------------------------------------------------ slicing.py
class Tiny(nn.Module):
    """conv1 (3->4) -> bn1 -> conv2 (4->6) -> flatten 6 x 2 x 2 -> fc (24->5)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 1, bias=False)
        self.fc = nn.Linear(24, 5)


def tiny():
    torch.manual_seed(0)
    m = Tiny()
    with torch.no_grad():
        m.bn1.running_mean.copy_(torch.arange(4.0) + 1)
        m.bn1.running_var.copy_(torch.arange(4.0) + 2)
    g1 = conv_group("g1", "conv1", 4, bias=True, bn="bn1", consumers=("conv2",), partitioned=True)
    g2 = conv_group("g2", "conv2", 6, consumers=("fc",), consumer_repeat=4, partitioned=True)
    return m, [g1, g2]


def test_slicer_tensors_and_indices():
    _, groups = tiny()
    sl = TensorSlicer(groups)
    k1, k2 = torch.tensor([1, 3]), torch.tensor([0, 5])
    assert sl.sliced_tensors({"g1": k1}) == ["bn1.bias", "bn1.running_mean", "bn1.running_var", "bn1.weight",
                                             "conv1.bias", "conv1.weight", "conv2.weight"]
    assert sl.sliced_tensors({"g2": k2}) == ["conv2.weight", "fc.weight"]
    assert sl.sliced_tensors({}) == []
    idx = sl.index("conv2.weight", {"g1": k1, "g2": k2})
    assert [d for d, _ in idx] == [0, 1]                   # sorted by dim: g2 rows, g1 columns
    assert idx[0][1].tolist() == [0, 5] and idx[1][1].tolist() == [1, 3]
    assert [d for d, _ in sl.index("conv2.weight", {"g1": k1})] == [1]
    fc = sl.index("fc.weight", {"g2": k2})
    assert fc[0][0] == 1 and fc[0][1].tolist() == [0, 1, 2, 3, 20, 21, 22, 23]   # repeat 4
    assert sl.index("fc.bias", {"g1": k1, "g2": k2}) == []
    assert sl.index("conv1.weight", {"g2": k2}) == []


def test_extract_and_write_back_cross_product():
    m, groups = tiny()
    sl = TensorSlicer(groups)
    keep = {"g1": torch.tensor([0, 2]), "g2": torch.tensor([1, 4, 5])}
    w = m.state_dict()["conv2.weight"]                      # (6, 4, 1, 1)
    part = sl.extract("conv2.weight", w, keep)
    assert part.shape == (3, 2, 1, 1) and part.is_contiguous()
    expect = torch.stack([torch.stack([w[r, c] for c in (0, 2)]) for r in (1, 4, 5)])
    assert torch.equal(part, expect)
    fc = m.state_dict()["fc.weight"]                        # (5, 24): columns 4..7, 16..23
    cols = [4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23]
    assert torch.equal(sl.extract("fc.weight", fc, keep), fc[:, cols])
    bias = m.state_dict()["fc.bias"]
    assert torch.equal(sl.extract("fc.bias", bias, keep), bias)   # unsliced: the whole tensor

    full = torch.zeros(6, 4, 1, 1)
    sl.write_back("conv2.weight", full, part + 1, keep)
    for r in range(6):
        for c in range(4):
            want = w[r, c] + 1 if (r in (1, 4, 5) and c in (0, 2)) else torch.zeros(1, 1)
            assert torch.equal(full[r, c], want), (r, c)
    unsliced = torch.zeros(5)
    sl.write_back("fc.bias", unsliced, torch.arange(5.0), keep)
    assert unsliced.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    half = torch.zeros(6, 4, 1, 1, dtype=torch.float64)
    sl.write_back("conv2.weight", half, part, keep)          # cast to the full tensor's dtype
    assert half.dtype == torch.float64 and float(half.abs().sum()) == pytest.approx(float(part.double().abs().sum()))


def test_multi_dim_slicing_needs_leading_dims():
    t = torch.zeros(2, 3, 4)
    TensorSlicer._advanced_index(t, [(0, torch.tensor([1])), (1, torch.tensor([0, 2]))])
    with pytest.raises(ValueError, match=r"multi-dim slicing needs leading dims, got \[0, 2\]"):
        TensorSlicer._advanced_index(t, [(0, torch.tensor([1])), (2, torch.tensor([0]))])
    with pytest.raises(ValueError, match=r"got \[1, 2\]"):
        TensorSlicer._advanced_index(t, [(1, torch.tensor([1])), (2, torch.tensor([0]))])
    ix = TensorSlicer._advanced_index(t, [(1, torch.tensor([0, 2]))])   # one dim anywhere is fine
    assert t[ix].shape == (2, 2, 4)


def test_subnetwork_is_smaller_with_metadata_and_leaves_the_model():
    m, groups = tiny()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    keep = {"g1": torch.tensor([1, 2, 3]), "g2": torch.tensor([0, 3])}
    m.conv1.weight.requires_grad_(False)
    sub = subnetwork(m, TensorSlicer(groups), keep)
    assert (sub.conv1.in_channels, sub.conv1.out_channels) == (3, 3)
    assert (sub.conv2.in_channels, sub.conv2.out_channels) == (3, 2)
    assert sub.bn1.num_features == 3
    assert (sub.fc.in_features, sub.fc.out_features) == (8, 5)
    assert torch.equal(sub.bn1.running_var, before["bn1.running_var"][[1, 2, 3]])
    assert "running_var" in sub.bn1._buffers and "running_var" not in dict(sub.bn1.named_parameters())
    assert isinstance(sub.conv1.weight, nn.Parameter) and not sub.conv1.weight.requires_grad
    assert sub.conv2.weight.requires_grad
    assert torch.equal(sub.fc.weight, before["fc.weight"][:, [0, 1, 2, 3, 12, 13, 14, 15]])
    with torch.no_grad():
        sub.conv1.weight.add_(1)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())   # the full model is untouched
    assert (m.conv1.out_channels, m.bn1.num_features, m.fc.in_features) == (4, 4, 24)
    x = torch.randn(2, 3, 2, 2)
    h = sub.conv2(sub.bn1.eval()(sub.conv1(x)))              # the smaller layers fit together
    assert sub.fc(h.flatten(1)).shape == (2, 5)


def test_subnetwork_batchnorm_without_affine():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 5, 1)
            self.bn = nn.BatchNorm2d(5, affine=False)

    g = FilterGroup("g", 5, (Member("conv.weight", 0), Member("bn.running_mean", 0), Member("bn.running_var", 0)),
                    True, "conv.weight")
    sub = subnetwork(M(), TensorSlicer([g]), {"g": torch.tensor([0, 4])})
    assert sub.bn.num_features == 2 and sub.conv.out_channels == 2


def test_subnetwork_batchnorm_without_running_statistics():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 5, 1)
            self.bn = nn.BatchNorm2d(5, track_running_stats=False)   # no running_mean: the size is gamma's

    g = FilterGroup("g", 5, (Member("conv.weight", 0), Member("conv.bias", 0), Member("bn.weight", 0),
                             Member("bn.bias", 0)), True, "conv.weight")
    sub = subnetwork(M(), TensorSlicer([g]), {"g": torch.tensor([1, 2, 3])})
    assert sub.bn.num_features == 3 and sub.bn.running_mean is None
    assert sub.bn(sub.conv(torch.randn(2, 2, 3, 3))).shape == (2, 3, 3, 3)


def test_grouped_conv_in_channels_count_groups():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 6, 1, groups=2)   # weight (6, 2, 1, 1)

    g = FilterGroup("g", 6, (Member("conv.weight", 0),), True, "conv.weight")
    sub = subnetwork(M(), TensorSlicer([g]), {"g": torch.tensor([0, 1, 4, 5])})
    assert (sub.conv.out_channels, sub.conv.in_channels) == (4, 4)


def test_zero_channels_every_member():
    m, groups = tiny()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    zero_channels(m, groups[1], torch.tensor([2]))          # g2: conv2 row 2, fc columns 8..11
    s = m.state_dict()
    assert float(s["conv2.weight"][2].abs().sum()) == 0
    assert torch.equal(s["conv2.weight"][[0, 1, 3, 4, 5]], before["conv2.weight"][[0, 1, 3, 4, 5]])
    assert float(s["fc.weight"][:, 8:12].abs().sum()) == 0
    assert torch.equal(s["fc.weight"][:, :8], before["fc.weight"][:, :8])
    assert torch.equal(s["fc.weight"][:, 12:], before["fc.weight"][:, 12:])
    zero_channels(m, groups[0], torch.tensor([0, 3]))
    for t in ("conv1.weight", "conv1.bias", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var"):
        assert float(s[t][[0, 3]].abs().sum()) == 0, t
        assert torch.equal(s[t][[1, 2]], before[t][[1, 2]]), t
    assert float(s["conv2.weight"][:, [0, 3]].abs().sum()) == 0
