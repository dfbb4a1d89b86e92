"""LoFT's exchange after K local steps: partitioned slices by allgather, shared tensors averaged.

Shard layout (the order every rank packs and unpacks; all ranks must agree on it):
  1. for each tensor of ``TensorSlicer.sliced_tensors(keep)`` (sorted names): the rank's slice
     of the weight/buffer, flattened; then, with momentum ``carry``, the same for the momentum of
     every sliced *parameter* in the same order;
  2. the concatenation is one float32 buffer per rank, allgathered in one named collective; rank
     s's part starts after the parts of ranks 0..s-1, whose lengths every rank computes from the
     plan (no size exchange is needed).
Shared tensors (floating-point, not sliced by any partitioned group) are concatenated in
``state_dict`` order into one buffer, then the momentum of the shared parameters; averaged in one
named allreduce. Integer buffers (``num_batches_tracked``) are identical on all ranks (every rank
does K steps) and are not exchanged.

Tensors sliced on two dims (the weight between two partitioned layers; every hidden layer of the
LTH models): a rank's shard holds only its diagonal block, so the off-diagonal entries are
covered by no rank (:mod:`loft_hpc.partition.coverage` says which and how many). They are
untrained that round (no gradient, no weight decay) and the write-back leaves them as they
were: their weights, and with ``carry`` their momentum. An entry that returns after rounds
untrained therefore resumes with the momentum of the last round it was trained in (the rule
``keep``). Zeroing that momentum instead (restarting the entry like a fresh parameter, as an
independent-subnet worker re-creating its optimizer would) was measured and not taken: it never
trained better and at K = 5, S = 4 trained worse (README, "What the implementation chose").
The rule needs no code and no bytes: it is what writing back only the owned slices does, on
every rank from the same plan.
"""
from __future__ import annotations

import torch
from torch import nn

from loft_hpc.exchange.collectives import Collectives
from loft_hpc.partition.plan import PartitionPlan
from loft_hpc.partition.slicing import TensorSlicer


def _numel_of_slice(shape: torch.Size, idx: list[tuple[int, torch.Tensor]]) -> int:
    n = 1
    sizes = {d: len(e) for d, e in idx}
    for d, s in enumerate(shape):
        n *= sizes.get(d, s)
    return n


class ShardExchange:
    """Packs, exchanges and unpacks the model (and momentum) between rounds."""

    def __init__(self, model: nn.Module, slicer: TensorSlicer, coll: Collectives, carry_momentum: bool) -> None:
        self.slicer = slicer
        self.coll = coll
        self.carry = carry_momentum
        state = model.state_dict()
        self.param_names = {n for n, _ in model.named_parameters()}
        all_partitioned = {t for g in slicer.groups.values() if g.partitioned for t in g.tensors()}
        self.partitioned = sorted(all_partitioned)
        self.shared = [n for n, t in state.items() if n not in all_partitioned and t.is_floating_point()]
        self.shared_params = [n for n in self.shared if n in self.param_names]

    # ---- layout
    def shard_tensors(self, keep) -> list[tuple[str, str]]:
        """[(kind, tensor)] in shard order; kind 'w' = weight/buffer, 'm' = momentum."""
        names = self.slicer.sliced_tensors(keep)
        out = [("w", n) for n in names]
        if self.carry:
            out += [("m", n) for n in names if n in self.param_names]
        return out

    def shard_numel(self, full_state: dict, keep) -> int:
        return sum(_numel_of_slice(full_state[n].shape, self.slicer.index(n, keep)) for _, n in self.shard_tensors(keep))

    def average_shared(self, sstate: dict, sub_mom: dict, dst_state: dict, dst_mom: dict, round_: int) -> None:
        """The shared tensors (and, with carry, the shared parameters' momentum) of ``sstate`` /
        ``sub_mom`` averaged over the ranks in one named allreduce, written into ``dst_state`` /
        ``dst_mom`` (which may be the same dicts)."""
        parts = [sstate[n].detach().reshape(-1).float() for n in self.shared]  # shard layout: state_dict order
        if self.carry:
            parts += [sub_mom[n].reshape(-1).float() for n in self.shared_params]
        if not parts:
            return
        avg = self.coll.allreduce_mean(torch.cat(parts), name=f"loft.shared.r{round_}")  # collective order: every rank
        offset = 0
        with torch.no_grad():
            for n in self.shared:
                t = dst_state[n]
                t.copy_(avg[offset:offset + t.numel()].view_as(t))
                offset += t.numel()
            if self.carry:
                for n in self.shared_params:
                    t = dst_mom[n]
                    t.copy_(avg[offset:offset + t.numel()].view_as(t))
                    offset += t.numel()

    # ---- exchange
    def exchange(self, full: nn.Module, sub: nn.Module, full_mom: dict, sub_mom: dict, plan: PartitionPlan, rank: int, round_: int) -> None:
        """Write the round's result into ``full`` (and ``full_mom``), identical on every rank.

        ``sub_mom``: momentum of the sub-network's parameters by name (empty without carry).
        """
        fstate, sstate = full.state_dict(), sub.state_dict()
        keep = plan.keep(rank)
        device = next(iter(fstate.values())).device
        # -- partitioned slices: one allgather  [shard layout: see module docstring]
        parts = []
        for kind, n in self.shard_tensors(keep):  # shard layout: sorted tensor names, weights then momentum
            src = sstate[n] if kind == "w" else sub_mom[n]
            parts.append(src.detach().reshape(-1).float())
        mine = torch.cat(parts) if parts else torch.zeros(0, device=device)
        sizes = [self.shard_numel(fstate, plan.keep(s)) for s in range(plan.world)]  # shard layout: from the plan
        gathered = self.coll.allgather(mine, name=f"loft.shards.r{round_}", sizes=sizes)  # collective order: 1st
        offset = 0
        with torch.no_grad():
            for s in range(plan.world):  # shard layout: rank s's part follows those of ranks 0..s-1
                keep_s = plan.keep(s)
                for kind, n in self.shard_tensors(keep_s):
                    dst = fstate[n] if kind == "w" else full_mom[n]
                    idx = self.slicer.index(n, keep_s)
                    k = _numel_of_slice(dst.shape, idx)
                    shape = [next((len(e) for dd, e in idx if dd == d), dst.shape[d]) for d in range(dst.dim())]
                    # two-dim-sliced tensors: only rank s's diagonal block is written; entries
                    # no rank owns keep their weight and momentum (rule 'keep', module docstring)
                    self.slicer.write_back(n, dst, gathered[offset:offset + k].view(shape), keep_s)
                    offset += k
        assert offset == gathered.numel(), "shard layout mismatch between ranks"
        self.average_shared(sstate, sub_mom, fstate, full_mom, round_)  # collective order: 2nd
        # integer buffers (num_batches_tracked) advanced identically on every rank
        for n, t in sstate.items():
            if not t.is_floating_point() and n in fstate:
                fstate[n].copy_(t)
