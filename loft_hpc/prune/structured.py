"""Structured filter pruning: remove whole filter groups' channels by filter score.

Per level the kept count of a group is ``max(1, round(keep_fraction * C))`` (layer-wise), or one
threshold over all selected groups (global; scores divided by the producer's fan-in so layers of
different width compare). Pruned channels are zeroed in every *parameter* member of the group
(producer rows and bias, BN gamma/beta, consumer input channels): the channel then outputs 0.
"""
from __future__ import annotations

import torch

from loft_hpc.models.groups import FilterGroup


def _scores(state: dict, g: FilterGroup, score: str) -> torch.Tensor:
    w = state[g.producer].detach().float().reshape(g.size, -1).cpu()
    s = (w * w).sum(1) if score == "l2" else w.abs().sum(1)
    return s


def channel_keep(state: dict, groups: list[FilterGroup], keep_fraction: float, *, score: str, scope: str,
                 alive: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Bool per group: which channels survive. ``alive`` (previous level) channels only shrink."""
    scores, out = {}, {}
    for g in groups:
        s = _scores(state, g, score)
        if scope == "global":
            s = s / (state[g.producer][0].numel())
        if alive is not None:
            s = torch.where(alive[g.name], s, torch.full_like(s, -float("inf")))
        scores[g.name] = s
    if scope == "layerwise":
        for g in groups:
            k = max(1, round(keep_fraction * g.size))
            keep = torch.zeros(g.size, dtype=torch.bool)
            keep[torch.topk(scores[g.name], k).indices] = True
            out[g.name] = keep
    else:
        allscores = torch.cat([scores[g.name] for g in groups])
        k = max(len(groups), round(keep_fraction * allscores.numel()))
        thresh = torch.topk(allscores, k).values.min()
        for g in groups:
            keep = scores[g.name] >= thresh
            if not keep.any():  # never remove a whole layer
                keep[scores[g.name].argmax()] = True
            out[g.name] = keep
    return out


def masks_from_channels(model: torch.nn.Module, groups: list[FilterGroup], keep: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    masks: dict[str, torch.Tensor] = {}
    for g in groups:
        for m in g.members:
            if m.tensor not in params:
                continue  # BN running statistics: buffers, not masked
            p = params[m.tensor]
            mask = masks.setdefault(m.tensor, torch.ones(p.shape, dtype=torch.bool))
            drop = m.entries(torch.nonzero(~keep[g.name]).reshape(-1))
            mask.index_fill_(m.dim, drop, False)
    return masks


def channels_alive(masks: dict[str, torch.Tensor], groups: list[FilterGroup]) -> dict[str, torch.Tensor]:
    """Channels whose producer rows are not entirely masked (the inverse of masks_from_channels)."""
    return {g.name: masks[g.producer].reshape(g.size, -1).any(1) for g in groups}
