"""The lean exchange (``train.exchange: alltoall``): each rank keeps only the slices of the filters
it trains, and after K steps sends each slice straight to the rank that trains it next round.

Home slices
-----------
Every partitioned tensor T has a *home dim*: the lowest dim a partitioned filter group slices.
For a producer's tensors (conv weight rows, bias, BN affine parameters and running statistics)
that is dim 0, the filters themselves; for a consumer weight sliced only by the previous layer's
group (dim 1) it is dim 1. In round r a rank's home slice of T holds the entries of the home dim
that belong to the filters it trains in round r, and every entry of the other dims.

A weight sliced on two dims (the weight between two partitioned layers: rows by its own group,
columns by the previous one) is homed by its rows, dim 0, because
- a row is a filter: its weights, bias and BN entries then live on one rank, and the filter's
  score (the norm of its row, for snapshots and pruning) is that rank's alone;
- a row is contiguous in memory, so a slice of rows is packed and unpacked without gathers;
- the entries of a row outside the rank's trained columns (no rank trains them this round: the
  independent-subnet rule ``keep`` of :mod:`loft_hpc.exchange.shards`) stay with the row and keep
  their weight and momentum, exactly as the allgather exchange leaves them.
So every entry of every partitioned tensor is held by exactly one rank, and a rank holds P/S of
the partitioned floats (P the partitioned floats, S ranks; uneven deals differ by a filter).

The sub-network a rank trains in round r is its home slices with the other sliced dims narrowed
to its kept filters; tensors sliced only on their home dim *are* the home slice (shared storage:
no copy), the two-dim ones are copied out at the start of the round and written back at its end.

Exchange layout  [shard layout]
--------------------------------
Both plans (this round's and the next) are known to every rank, so no sizes are exchanged.
Rank s sends rank q, for every tensor in sorted name order, the home-dim entries of
home_r(s) ∩ home_{r+1}(q) in ascending order (each a contiguous ``index_select`` of the home
slice, flattened), then, with momentum carried, the same for the momentum of every parameter
tensor in the same order. The parts for q = 0..S-1 are concatenated into one float buffer and
moved by one named alltoall with those splits; the receiver unpacks rank s's part with the same
layout into its next home slices. Shared tensors (and their momentum) are averaged with one
allreduce as in the allgather exchange.

Received partitioned floats per rank and sync: |home_{r+1}(q) \\ home_r(q)|, on average
(S-1)/S^2 of P (each of the P/S next-round entries stays with probability 1/S).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from loft_hpc.partition.plan import PartitionPlan
from loft_hpc.partition.slicing import TensorSlicer


@dataclass(frozen=True)
class Home:
    """Where tensor ``name`` is homed: ``dim``, the member that slices it there and its group;
    ``other``: the other sliced dims as (dim, member, group) (at most one: slicing needs leading dims)."""

    name: str
    dim: int
    member: object
    group: str
    other: tuple = ()


def homes(slicer: TensorSlicer) -> dict[str, Home]:
    """The home of every tensor a partitioned group slices (the slicer holds only those groups)."""
    out = {}
    for t, slices in slicer.by_tensor.items():
        (d, m, g), *rest = slices  # sorted by dim: the lowest sliced dim is home
        if len(rest) > 1:
            raise ValueError(f"{t}: sliced on {len(rest) + 1} dims; the lean exchange handles at most two")
        out[t] = Home(t, d, m, g, tuple(rest))
    return dict(sorted(out.items()))


def home_rows(h: Home, keep: dict[str, torch.Tensor]) -> torch.Tensor:
    """Entries of ``h.dim`` homed on the rank whose plan is ``keep`` (ascending)."""
    return h.member.entries(keep[h.group])


@dataclass
class HomeStore:
    """One rank's home slices (``w``) and, with momentum carried, their momentum (``m``), for the
    round whose plan is ``keep``."""

    keep: dict[str, torch.Tensor]
    w: dict[str, torch.Tensor] = field(default_factory=dict)
    m: dict[str, torch.Tensor] = field(default_factory=dict)



def row_numel(shape, dim: int) -> int:
    """Floats in one entry of ``dim`` (the product of the other dims)."""
    return math.prod(s for d, s in enumerate(shape) if d != dim)


class LeanLayout:
    """The home slices of a model under a partition, and the alltoall between two plans."""

    def __init__(self, model: nn.Module, slicer: TensorSlicer, carry_momentum: bool) -> None:
        self.slicer = slicer
        self.homes = homes(slicer)
        state = model.state_dict()
        params = {n for n, _ in model.named_parameters()}
        self.shapes = {t: tuple(state[t].shape) for t in self.homes}
        self.dtypes = {t: state[t].dtype for t in self.homes}
        bad = {t: d for t, d in self.dtypes.items() if d != torch.float32}
        if bad:
            raise ValueError(f"the lean exchange moves float32 tensors; {next(iter(bad))} is {next(iter(bad.values()))}")
        self.with_mom = [t for t in self.homes if carry_momentum and t in params]  # sorted, as self.homes

    # ------------------------------------------------------------------ sizes
    def home_shape(self, t: str, keep) -> tuple[int, ...]:
        h = self.homes[t]
        shape = list(self.shapes[t])
        shape[h.dim] = len(home_rows(h, keep))
        return tuple(shape)

    def moving_rows(self, t: str, keep_from, keep_to) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions in the sender's home slice, positions in the receiver's) of the entries of
        ``t``'s home dim that move from the rank of ``keep_from`` to the rank of ``keep_to``."""
        h = self.homes[t]
        src, dst = home_rows(h, keep_from), home_rows(h, keep_to)
        common = src[torch.isin(src, dst)]  # ascending: src is
        return torch.searchsorted(src, common), torch.searchsorted(dst, common)

    def part_numel(self, keep_from, keep_to) -> int:
        """Floats one rank sends another: the moving rows of every tensor (and momentum)."""
        n = 0
        for t in self.homes:
            k = len(self.moving_rows(t, keep_from, keep_to)[0]) * row_numel(self.shapes[t], self.homes[t].dim)
            n += k * (2 if t in self.with_mom else 1)
        return n

    # ------------------------------------------------------------------ stores
    def store_from_full(self, state: dict, momentum: dict, keep) -> HomeStore:
        """The home slices of ``keep`` cut from full tensors (a fresh start, a resume)."""
        st = HomeStore(keep)
        for t, h in self.homes.items():
            rows = home_rows(h, keep).to(state[t].device)
            st.w[t] = state[t].detach().index_select(h.dim, rows).clone()
            if t in self.with_mom:
                st.m[t] = momentum[t].detach().index_select(h.dim, rows).clone()
        return st

    def sub_value(self, t: str, home: torch.Tensor, keep) -> torch.Tensor:
        """The sub-network's tensor ``t`` from its home slice: the other sliced dim narrowed to the
        kept filters (a copy), or the home slice itself."""
        if not self.homes[t].other:
            return home
        (d, m, g), = self.homes[t].other
        return home.index_select(d, m.entries(keep[g]).to(home.device))

    def write_sub(self, t: str, home: torch.Tensor, value: torch.Tensor, keep) -> None:
        """The trained sub-network tensor back into its home slice (two-dim: the kept columns only;
        the others, trained by no rank this round, keep their values)."""
        if self.homes[t].other:
            (d, m, g), = self.homes[t].other
            home.index_copy_(d, m.entries(keep[g]).to(home.device), value)
        elif value.data_ptr() != home.data_ptr():
            home.copy_(value)

    # ------------------------------------------------------------------ the exchange
    def exchange(self, coll, store: HomeStore, plan_now: PartitionPlan, plan_next: PartitionPlan, rank: int,
                 name: str) -> HomeStore:
        """One alltoall: this rank's home slices of ``plan_now`` out to their owners of
        ``plan_next``, and its own home slices of ``plan_next`` in (module docstring: layout)."""
        S = plan_now.world
        me_now, me_next = plan_now.keep(rank), plan_next.keep(rank)
        device = next(iter(store.w.values())).device if store.w else torch.device("cpu")
        parts, send = [], []
        for q in range(S):  # shard layout: destinations in rank order
            k0 = len(parts)
            moving = {t: self.moving_rows(t, me_now, plan_next.keep(q))[0].to(device) for t in self.homes}
            for t, h in self.homes.items():  # shard layout: sorted tensors, weights then momentum
                parts.append(store.w[t].index_select(h.dim, moving[t]).reshape(-1))
            for t in self.with_mom:
                parts.append(store.m[t].index_select(self.homes[t].dim, moving[t]).reshape(-1))
            send.append(sum(p.numel() for p in parts[k0:]))
        recv = [self.part_numel(plan_now.keep(s), me_next) for s in range(S)]
        buf = torch.cat(parts) if parts else torch.zeros(0, device=device)
        got = coll.alltoall(buf, send, recv, name=name)  # collective order: once per round, every rank
        new = HomeStore(me_next)
        for t in self.homes:
            new.w[t] = torch.empty(self.home_shape(t, me_next), dtype=self.dtypes[t], device=device)
        for t in self.with_mom:
            new.m[t] = torch.empty(self.home_shape(t, me_next), dtype=self.dtypes[t], device=device)
        off = 0
        for s in range(S):  # shard layout: senders in rank order, each part as packed above
            dst = {t: self.moving_rows(t, plan_now.keep(s), me_next)[1].to(device) for t in self.homes}
            for kind, names in (("w", list(self.homes)), ("m", self.with_mom)):
                for t in names:
                    h = self.homes[t]
                    target = new.w[t] if kind == "w" else new.m[t]
                    shape = list(target.shape)
                    shape[h.dim] = len(dst[t])
                    k = math.prod(shape)
                    target.index_copy_(h.dim, dst[t], got[off:off + k].view(shape))
                    off += k
        if off != got.numel():
            raise RuntimeError(f"{name}: unpacked {off} of {got.numel()} floats: the ranks disagree on the layout")
        return new

    def assemble(self, coll, store: HomeStore, plan: PartitionPlan, rank: int, full: dict, momentum: bool,
                 name: str) -> None:
        """Every rank's home slices (weights, or momentum when ``momentum``) gathered into the
        full tensors ``full`` (by name, allocated by the caller), counted as ``assemble``."""
        names = self.with_mom if momentum else list(self.homes)
        src = store.m if momentum else store.w
        device = next(iter(full.values())).device if full else None
        mine = torch.cat([src[t].reshape(-1) for t in names]) if names else torch.zeros(0, device=device)
        sizes = [sum(math.prod(self.home_shape(t, plan.keep(s))) for t in names) for s in range(plan.world)]
        got = coll.allgather(mine, name=name, sizes=sizes, kind="assemble")  # collective order: every rank
        off = 0
        for s in range(plan.world):  # shard layout: rank s's home slices, sorted tensors
            keep = plan.keep(s)
            for t in names:
                h = self.homes[t]
                shape = self.home_shape(t, keep)
                k = math.prod(shape)
                full[t].index_copy_(h.dim, home_rows(h, keep).to(full[t].device), got[off:off + k].view(shape))
                off += k
        if off != got.numel():
            raise RuntimeError(f"{name}: assembled {off} of {got.numel()} floats")
