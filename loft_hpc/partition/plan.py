"""Partition plans: which filters of every partitioned group each rank trains in a round.

``PartitionPlan.draw(seed, r, groups, S)`` deals, for round ``r``, each partitioned group ``g``
of ``groups``: a random permutation ``perm`` of its ``C`` filters is drawn with
``torch.randperm(C, generator=generator(seed, 'partition', r, j))``
(:func:`loft_hpc.utils.seeding.generator`), where ``j`` is ``g``'s index in the list ``groups``
as passed (the LoFT trainer passes the model's partitioned groups only, in
``filter_groups()`` order, so ``j`` counts partitioned groups; a group in the list that is not
partitioned is skipped but still takes an index). The permutation is dealt round-robin: rank
``s`` gets ``perm[s::S]``, sorted ascending, so the shares are disjoint, cover the group, and
have :func:`share_size` filters (sizes differ by at most one, the lower ranks taking the extra
filters). The plan is a pure function of (seed, round, groups, S): every rank computes the same
plan without communicating, and a fresh one is drawn every round.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from loft_hpc.models.groups import FilterGroup
from loft_hpc.utils.seeding import generator


def share_size(channels: int, world: int, rank: int) -> int:
    """Filters of a ``channels``-wide group dealt round-robin to ``rank`` of ``world``."""
    return channels // world + (1 if rank < channels % world else 0)


def check_partitionable(groups: list[FilterGroup], world: int) -> str | None:
    """An error line when a partitioned group has fewer filters than ranks, else None."""
    for g in groups:
        if g.partitioned and g.size < world:
            return (f"filter group {g.name} has {g.size} filters, fewer than the {world} ranks: "
                    f"use fewer ranks, a wider model (model.width / model.inner_width_factor) or model.partition_rule")
    return None


@dataclass(frozen=True)
class PartitionPlan:
    """The deal of one round (see the module docstring); ``keep(rank)`` is what that rank's
    sub-network holds: group name -> sorted 1-D long tensor of filter indices."""

    round: int
    world: int
    assignment: dict[str, tuple[torch.Tensor, ...]]  # group -> per-rank sorted filter indices

    @classmethod
    def draw(cls, seed: int, round_: int, groups: list[FilterGroup], world: int) -> "PartitionPlan":
        out = {}
        for j, g in enumerate(groups):
            if not g.partitioned:
                continue
            perm = torch.randperm(g.size, generator=generator(seed, "partition", round_, j))
            out[g.name] = tuple(torch.sort(perm[s::world]).values for s in range(world))
        return cls(round_, world, out)

    def keep(self, rank: int) -> dict[str, torch.Tensor]:
        return {name: parts[rank] for name, parts in self.assignment.items()}
