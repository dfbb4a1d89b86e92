"""Post-activation ResNets (ResNet-34, the LTH paper's CIFAR ResNet-18) and the ResNet skeleton
shared with :mod:`loft_hpc.models.preresnet`.

Layout: stem ``conv1`` [+ ``bn1`` + ReLU] [+ ``maxpool``], stages ``layer1``..``layerN`` of blocks
``layerN.i``, head (pre-activation only: ``bn_final`` + ReLU), global average pool,
``classifier``. Stage ``k`` has ``width * 2**(k-1)`` residual channels; the first block of every
stage but the first has stride 2. No conv biases.

Stems: ``cifar`` = 3x3 conv, stride 1, no max-pool; ``imagenet`` = 7x7/2 conv + BN + ReLU +
3x3/2 max-pool. The post-activation cifar stem has BN + ReLU after its conv; the
pre-activation cifar stem is the bare conv (the first block's ``bn1`` normalises it).

Block width ``w``: the residual stream has ``w`` channels, the block's inner channels (conv1
output, its BN, conv2 input) ``round(w * inner_width_factor)``.

Filter groups: one per block, ``layerN.i.inner``: conv1's output channels, the BN on them and
conv2's input channels. Default rule ``loft`` (the paper's release): partitioned only in blocks
that are not the first of their stage, in stages 2 and later. Residual-stream channels (stem,
conv2 output, downsample) couple every block of a stage and are never groups; nor is the
classifier.

``resnet18_lth`` is the network the LTH paper's table calls "ResNet-18" (open_lth's
``cifar_resnet_20``): post-activation basic blocks, 3 stages x 3 blocks of widths 16/32/64
(``width`` = 16), 1x1 conv + BN shortcut when the shape changes.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from loft_hpc.models.base import GroupedModel
from loft_hpc.models.groups import FilterGroup, conv_group

STEMS = ("cifar", "imagenet")


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """conv1-bn1-relu-conv2-bn2, plus the shortcut (1x1 conv + BN when the shape changes), relu."""

    inner_bn = "bn1"

    def __init__(self, cin: int, cout: int, inner: int, stride: int) -> None:
        super().__init__()
        self.conv1 = conv3x3(cin, inner, stride)
        self.bn1 = nn.BatchNorm2d(inner)
        self.conv2 = conv3x3(inner, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + shortcut)


def stem_forward(m, x: torch.Tensor) -> torch.Tensor:
    """conv1 (+ bn1 + ReLU) (+ max-pool) of ``m`` (a ResNet, or a pipeline stem holding its modules)."""
    x = m.conv1(x)
    if m.bn1 is not None:
        x = F.relu(m.bn1(x))
    if m.maxpool is not None:
        x = m.maxpool(x)
    return x


def head_forward(m, x: torch.Tensor) -> torch.Tensor:
    """(bn_final + ReLU) + global average pool + classifier of ``m``."""
    if m.bn_final is not None:
        x = F.relu(m.bn_final(x))
    return m.classifier(F.adaptive_avg_pool2d(x, 1).flatten(1))


class ResNetBase(GroupedModel):
    """Stem, stages of ``block`` and classifier; ``preact`` selects the pre-activation layout.

    ``block(cin, cout, inner, stride)`` must have ``conv1`` / ``conv2`` and name the BN on
    conv1's output in its class attribute ``inner_bn``.
    """

    def __init__(self, block: type[nn.Module], blocks: tuple[int, ...], *, preact: bool, stem: str,
                 width: int, inner_width_factor: float, in_channels: int, num_classes: int,
                 partition_rule: str = "loft") -> None:
        super().__init__(partition_rule)
        if stem not in STEMS:
            raise ValueError(f"stem must be one of {STEMS}, got {stem!r}")
        if width < 1 or round(width * inner_width_factor) < 1:
            raise ValueError(f"width {width} x inner_width_factor {inner_width_factor} leaves no inner channels")
        self.preact = preact
        self.stem_kind = stem
        self.inner_bn = block.inner_bn
        if stem == "cifar":
            self.conv1 = conv3x3(in_channels, width)
        else:
            self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = None if (preact and stem == "cifar") else nn.BatchNorm2d(width)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1) if stem == "imagenet" else None

        self.stage_names: list[str] = []
        cin = width
        for k, n in enumerate(blocks, 1):
            cout = width * 2 ** (k - 1)
            inner = round(cout * inner_width_factor)
            layers = []
            for i in range(n):
                stride = 2 if (k > 1 and i == 0) else 1
                layers.append(block(cin, cout, inner, stride))
                cin = cout
            self.add_module(f"layer{k}", nn.Sequential(*layers))
            self.stage_names.append(f"layer{k}")
        self.bn_final = nn.BatchNorm2d(cin) if preact else None
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = stem_forward(self, x)
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return head_forward(self, x)

    def filter_groups(self) -> list[FilterGroup]:
        groups = []
        for k, name in enumerate(self.stage_names, 1):
            for i, blk in enumerate(getattr(self, name)):
                p = f"{name}.{i}"
                groups.append(conv_group(
                    f"{p}.inner", f"{p}.conv1", blk.conv1.out_channels, bn=f"{p}.{self.inner_bn}",
                    consumers=(f"{p}.conv2",), partitioned=self._is_partitioned(k >= 2 and i >= 1)))
        return groups


class ResNet(ResNetBase):
    """Post-activation ResNet of :class:`BasicBlock`."""

    def __init__(self, blocks: tuple[int, ...], **kw) -> None:
        super().__init__(BasicBlock, blocks, preact=False, **kw)


def resnet34(**kw) -> ResNet:
    """ResNet-34: blocks [3, 4, 6, 3]; keyword arguments as :class:`ResNetBase`."""
    return ResNet((3, 4, 6, 3), **kw)


def resnet18_lth(**kw) -> ResNet:
    """The LTH paper's CIFAR "ResNet-18": blocks [3, 3, 3], widths w/2w/4w (w = 16 in the paper)."""
    return ResNet((3, 3, 3), **kw)
