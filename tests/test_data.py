"""Data sets through the real loaders (torchvision CIFAR / ImageFolder, scikit-learn digits) on files
written in the real formats by tests/datafiles.py, and the determinism contract of augmentation."""
from __future__ import annotations

import os
import pickle
import shutil

import pytest
import torch
from torch.utils.data import DataLoader

from loft_hpc.config import ConfigError
from loft_hpc.config.schema import DataConfig
from loft_hpc.data import build_datasets, check_data
from loft_hpc.data.cifar import STATS
from loft_hpc.data.digits import stratified_split

from tests.datafiles import CIFAR10_NAMES, CIFAR100_FINE, write_cifar, write_imagefolder


@pytest.fixture(scope="module")
def cifar10_root(tmp_path_factory):
    return write_cifar(str(tmp_path_factory.mktemp("c10")), n_train=53, n_test=21, num_classes=10)


@pytest.fixture(scope="module")
def cifar100_root(tmp_path_factory):
    return write_cifar(str(tmp_path_factory.mktemp("c100")), n_train=120, n_test=30, num_classes=100)


@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory):
    return write_imagefolder(str(tmp_path_factory.mktemp("inet")), classes=3, per_class=4, size=40,
                             val_per_class=2)


def _cfg(name, root="", **kw):
    if name.startswith("cifar"):
        kw.setdefault("verify_checksums", False)
    return DataConfig(name=name, root=root, **kw)


def _raises(cfg, *needles):
    """check_data and build_datasets both raise a one-line ConfigError containing every needle."""
    for fn in (check_data, build_datasets):
        with pytest.raises(ConfigError) as exc:
            fn(cfg)
        msg = str(exc.value)
        assert "\n" not in msg
        for n in needles:
            assert n in msg, (n, msg)


def _labels(ds):
    return [ds[i][1] for i in range(len(ds))]


# --- CIFAR ---------------------------------------------------------------------------------------

def test_cifar10_loads_through_torchvision(cifar10_root):
    b = build_datasets(_cfg("cifar10", cifar10_root))
    assert (b.name, b.num_classes, b.in_channels, b.image_size) == ("cifar10", 10, 3, 32)
    # the training set is data_batch_1..5 in order (not the test batch, not a subset)
    batches = []
    for k in range(1, 6):
        with open(os.path.join(cifar10_root, "cifar-10-batches-py", f"data_batch_{k}"), "rb") as f:
            batches += pickle.load(f, encoding="latin1")["labels"]
    assert _labels(b.train) == batches
    assert (len(b.train), len(b.test)) == (53, 21)
    assert b.train.classes == CIFAR10_NAMES
    x, y = b.train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and isinstance(y, int)
    assert set(_labels(b.train)) <= set(range(10)) and len(set(_labels(b.train))) == 10
    # Test items decode the pickle exactly: row-major R, G, B planes, then the CIFAR normalisation.
    with open(os.path.join(cifar10_root, "cifar-10-batches-py", "test_batch"), "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in STATS["cifar10"])
    for i in (0, 7, 20):
        x, y = b.test[i]
        raw = torch.from_numpy(entry["data"][i].reshape(3, 32, 32)).float()
        assert torch.allclose((x * std + mean) * 255, raw, atol=1e-3)
        assert y == entry["labels"][i]


def test_cifar100_loads_fine_labels(cifar100_root):
    b = build_datasets(_cfg("cifar100", cifar100_root))
    assert (b.num_classes, b.in_channels, b.image_size) == (100, 3, 32)
    assert (len(b.train), len(b.test)) == (120, 30)
    assert b.train.classes == CIFAR100_FINE
    assert b.test[0][0].shape == (3, 32, 32)
    with open(os.path.join(cifar100_root, "cifar-100-python", "train"), "rb") as f:
        fine = pickle.load(f, encoding="latin1")["fine_labels"]
    assert _labels(b.train) == fine and max(fine) == 99


def test_cifar_resized_once_to_image_size(cifar10_root):
    b = build_datasets(_cfg("cifar10", cifar10_root, image_size=16))
    assert b.image_size == 16 and b.train[3][0].shape == (3, 16, 16) and b.test[3][0].shape == (3, 16, 16)


@pytest.mark.parametrize("which", ["cifar10", "cifar100"])
def test_cifar_checksums_reject_written_files(which, cifar10_root, cifar100_root):
    root = cifar10_root if which == "cifar10" else cifar100_root
    first = "data_batch_1" if which == "cifar10" else "train"
    _raises(_cfg(which, root, verify_checksums=True), "data.root", "MD5", first, "data.verify_checksums=false")


def test_cifar_missing_root_and_files(tmp_path, cifar10_root):
    _raises(_cfg("cifar10", ""), "data.root", "cifar-10-batches-py", "download=True")
    missing = str(tmp_path / "nowhere")
    _raises(_cfg("cifar100", missing), f"data.root={missing!r}", os.path.join(missing, "cifar-100-python"),
            "torchvision.datasets.CIFAR100", "cifar-100-python.tar.gz")
    partial = str(tmp_path / "partial")
    shutil.copytree(cifar10_root, partial)
    os.remove(os.path.join(partial, "cifar-10-batches-py", "test_batch"))
    _raises(_cfg("cifar10", partial), "data.root", os.path.join("cifar-10-batches-py", "test_batch"))


def test_cifar_unreadable_file_is_a_config_error(tmp_path, cifar10_root):
    broken = str(tmp_path / "broken")
    shutil.copytree(cifar10_root, broken)
    with open(os.path.join(broken, "cifar-10-batches-py", "data_batch_3"), "wb") as f:
        f.write(b"not a pickle")
    with pytest.raises(ConfigError, match="data.root.*could not read"):
        build_datasets(_cfg("cifar10", broken))


# --- ImageNet layout -----------------------------------------------------------------------------

def test_imagefolder_jpegs_load(imagenet_root):
    b = build_datasets(_cfg("imagenet", imagenet_root, image_size=32))
    assert (b.num_classes, b.in_channels, b.image_size) == (3, 3, 32)
    assert (len(b.train), len(b.test)) == (12, 6)
    assert b.train.classes == b.test.classes == ["n00000000", "n00000001", "n00000002"]
    for ds in (b.train, b.test):
        for i in range(len(ds)):
            x, y = ds[i]
            assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= y < 3
    assert _labels(b.test) == [0, 0, 1, 1, 2, 2]
    assert build_datasets(_cfg("imagenet", imagenet_root)).image_size == 224


def test_imagefolder_layout_errors(tmp_path, imagenet_root):
    _raises(_cfg("imagenet", ""), "data.root", "train/<class>")
    _raises(_cfg("imagenet", str(tmp_path / "none")), "data.root", "val/<class>")
    odd = str(tmp_path / "odd")
    shutil.copytree(imagenet_root, odd)
    shutil.rmtree(os.path.join(odd, "val", "n00000002"))
    _raises(_cfg("imagenet", odd), "data.root", "class folders differ", "n00000002")
    shutil.rmtree(os.path.join(odd, "val"))
    _raises(_cfg("imagenet", odd), "data.root", os.path.join(odd, "val"))


# --- digits and synthetic ------------------------------------------------------------------------

def test_digits_split_and_shape():
    b = build_datasets(_cfg("digits", test_fraction=0.25))
    assert (b.num_classes, b.in_channels, b.image_size) == (10, 1, 32)
    assert len(b.train) + len(b.test) == 1797 and len(b.test) == round(1797 * 0.25)
    assert b.train[0][0].shape == (1, 32, 32) and b.test[0][0].shape == (1, 32, 32)
    # Same split on a second build (and any machine: it is hash-based, not RNG-based).
    again = build_datasets(_cfg("digits", test_fraction=0.25))
    for i in (0, 100, len(b.test) - 1):
        assert torch.equal(b.test[i][0], again.test[i][0]) and b.test[i][1] == again.test[i][1]
    small = build_datasets(_cfg("digits", test_fraction=0.1, image_size=16))
    assert len(small.test) == 180 and small.train[0][0].shape == (1, 16, 16)


def test_digits_split_is_stratified_and_fixed():
    from sklearn.datasets import load_digits

    y = load_digits().target
    train, test = stratified_split(y, 0.25)
    assert sorted(train + test) == list(range(1797)) and not set(train) & set(test)
    assert (train, test) == stratified_split(y, 0.25)
    for c in range(10):
        n_c = int((y == c).sum())
        assert abs(int((y[test] == c).sum()) - 0.25 * n_c) <= 1
    assert test[:6] == [6, 7, 10, 12, 15, 18]  # pinned: a changed split would change every result


def test_synthetic_is_deterministic_and_learnable():
    cfg = _cfg("synthetic", synthetic_train_size=200, synthetic_test_size=100, synthetic_classes=4, augment=False)
    b = build_datasets(cfg)
    assert (b.num_classes, b.in_channels, b.image_size) == (4, 3, 16)
    assert (len(b.train), len(b.test)) == (200, 100)
    again = build_datasets(cfg)
    assert torch.equal(b.train[17][0], again.train[17][0]) and not torch.equal(b.train[17][0], b.test[17][0])
    xs = torch.stack([b.train[i][0] for i in range(200)])
    ys = torch.tensor(_labels(b.train))
    centroids = torch.stack([xs[ys == c].mean(0) for c in range(4)]).flatten(1)
    xt = torch.stack([b.test[i][0] for i in range(100)]).flatten(1)
    pred = torch.cdist(xt, centroids).argmin(1)
    assert (pred == torch.tensor(_labels(b.test))).float().mean() > 0.9
    assert build_datasets(_cfg("synthetic", image_size=24)).train[0][0].shape == (3, 24, 24)


def test_unknown_name_is_a_config_error():
    cfg = _cfg("digits")
    cfg.name = "mnist"
    with pytest.raises(ConfigError, match="data.name"):
        check_data(cfg)


# --- the augmentation contract -------------------------------------------------------------------

@pytest.fixture(scope="module")
def bundles(cifar10_root, imagenet_root):
    return {
        "cifar10": build_datasets(_cfg("cifar10", cifar10_root)),
        "imagenet": build_datasets(_cfg("imagenet", imagenet_root, image_size=32)),
        "digits": build_datasets(_cfg("digits")),
        "synthetic": build_datasets(_cfg("synthetic", synthetic_train_size=64)),
    }


@pytest.mark.parametrize("name", ["cifar10", "imagenet", "digits", "synthetic"])
def test_augmentation_is_a_pure_function_of_seed_and_index(bundles, name):
    train, test = bundles[name].train, bundles[name].test
    idx = list(range(8))
    train.set_augment_seed(11)
    first = [train[i][0] for i in idx]
    train.set_augment_seed(12)
    other = [train[i][0] for i in reversed(idx)][::-1]
    train.set_augment_seed(11)
    again = [train[i][0] for i in reversed(idx)][::-1]  # order of access does not matter
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert any(not torch.equal(a, b) for a, b in zip(first, other))
    # The test set never augments: the seed changes nothing there.
    before = test[1][0]
    test.set_augment_seed(999)
    assert torch.equal(before, test[1][0])
    assert test[1][0].shape == first[1].shape


def test_augment_off_ignores_seed(cifar10_root):
    train = build_datasets(_cfg("cifar10", cifar10_root, augment=False)).train
    train.set_augment_seed(1)
    a = train[5][0]
    train.set_augment_seed(2)
    assert torch.equal(a, train[5][0])


@pytest.mark.parametrize("name", ["cifar10", "imagenet", "digits", "synthetic"])
def test_datasets_pickle_for_spawned_workers(bundles, name):
    train = bundles[name].train
    train.set_augment_seed(21)
    copy = pickle.loads(pickle.dumps(train))
    assert copy.augment_seed == 21 and torch.equal(copy[2][0], train[2][0])


def test_global_rng_untouched(bundles):
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    for name, b in bundles.items():
        b.train.set_augment_seed(3)
        for i in range(6):
            b.train[i]
            b.test[i]
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("name", ["cifar10", "imagenet"])
def test_worker_processes_give_the_same_batches(bundles, name):
    train = bundles[name].train
    train.set_augment_seed(77)

    def epoch(workers):
        g = torch.Generator().manual_seed(5)  # same shuffled order in both runs
        loader = DataLoader(train, batch_size=4, shuffle=True, generator=g, num_workers=workers)
        return [(x.clone(), y.clone()) for x, y in loader]

    serial, parallel = epoch(0), epoch(2)
    assert len(serial) == len(parallel) > 1
    for (x0, y0), (x2, y2) in zip(serial, parallel):
        assert torch.equal(x0, x2) and torch.equal(y0, y2)
    train.set_augment_seed(78)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(serial, epoch(2)))
