"""Structured filter pruning: remove whole filter groups' channels by filter score.

Scores. A filter's score is the squared L2 norm (``l2``, the paper's) or the L1 norm (``l1``) of
its producer row. Within one group the filters with the largest scores are kept, whatever the
scope.

Layer-wise scope. Every group keeps ``max(1, round(keep_fraction * C))`` filters.

Global scope: one threshold over every selected group, on a score that compares layers fairly::

    z_f = (s_f - mean_g s) / std_g s  +  ln(level_g),    level_g = (mean_g s~)^(1/d)

``mean_g``/``std_g`` are taken over the group's alive filters (those of the previous IMP level); the
first term is the filter's standing in its own layer, in standard deviations; the second is the
layer's level, the log of its typical filter magnitude: ``s~ = s`` and ``d = 2`` for ``l2``,
``s~ = s / sqrt(fan-in)`` and ``d = 1`` for ``l1`` (under PyTorch's default, fan-in scaled
initialisation, used by every model here, ``s~`` has the same expectation for every layer shape:
1/3 and 1/2). So:

- within a group the order is the score's order, and the global threshold keeps a top-k per group;
- multiplying every weight of the network by one factor changes nothing (only differences of
  ``ln(level)`` count);
- a layer whose filters are all c times larger (smaller) ranks ``ln c`` standard deviations higher
  (lower): one within-layer standard deviation weighs as much as a factor e between layers'
  typical filter magnitudes. A layer scaled down x0.1 drops 2.3 standard deviations and is pruned
  first;
- at initialisation every layer has the same level up to sampling noise (the level of a group of C
  filters varies by about ``sqrt(0.8 / fan-in) / (2 sqrt(C))``: under 0.01, against a within-layer
  spread of 1) and each layer's filters are standardised, so every group loses about the target
  fraction at every p. Measured on PreResNet-34, inner width x2 (width 64, 32 px, seed 0, the
  partitioned groups): 47.9-51.6% per group at p = 0.5, 78.3-83.2% at p = 0.8 (tested: within 10
  points, also for the small models of the tests). With the weights of layer3.2 scaled x0.1 that
  group loses 99.0% (p = 0.5) and 99.8% (p = 0.8), the others 43-48% and 76-82%.

Why not the simpler choices: dividing by fan-in (this module before) makes the squared L2 score
about 1/fan-in at initialisation, so deep, wide layers were pruned first (PreResNet-34 x2, p = 0.5:
stage 2 lost 0%, stage 3 23-27%, stage 4 99.9%, i.e. kept one filter per group). Dividing by the
layer's own mean or RMS score (Molchanov et al. 2017) is blind to a layer's scale (a layer scaled
x0.1 is ranked exactly as before) and, because the relative spread of the scores at
initialisation is about ``sqrt(0.8 / fan-in)``, it prunes the small fan-in layers less at high
ratios (PreResNet-34 x2, p = 0.8: stage 2 groups 70.7-75.4% against 86.0-86.5% in stage 4). BN
scaling factors (network slimming, Early-Bird) are all 1 at initialisation, exist only in BN
networks, and are not the paper's filter score. Measuring a layer's level in units of its own
spread (a t-statistic, ``(s_f - network mean) / std_g``) instead of as a log ratio turns the
sampling noise of a layer's mean at initialisation, where the spread is a few percent, into
differences between groups (simulated, PreResNet-34 x2 at width 16, p = 0.5, 50 seeds: the worst
group was more than 10 points from p in 38% of the seeds, against 4% with the log level).

Pruned channels are zeroed in every *parameter* member of the group (producer rows and bias, BN
gamma/beta, consumer input channels): the channel then outputs 0.
"""
from __future__ import annotations

import math

import torch

from loft_hpc.models.groups import FilterGroup


def _scores(state: dict, g: FilterGroup, score: str) -> torch.Tensor:
    w = state[g.producer].detach().float().reshape(g.size, -1).cpu()
    s = (w * w).sum(1) if score == "l2" else w.abs().sum(1)
    return s


def global_scores(state: dict, groups: list[FilterGroup], *, score: str,
                  alive: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Per group the comparable score ``z`` of the module notes (float64); ``-inf`` for filters
    that are not alive. Ranking by ``z`` within a group is ranking by the raw score."""
    out = {}
    tiny = torch.finfo(torch.float64).tiny
    for g in groups:
        s = _scores(state, g, score).double()  # the order within the group is the float32 score's
        a = alive[g.name].cpu() if alive is not None else torch.ones(g.size, dtype=torch.bool)
        sa = s[a]
        z = torch.full_like(s, -math.inf)
        if sa.numel() == 0:
            out[g.name] = z
            continue
        fan_in = state[g.producer][0].numel()
        mean = sa.mean()
        std = sa.std(unbiased=False) if sa.numel() > 1 else torch.zeros((), dtype=s.dtype)
        if score == "l2":
            level = 0.5 * math.log(max(float(mean), tiny))
        else:
            level = math.log(max(float(mean) / math.sqrt(fan_in), tiny))
        # equal scores (or one alive filter): no standing within the layer, only its level
        standing = (sa - mean) / std if float(std) > 0 else torch.zeros_like(sa)
        z[a] = standing + level
        out[g.name] = z
    return out


def channel_keep(state: dict, groups: list[FilterGroup], keep_fraction: float, *, score: str, scope: str,
                 alive: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Bool per group: which channels survive. ``alive`` (previous level) channels only shrink."""
    out = {}
    if scope == "layerwise":
        for g in groups:
            s = _scores(state, g, score)
            if alive is not None:
                s = torch.where(alive[g.name].cpu(), s, torch.full_like(s, -math.inf))
            k = max(1, round(keep_fraction * g.size))
            keep = torch.zeros(g.size, dtype=torch.bool)
            keep[torch.topk(s, k).indices] = True
            out[g.name] = keep
        return out
    scores = global_scores(state, groups, score=score, alive=alive)
    allscores = torch.cat([scores[g.name] for g in groups])
    k = max(len(groups), round(keep_fraction * allscores.numel()))
    thresh = torch.topk(allscores, k).values.min()
    for g in groups:
        keep = (scores[g.name] >= thresh) & (scores[g.name] > -math.inf)
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
