"""Unstructured magnitude pruning of conv and linear weights (the Lottery Ticket Hypothesis).

Layer-wise: every conv weight loses the same fraction; fully-connected weights lose that fraction
times ``fc_rate / conv_rate`` (0 keeps them dense), as the LTH per-layer rates. Global: one
magnitude threshold over all conv weights (and fc weights when ``fc_rate`` > 0).
Weights already pruned are never revived.
"""
from __future__ import annotations

import torch


def magnitude_masks(state: dict, names: list[str], kinds: dict[str, str], prune_fraction: float, *, scope: str,
                    conv_rate: float, fc_rate: float, previous: dict | None = None) -> dict[str, torch.Tensor]:
    rel = {"conv": 1.0, "fc": (fc_rate / conv_rate) if conv_rate > 0 else 1.0}
    masks = {}
    def alive(n):
        return previous[n].bool() if previous is not None and n in previous else torch.ones(state[n].shape, dtype=torch.bool)
    if scope == "layerwise":
        for n in names:
            frac = min(prune_fraction * rel[kinds[n]], 0.99)
            w = state[n].detach().abs().float().cpu()
            a = alive(n)
            k = int(round((1 - frac) * w.numel()))
            k = max(1, min(k, int(a.sum())))
            scores = torch.where(a, w, torch.full_like(w, -1.0)).reshape(-1)
            keep = torch.zeros(w.numel(), dtype=torch.bool)
            keep[torch.topk(scores, k).indices] = True
            masks[n] = keep.view(w.shape)
        return masks
    pool = [n for n in names if kinds[n] == "conv" or fc_rate > 0]
    flat = torch.cat([torch.where(alive(n), state[n].detach().abs().float().cpu(), torch.full(state[n].shape, -1.0)).reshape(-1) for n in pool])
    k = max(1, int(round((1 - prune_fraction) * flat.numel())))
    thresh = torch.topk(flat, k).values.min()
    for n in names:
        if n in pool:
            masks[n] = (torch.where(alive(n), state[n].detach().abs().float().cpu(), torch.full(state[n].shape, -1.0)) >= thresh) & alive(n)
    return masks
