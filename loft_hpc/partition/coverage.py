"""Which entries of each sliced tensor LoFT trains in a round (pure functions of the plan).

A tensor sliced by one partitioned group (a producer's rows, a BN vector, the first consumer
after shared layers) is trained in full every round: its entries are dealt to the ranks, each
entry to exactly one. A tensor sliced on *two* dims by two partitioned groups (the weight
between two partitioned layers, as between the hidden layers of the LTH models; the ResNets have
none, whatever ``model.partition_rule``) is trained only on the ranks' diagonal blocks: entry
``(i, j, ...)`` is trained in a round iff the rank that owns row ``i`` also owns column ``j``.
The other (off-diagonal) entries get no gradient and no weight decay that round, and the
exchange leaves their weights and momentum as they were (the independent-subnet design of IST;
the momentum rule is in :mod:`loft_hpc.exchange.shards`).

API (everything is a pure function of the filter groups, the seed, the round and the world
size, so every rank gets the same numbers without communicating):

* :func:`trained_fraction` ``(slicer, plan) -> {tensor: fraction}`` for one round's plan;
* :func:`mean_trained_fraction` ``(groups, seed, rounds, world) -> {tensor: mean fraction}``
  over rounds ``0 .. rounds-1``, drawing the plans exactly as LoFT pretraining does;
* :func:`trained_mask` ``(slicer, plan, tensor, shape) -> bool tensor`` of the trained entries;
* :func:`partially_trained` ``(slicer, plan) -> [tensor]``: the tensors sliced on two or more
  partitioned dims (those whose fraction is below 1 when ``world > 1``).

Typical use in the pretraining loop (``self.slicer``, ``self.partitioned`` and ``plan`` as in
:class:`loft_hpc.train.loft.LoftTrainer`)::

    from loft_hpc.partition.coverage import trained_fraction, mean_trained_fraction
    frac = trained_fraction(self.slicer, plan)            # {'fc2.weight': 0.5, 'fc1.weight': 1.0, ...}
    mean = mean_trained_fraction(self.partitioned, t.seed, rounds, world)

Since the deal gives every rank a fixed number of filters (sizes differing by at most one), the
fraction of a tensor does not depend on which filters a rank draws: it is the same every round,
``sum_s prod_d n_{s,d} / C_d`` over ranks ``s`` and sliced dims ``d`` (``n_{s,d}``: rank ``s``'s
share of the group slicing dim ``d``, of ``C_d`` filters), e.g. 1/S for two groups that divide
evenly by S. :func:`mean_trained_fraction` still averages real plans, so it stays right if the
deal changes. Only tensors sliced by at least one partitioned group appear; every other tensor is
shared and trained in full by every rank (fraction 1).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from loft_hpc.models.groups import FilterGroup
from loft_hpc.partition.plan import PartitionPlan
from loft_hpc.partition.slicing import TensorSlicer


def _sliced_dims(slicer: TensorSlicer, plan: PartitionPlan, tensor: str):
    """[(dim, member, group)] of ``tensor`` for the groups this plan partitions."""
    return [(d, m, g) for d, m, g in slicer.by_tensor.get(tensor, ()) if g in plan.assignment]


def _tensors(slicer: TensorSlicer, plan: PartitionPlan) -> list[str]:
    return sorted(t for t in slicer.by_tensor if _sliced_dims(slicer, plan, t))


def trained_entries(slicer: TensorSlicer, plan: PartitionPlan, tensor: str) -> tuple[int, int]:
    """``(trained, total)`` counted in filter-index tuples of the sliced dims (the unsliced dims
    and a member's ``repeat`` multiply both and cancel in the fraction)."""
    dims = _sliced_dims(slicer, plan, tensor)
    total = 1
    for _, _, g in dims:
        total *= slicer.groups[g].size
    trained = 0
    for s in range(plan.world):
        n = 1
        for _, _, g in dims:
            n *= len(plan.assignment[g][s])
        trained += n
    return trained, total


def trained_fraction(slicer: TensorSlicer, plan: PartitionPlan) -> dict[str, float]:
    """Per tensor sliced by a partitioned group of ``plan``: the fraction of its entries that
    some rank trains in ``plan.round`` (1.0 for tensors sliced on one dim; for two dims the sum
    over ranks of the product of the rank's kept fractions per dim). Sorted by tensor name.

    ``slicer``: the :class:`TensorSlicer` of the model's partitioned groups (as LoFT builds it);
    groups of the slicer that the plan does not partition count as unsliced.
    """
    out = {}
    for t in _tensors(slicer, plan):
        num, den = trained_entries(slicer, plan, t)
        out[t] = num / den
    return out


def partially_trained(slicer: TensorSlicer, plan: PartitionPlan) -> list[str]:
    """Tensors sliced on two or more partitioned dims (trained only on the diagonal blocks)."""
    return [t for t in _tensors(slicer, plan) if len(_sliced_dims(slicer, plan, t)) > 1]


def trained_mask(slicer: TensorSlicer, plan: PartitionPlan, tensor: str, shape: Sequence[int]) -> torch.Tensor:
    """Boolean tensor of ``shape`` (the full tensor's): True where some rank trains the entry
    in ``plan.round``. All True for tensors sliced on one dim or not at all."""
    dims = _sliced_dims(slicer, plan, tensor)
    mask = torch.ones(tuple(shape), dtype=torch.bool)
    if len(dims) < 2:
        return mask
    # owner[d][i] = the rank that holds index i of dim d; trained iff all sliced dims agree.
    owners = []
    for d, m, g in dims:
        own = torch.full((shape[d],), -1, dtype=torch.long)
        for s, part in enumerate(plan.assignment[g]):
            own[m.entries(part)] = s
        view = [1] * len(shape)
        view[d] = -1
        owners.append(own.view(view))
    for o in owners[1:]:
        mask &= (o == owners[0])
    return mask


def mean_trained_fraction(groups: Iterable[FilterGroup], seed: int, rounds: int, world: int) -> dict[str, float]:
    """Per tensor: the mean over rounds ``0 .. rounds-1`` of :func:`trained_fraction`, for the
    plans LoFT draws with ``train.seed = seed`` on ``world`` ranks.

    ``groups``: the model's filter groups (all of them or only the partitioned ones: the plans
    are drawn from the partitioned ones in model order, exactly as
    :meth:`loft_hpc.train.loft.LoftTrainer.plan`).
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    part = [g for g in groups if g.partitioned]
    slicer = TensorSlicer(part)
    sums: dict[str, float] = {}
    for r in range(rounds):
        for t, f in trained_fraction(slicer, PartitionPlan.draw(seed, r, part, world)).items():
            sums[t] = sums.get(t, 0.0) + f
    return {t: v / rounds for t, v in sums.items()}
