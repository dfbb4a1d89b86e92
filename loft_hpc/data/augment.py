"""Deterministic augmentation: item ``i`` of an epoch is a pure function of (augment seed, i).

Resuming a run exactly needs the training samples to be reproducible from the checkpoint alone, so
no transform here reads the global torch RNG. Instead :class:`AugmentedDataset` builds one
``torch.Generator`` per item, seeded from a 64-bit hash of (seed, index), and hands it to the
transform. This gives the same tensors with DataLoader ``num_workers`` 0 or > 0 (workers only copy
the seed, they never draw from a shared stream) and leaves ``torch.get_rng_state()`` untouched.

A transform is any picklable callable ``transform(raw, generator) -> float tensor``; ``generator``
is ``None`` when augmentation is off (test sets, ``data.augment=false``) and the transform then
does only its deterministic part (resize / crop / normalise).

Note for DataLoader users: the seed is an attribute of the dataset, which workers copy when the
loader's iterator starts. Call :meth:`AugmentedDataset.set_augment_seed` *before* ``iter(loader)``
each epoch, and do not use ``persistent_workers=True`` (persistent workers keep the old copy).
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

_MASK64 = (1 << 64) - 1

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_seed(*values: int) -> int:
    """A 63-bit hash of a sequence of integers (stable across machines and Python versions)."""
    h = 0x243F6A8885A308D3
    for v in values:
        h = _splitmix64(h ^ (int(v) & _MASK64))
    return h >> 1


def item_generator(seed: int, index: int) -> torch.Generator:
    """A fresh CPU generator for item ``index`` under augment seed ``seed``."""
    return torch.Generator().manual_seed(mix_seed(seed, index))


def _randint(g: torch.Generator, high: int) -> int:
    """A uniform integer in [0, high) drawn from ``g``."""
    return int(torch.randint(0, high, (1,), generator=g).item())


def _coin(g: torch.Generator) -> bool:
    return bool(torch.rand((), generator=g).item() < 0.5)


def _stats(values: Sequence[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1)


class TensorAugment:
    """For in-memory image tensors (C x H x W, uint8 or float): optional pad + random crop back to
    the same size, optional horizontal flip, then ``(x * scale - mean) / std``.

    Padding is with zeros of the *raw* values (black borders, as torchvision's RandomCrop), applied
    before normalisation.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], pad: int = 0, flip: bool = False,
                 scale: float = 1.0):
        self.mean, self.std = _stats(mean), _stats(std)
        self.pad, self.flip, self.scale = int(pad), bool(flip), float(scale)

    def __call__(self, x: torch.Tensor, g: Optional[torch.Generator]) -> torch.Tensor:
        if g is not None:
            u_top, u_left, u_flip = torch.rand(3, generator=g, dtype=torch.float64).tolist()
            if self.pad > 0:
                h, w = x.shape[-2:]
                p, n = self.pad, 2 * self.pad + 1
                top, left = min(int(u_top * n), n - 1), min(int(u_left * n), n - 1)
                x = F.pad(x, (p, p, p, p))[..., top:top + h, left:left + w]
            if self.flip and u_flip < 0.5:
                x = x.flip(-1)
        x = x.to(torch.float32, copy=True)  # never write into the data set's own storage
        if self.scale != 1.0:
            x.mul_(self.scale)
        return x.sub_(self.mean).div_(self.std)


def random_resized_crop_params(width: int, height: int, g: torch.Generator,
                               scale=(0.08, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0)):
    """torchvision's ``RandomResizedCrop.get_params`` drawing from ``g``: returns (top, left, h, w)."""
    area = height * width
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(2, generator=g, dtype=torch.float64).tolist()
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_r[0] + (log_r[1] - log_r[0]) * u[1])
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return _randint(g, height - h + 1), _randint(g, width - w + 1), h, w
    # Fallback (as torchvision): the central crop with the closest allowed aspect ratio.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class PILTrainTransform:
    """ImageNet training: RandomResizedCrop(size) + horizontal flip, then to tensor + normalise.
    Without a generator: the evaluation transform (see :class:`PILEvalTransform`)."""

    def __init__(self, size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.size = int(size)
        self.mean, self.std = _stats(mean), _stats(std)
        self.eval = PILEvalTransform(size, mean, std)

    def __call__(self, img, g: Optional[torch.Generator]) -> torch.Tensor:
        import torchvision.transforms.functional as TF
        from torchvision.transforms import InterpolationMode

        if g is None:
            return self.eval(img, None)
        top, left, h, w = random_resized_crop_params(img.width, img.height, g)
        img = TF.resized_crop(img, top, left, h, w, [self.size, self.size],
                              interpolation=InterpolationMode.BILINEAR, antialias=True)
        if _coin(g):
            img = TF.hflip(img)
        return _pil_to_normalised(img, self.mean, self.std)


class PILEvalTransform:
    """ImageNet evaluation: Resize(int(size * 256 / 224)) + CenterCrop(size), to tensor, normalise."""

    def __init__(self, size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.size = int(size)
        self.resize = int(size * 256 / 224)
        self.mean, self.std = _stats(mean), _stats(std)

    def __call__(self, img, g: Optional[torch.Generator] = None) -> torch.Tensor:
        import torchvision.transforms.functional as TF
        from torchvision.transforms import InterpolationMode

        img = TF.resize(img, self.resize, interpolation=InterpolationMode.BILINEAR, antialias=True)
        img = TF.center_crop(img, [self.size, self.size])
        return _pil_to_normalised(img, self.mean, self.std)


def _pil_to_normalised(img, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    import torchvision.transforms.functional as TF

    x = TF.pil_to_tensor(img.convert("RGB")).to(torch.float32).div_(255.0)
    return (x - mean) / std


class AugmentedDataset(Dataset):
    """Wraps a source dataset (``source[i] -> (raw sample, label)``) with a seeded transform.

    ``__getitem__(i)`` returns ``(float32 tensor C x H x W, int label)`` and is a pure function of
    (the seed last given to :meth:`set_augment_seed`, ``i``) when ``augment`` is on, and of ``i``
    alone when it is off.
    """

    def __init__(self, source, transform: Callable, augment: bool, classes: Optional[Sequence] = None):
        self.source = source
        self.transform = transform
        self.augment = bool(augment)
        self.classes = list(classes) if classes is not None else None
        self.augment_seed = 0

    def set_augment_seed(self, seed: int) -> None:
        """Seed of the augmentation of every item from now on (the trainer sets it each epoch)."""
        self.augment_seed = int(seed)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        index = int(index)
        if index < 0:
            index += len(self)
        raw, label = self.source[index]
        g = item_generator(self.augment_seed, index) if self.augment else None
        return self.transform(raw, g), int(label)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(n={len(self)}, augment={self.augment}, "
                f"seed={self.augment_seed}, transform={type(self.transform).__name__})")
