"""Models that state their filter groups (see :mod:`loft_hpc.models.groups`)."""
from loft_hpc.models.base import GroupedModel
from loft_hpc.models.groups import FilterGroup
from loft_hpc.models.registry import ARCH_NAMES, build_model

__all__ = ["ARCH_NAMES", "FilterGroup", "GroupedModel", "build_model"]
