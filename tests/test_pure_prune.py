"""Masks, structured and unstructured selection (loft_hpc/prune/*.py) on hand-made tensors, against
values worked out by hand in the comments, single process (part of the mutation-testing
selection, ``make mutation``)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from loft_hpc.models.groups import FilterGroup, Member
from loft_hpc.prune.masks import MaskError, apply_masks_, sparsity_report, sparsity_rows, validate_masks
from loft_hpc.prune.structured import _scores, channel_keep, channels_alive, global_scores, masks_from_channels
from loft_hpc.prune.unstructured import _kept_fraction, _rates, lth_pruned_fraction, lth_rounds, magnitude_masks


class Two(nn.Module):
    """fc1 (2 -> 3, bias) -> fc2 (3 -> 2): 6 + 3 + 6 = 15 parameters."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(2, 3)
        self.fc2 = nn.Linear(3, 2, bias=False)


def bools(rows):
    return torch.tensor(rows, dtype=torch.bool)


# -------------------------------------------------------------------------------------- masks.py
def test_validate_masks_messages():
    m = Two()
    with pytest.raises(MaskError, match=r"^mask 'fc3\.weight' names no parameter of the model$"):
        validate_masks({"fc3.weight": torch.ones(1)}, m)
    with pytest.raises(MaskError, match=r"^mask 'fc1\.weight' has shape \(2, 3\), the parameter has \(3, 2\)$"):
        validate_masks({"fc1.weight": torch.ones(2, 3)}, m)
    with pytest.raises(MaskError, match=r"^mask 'fc2\.weight' holds values other than 0 and 1$"):
        validate_masks({"fc2.weight": torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.5, 1.0]])}, m)
    with pytest.raises(MaskError, match="other than 0 and 1"):
        validate_masks({"fc2.weight": torch.tensor([[1, 0, 1], [0, -1, 1]])}, m)
    # 0/1 in any dtype, and bool masks, pass
    validate_masks({"fc1.weight": torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]]),
                    "fc2.weight": torch.ones(2, 3, dtype=torch.uint8), "fc1.bias": bools([True, False, True])}, m)
    validate_masks({}, m)


def test_validate_masks_between_levels():
    m = Two()
    prev = {"fc1.weight": torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]), "fc2.weight": torch.ones(2, 3)}
    same = {"fc1.weight": bools([[1, 0], [1, 1], [0, 1]]), "fc2.weight": bools([[1, 0, 1], [0, 0, 1]])}
    validate_masks(same, m, previous=prev)                       # shrinking (or equal) is fine
    validate_masks({**same, "fc1.bias": bools([1, 1, 1])}, m, previous=prev)   # a newly masked tensor too
    revive = {**same, "fc1.weight": bools([[1, 1], [1, 1], [0, 1]])}
    with pytest.raises(MaskError, match=r"^mask 'fc1\.weight' revives weights pruned at an earlier level$"):
        validate_masks(revive, m, previous=prev)
    with pytest.raises(MaskError, match=r"^masks \['fc2\.weight'\] of the earlier level are missing$"):
        validate_masks({"fc1.weight": same["fc1.weight"]}, m, previous=prev)
    prev4 = {n: torch.ones(1) for n in ("a", "b", "c", "d")}
    with pytest.raises(MaskError, match=r"^masks \['a', 'b', 'c'\] of the earlier level are missing$"):
        validate_masks({}, m, previous=prev4)


def test_sparsity_rows_and_report():
    m = Two()
    masks = {"fc2.weight": bools([[1, 0, 0], [0, 0, 1]]), "fc1.weight": bools([[1, 1], [1, 0], [1, 1]])}
    assert sparsity_rows(masks) == [{"name": "fc1.weight", "kept": 5, "total": 6},
                                    {"name": "fc2.weight", "kept": 2, "total": 6}]
    table, overall = sparsity_report(masks, m)
    assert overall == pytest.approx(5 / 12)                      # 7 of 12 masked weights kept
    lines = table.splitlines()
    assert lines[0] == f"  {'fc1.weight':<40} kept {5:>10,} / {6:>10,}  pruned {1 / 6:6.1%}"
    assert lines[1] == f"  {'fc2.weight':<40} kept {2:>10,} / {6:>10,}  pruned {4 / 6:6.1%}"
    # 15 parameters, 5 of them pruned
    assert lines[2] == (f"  {'overall (masked tensors)':<40} kept {7:>10,} / {12:>10,}  pruned {5 / 12:6.1%}  "
                        f"(model: 10 of 15 weights remain)")
    assert len(lines) == 3
    table, overall = sparsity_report({}, m)
    assert overall == 0.0 and table.endswith("(model: 15 of 15 weights remain)")


def test_apply_masks_multiplies_in_place():
    m = Two()
    with torch.no_grad():
        m.fc1.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]))
        m.fc2.weight.fill_(7.0)
    apply_masks_(m, {"fc1.weight": bools([[1, 0], [0, 1], [1, 1]])})
    assert m.fc1.weight.tolist() == [[1.0, 0.0], [0.0, 4.0], [5.0, 6.0]]
    assert m.fc2.weight.tolist() == [[7.0] * 3] * 2


# --------------------------------------------------------------------------------- structured.py
def linear_group(name, weight_rows, *, extra=()):
    w = torch.tensor(weight_rows, dtype=torch.float32)
    g = FilterGroup(name, w.shape[0], (Member(f"{name}.weight", 0), *extra), True, f"{name}.weight")
    return g, w


def test_filter_scores_l2_and_l1():
    g, w = linear_group("a", [[1.0, -2.0], [0.0, 3.0], [-1.0, -1.0]])
    assert _scores({"a.weight": w}, g, "l2").tolist() == [5.0, 9.0, 2.0]
    assert _scores({"a.weight": w}, g, "l1").tolist() == [3.0, 3.0, 2.0]
    conv = torch.arange(2 * 2 * 2 * 2, dtype=torch.float32).reshape(2, 2, 2, 2) - 7   # rows -7..0 and 1..8
    gc = FilterGroup("c", 2, (Member("c.weight", 0),), True, "c.weight")
    assert _scores({"c.weight": conv}, gc, "l2").tolist() == [sum(x * x for x in range(8)), sum(x * x for x in range(1, 9))]
    assert _scores({"c.weight": conv}, gc, "l1").tolist() == [28.0, 36.0]


def _z(scores, level):
    mean = sum(scores) / len(scores)
    std = math.sqrt(sum((s - mean) ** 2 for s in scores) / len(scores))
    return [(s - mean) / std + level for s in scores]


def test_global_scores_by_hand():
    g, w = linear_group("a", [[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    state = {"a.weight": w}
    # l2: scores 1, 4, 9 (mean 14/3); level = ln(sqrt(mean))
    z = global_scores(state, [g], score="l2")["a"]
    assert z.dtype == torch.float64
    assert z.tolist() == pytest.approx(_z([1, 4, 9], 0.5 * math.log(14 / 3)), rel=1e-12)
    # l1: scores 1, 2, 3 (mean 2), fan-in 2: level = ln(2 / sqrt(2))
    z = global_scores(state, [g], score="l1")["a"]
    assert z.tolist() == pytest.approx(_z([1, 2, 3], math.log(2 / math.sqrt(2))), rel=1e-12)
    # only the alive filters count, the others are -inf
    z = global_scores(state, [g], score="l2", alive={"a": bools([True, False, True])})["a"]
    assert z[1] == -math.inf
    assert [z[0].item(), z[2].item()] == pytest.approx(_z([1, 9], 0.5 * math.log(5)), rel=1e-12)
    # one alive filter, or equal scores: no standing, only the level
    z = global_scores(state, [g], score="l2", alive={"a": bools([False, True, False])})["a"]
    assert z[1].item() == pytest.approx(0.5 * math.log(4)) and z[0] == -math.inf and z[2] == -math.inf
    ge, we = linear_group("e", [[2.0, 0.0], [0.0, 2.0], [0.0, -2.0]])
    assert global_scores({"e.weight": we}, [ge], score="l2")["e"].tolist() == pytest.approx([math.log(2)] * 3)
    # nothing alive: every filter -inf, and the next group is still scored
    z = global_scores({**state, "e.weight": we}, [g, ge], score="l2",
                      alive={"a": bools([False, False, False]), "e": bools([True] * 3)})
    assert z["a"].tolist() == [-math.inf] * 3
    assert z["e"].tolist() == pytest.approx([math.log(2)] * 3)
    # a single filter of fan-in 4 under l1: level ln(s / sqrt(4)) with s = 1 + 2 + 3 + 4
    g1, w1 = linear_group("one", [[1.0, -2.0, 3.0, -4.0]])
    assert global_scores({"one.weight": w1}, [g1], score="l1")["one"].tolist() == pytest.approx([math.log(10 / 2)])
    # an all-zero layer has the lowest level there is, but still finite
    gz, wz = linear_group("z", [[0.0, 0.0], [0.0, 0.0]])
    z = global_scores({"z.weight": wz}, [gz], score="l2")["z"]
    assert torch.isfinite(z).all() and z[0].item() == pytest.approx(0.5 * math.log(torch.finfo(torch.float64).tiny))
    z = global_scores({"z.weight": wz}, [gz], score="l1")["z"]
    assert z[0].item() == pytest.approx(math.log(torch.finfo(torch.float64).tiny))


def test_channel_keep_layerwise_counts_and_alive():
    g, w = linear_group("a", [[5.0], [1.0], [4.0], [2.0], [3.0]])
    state = {"a.weight": w}
    for kf, want in ((0.6, [0, 2, 4]), (0.5, [0, 2]), (0.3, [0, 2]), (0.1, [0]), (0.0, [0]), (1.0, [0, 1, 2, 3, 4])):
        keep = channel_keep(state, [g], kf, score="l2", scope="layerwise")["a"]   # round(kf x 5), at least 1
        assert keep.dtype == torch.bool and torch.nonzero(keep).reshape(-1).tolist() == want, kf
    alive = {"a": bools([False, True, True, True, False])}
    keep = channel_keep(state, [g], 0.4, score="l1", scope="layerwise", alive=alive)["a"]
    assert torch.nonzero(keep).reshape(-1).tolist() == [2, 3]   # round(0.4 x 5) = 2 largest alive: 4.0 and 2.0


def test_channel_keep_global_threshold_and_never_a_whole_layer():
    # group a: scores 100, 1, 0.01 (l2 of 10, 1, 0.1); group b: 4, 4.41, 3.61 (2, 2.1, 1.9)
    ga, wa = linear_group("a", [[10.0], [1.0], [0.1]])
    gb, wb = linear_group("b", [[2.0], [2.1], [1.9]])
    state = {"a.weight": wa, "b.weight": wb}
    z = global_scores(state, [ga, gb], score="l2")
    allz = sorted(torch.cat([z["a"], z["b"]]).tolist(), reverse=True)
    for kf, k in ((0.5, 3), (0.67, 4), (0.2, 2), (0.0, 2), (1.0, 6)):     # max(2 groups, round(kf x 6))
        keep = channel_keep(state, [ga, gb], kf, score="l2", scope="global")
        thresh = allz[k - 1]
        for name in ("a", "b"):
            want = z[name] >= thresh
            if not want.any():
                want = torch.zeros(3, dtype=torch.bool)
                want[int(z[name].argmax())] = True
            assert torch.equal(keep[name], want), (kf, name)
        assert all(keep[n].any() for n in ("a", "b"))
    # b scaled x0.01: z of a about 3.17, 1.06, 1.04, of b -3.93, -2.68, -5.12; keeping 2 of 6 takes
    # a's first two, and b keeps its best filter (2.1) all the same
    state_small = {"a.weight": wa, "b.weight": wb * 0.01}
    keep = channel_keep(state_small, [ga, gb], 0.34, score="l2", scope="global")
    assert keep["a"].tolist() == [True, True, False]
    assert keep["b"].tolist() == [False, True, False]
    # dead filters never come back, even with the largest scores
    alive = {"a": bools([False, True, True]), "b": bools([True, True, True])}
    keep = channel_keep(state, [ga, gb], 1.0, score="l2", scope="global", alive=alive)
    assert keep["a"].tolist() == [False, True, True] and keep["b"].tolist() == [True, True, True]


def test_masks_from_channels_and_back():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 3, 1)
            self.bn = nn.BatchNorm2d(3)
            self.fc = nn.Linear(6, 2)          # consumes 3 channels x 2 features each

    g = FilterGroup("g", 3, (Member("conv.weight", 0), Member("conv.bias", 0), Member("bn.weight", 0),
                             Member("bn.running_var", 0), Member("fc.weight", 1, 2)), True, "conv.weight")
    model = M()
    masks = masks_from_channels(model, [g], {"g": bools([True, False, True])})
    assert set(masks) == {"conv.weight", "conv.bias", "bn.weight", "fc.weight"}   # buffers are not masked
    assert all(m.dtype == torch.bool for m in masks.values())
    assert masks["conv.weight"].reshape(-1).tolist() == [True, False, True]
    assert masks["conv.bias"].tolist() == [True, False, True] and masks["bn.weight"].tolist() == [True, False, True]
    assert masks["fc.weight"].tolist() == [[True, True, False, False, True, True]] * 2
    assert all(masks[n].shape == p.shape for n, p in model.named_parameters() if n in masks)
    assert channels_alive(masks, [g])["g"].tolist() == [True, False, True]
    # two groups on one tensor share its mask
    g2 = FilterGroup("h", 2, (Member("fc.weight", 0),), True, "fc.weight")
    masks = masks_from_channels(model, [g, g2], {"g": bools([True, True, False]), "h": bools([False, True])})
    assert masks["fc.weight"].tolist() == [[False] * 6, [True, True, True, True, False, False]]
    assert channels_alive(masks, [g, g2])["h"].tolist() == [False, True]
    assert channels_alive(masks, [g, g2])["g"].tolist() == [True, True, False]


# ------------------------------------------------------------------------------- unstructured.py
def test_rates_and_kept_fraction():
    assert _rates({"c": "conv", "f": "fc", "d": "fc"}, 0.1, 0.3) == {"c": 0.1, "f": 0.3, "d": 0.3}
    # 100 weights keeping 0.9^2, 300 keeping 0.5^2
    assert _kept_fraction([100, 300], [0.9, 0.5], 2) == pytest.approx((81 + 75) / 400)
    assert _kept_fraction([100, 300], [0.9, 0.5], 0) == 1.0


@pytest.mark.parametrize("rate, keep", [(0.2, 0.512), (0.2, 0.01), (0.5, 0.5), (0.1, 0.999), (0.9, 1e-6)])
def test_lth_rounds_one_rate_is_a_logarithm(rate, keep):
    # one rate: (1 - r)^m = keep  =>  m = ln keep / ln(1 - r); 0.01 at 20%: 20.6 rounds (beyond the
    # first bracket [0, 1], found by doubling)
    m = lth_rounds([10, 30], [rate, rate], keep)
    assert m == pytest.approx(math.log(keep) / math.log(1 - rate), rel=1e-10)


def test_lth_rounds_mixed_rates_and_bounds():
    m = lth_rounds([100, 300], [0.1, 0.5], (81 + 75) / 400)
    assert m == pytest.approx(2.0, rel=1e-10)
    assert lth_rounds([5], [0.3], 1.0) == pytest.approx(0.0, abs=1e-12)
    for rates in ([0.0, 0.2], [1.0], [0.2, 1.5], [-0.1]):
        with pytest.raises(ValueError, match=r"^rates must be in \(0, 1\), got "):
            lth_rounds([1] * len(rates), rates, 0.5)
    with pytest.raises(ValueError, match="rates must be in"):
        lth_rounds([], [], 0.5)
    for k in (0.0, 1.5, -0.2):
        with pytest.raises(ValueError, match=rf"^keep fraction must be in \(0, 1\], got {k}$"):
            lth_rounds([1], [0.2], k)


def test_lth_pruned_fraction_ignores_rate_zero_layers():
    state = {"c": torch.zeros(100), "f": torch.zeros(300)}
    kinds = {"c": "conv", "f": "fc"}
    assert lth_pruned_fraction(state, ["c", "f"], kinds, 2, conv_rate=0.1, fc_rate=0.5) == pytest.approx(1 - 156 / 400)
    assert lth_pruned_fraction(state, ["c", "f"], kinds, 3, conv_rate=0.2, fc_rate=0.0) == pytest.approx(1 - 0.8 ** 3)
    assert lth_pruned_fraction(state, ["f"], kinds, 1, conv_rate=0.9, fc_rate=0.25) == pytest.approx(0.25)


def test_magnitude_masks_layerwise_by_hand():
    state = {"c": torch.tensor([[0.5, -4.0], [3.0, -0.1]]), "f": torch.tensor([1.0, -2.0, 3.0, -4.0, 5.0, -6.0]),
             "z": torch.tensor([9.0, 9.0])}
    kinds = {"c": "conv", "f": "fc", "z": "fc"}
    # one rate for c and f (0.2 each, z not named): prune 50% of 10 weights -> every layer keeps 50%:
    # c round(4 x 0.5) = 2, f round(6 x 0.5) = 3, the largest magnitudes
    masks = magnitude_masks(state, ["c", "f"], kinds, 0.5, scope="layerwise", conv_rate=0.2, fc_rate=0.2)
    assert set(masks) == {"c", "f"}
    assert masks["c"].tolist() == [[False, True], [True, False]]
    assert masks["f"].tolist() == [False, False, False, True, True, True]
    # different rates: c (conv 0.5) and f (fc 0.2) after m rounds keep 4 x 0.5^m + 6 x 0.8^m = 7 of
    # 10 weights at m = 0.920 (2.11 + 4.89): c keeps its 2 largest, f its 5 largest
    masks = magnitude_masks(state, ["c", "f"], kinds, 0.3, scope="layerwise", conv_rate=0.5, fc_rate=0.2)
    assert masks["c"].tolist() == [[False, True], [True, False]]
    assert masks["f"].tolist() == [False, True, True, True, True, True]
    # fc_rate 0: f is not pruned at all (no mask)
    masks = magnitude_masks(state, ["c", "f"], kinds, 0.75, scope="layerwise", conv_rate=0.2, fc_rate=0.0)
    assert set(masks) == {"c"} and masks["c"].tolist() == [[False, True], [False, False]]
    # at least one weight per layer, never more than survive
    masks = magnitude_masks(state, ["c"], kinds, 0.99, scope="layerwise", conv_rate=0.2, fc_rate=0.2)
    assert masks["c"].tolist() == [[False, True], [False, False]]
    prev = {"c": bools([[1, 0], [0, 1]])}
    masks = magnitude_masks(state, ["c"], kinds, 0.0, scope="layerwise", conv_rate=0.2, fc_rate=0.2, previous=prev)
    assert masks["c"].tolist() == [[True, False], [False, True]]
    masks = magnitude_masks(state, ["c"], kinds, 0.75, scope="layerwise", conv_rate=0.2, fc_rate=0.2, previous=prev)
    assert masks["c"].tolist() == [[True, False], [False, False]]   # 1 of 4: the larger survivor (0.5 > 0.1)
    with pytest.raises(ValueError, match=r"^unstructured layer-wise pruning: every layer has rate 0 "
                                         r"\(conv_rate=0\.0, fc_rate=0\.0\): nothing to prune$"):
        magnitude_masks(state, ["c", "f"], kinds, 0.5, scope="layerwise", conv_rate=0.0, fc_rate=0.0)


def test_magnitude_masks_global_by_hand():
    state = {"c": torch.tensor([[0.5, -4.0], [3.0, -0.1]]), "f": torch.tensor([1.0, -2.0, 3.0, -4.0, 5.0])}
    kinds = {"c": "conv", "f": "fc"}
    # 9 weights, keep round(0.5 x 9) = 4 (banker's: 4.5 -> 4): 5, 4, -4, 3, 3 -> threshold 3 keeps ties too
    masks = magnitude_masks(state, ["c", "f"], kinds, 0.5, scope="global", conv_rate=0.2, fc_rate=0.2)
    assert masks["c"].tolist() == [[False, True], [True, False]]
    assert masks["f"].tolist() == [False, False, True, True, True]
    # fc_rate 0: only conv weights are pooled, fc layers get no mask
    masks = magnitude_masks(state, ["c", "f"], kinds, 0.5, scope="global", conv_rate=0.2, fc_rate=0.0)
    assert set(masks) == {"c"} and masks["c"].tolist() == [[False, True], [True, False]]
    # dead weights stay dead and count as the smallest
    prev = {"c": bools([[1, 0], [1, 1]]), "f": bools([1, 1, 1, 1, 0])}
    masks = magnitude_masks(state, ["c", "f"], kinds, 0.5, scope="global", conv_rate=0.2, fc_rate=0.2, previous=prev)
    assert masks["c"].tolist() == [[False, False], [True, False]]
    assert masks["f"].tolist() == [False, True, True, True, False]
    # dead weights rank below every live one: 7 of 9 kept with c's two largest dead keeps every
    # live weight (5, 4, 3, 2, 1, 0.5, 0.1)
    prev = {"c": bools([[1, 0], [0, 1]]), "f": bools([1, 1, 1, 1, 1])}
    masks = magnitude_masks(state, ["c", "f"], kinds, 0.2, scope="global", conv_rate=0.2, fc_rate=0.2, previous=prev)
    assert masks["c"].tolist() == [[True, False], [False, True]] and masks["f"].tolist() == [True] * 5
    # at least one weight overall
    masks = magnitude_masks(state, ["c", "f"], kinds, 1.0, scope="global", conv_rate=0.2, fc_rate=0.2)
    assert sum(int(m.sum()) for m in masks.values()) == 1 and masks["f"][4]
    with pytest.raises(ValueError, match=r"^unstructured global pruning: no conv layer and fc_rate=0: nothing to prune$"):
        magnitude_masks({"f": state["f"]}, ["f"], {"f": "fc"}, 0.5, scope="global", conv_rate=0.2, fc_rate=0.0)
