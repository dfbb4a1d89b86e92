"""Data set registry: ``check_data`` (cheap, every rank, before any collective) and ``build_datasets``.

Each data set lives in its own module exposing ``check(cfg)`` and ``build(cfg) -> DataBundle``; the
registry maps ``data.name`` to that module and imports it only when used, so a job on the embedded
digits never imports torchvision's data sets and a CIFAR job never needs scikit-learn.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

from loft_hpc.config.errors import ConfigError
from loft_hpc.config.schema import DataConfig

REGISTRY = {
    "digits": "loft_hpc.data.digits",
    "synthetic": "loft_hpc.data.synthetic",
    "cifar10": "loft_hpc.data.cifar",
    "cifar100": "loft_hpc.data.cifar",
    "imagenet": "loft_hpc.data.imagenet",
}


@dataclass
class DataBundle:
    """The training and test sets of a job and what a model needs to know about them.

    ``train`` and ``test`` are :class:`loft_hpc.data.augment.AugmentedDataset`; items are
    ``(float32 tensor in_channels x image_size x image_size, int label)``. Only ``train`` augments
    (when ``data.augment``); call ``train.set_augment_seed(s)`` before each epoch.
    """

    name: str
    train: object
    test: object
    num_classes: int
    in_channels: int
    image_size: int

    def __repr__(self) -> str:
        return (f"DataBundle(name={self.name!r}, train={len(self.train)}, test={len(self.test)}, "
                f"num_classes={self.num_classes}, in_channels={self.in_channels}, "
                f"image_size={self.image_size}, augment={getattr(self.train, 'augment', None)})")


def _module(cfg: DataConfig):
    try:
        path = REGISTRY[cfg.name]
    except KeyError:
        raise ConfigError(f"data.name={cfg.name!r}: unknown data set (choose from {', '.join(REGISTRY)})") from None
    return importlib.import_module(path)


def check_data(cfg: DataConfig) -> None:
    """Raise :class:`ConfigError` (one line naming data.root and the path) when the data set's files
    are missing or (CIFAR with ``verify_checksums``) corrupted; otherwise return quietly."""
    _module(cfg).check(cfg)


def build_datasets(cfg: DataConfig) -> DataBundle:
    """Load the data set named by ``cfg.name``; missing or corrupted files raise :class:`ConfigError`
    as in :func:`check_data` (each builder checks what it reads)."""
    bundle = _module(cfg).build(cfg)
    assert isinstance(bundle, DataBundle)
    return bundle
