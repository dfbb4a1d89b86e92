"""Pre-activation ResNets (PreResNet-18, PreResNet-34), the LoFT paper's main models.

Layout, stems, widths and filter groups as :mod:`loft_hpc.models.resnet` (``preact=True``): the
cifar stem is a bare 3x3 conv, the imagenet stem 7x7/2 conv + BN + ReLU + 3x3/2 max-pool; the
head is ``bn_final`` + ReLU + global average pool + ``classifier``. Each block's filter group is
its inner channels: ``conv1`` output, ``bn2``, ``conv2`` input.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from loft_hpc.models.resnet import ResNetBase, conv1x1, conv3x3


class PreActBlock(nn.Module):
    """``out = relu(bn1(x)); shortcut = downsample(out) or x; out = conv2(relu(bn2(conv1(out))))
    + shortcut``; ``downsample`` is a strided 1x1 conv without BN when the shape changes."""

    inner_bn = "bn2"

    def __init__(self, cin: int, cout: int, inner: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = conv3x3(cin, inner, stride)
        self.bn2 = nn.BatchNorm2d(inner)
        self.conv2 = conv3x3(inner, cout)
        self.downsample = conv1x1(cin, cout, stride) if (stride != 1 or cin != cout) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = x if self.downsample is None else self.downsample(out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreResNet(ResNetBase):
    """Pre-activation ResNet of :class:`PreActBlock`."""

    def __init__(self, blocks: tuple[int, ...], **kw) -> None:
        super().__init__(PreActBlock, blocks, preact=True, **kw)


def preresnet18(**kw) -> PreResNet:
    """PreResNet-18: blocks [2, 2, 2, 2]; keyword arguments as :class:`ResNetBase`."""
    return PreResNet((2, 2, 2, 2), **kw)


def preresnet34(**kw) -> PreResNet:
    """PreResNet-34: blocks [3, 4, 6, 3]; keyword arguments as :class:`ResNetBase`."""
    return PreResNet((3, 4, 6, 3), **kw)
