"""The Lottery Ticket Hypothesis paper's small models: LeNet-300-100, Conv-2/4/6 and VGG-19.

Like every model of the package they derive from :class:`~loft_hpc.models.base.GroupedModel`,
which gives unstructured pruning its interface (``prunable_weights``, ``layer_kind``); each model
here states its ``filter_groups``. The LTH paper's ResNet-18 is ``resnet18_lth`` in
:mod:`loft_hpc.models.resnet`.

Models (Frankle & Carbin, ICLR 2019, Figure 2), all sized by ``width`` with 64 as the paper's size:

* LeNet-300-100: ``in_channels*H*W -> 300 -> 100 -> classes``, ReLU; hidden units scale by
  ``width/64``.
* Conv-2/4/6: pairs of 3x3 convs (padding 1, bias, ReLU) of ``width``, ``2*width``, ``4*width``
  channels, each pair followed by a 2x2 max-pool, then fully connected ``4*width``, ``4*width``
  (256, 256 at width 64), classes. The first linear consumes the flattened feature map.
* VGG-19 (the CIFAR variant with BatchNorm, no dropout, as open_lth's ``cifar_vgg_19``):
  64,64,M,128,128,M,256x4,M,512x4,M,512x4 (times ``width/64``), 3x3 convs without bias
  (BatchNorm follows), then a global average pool and one linear layer. At 32x32 the global pool
  equals open_lth's final 2x2 average pool; it also makes the classifier independent of the image
  size.

Filter groups: one per hidden layer (each conv's output channels with bias / BN and the next
layer's input, for Conv-2/4/6's last conv a block of ``H*W`` flattened inputs of ``fc1`` per
channel; each hidden linear's output units). Input channels and output logits are never groups.
The default rule (``loft``) partitions every group: each rank holds a subset of the channels of
every hidden layer, input and output layers are shared. Consecutive hidden layers are then both
partitioned, so the weight between them is sliced on both dimensions and a rank trains only its
diagonal block in a round (see :mod:`loft_hpc.exchange.shards` for the entries no rank trains).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from loft_hpc.models.base import GroupedModel
from loft_hpc.models.groups import FilterGroup, conv_group


def _scaled(base: int, width: int) -> int:
    return max(1, round(base * width / 64))


class LeNet300100(GroupedModel):
    """LeNet-300-100 on flattened images; groups ``fc1`` and ``fc2`` (the hidden units)."""

    def __init__(self, *, in_channels: int, image_size: int, num_classes: int, width: int = 64,
                 partition_rule: str = "loft") -> None:
        super().__init__(partition_rule)
        self.hidden = (_scaled(300, width), _scaled(100, width))
        self.fc1 = nn.Linear(in_channels * image_size * image_size, self.hidden[0])
        self.fc2 = nn.Linear(self.hidden[0], self.hidden[1])
        self.classifier = nn.Linear(self.hidden[1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc1(x.flatten(1)))
        return self.classifier(F.relu(self.fc2(x)))

    def filter_groups(self) -> list[FilterGroup]:
        part = self._is_partitioned(True)
        return [
            conv_group("fc1", "fc1", self.hidden[0], bias=True, consumers=("fc2",), partitioned=part),
            conv_group("fc2", "fc2", self.hidden[1], bias=True, consumers=("classifier",), partitioned=part),
        ]


class ConvNet(GroupedModel):
    """Conv-2, Conv-4 or Conv-6 (``pairs`` = 1, 2, 3) of the LTH paper."""

    def __init__(self, pairs: int, *, in_channels: int, image_size: int, num_classes: int,
                 width: int = 64, partition_rule: str = "loft") -> None:
        super().__init__(partition_rule)
        if image_size >> pairs < 1:
            raise ValueError(f"conv{2 * pairs} max-pools {pairs} times: image_size must be >= {2 ** pairs}, got {image_size}")
        self.channels = [width * 2 ** (i // 2) for i in range(2 * pairs)]
        self.fc_width = 4 * width
        self.final_hw = (image_size >> pairs) ** 2
        prev = in_channels
        for i, c in enumerate(self.channels, 1):
            self.add_module(f"conv{i}", nn.Conv2d(prev, c, 3, padding=1, bias=True))
            prev = c
        self.fc1 = nn.Linear(prev * self.final_hw, self.fc_width)
        self.fc2 = nn.Linear(self.fc_width, self.fc_width)
        self.classifier = nn.Linear(self.fc_width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(1, len(self.channels) + 1):
            x = F.relu(getattr(self, f"conv{i}")(x))
            if i % 2 == 0:
                x = F.max_pool2d(x, 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return self.classifier(F.relu(self.fc2(x)))

    def filter_groups(self) -> list[FilterGroup]:
        part = self._is_partitioned(True)
        n = len(self.channels)
        groups = []
        for i, c in enumerate(self.channels, 1):
            last = i == n
            groups.append(conv_group(
                f"conv{i}", f"conv{i}", c, bias=True, consumers=("fc1" if last else f"conv{i + 1}",),
                consumer_repeat=self.final_hw if last else 1, partitioned=part))
        groups.append(conv_group("fc1", "fc1", self.fc_width, bias=True, consumers=("fc2",), partitioned=part))
        groups.append(conv_group("fc2", "fc2", self.fc_width, bias=True, consumers=("classifier",), partitioned=part))
        return groups


VGG19_PLAN = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512)


class VGG19(GroupedModel):
    """CIFAR VGG-19 with BatchNorm: ``conv{i}`` / ``bn{i}`` for i = 1..16, ``classifier``."""

    def __init__(self, *, in_channels: int, image_size: int, num_classes: int, width: int = 64,
                 partition_rule: str = "loft") -> None:
        super().__init__(partition_rule)
        pools = VGG19_PLAN.count("M")
        if image_size >> pools < 1:
            raise ValueError(f"vgg19 max-pools {pools} times: image_size must be >= {2 ** pools}, got {image_size}")
        self.channels: list[int] = []
        self._pool_after: set[int] = set()
        prev = in_channels
        for item in VGG19_PLAN:
            if item == "M":
                self._pool_after.add(len(self.channels))
                continue
            c = _scaled(item, width)
            self.channels.append(c)
            i = len(self.channels)
            self.add_module(f"conv{i}", nn.Conv2d(prev, c, 3, padding=1, bias=False))
            self.add_module(f"bn{i}", nn.BatchNorm2d(c))
            prev = c
        self.classifier = nn.Linear(prev, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(1, len(self.channels) + 1):
            x = F.relu(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(x)))
            if i in self._pool_after:
                x = F.max_pool2d(x, 2)
        return self.classifier(F.adaptive_avg_pool2d(x, 1).flatten(1))

    def filter_groups(self) -> list[FilterGroup]:
        part = self._is_partitioned(True)
        n = len(self.channels)
        return [
            conv_group(f"conv{i}", f"conv{i}", c, bn=f"bn{i}",
                       consumers=("classifier" if i == n else f"conv{i + 1}",), partitioned=part)
            for i, c in enumerate(self.channels, 1)
        ]
