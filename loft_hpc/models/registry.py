"""Build a model by name from a :class:`~loft_hpc.config.schema.ModelConfig`.

``width`` is the first stage's channels for the ResNets (64 in the LoFT paper, 16 for
``resnet18_lth``) and the size relative to 64 for the LTH models (64 = the paper's size). ``stem``
and ``inner_width_factor`` apply to the ResNets only; for the other archs ``stem`` must be ``auto``
or ``cifar`` (they have no downsampling stem) and ``inner_width_factor`` 1.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from loft_hpc.models.base import GroupedModel
from loft_hpc.models.lth import VGG19, ConvNet, LeNet300100
from loft_hpc.models.preresnet import preresnet18, preresnet34
from loft_hpc.models.resnet import resnet18_lth, resnet34

if TYPE_CHECKING:
    from loft_hpc.config.schema import ModelConfig

ARCH_NAMES = ("preresnet18", "preresnet34", "resnet34", "resnet18_lth", "lenet300_100", "conv2", "conv4", "conv6", "vgg19")

_RESNETS = {"preresnet18": preresnet18, "preresnet34": preresnet34, "resnet34": resnet34, "resnet18_lth": resnet18_lth}


def _lth(arch: str, **kw) -> GroupedModel:
    if arch == "lenet300_100":
        return LeNet300100(**kw)
    if arch == "vgg19":
        return VGG19(**kw)
    return ConvNet(int(arch[-1]) // 2, **kw)


def build_model(cfg: "ModelConfig", *, num_classes: int, in_channels: int, image_size: int, dataset: str) -> GroupedModel:
    """The model ``cfg.arch`` for ``in_channels`` x ``image_size`` x ``image_size`` inputs and
    ``num_classes`` outputs. ``stem='auto'`` means the imagenet stem iff ``dataset == 'imagenet'``.
    Raises ``ValueError`` for an unknown arch or an impossible combination."""
    from loft_hpc.models.external import arch_problem, build_external, is_external

    if cfg.arch not in ARCH_NAMES and not is_external(cfg.arch):
        raise ValueError(f"unknown arch {cfg.arch!r}; choose one of {', '.join(ARCH_NAMES)}, torchvision.<name> or "
                         "package.module:factory" + (f" ({arch_problem(cfg.arch)})" if arch_problem(cfg.arch) else ""))
    if is_external(cfg.arch):  # model.width, inner_width_factor and stem do not apply (run.py says so)
        return build_external(cfg.arch, num_classes=num_classes, in_channels=in_channels, image_size=image_size,
                              partition_rule=cfg.partition_rule)
    for what, v in (("num_classes", num_classes), ("in_channels", in_channels), ("image_size", image_size), ("width", cfg.width)):
        if v < 1:
            raise ValueError(f"{cfg.arch}: {what} must be >= 1, got {v}")
    common = dict(in_channels=in_channels, num_classes=num_classes, width=cfg.width, partition_rule=cfg.partition_rule)
    if cfg.arch in _RESNETS:
        stem = cfg.stem if cfg.stem != "auto" else ("imagenet" if dataset == "imagenet" else "cifar")
        return _RESNETS[cfg.arch](stem=stem, inner_width_factor=cfg.inner_width_factor, **common)
    if cfg.stem == "imagenet":
        raise ValueError(f"{cfg.arch} has no stem to choose: model.stem must be auto or cifar, got imagenet")
    if cfg.inner_width_factor != 1:
        raise ValueError(f"{cfg.arch}: inner_width_factor applies to ResNets only, got {cfg.inner_width_factor}")
    return _lth(cfg.arch, image_size=image_size, **common)
