"""CIFAR-10 / CIFAR-100 through torchvision's own loaders (``download=False``: no machine here is online).

The python-pickle batches are read by ``torchvision.datasets.CIFAR10/CIFAR100`` once and kept in
memory as one uint8 tensor (N x 3 x 32 x 32); items are cropped/flipped/normalised with tensor ops
(:class:`loft_hpc.data.augment.TensorAugment`), which is much lighter per item than PIL transforms.

torchvision checks the MD5 of every batch file and of the meta file against the official release.
``data.verify_checksums=false`` loads through :class:`UncheckedCIFAR10` / :class:`UncheckedCIFAR100`
instead, which only require the files to exist; that is meant for re-packed copies of the data and
for the small files the tests write in the same format, never as a way to hide a broken download.
"""
from __future__ import annotations

import os
import pickle

import torch
import torch.nn.functional as F
from torchvision.datasets import CIFAR10, CIFAR100
from torchvision.datasets.utils import check_integrity

from loft_hpc.config.errors import ConfigError
from loft_hpc.data.augment import AugmentedDataset, TensorAugment
from loft_hpc.data.datasets import DataBundle

NATIVE_SIZE = 32
# Per-channel mean/std of the training images, as commonly used.
STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
NUM_CLASSES = {"cifar10": 10, "cifar100": 100}
TITLE = {"cifar10": "CIFAR10", "cifar100": "CIFAR100"}


class _NoChecksum:
    """Mixin for torchvision's CIFAR loaders: files must exist, their MD5 is not checked."""

    def _check_integrity(self) -> bool:
        return all(os.path.isfile(os.path.join(self.root, self.base_folder, f))
                   for f, _ in self.train_list + self.test_list)

    def _load_meta(self) -> None:
        path = os.path.join(self.root, self.base_folder, self.meta["filename"])
        with open(path, "rb") as infile:
            self.classes = pickle.load(infile, encoding="latin1")[self.meta["key"]]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}


class UncheckedCIFAR10(_NoChecksum, CIFAR10):
    """``torchvision.datasets.CIFAR10`` without MD5 checks (for re-packed or test-written files)."""


class UncheckedCIFAR100(_NoChecksum, CIFAR100):
    """``torchvision.datasets.CIFAR100`` without MD5 checks (for re-packed or test-written files)."""


def _tv_class(name: str, verify: bool):
    if name == "cifar10":
        return CIFAR10 if verify else UncheckedCIFAR10
    return CIFAR100 if verify else UncheckedCIFAR100


def _files(name: str):
    """(base folder, [file names], download url) of the official release, from torchvision."""
    cls = _tv_class(name, verify=True)
    files = [(f, md5) for f, md5 in cls.train_list + cls.test_list]
    files.append((cls.meta["filename"], cls.meta["md5"]))
    return cls.base_folder, files, cls.url


def _howto(name: str, root: str) -> str:
    folder, _, url = _files(name)
    return (f"on a machine with internet run python -c \"import torchvision; "
            f"torchvision.datasets.{TITLE[name]}('{root or 'DATA_ROOT'}', download=True)\" "
            f"(or download {url} and unpack it), then copy the {folder}/ folder into data.root")


def check(cfg, md5: bool | None = None) -> None:
    """Files present (and, with ``data.verify_checksums``, matching the official MD5s)."""
    md5 = cfg.verify_checksums if md5 is None else md5
    folder, files, _ = _files(cfg.name)
    if not cfg.root:
        raise ConfigError(f"data.root is empty: data.name={cfg.name!r} needs the folder that holds "
                          f"{folder}/; {_howto(cfg.name, '')}")
    base = os.path.join(cfg.root, folder)
    if not os.path.isdir(base):
        raise ConfigError(f"data.root={cfg.root!r}: expected the folder {base} (not found); "
                          f"{_howto(cfg.name, cfg.root)}")
    for fname, digest in files:
        path = os.path.join(base, fname)
        if not os.path.isfile(path):
            raise ConfigError(f"data.root={cfg.root!r}: expected the file {path} (not found); "
                              f"{_howto(cfg.name, cfg.root)}")
        if md5 and not check_integrity(path, digest):
            raise ConfigError(f"data.root={cfg.root!r}: {path} does not match the MD5 of the official "
                              f"{TITLE[cfg.name]} release (corrupted or re-packed); download it again, or "
                              f"set data.verify_checksums=false for re-packed or test files")


def _load(cfg, train: bool):
    cls = _tv_class(cfg.name, cfg.verify_checksums)
    try:
        ds = cls(cfg.root, train=train, download=False)
    except RuntimeError as e:  # torchvision: "not found or corrupted"
        check(cfg, md5=cfg.verify_checksums)  # names the missing / bad file
        raise ConfigError(f"data.root={cfg.root!r}: torchvision could not load {TITLE[cfg.name]} from "
                          f"{os.path.join(cfg.root, cls.base_folder)}: {e}") from None
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError) as e:
        raise ConfigError(f"data.root={cfg.root!r}: could not read the {TITLE[cfg.name]} files in "
                          f"{os.path.join(cfg.root, cls.base_folder)} ({type(e).__name__}: {e})") from None
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # N x 3 x 32 x 32 uint8
    labels = torch.as_tensor(ds.targets, dtype=torch.int64)
    n_cls = NUM_CLASSES[cfg.name]
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n_cls):
        raise ConfigError(f"data.root={cfg.root!r}: {TITLE[cfg.name]} labels outside 0..{n_cls - 1} "
                          f"in {os.path.join(cfg.root, cls.base_folder)}")
    return images, labels, list(ds.classes)


def resize_uint8(images: torch.Tensor, size: int, chunk: int = 4096) -> torch.Tensor:
    """Bilinear (antialiased) resize of an N x C x H x W uint8 tensor, done once at load time."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    out = torch.empty(images.shape[0], images.shape[1], size, size, dtype=torch.uint8)
    for s in range(0, images.shape[0], chunk):
        x = F.interpolate(images[s:s + chunk].float(), size=(size, size), mode="bilinear",
                          align_corners=False, antialias=True)
        out[s:s + chunk] = x.round_().clamp_(0, 255).to(torch.uint8)
    return out


def build(cfg) -> DataBundle:
    from torch.utils.data import TensorDataset

    check(cfg, md5=False)  # cheap: existence; torchvision itself verifies MD5s when asked
    size = cfg.image_size or NATIVE_SIZE
    mean, std = STATS[cfg.name]
    pad = max(1, round(4 * size / NATIVE_SIZE))  # RandomCrop(32, padding=4), scaled with the size
    tr_x, tr_y, classes = _load(cfg, train=True)
    te_x, te_y, _ = _load(cfg, train=False)
    train_tf = TensorAugment(mean, std, pad=pad, flip=True, scale=1 / 255)
    test_tf = TensorAugment(mean, std, scale=1 / 255)
    train = AugmentedDataset(TensorDataset(resize_uint8(tr_x, size), tr_y), train_tf, cfg.augment, classes)
    test = AugmentedDataset(TensorDataset(resize_uint8(te_x, size), te_y), test_tf, False, classes)
    return DataBundle(name=cfg.name, train=train, test=test, num_classes=NUM_CLASSES[cfg.name],
                      in_channels=3, image_size=size)
