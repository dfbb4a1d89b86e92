"""A synthetic, learnable, class-dependent image set for fast tests and smoke runs (no files needed).

Each class has a fixed smooth prototype (3 x 4 x 4 Gaussian values upsampled bilinearly to
S x S, S = image_size or 16); sample ``i`` of a split has label ``i % classes`` and is its class's
prototype plus unit Gaussian noise drawn from a generator seeded by (split, i), scaled to about unit
variance. Everything derives from fixed seeds, so every machine and run sees the same data; nothing
is stored, items are generated on the fly (a few microseconds each). Training augmentation: zero
pad S/8 + random crop and horizontal flip.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from loft_hpc.data.augment import AugmentedDataset, TensorAugment, mix_seed
from loft_hpc.data.datasets import DataBundle

NATIVE_SIZE = 16
CHANNELS = 3
PROTO_SEED = 0x10F7
NOISE = 1.0
TRAIN_SALT, TEST_SALT = 1, 2


def prototypes(num_classes: int, size: int) -> torch.Tensor:
    """num_classes x 3 x size x size smooth class patterns, each with zero mean and unit std."""
    g = torch.Generator().manual_seed(PROTO_SEED)
    low = torch.randn(num_classes, CHANNELS, 4, 4, generator=g)
    protos = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    flat = protos.flatten(1)
    flat = (flat - flat.mean(1, keepdim=True)) / flat.std(1, keepdim=True).clamp_min(1e-6)
    return flat.view_as(protos).contiguous()


class SyntheticSource(Dataset):
    """``source[i] -> (prototype[i % C] + noise_i, i % C)``, generated on demand."""

    def __init__(self, protos: torch.Tensor, size: int, salt: int):
        self.protos, self.n, self.salt = protos, int(size), int(salt)
        self.scale = 1.0 / math.sqrt(1.0 + NOISE ** 2)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        label = index % self.protos.shape[0]
        g = torch.Generator().manual_seed(mix_seed(PROTO_SEED, self.salt, index))
        noise = torch.randn(self.protos.shape[1:], generator=g)
        return (self.protos[label] + NOISE * noise) * self.scale, label


def check(cfg) -> None:
    """Nothing to check: the data set is generated."""


def build(cfg) -> DataBundle:
    size = cfg.image_size or NATIVE_SIZE
    protos = prototypes(cfg.synthetic_classes, size)
    classes = [f"class{c}" for c in range(cfg.synthetic_classes)]
    zero, one = (0.0,) * CHANNELS, (1.0,) * CHANNELS
    train = AugmentedDataset(SyntheticSource(protos, cfg.synthetic_train_size, TRAIN_SALT),
                             TensorAugment(zero, one, pad=max(1, size // 8), flip=True), cfg.augment, classes)
    test = AugmentedDataset(SyntheticSource(protos, cfg.synthetic_test_size, TEST_SALT),
                            TensorAugment(zero, one), False, classes)
    return DataBundle(name=cfg.name, train=train, test=test, num_classes=cfg.synthetic_classes,
                      in_channels=CHANNELS, image_size=size)
