"""Which entries a round trains (loft_hpc/partition/coverage.py) on hand-made groups and fixed
deals, against counts worked out by hand and entry by entry, single process (part of the
mutation-testing selection, ``make mutation``)."""
from __future__ import annotations

import pytest
import torch

from loft_hpc.models.groups import FilterGroup, Member
from loft_hpc.partition import coverage
from loft_hpc.partition.plan import PartitionPlan
from loft_hpc.partition.slicing import TensorSlicer


def fixed_plan(world, deal: dict[str, list[list[int]]]) -> PartitionPlan:
    return PartitionPlan(0, world, {g: tuple(torch.tensor(p, dtype=torch.long) for p in parts) for g, parts in deal.items()})


def two_dim_groups():
    # h1 (5 filters) -> h2 (4 filters): "h2.weight" is sliced by h2 (rows) and h1 (columns)
    h1 = FilterGroup("h1", 5, (Member("h1.weight", 0), Member("h1.bias", 0), Member("h2.weight", 1)), True, "h1.weight")
    h2 = FilterGroup("h2", 4, (Member("h2.weight", 0), Member("out.weight", 1, 2)), True, "h2.weight")
    return h1, h2


def test_trained_fraction_by_hand():
    h1, h2 = two_dim_groups()
    sl = TensorSlicer([h1, h2])
    plan = fixed_plan(2, {"h1": [[0, 1, 4], [2, 3]], "h2": [[1, 2], [0, 3]]})
    # h2.weight: rank 0 trains 2 x 3 index pairs, rank 1 2 x 2, of 4 x 5
    assert coverage.trained_entries(sl, plan, "h2.weight") == (10, 20)
    assert coverage.trained_entries(sl, plan, "h1.weight") == (5, 5)
    assert coverage.trained_fraction(sl, plan) == {"h1.bias": 1.0, "h1.weight": 1.0, "h2.weight": 0.5,
                                                   "out.weight": 1.0}
    assert list(coverage.trained_fraction(sl, plan)) == ["h1.bias", "h1.weight", "h2.weight", "out.weight"]
    assert coverage.partially_trained(sl, plan) == ["h2.weight"]
    three = fixed_plan(3, {"h1": [[0, 3], [1, 4], [2]], "h2": [[0, 1], [2], [3]]})
    assert coverage.trained_entries(sl, three, "h2.weight") == (2 * 2 + 1 * 2 + 1 * 1, 20)
    only_h2 = fixed_plan(2, {"h2": [[1, 2], [0, 3]]})          # h1 not partitioned by this plan
    assert coverage.trained_fraction(sl, only_h2) == {"h2.weight": 1.0, "out.weight": 1.0}
    assert coverage.partially_trained(sl, only_h2) == []


def test_trained_mask_entry_by_entry():
    h1, h2 = two_dim_groups()
    sl = TensorSlicer([h1, h2])
    plan = fixed_plan(2, {"h1": [[0, 1, 4], [2, 3]], "h2": [[1, 2], [0, 3]]})
    mask = coverage.trained_mask(sl, plan, "h2.weight", (4, 5, 3))
    owner_h1 = {0: 0, 1: 0, 4: 0, 2: 1, 3: 1}
    owner_h2 = {1: 0, 2: 0, 0: 1, 3: 1}
    for i in range(4):
        for j in range(5):
            assert bool(mask[i, j].all()) == (owner_h2[i] == owner_h1[j]) and bool(mask[i, j].any()) == bool(mask[i, j].all())
    assert mask.dtype == torch.bool and mask.shape == (4, 5, 3)
    assert int(mask[:, :, 0].sum()) == 10
    for t, shape in (("h1.weight", (5, 2)), ("out.weight", (3, 8)), ("unrelated", (2, 2))):
        m = coverage.trained_mask(sl, plan, t, shape)
        assert m.shape == shape and bool(m.all()), t


def test_mean_trained_fraction_over_rounds():
    h1, h2 = two_dim_groups()
    shared = FilterGroup("s", 3, (Member("s.weight", 0),), False, "s.weight")
    # with sizes 5 and 4 on 2 ranks every deal gives shares (3, 2) and (2, 2): (6 + 4) / 20
    got = coverage.mean_trained_fraction([shared, h1, h2], seed=7, rounds=3, world=2)
    assert got == pytest.approx({"h1.bias": 1.0, "h1.weight": 1.0, "h2.weight": 0.5, "out.weight": 1.0})
    assert "s.weight" not in got
    assert coverage.mean_trained_fraction([h1, h2], seed=7, rounds=1, world=2)["h2.weight"] == pytest.approx(0.5)
    for bad in (0, -1):
        with pytest.raises(ValueError, match=f"rounds must be >= 1, got {bad}"):
            coverage.mean_trained_fraction([h1, h2], seed=0, rounds=bad, world=2)


def test_mean_trained_fraction_is_the_mean_of_the_plans_loft_draws():
    h1, h2 = two_dim_groups()
    part = [h1, h2]
    sl = TensorSlicer(part)
    want = {}
    for r in range(4):
        for t, f in coverage.trained_fraction(sl, PartitionPlan.draw(9, r, part, 3)).items():
            want[t] = want.get(t, 0.0) + f / 4
    # sizes 5 and 4 on 3 ranks: shares (2, 2, 1) and (2, 1, 1): (4 + 2 + 1) / 20 every round
    assert want["h2.weight"] == pytest.approx(7 / 20)
    assert coverage.mean_trained_fraction(part, seed=9, rounds=4, world=3) == pytest.approx(want)
