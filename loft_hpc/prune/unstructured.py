"""Unstructured magnitude pruning of conv and linear weights (the Lottery Ticket Hypothesis).

Layer-wise scope: the LTH per-layer rates, per pruning round and compounding. ``conv_rate`` and
``fc_rate`` are the fractions of the *surviving* weights that one LTH round prunes in every conv
(fully-connected) layer, so after ``m`` rounds a layer with rate ``r`` keeps ``(1 - r)^m`` of its
weights (LTH's Conv-2, conv 10% / fc 20%, after 5 rounds: conv 0.9^5 = 59.05%, fc 0.8^5 = 32.77%).
A layer whose rate is 0 is not pruned at all (no mask; the LTH ResNet-18 / VGG-19 setting fc 0%).

How the ticket's ratio ``p`` and the IMP levels meet these rates: the ratio is the pruned fraction
of the pruned (masked) layers' weights, as for every other method, and an IMP level ``k`` of ``n``
keeps ``(1 - p)^(k/n)`` of them (``loft_hpc.stages.ticket``). A level that keeps the fraction
``K`` is the LTH ticket after ``m`` rounds, for the one real ``m`` at which the compounded rates
keep exactly ``K`` overall::

    sum_l N_l (1 - r_l)^m  =  K sum_l N_l          (N_l: weights of layer l)

and every layer then keeps ``round(N_l (1 - r_l)^m)`` weights (at least 1, never more than
survive). So the ticket named ``pNN`` is pruned by p (up to that rounding), and its layers are in
LTH's proportions. LTH's Conv-2 ticket after 5 rounds is ``ratios=[p5]`` with ``p5 =
lth_pruned_fraction(..., rounds=5)`` (0.66996 on 32x32x3 inputs): its conv layers keep 59.05%,
its fc layers 32.77% of their weights. With ``levels: 5`` each level is then about one LTH round:
exactly one when all rates are equal (LeNet-300-100, fc 20%), else level k is the ticket after
``m_k`` rounds with ``m_k`` within 0.03 of k for Conv-2/4/6 and ``m_5 = 5`` (the levels share the
schedule ``(1 - p)^(k/n)`` of every method, which the mixture of rates does not follow exactly).
We chose the ratio as the target, rather than a number of whole rounds, because tickets are named,
stored and compared by ratio, one ticket per ratio, and ``prune.levels`` already sets the number of
IMP levels: whole LTH rounds would make a ticket's pruned fraction differ from the ratio in its
name.

Global scope: one magnitude threshold over all conv weights (and fc weights when ``fc_rate`` > 0),
pruning ``p`` of them (the LTH ResNet-18 / VGG-19 setting: conv 20%, fc 0%, pruned globally).
Weights already pruned are never revived.
"""
from __future__ import annotations

import torch


def _rates(kinds: dict[str, str], conv_rate: float, fc_rate: float) -> dict[str, float]:
    return {n: conv_rate if k == "conv" else fc_rate for n, k in kinds.items()}


def _kept_fraction(sizes: list[int], keep_per_round: list[float], m: float) -> float:
    return sum(n * q ** m for n, q in zip(sizes, keep_per_round)) / sum(sizes)


def lth_rounds(sizes: list[int], rates: list[float], keep_fraction: float) -> float:
    """The real number of LTH rounds ``m`` at which layers of ``sizes`` weights pruned at ``rates``
    (each in (0, 1)) per round keep ``keep_fraction`` of their weights in total."""
    if not sizes or any(not 0 < r < 1 for r in rates):
        raise ValueError(f"rates must be in (0, 1), got {rates}")
    if not 0 < keep_fraction <= 1:
        raise ValueError(f"keep fraction must be in (0, 1], got {keep_fraction}")
    q = [1 - r for r in rates]
    lo, hi = 0.0, 1.0
    while _kept_fraction(sizes, q, hi) > keep_fraction:
        lo, hi = hi, hi * 2
    for _ in range(200):  # bisection: the kept fraction decreases strictly with m
        mid = 0.5 * (lo + hi)
        if _kept_fraction(sizes, q, mid) > keep_fraction:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def lth_pruned_fraction(state: dict, names: list[str], kinds: dict[str, str], rounds: float, *,
                        conv_rate: float, fc_rate: float) -> float:
    """The pruned fraction of the pruned layers after ``rounds`` LTH rounds: the ratio to ask for
    to get LTH's ticket after that many rounds (layers with rate 0 are not counted)."""
    rates = _rates({n: kinds[n] for n in names}, conv_rate, fc_rate)
    pool = [n for n in names if rates[n] > 0]
    sizes = [state[n].numel() for n in pool]
    return 1 - _kept_fraction(sizes, [1 - rates[n] for n in pool], rounds)


def magnitude_masks(state: dict, names: list[str], kinds: dict[str, str], prune_fraction: float, *, scope: str,
                    conv_rate: float, fc_rate: float, previous: dict | None = None) -> dict[str, torch.Tensor]:
    """Masks of the pruned layers (layers with rate 0 get none) pruning ``prune_fraction`` of their
    weights in total: layer-wise by LTH's compounding rates, or globally by one threshold."""
    def alive(n):
        return previous[n].bool() if previous is not None and n in previous else torch.ones(state[n].shape, dtype=torch.bool)

    masks = {}
    if scope == "layerwise":
        rates = _rates({n: kinds[n] for n in names}, conv_rate, fc_rate)
        pool = [n for n in names if rates[n] > 0]
        if not pool:
            raise ValueError("unstructured layer-wise pruning: every layer has rate 0 "
                             f"(conv_rate={conv_rate}, fc_rate={fc_rate}): nothing to prune")
        m = lth_rounds([state[n].numel() for n in pool], [rates[n] for n in pool], 1 - prune_fraction)
        for n in pool:
            w = state[n].detach().abs().float().cpu()
            a = alive(n)
            k = int(round(w.numel() * (1 - rates[n]) ** m))
            k = max(1, min(k, int(a.sum())))
            scores = torch.where(a, w, torch.full_like(w, -1.0)).reshape(-1)
            keep = torch.zeros(w.numel(), dtype=torch.bool)
            keep[torch.topk(scores, k).indices] = True
            masks[n] = keep.view(w.shape)
        return masks
    pool = [n for n in names if kinds[n] == "conv" or fc_rate > 0]
    if not pool:
        raise ValueError("unstructured global pruning: no conv layer and fc_rate=0: nothing to prune")
    flat = torch.cat([torch.where(alive(n), state[n].detach().abs().float().cpu(), torch.full(state[n].shape, -1.0)).reshape(-1) for n in pool])
    k = max(1, int(round((1 - prune_fraction) * flat.numel())))
    thresh = torch.topk(flat, k).values.min()
    for n in names:
        if n in pool:
            masks[n] = (torch.where(alive(n), state[n].detach().abs().float().cpu(), torch.full(state[n].shape, -1.0)) >= thresh) & alive(n)
    return masks
