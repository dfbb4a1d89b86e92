"""Models the package did not write: ``model.arch: torchvision.<name>`` (a classification CNN of
``torchvision.models.list_models()``) or ``model.arch: package.module:factory`` (your own).

The network is built as its authors wrote it (torchvision: ``get_model(name, weights=None,
num_classes=...)``; a factory: called with whichever of ``num_classes``, ``in_channels`` and
``image_size`` it accepts, and must return an ``nn.Module``), then *adopted*: its class becomes a
subclass of both its own class and :class:`~loft_hpc.models.base.GroupedModel`, so its module
names, ``state_dict`` keys and ``forward`` stay exactly the author's, and its filter groups are
derived from its graph (:mod:`loft_hpc.models.derive`) once, at construction, on an input of the
data set's shape. A graph the derivation cannot follow is refused there, in one line naming the
module and the operation, before any collective.
"""
from __future__ import annotations

import importlib
import inspect
import re

import torch
from torch import nn

from loft_hpc.models.base import GroupedModel
from loft_hpc.models.derive import derive
from loft_hpc.models.groups import FilterGroup, check_groups

TORCHVISION = "torchvision."
FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def is_external(arch: str) -> bool:
    return arch.startswith(TORCHVISION) or bool(FACTORY.match(arch))


def arch_problem(arch: str) -> str | None:
    """Why ``arch`` cannot name an external model (None when its form is right)."""
    if arch.startswith(TORCHVISION):
        return None if arch[len(TORCHVISION):] else "torchvision.<name>: the name is missing"
    if ":" in arch and not FACTORY.match(arch):
        return "a factory is written package.module:function"
    return None


class DerivedModel(GroupedModel):
    """Mixed into an adopted network's class: filter groups from its graph."""

    derived_tied: list  # (producers, joins) of the channel spaces kept whole

    def filter_groups(self) -> list[FilterGroup]:
        return list(self.__dict__["_derived_groups"])


def _torchvision(name: str, num_classes: int) -> nn.Module:
    import torchvision

    classification = torchvision.models.list_models(module=torchvision.models)
    if name not in classification:
        close = [m for m in classification if name.split("_")[0] in m][:6]
        raise ValueError(f"torchvision has no classification model {name!r}"
                         + (f" (close: {', '.join(close)})" if close else " (torchvision.models.list_models())"))
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes)


def _factory(path: str, **kw) -> nn.Module:
    mod_name, _, fn_name = path.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise ValueError(f"cannot import {mod_name!r} ({e}); is it on PYTHONPATH on every rank?") from None
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise ValueError(f"{mod_name} has no callable {fn_name!r}")
    params = inspect.signature(fn).parameters
    takes_all = any(p.kind == p.VAR_KEYWORD for p in params.values())
    net = fn(**{k: v for k, v in kw.items() if takes_all or k in params})
    if not isinstance(net, nn.Module):
        raise ValueError(f"{path} returned {type(net).__name__}, not a torch.nn.Module")
    return net


def build_external(arch: str, *, num_classes: int, in_channels: int, image_size: int,
                   partition_rule: str) -> GroupedModel:
    """The adopted network ``arch`` with its derived filter groups (``ValueError``: one line)."""
    if arch.startswith(TORCHVISION):
        if in_channels != 3:
            raise ValueError(f"torchvision's models take 3-channel images; this data set has {in_channels} "
                             "(use data.name=synthetic, cifar10, cifar100 or imagenet, or your own factory)")
        net = _torchvision(arch[len(TORCHVISION):], num_classes)
    else:
        net = _factory(arch, num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    return adopt(net, partition_rule, torch.zeros(1, in_channels, image_size, image_size))


def adopt(net: nn.Module, partition_rule: str, sample: torch.Tensor) -> GroupedModel:
    """``net`` itself, its class now also a :class:`DerivedModel`, its groups derived on ``sample``."""
    base = type(net)
    if not isinstance(net, DerivedModel):
        net.__class__ = type(base.__name__, (DerivedModel, base), {"__module__": base.__module__,
                                                                   "__qualname__": base.__qualname__})
    net.partition_rule = partition_rule
    d = derive(net, sample.to(next(net.parameters()).device), partition_rule)
    if not d.groups:
        raise ValueError(f"{base.__name__}: the derivation found no filter group (every channel is tied, or "
                         "the network has no hidden convolution or linear layer)")
    check_groups(net, d.groups)
    net.__dict__["_derived_groups"] = tuple(d.groups)
    net.__dict__["derived_tied"] = d.tied
    return net
