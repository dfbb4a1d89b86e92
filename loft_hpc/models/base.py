"""Base class of every model: a ``torch.nn.Module`` that states its filter groups."""
from __future__ import annotations

from torch import nn

from loft_hpc.models.groups import FilterGroup


class GroupedModel(nn.Module):
    """A model that knows its filter groups (see :mod:`loft_hpc.models.groups`).

    Subclasses implement :meth:`filter_groups`; :meth:`prunable_weights` and :meth:`layer_kind`
    serve unstructured pruning. The last linear layer is named ``classifier`` in every model. ``partition_rule`` selects which groups LoFT
    partitions: ``"loft"`` (the model's default, for ResNets the paper's rule), ``"all"`` (every
    group) or ``"none"`` (nothing partitioned: LoFT degenerates to local SGD with averaging).
    """

    def __init__(self, partition_rule: str = "loft") -> None:
        super().__init__()
        if partition_rule not in ("loft", "all", "auto", "none"):
            raise ValueError(f"partition_rule must be loft, all (or auto) or none, got {partition_rule!r}")
        self.partition_rule = partition_rule

    def filter_groups(self) -> list[FilterGroup]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _is_partitioned(self, default: bool) -> bool:
        """Apply ``partition_rule`` to a group whose default (rule ``loft``) is ``default``."""
        return {"loft": default, "all": True, "auto": True, "none": False}[self.partition_rule]

    def prunable_weights(self) -> list[str]:
        """``state_dict`` names of every conv and linear weight, in module order."""
        return [f"{n}.weight" for n, m in self.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]

    def layer_kind(self, name: str) -> str:
        """``'conv'`` or ``'fc'`` for a weight name (``'conv1.weight'``) or a module name."""
        modules = dict(self.named_modules())
        mod = modules.get(name)
        if mod is None and name.endswith(".weight"):
            mod = modules.get(name[: -len(".weight")])
        if isinstance(mod, nn.Conv2d):
            return "conv"
        if isinstance(mod, nn.Linear):
            return "fc"
        raise ValueError(f"{name!r} is not a conv or linear layer of {type(self).__name__}")
