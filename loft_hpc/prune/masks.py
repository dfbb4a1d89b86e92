"""Masks: tensor name -> bool tensor of the parameter's shape (True = kept).

``validate_masks`` is the single gate every mask passes: 0/1 values, names and shapes of the
model, and (between IMP levels) only shrinking.
"""
from __future__ import annotations

import torch
from torch import nn


class MaskError(ValueError):
    pass


def validate_masks(masks: dict[str, torch.Tensor], model: nn.Module, previous: dict | None = None) -> None:
    params = dict(model.named_parameters())
    for n, m in masks.items():
        if n not in params:
            raise MaskError(f"mask {n!r} names no parameter of the model")
        if tuple(m.shape) != tuple(params[n].shape):
            raise MaskError(f"mask {n!r} has shape {tuple(m.shape)}, the parameter has {tuple(params[n].shape)}")
        if m.dtype != torch.bool and not bool(((m == 0) | (m == 1)).all()):
            raise MaskError(f"mask {n!r} holds values other than 0 and 1")
        if previous is not None and n in previous and bool((m.bool() & ~previous[n].bool()).any()):
            raise MaskError(f"mask {n!r} revives weights pruned at an earlier level")
    if previous is not None:
        lost = sorted(set(previous) - set(masks))
        if lost:
            raise MaskError(f"masks {lost[:3]} of the earlier level are missing")


def sparsity_rows(masks: dict[str, torch.Tensor]) -> list[dict]:
    return [{"name": n, "kept": int(m.sum()), "total": m.numel()} for n, m in sorted(masks.items())]


def sparsity_report(masks: dict[str, torch.Tensor], model: nn.Module) -> tuple[str, float]:
    """A per-layer table and the overall pruned fraction of the masked parameters."""
    rows = sparsity_rows(masks)
    kept = sum(r["kept"] for r in rows)
    total = sum(r["total"] for r in rows)
    lines = [f"  {r['name']:<40} kept {r['kept']:>10,} / {r['total']:>10,}  pruned {1 - r['kept'] / r['total']:6.1%}" for r in rows]
    overall = 1 - kept / total if total else 0.0
    all_params = sum(p.numel() for p in model.parameters())
    lines.append(f"  {'overall (masked tensors)':<40} kept {kept:>10,} / {total:>10,}  pruned {overall:6.1%}  "
                 f"(model: {all_params - (total - kept):,} of {all_params:,} weights remain)")
    return "\n".join(lines), overall


def apply_masks_(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, m in masks.items():
            params[n].mul_(m.to(params[n].device, params[n].dtype))
