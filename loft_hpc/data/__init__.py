"""Data sets: embedded digits (default), synthetic, CIFAR-10/100 and ImageNet.

``check_data(cfg)`` is cheap and raises :class:`loft_hpc.config.ConfigError` for missing files;
``build_datasets(cfg)`` returns a :class:`DataBundle` whose ``train`` set augments deterministically
(item ``i`` is a pure function of the seed given to ``train.set_augment_seed`` and ``i``).
"""
from loft_hpc.data.augment import AugmentedDataset, item_generator, mix_seed
from loft_hpc.data.datasets import REGISTRY, DataBundle, build_datasets, check_data

__all__ = ["AugmentedDataset", "DataBundle", "REGISTRY", "build_datasets", "check_data", "item_generator",
           "mix_seed"]
