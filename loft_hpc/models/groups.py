"""Filter groups: the unit that LoFT partitions and structured pruning removes.

A *filter group* is one producer's output channel together with every tensor entry indexed by
it: the producer's weight rows (dim 0) and bias, the following BatchNorm's affine parameters and
running statistics, and the consumer's input channels (dim 1 of a conv / linear weight; for a
linear layer after a flatten, a block of ``repeat`` consecutive input features per channel).

Each model describes its groups with :class:`FilterGroup`; every other part of the package
(partition plans, sub-network slicing, shard exchange, pruning masks, filter scores) works from
that description only, never from layer names.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Member:
    """One tensor (a ``state_dict`` key) indexed by a group's channels along ``dim``.

    ``repeat`` > 1 maps channel ``c`` to the entries ``[c*repeat, (c+1)*repeat)`` of that dim
    (a linear layer that consumes a flattened ``C x H x W`` feature map has ``repeat = H*W``).
    """

    tensor: str
    dim: int
    repeat: int = 1

    def entries(self, channels: torch.Tensor) -> torch.Tensor:
        """Indices along ``dim`` that belong to ``channels`` (a 1-D long tensor), in order."""
        if self.repeat == 1:
            return channels
        offs = torch.arange(self.repeat, dtype=channels.dtype, device=channels.device)
        return (channels[:, None] * self.repeat + offs[None, :]).reshape(-1)


@dataclass(frozen=True)
class FilterGroup:
    """A set of ``size`` filters whose members are sliced together.

    ``partitioned``: LoFT deals these filters to the ranks every round; otherwise the group is
    shared (held in full by every rank and averaged). ``producer`` names the tensor whose rows
    are the filters (its norms score the filters for pruning and for the filter-distance metric).
    """

    name: str
    size: int
    members: tuple[Member, ...]
    partitioned: bool
    producer: str

    def tensors(self) -> list[str]:
        return [m.tensor for m in self.members]


def conv_group(
    name: str,
    producer: str,
    size: int,
    *,
    bias: bool = False,
    bn: str | None = None,
    consumers: tuple[str, ...] = (),
    consumer_repeat: int = 1,
    partitioned: bool = False,
) -> FilterGroup:
    """Group for ``producer`` (a conv/linear module path) -> optional ``bn`` -> ``consumers``.

    Module paths are dotted ``named_modules`` names; the tensors are derived from them.
    """
    members = [Member(f"{producer}.weight", 0)]
    if bias:
        members.append(Member(f"{producer}.bias", 0))
    if bn is not None:
        members += [Member(f"{bn}.{t}", 0) for t in ("weight", "bias", "running_mean", "running_var")]
    members += [Member(f"{c}.weight", 1, consumer_repeat) for c in consumers]
    return FilterGroup(name, size, tuple(members), partitioned, f"{producer}.weight")


def check_groups(model: nn.Module, groups: list[FilterGroup]) -> None:
    """Raise ``ValueError`` when a group names a missing tensor or a dimension of the wrong size,
    or when a tensor dimension is claimed by two groups."""
    state = dict(model.state_dict())
    claimed: dict[tuple[str, int], str] = {}
    names = set()
    for g in groups:
        if g.name in names:
            raise ValueError(f"filter group name {g.name!r} is used twice")
        names.add(g.name)
        if g.size < 1:
            raise ValueError(f"filter group {g.name!r} has size {g.size}")
        for m in g.members:
            if m.tensor not in state:
                raise ValueError(f"filter group {g.name!r}: model has no tensor {m.tensor!r}")
            t = state[m.tensor]
            if m.dim >= t.dim() or t.shape[m.dim] != g.size * m.repeat:
                raise ValueError(
                    f"filter group {g.name!r}: {m.tensor} dim {m.dim} has shape {tuple(t.shape)}, "
                    f"expected {g.size * m.repeat} entries"
                )
            key = (m.tensor, m.dim)
            if key in claimed:
                raise ValueError(f"{m.tensor} dim {m.dim} is claimed by groups {claimed[key]!r} and {g.name!r}")
            claimed[key] = g.name
        if g.producer not in g.tensors():
            raise ValueError(f"filter group {g.name!r}: producer {g.producer!r} is not a member")


def partitioned_groups(groups: list[FilterGroup]) -> list[FilterGroup]:
    return [g for g in groups if g.partitioned]
