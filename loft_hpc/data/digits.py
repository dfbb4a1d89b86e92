"""The embedded default: scikit-learn's handwritten digits (1,797 8x8 images, values 0..16, 10 classes).

It ships inside scikit-learn, so it works offline on every machine and needs no ``data.root``.
The train/test split is stratified and fixed: each image's place is decided by a hash of its index
(:func:`loft_hpc.data.augment.mix_seed`), not by a library RNG whose stream could change between
versions, so every machine and every run gets the same split for the same ``data.test_fraction``.
Images are scaled to [0, 1], resized once (bilinear) to ``image_size`` (0 -> 32), kept in memory as
1 x S x S float tensors and normalised with the training split's mean/std. Augmentation is a small
random translation (zero-pad S/16 pixels, random crop back to S); no flips, digits are not
mirror-symmetric.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from loft_hpc.config.errors import ConfigError
from loft_hpc.data.augment import AugmentedDataset, TensorAugment, mix_seed
from loft_hpc.data.datasets import DataBundle

NATIVE_SIZE = 32
SPLIT_SALT = 0x5D161  # fixed: the split must never depend on the job's seed
NUM_CLASSES = 10


def check(cfg) -> None:
    try:
        import sklearn.datasets  # noqa: F401
    except ImportError:
        raise ConfigError(f"data.name={cfg.name!r} needs scikit-learn (pip install scikit-learn), which "
                          f"ships the digits images; or choose another data.name") from None


def stratified_split(labels, test_fraction: float):
    """Fixed stratified split: (train indices, test indices), both sorted.

    Within each class the samples are ordered by a hash of their index and given the key
    (rank + 0.5) / class size; the ``round(n * test_fraction)`` smallest keys form the test set, so
    every class contributes in proportion (to within one sample) and the total is exact.
    """
    labels = np.asarray(labels)
    n = len(labels)
    n_test = min(max(int(round(n * test_fraction)), 1), n - 1)
    keys = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c).tolist()
        idx.sort(key=lambda i: mix_seed(SPLIT_SALT, i))
        keys.extend(((r + 0.5) / len(idx), mix_seed(SPLIT_SALT, 1, i), i) for r, i in enumerate(idx))
    keys.sort()
    test = sorted(i for _, _, i in keys[:n_test])
    train = sorted(i for _, _, i in keys[n_test:])
    return train, test


def build(cfg) -> DataBundle:
    check(cfg)
    from sklearn.datasets import load_digits

    d = load_digits()
    size = cfg.image_size or NATIVE_SIZE
    images = torch.as_tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # N x 1 x 8 x 8 in [0, 1]
    if size != images.shape[-1]:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    labels = torch.as_tensor(d.target, dtype=torch.int64)
    tr, te = stratified_split(d.target, cfg.test_fraction)
    tr_x, te_x = images[tr].contiguous(), images[te].contiguous()
    mean, std = float(tr_x.mean()), float(tr_x.std())
    pad = max(1, round(2 * size / NATIVE_SIZE))
    classes = [str(c) for c in range(NUM_CLASSES)]
    train = AugmentedDataset(TensorDataset(tr_x, labels[tr]),
                             TensorAugment((mean,), (std,), pad=pad, flip=False), cfg.augment, classes)
    test = AugmentedDataset(TensorDataset(te_x, labels[te]),
                            TensorAugment((mean,), (std,)), False, classes)
    return DataBundle(name=cfg.name, train=train, test=test, num_classes=NUM_CLASSES, in_channels=1,
                      image_size=size)
