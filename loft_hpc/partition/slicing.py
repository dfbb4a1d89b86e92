"""Slice a model's tensors by kept channels per filter group, and write slices back.

``TensorSlicer`` is built once per model from its filter groups. For a plan ``keep`` (group name
-> 1-D long tensor of kept channels, sorted) it gives, per tensor, an index per sliced dim:
``extract`` reads ``full[idx0][:, idx1]...`` and ``write_back`` stores a slice into the full tensor
at the same entries. ``subnetwork`` builds a genuinely smaller ``nn.Module`` (fewer channels, not
masked) whose tensors are those slices, with module metadata (``out_channels``...) updated.
"""
from __future__ import annotations

import copy
from collections import defaultdict

import torch
from torch import nn

from loft_hpc.models.groups import FilterGroup, Member

Keep = dict[str, torch.Tensor]


class TensorSlicer:
    def __init__(self, groups: list[FilterGroup]) -> None:
        self.groups = {g.name: g for g in groups}
        # tensor -> [(dim, member, group name)] sorted by dim
        by_tensor: dict[str, list[tuple[int, Member, str]]] = defaultdict(list)
        for g in groups:
            for m in g.members:
                by_tensor[m.tensor].append((m.dim, m, g.name))
        self.by_tensor = {t: sorted(v, key=lambda x: x[0]) for t, v in by_tensor.items()}

    def sliced_tensors(self, keep: Keep) -> list[str]:
        """Tensors that at least one group of ``keep`` slices, in a stable order."""
        return sorted(t for t, v in self.by_tensor.items() if any(g in keep for _, _, g in v))

    def index(self, tensor: str, keep: Keep) -> list[tuple[int, torch.Tensor]]:
        """[(dim, entries)] for ``tensor`` under ``keep`` (only the dims whose group is kept)."""
        return [(d, m.entries(keep[g])) for d, m, g in self.by_tensor.get(tensor, ()) if g in keep]

    @staticmethod
    def _advanced_index(t: torch.Tensor, idx: list[tuple[int, torch.Tensor]]):
        # Broadcast one index per sliced dim so that t[ix] selects the cross product.
        ix: list = [slice(None)] * t.dim()
        n = len(idx)
        for k, (d, e) in enumerate(idx):
            shape = [1] * n
            shape[k] = -1
            ix[d] = e.to(t.device).view(shape)
        if n > 1:
            # Advanced indices on non-adjacent dims move to the front; keep dims adjacent-safe by
            # requiring sliced dims to be leading (true for conv/linear weights: dims 0 and 1).
            dims = [d for d, _ in idx]
            if dims != list(range(n)):
                raise ValueError(f"multi-dim slicing needs leading dims, got {dims}")
        return tuple(ix)

    def extract(self, tensor: str, t: torch.Tensor, keep: Keep) -> torch.Tensor:
        idx = self.index(tensor, keep)
        return t[self._advanced_index(t, idx)].contiguous() if idx else t

    def write_back(self, tensor: str, full: torch.Tensor, part: torch.Tensor, keep: Keep) -> None:
        idx = self.index(tensor, keep)
        if not idx:
            full.copy_(part)
            return
        full[self._advanced_index(full, idx)] = part.to(full.dtype)


def _fix_module_metadata(module: nn.Module) -> None:
    if isinstance(module, nn.modules.conv._ConvNd):
        if module.groups > 1 and module.groups == module.in_channels == module.out_channels:
            module.groups = module.weight.shape[0]  # depthwise: one group per kept channel
        module.out_channels = module.weight.shape[0]
        module.in_channels = module.weight.shape[1] * module.groups
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        module.num_features = module.weight.shape[0] if module.weight is not None else module.running_mean.shape[0]
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape


def subnetwork(model: nn.Module, slicer: TensorSlicer, keep: Keep) -> nn.Module:
    """A copy of ``model`` holding only the ``keep`` channels of each group in ``keep``.

    The copy's parameters are new leaf tensors (the slices); the full model is not modified.
    """
    sub = copy.deepcopy(model)
    modules = dict(sub.named_modules())
    touched = set()
    for tensor in slicer.sliced_tensors(keep):
        mod_name, _, attr = tensor.rpartition(".")
        mod = modules[mod_name]
        old = getattr(mod, attr)
        new = slicer.extract(tensor, old.detach(), keep)
        if attr in mod._parameters:
            mod._parameters[attr] = nn.Parameter(new.clone(), requires_grad=old.requires_grad)
        else:
            mod._buffers[attr] = new.clone()
        touched.add(mod_name)
    for name in touched:
        _fix_module_metadata(modules[name])
    return sub


def zero_channels(model: nn.Module, group: FilterGroup, channels: torch.Tensor) -> None:
    """Set every member entry of ``channels`` to zero in place (BN running_var too: a zeroed
    channel then outputs ``beta = 0``). Used by tests and by structured masks."""
    state = model.state_dict()
    with torch.no_grad():
        for m in group.members:
            t = state[m.tensor]
            t.index_fill_(m.dim, m.entries(channels.to(t.device)), 0)
