"""Filter scores: per filter group, the squared L2 and the L1 norm of each producer row."""
from __future__ import annotations

import torch

from loft_hpc.models.groups import FilterGroup


@torch.no_grad()
def filter_scores(state: dict, groups: list[FilterGroup]) -> dict[str, dict[str, torch.Tensor]]:
    out = {}
    for g in groups:
        w = state[g.producer].detach().float().reshape(g.size, -1).cpu()
        out[g.name] = {"l2": (w * w).sum(1), "l1": w.abs().sum(1)}
    return out
