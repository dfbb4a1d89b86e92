"""A model as a sequence of pipeline blocks, and its cut into S stages (GPipe, LOFT_SPEC 6c).

``pipeline_blocks(model)`` lists the model's forward pass as blocks that can be chained: the stem,
every residual block (never cut inside: its shortcut spans it), the head. The blocks *share* the
model's modules (no copies), so a stage trains the model's own parameters and its state_dict
names are the model's.

``balanced_cuts(costs, S)`` splits the chain into S contiguous stages minimising the largest
stage cost (parameter count by default: the stage that holds the most weights sets the memory);
``cuts`` given in the config are block indices where stages 2..S begin.
"""
from __future__ import annotations

import torch
from torch import nn

from loft_hpc.models.resnet import ResNetBase, head_forward, stem_forward


class ResNetStem(nn.Module):
    """conv1 (+ bn1 + ReLU) (+ max-pool) of a :class:`~loft_hpc.models.resnet.ResNetBase`."""

    def __init__(self, model) -> None:
        super().__init__()
        self.conv1, self.bn1, self.maxpool = model.conv1, model.bn1, model.maxpool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return stem_forward(self, x)


class ResNetHead(nn.Module):
    """(bn_final + ReLU) + global average pool + classifier."""

    def __init__(self, model) -> None:
        super().__init__()
        self.bn_final, self.classifier = model.bn_final, model.classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return head_forward(self, x)


def pipeline_blocks(model) -> list[tuple[str, nn.Module]]:
    """(name, module) of the model's forward pass in order; composing them is ``model.forward``.
    ValueError for a model without a pipeline layout."""
    if not isinstance(model, ResNetBase):
        raise ValueError(f"{type(model).__name__} has no pipeline layout (GPipe cuts the ResNets: "
                         f"preresnet18, preresnet34, resnet34, resnet18_lth)")
    blocks = [("stem", ResNetStem(model))]
    for name in model.stage_names:
        blocks += [(f"{name}.{i}", blk) for i, blk in enumerate(getattr(model, name))]
    blocks.append(("head", ResNetHead(model)))
    return blocks


def block_params(blocks: list[tuple[str, nn.Module]]) -> list[int]:
    return [sum(p.numel() for p in m.parameters()) for _, m in blocks]


@torch.no_grad()
def block_flops(blocks: list[tuple[str, nn.Module]], sample: torch.Tensor) -> list[int]:
    """Forward multiply-accumulates of every block on one sample (conv and linear layers, the
    bulk of the work), measured by running it (eval mode, training flags restored)."""
    macs = [0] * len(blocks)
    current = [0]

    def hook(m, inp, out):
        if isinstance(m, nn.Conv2d):
            macs[current[0]] += out.numel() // out.shape[0] * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        elif isinstance(m, nn.Linear):
            macs[current[0]] += out.numel() // out.shape[0] * m.in_features

    handles = [m.register_forward_hook(hook) for _, b in blocks for m in b.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    modes = [m.training for _, m in blocks]
    try:
        x = sample[:1]
        for i, (_, m) in enumerate(blocks):
            m.eval()
            current[0] = i
            x = m(x)
    finally:
        for h in handles:
            h.remove()
        for (_, m), t in zip(blocks, modes):
            m.train(t)
    return macs


def balanced_cuts(costs: list[float], stages: int) -> list[int]:
    """Indices where stages 2..S begin: the contiguous split of ``costs`` into ``stages``
    non-empty parts with the smallest largest part (ties: the earliest cuts). Exact (dynamic
    programming over prefixes)."""
    n = len(costs)
    if not 1 <= stages <= n:
        raise ValueError(f"cannot cut {n} blocks into {stages} stages")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[k][i]: smallest largest part splitting the first i blocks into k parts; arg: where the last part starts
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    arg = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for k in range(1, stages + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                v = max(best[k - 1][j], prefix[i] - prefix[j])
                if v < best[k][i]:
                    best[k][i], arg[k][i] = v, j
    cuts, i = [], n
    for k in range(stages, 0, -1):
        i = arg[k][i]
        cuts.append(i)
    return sorted(cuts)[1:]  # the first part starts at 0


def stage_ranges(n_blocks: int, cuts: list[int]) -> list[tuple[int, int]]:
    """[lo, hi) block range of every stage for the cut indices."""
    bounds = [0, *cuts, n_blocks]
    if any(b >= a for a, b in zip(bounds[1:], bounds[:-1])) or not all(0 < c < n_blocks for c in cuts):
        raise ValueError(f"cuts {cuts} do not split {n_blocks} blocks into non-empty stages in order")
    return list(zip(bounds[:-1], bounds[1:]))


def stage_state_names(model: nn.Module, blocks: list[tuple[str, nn.Module]], cuts: list[int]) -> list[list[str]]:
    """The ``model.state_dict()`` names (parameters and buffers) each stage owns, in state order."""
    owner = {}
    for s, (lo, hi) in enumerate(stage_ranges(len(blocks), cuts)):
        for _, m in blocks[lo:hi]:
            for v in [*m.parameters(), *m.buffers()]:
                owner[id(v)] = s
    names: list[list[str]] = [[] for _ in range(len(cuts) + 1)]
    for n, v in model.state_dict(keep_vars=True).items():
        if id(v) in owner:
            names[owner[id(v)]].append(n)
    return names


@torch.no_grad()
def boundary_shapes(blocks: list[tuple[str, nn.Module]], cuts: list[int], sample: torch.Tensor) -> list[tuple[int, ...]]:
    """Per-sample shape of the activation crossing each cut (forward on one sample in eval mode;
    the modules' training flags are restored)."""
    modes = [m.training for _, m in blocks]
    for _, m in blocks:
        m.eval()
    try:
        shapes, x = [], sample[:1]
        for i, (_, m) in enumerate(blocks):
            if i in cuts:
                shapes.append(tuple(x.shape[1:]))
            x = m(x)
    finally:
        for (_, m), t in zip(blocks, modes):
            m.train(t)
    return shapes
