"""Write tiny data sets in the real on-disk formats, for tests (no machine here can download them).

* :func:`write_cifar` -> ``cifar-10-batches-py/`` (``data_batch_1..5``, ``test_batch``,
  ``batches.meta``) or ``cifar-100-python/`` (``train``, ``test``, ``meta``): python pickles laid
  out as the originals (str keys as read with ``encoding='latin1'``, ``'data'`` uint8 N x 3072 of
  row-major R, G, B planes). Their MD5s of course differ from the official release, so load them
  with ``data.verify_checksums=false``.
* :func:`write_imagefolder` -> ``train/<class>/*.JPEG`` and ``val/<class>/*.JPEG`` real JPEG files.

Images are class-dependent (a colour and a stripe orientation per class, random phase and noise per
image) so a small model can learn them. Everything is generated from fixed seeds: same call, same
bytes.
"""
from __future__ import annotations

import os
import pickle

import numpy as np

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR100_FINE = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly "
    "camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup "
    "dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower "
    "leopard lion lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid "
    "otter palm_tree pear pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray road "
    "rocket rose sea seal shark shrew skunk skyscraper snail snake spider squirrel streetcar sunflower "
    "sweet_pepper table tank telephone television tiger tractor train trout tulip turtle wardrobe whale "
    "willow_tree wolf woman worm").split()
CIFAR100_COARSE = (
    "aquatic_mammals fish flowers food_containers fruit_and_vegetables household_electrical_devices "
    "household_furniture insects large_carnivores large_man-made_outdoor_things "
    "large_natural_outdoor_scenes large_omnivores_and_herbivores medium_mammals "
    "non-insect_invertebrates people reptiles small_mammals trees vehicles_1 vehicles_2").split()
assert len(CIFAR100_FINE) == 100 and len(CIFAR100_COARSE) == 20


def class_images(labels, num_classes: int, height: int, width: int | None = None, seed: int = 0) -> np.ndarray:
    """uint8 images N x H x W x 3: per class a base colour and stripe direction/frequency; per image a
    random stripe phase, brightness and pixel noise."""
    width = width or height
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.RandomState(seed)
    palette = np.random.RandomState(12345).uniform(40, 215, size=(num_classes, 3))
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    yy, xx = yy / height, xx / width
    out = np.empty((len(labels), height, width, 3), dtype=np.uint8)
    for k, c in enumerate(labels):
        theta = np.pi * c / num_classes
        freq = 2 + c % 3
        phase = rng.uniform(0, 2 * np.pi)
        wave = np.sin(2 * np.pi * freq * (xx * np.cos(theta) + yy * np.sin(theta)) + phase)
        img = palette[c][None, None, :] * (0.65 + 0.35 * wave[..., None]) * rng.uniform(0.85, 1.15)
        img = img + rng.normal(0, 12, size=img.shape)
        out[k] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return out


def _labels(n: int, num_classes: int, seed: int) -> np.ndarray:
    """Balanced labels (each class n // C or n // C + 1 times) in a seeded order."""
    return np.random.RandomState(seed).permutation(np.arange(n) % num_classes)


def _dump(path: str, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _cifar_rows(images: np.ndarray) -> np.ndarray:
    """N x 32 x 32 x 3 -> N x 3072 (all red, then green, then blue; each row-major)."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), 3072))


def write_cifar(root, n_train: int = 100, n_test: int = 40, num_classes: int = 10, seed: int = 0):
    """Write a tiny CIFAR-10 (``num_classes=10``) or CIFAR-100 (``num_classes=100``) under ``root``.

    CIFAR-10: ``n_train`` images spread over the five training batches. CIFAR-100: the coarse
    label of fine class ``f`` is ``f % 20`` (not the real super-class map; nothing here uses it).
    Returns ``root``.
    """
    if num_classes not in (10, 100):
        raise ValueError("num_classes must be 10 or 100")
    os.makedirs(root, exist_ok=True)
    tr_y, te_y = _labels(n_train, num_classes, seed + 1), _labels(n_test, num_classes, seed + 2)
    tr_x = _cifar_rows(class_images(tr_y, num_classes, 32, seed=seed + 3))
    te_x = _cifar_rows(class_images(te_y, num_classes, 32, seed=seed + 4))

    def names(labels, start):
        tags = CIFAR10_NAMES if num_classes == 10 else CIFAR100_FINE
        return [f"{tags[c]}_s_{start + i:06d}.png" for i, c in enumerate(labels)]

    if num_classes == 10:
        folder = os.path.join(root, "cifar-10-batches-py")
        os.makedirs(folder, exist_ok=True)
        bounds = np.linspace(0, n_train, 6).round().astype(int)
        for b in range(5):
            s, e = bounds[b], bounds[b + 1]
            _dump(os.path.join(folder, f"data_batch_{b + 1}"), {
                "batch_label": f"training batch {b + 1} of 5", "labels": tr_y[s:e].tolist(),
                "data": tr_x[s:e], "filenames": names(tr_y[s:e], s)})
        _dump(os.path.join(folder, "test_batch"), {
            "batch_label": "testing batch 1 of 1", "labels": te_y.tolist(), "data": te_x,
            "filenames": names(te_y, 0)})
        _dump(os.path.join(folder, "batches.meta"), {
            "num_cases_per_batch": int(bounds[1] - bounds[0]), "label_names": list(CIFAR10_NAMES),
            "num_vis": 3072})
    else:
        folder = os.path.join(root, "cifar-100-python")
        os.makedirs(folder, exist_ok=True)
        for fname, label, x, y in (("train", "training batch 1 of 1", tr_x, tr_y),
                                   ("test", "testing batch 1 of 1", te_x, te_y)):
            _dump(os.path.join(folder, fname), {
                "filenames": names(y, 0), "batch_label": label, "fine_labels": y.tolist(),
                "coarse_labels": (y % 20).tolist(), "data": x})
        _dump(os.path.join(folder, "meta"), {"fine_label_names": list(CIFAR100_FINE),
                                             "coarse_label_names": list(CIFAR100_COARSE)})
    return root


def write_imagefolder(root, classes: int = 3, per_class: int = 4, size: int = 40,
                      val_per_class: int | None = None, seed: int = 0):
    """Write ``train/<class>/*.JPEG`` (``per_class`` each) and ``val/<class>/*.JPEG``
    (``val_per_class``, default ``per_class``) under ``root``; returns ``root``.

    Class folders are named like ImageNet's (``n00000000``, ...). Images are ``size`` pixels high
    and ``size`` to ``size + 8`` wide (real ImageNet images are not square), and the first training
    image of class 0 is greyscale, as a few ImageNet files are.
    """
    from PIL import Image

    val_per_class = per_class if val_per_class is None else val_per_class
    for split, count, salt in (("train", per_class, 1), ("val", val_per_class, 2)):
        for c in range(classes):
            wnid = f"n{c:08d}"
            folder = os.path.join(root, split, wnid)
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                width = size + 4 * (i % 3)
                img = class_images([c], classes, size, width, seed=seed * 1000003 + salt * 10007 + c * 101 + i)[0]
                pil = Image.fromarray(img, "RGB")
                if split == "train" and c == 0 and i == 0:
                    pil = pil.convert("L")
                pil.save(os.path.join(folder, f"{wnid}_{i:05d}.JPEG"), format="JPEG", quality=90)
    return root
