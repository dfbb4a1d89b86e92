"""ImageNet (or any data set in the same layout) through ``torchvision.datasets.ImageFolder``.

Expected layout under ``data.root``::

    train/<class>/<image>.JPEG     (e.g. train/n01440764/n01440764_10026.JPEG)
    val/<class>/<image>.JPEG       (the 50,000 validation images sorted into the same class folders)

ImageFolder numbers classes by their sorted folder names, so ``val/`` must hold exactly the class
folders of ``train/``; :func:`check` refuses anything else rather than mislabel silently.
Training items: RandomResizedCrop(image_size) + horizontal flip (seeded per item, see
:mod:`loft_hpc.data.augment`); test items: Resize(int(image_size * 256 / 224)) + CenterCrop.
"""
from __future__ import annotations

import os

from loft_hpc.config.errors import ConfigError
from loft_hpc.data.augment import (IMAGENET_MEAN, IMAGENET_STD, AugmentedDataset, PILEvalTransform,
                                   PILTrainTransform)
from loft_hpc.data.datasets import DataBundle

NATIVE_SIZE = 224
LAYOUT = "expected data.root/train/<class>/*.JPEG and data.root/val/<class>/*.JPEG with the same class folders in both"


def _classes(cfg, split: str) -> list:
    path = os.path.join(cfg.root, split)
    if not os.path.isdir(path):
        raise ConfigError(f"data.root={cfg.root!r}: the folder {path} is missing; {LAYOUT}")
    with os.scandir(path) as it:
        names = sorted(e.name for e in it if e.is_dir())
    if not names:
        raise ConfigError(f"data.root={cfg.root!r}: {path} has no class folders; {LAYOUT}")
    return names


def check(cfg) -> None:
    """Cheap layout check: train/ and val/ exist and hold the same, non-empty set of class folders."""
    if not cfg.root:
        raise ConfigError(f"data.root is empty: data.name={cfg.name!r} needs a folder; {LAYOUT}")
    if not os.path.isdir(cfg.root):
        raise ConfigError(f"data.root={cfg.root!r}: the folder {cfg.root} does not exist; {LAYOUT}")
    train, val = _classes(cfg, "train"), _classes(cfg, "val")
    if train != val:
        only_t = sorted(set(train) - set(val))[:3]
        only_v = sorted(set(val) - set(train))[:3]
        raise ConfigError(f"data.root={cfg.root!r}: class folders differ between train/ ({len(train)}) and "
                          f"val/ ({len(val)}), e.g. only in train: {only_t}, only in val: {only_v}; {LAYOUT}")


def _folder(cfg, split: str):
    from torchvision.datasets import ImageFolder

    path = os.path.join(cfg.root, split)
    try:
        return ImageFolder(path)
    except (FileNotFoundError, OSError) as e:
        raise ConfigError(f"data.root={cfg.root!r}: could not index {path}: {e}") from None


def build(cfg) -> DataBundle:
    check(cfg)
    size = cfg.image_size or NATIVE_SIZE
    train_src, test_src = _folder(cfg, "train"), _folder(cfg, "val")
    train = AugmentedDataset(train_src, PILTrainTransform(size, IMAGENET_MEAN, IMAGENET_STD),
                             cfg.augment, train_src.classes)
    test = AugmentedDataset(test_src, PILEvalTransform(size, IMAGENET_MEAN, IMAGENET_STD), False,
                            test_src.classes)
    return DataBundle(name=cfg.name, train=train, test=test, num_classes=len(train_src.classes),
                      in_channels=3, image_size=size)
