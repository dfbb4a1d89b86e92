"""Analytic bytes per LoFT sync and per dense step, from the model's group sizes alone.

These formulas are written independently of the exchange code; the tests check that the bytes
the collectives actually moved equal them exactly. All tensors travel as float32 (4 bytes).

LoFT, rank s of S, one sync:
  shard(s)   = sum over tensors T touched by a partitioned group of
               numel(T) / prod_{partitioned dims d} size_d * prod_d share(size_d / repeat, S, s) * repeat
               (x2 for parameters when momentum is carried)
  allgather: sent = 4 shard(s), received = 4 (sum_q shard(q) - shard(s))
  allreduce: sent = received = 4 (numel of shared float tensors + numel of shared params with carry)
Dense data parallel, one step: allreduce sent = received = 4 x (number of parameters).
With one rank nothing is communicated: every count is 0.
GPipe reconstruction (LOFT_SPEC section 6): per sample and stage boundary, the activation goes
forward and its gradient back: 2 x 4 x boundary activation numel.
"""
from __future__ import annotations

import math

from torch import nn

from loft_hpc.models.groups import FilterGroup
from loft_hpc.partition.plan import share_size

FLOAT_BYTES = 4


def loft_sync_bytes(model: nn.Module, groups: list[FilterGroup], world: int, rank: int, carry_momentum: bool) -> dict:
    if world == 1:  # a single rank communicates nothing
        return {"allgather_sent": 0, "allgather_received": 0, "allreduce_sent": 0, "allreduce_received": 0}
    state = model.state_dict()
    params = {n for n, _ in model.named_parameters()}
    dims: dict[str, list[tuple[int, int, int]]] = {}
    for g in groups:
        if g.partitioned:
            for m in g.members:
                dims.setdefault(m.tensor, []).append((m.dim, g.size, m.repeat))

    def shard(s: int) -> int:
        total = 0
        for name, ds in dims.items():
            shape = list(state[name].shape)
            for d, size, rep in ds:
                shape[d] = share_size(size, world, s) * rep
            n = math.prod(shape)
            total += n * (2 if carry_momentum and name in params else 1)
        return total

    shared = [n for n, t in state.items() if n not in dims and t.is_floating_point()]
    shared_numel = sum(state[n].numel() for n in shared)
    if carry_momentum:
        shared_numel += sum(state[n].numel() for n in shared if n in params)
    own = shard(rank)
    everyone = sum(shard(q) for q in range(world))
    return {
        "allgather_sent": FLOAT_BYTES * own,
        "allgather_received": FLOAT_BYTES * (everyone - own),
        "allreduce_sent": FLOAT_BYTES * shared_numel,
        "allreduce_received": FLOAT_BYTES * shared_numel,
    }


def dense_step_bytes(model: nn.Module) -> dict:
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"allreduce_sent": FLOAT_BYTES * n, "allreduce_received": FLOAT_BYTES * n}


def gpipe_bytes(epochs: int, samples: int, boundary_numels: list[int]) -> int:
    """Total GPipe pretraining bytes under the reconstruction of LOFT_SPEC section 6."""
    return epochs * samples * 2 * FLOAT_BYTES * sum(boundary_numels)
