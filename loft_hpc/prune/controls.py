"""The controls of a ticket (the LTH paper's controls, open_lth's ``randomly_reinitialize`` and
``randomly_prune`` branches), retrained beside the ticket with the same budget (``retrain.controls``).

- ``random_reinit``: the ticket's masks on weights freshly initialised from another seed (the whole
  model, parameters and buffers, built as theta_0 is but from ``control_seed``), masks applied.
  Same mask, other weights: does the ticket need *its* weights?
- ``random_prune``: a random mask with the ticket's per-layer sparsity, applied to the ticket's
  own rewound weights (the full weights of the rewind point, not the ticket's masked copy). Same
  weights and sparsity, other mask: does the ticket need *its* mask?
  Structured ticket: in every filter group the ticket pruned, the same number of kept filters,
  chosen at random, turned into masks by :func:`masks_from_channels`; every masked tensor then
  keeps as many entries as the ticket's. Unstructured: per masked tensor, the same number of kept
  entries at random positions.

Each control is a pure function of (train.seed, control, ratio, mask_from) and the ticket:
:func:`control_seed` seeds a CPU generator, so every rank draws the same control without
communicating and a rerun draws it again.
"""
from __future__ import annotations

import torch

from loft_hpc.config.schema import CONTROLS
from loft_hpc.models.groups import FilterGroup
from loft_hpc.prune.masks import apply_masks_
from loft_hpc.prune.structured import channels_alive, masks_from_channels
from loft_hpc.utils.seeding import derive_seed

__all__ = ["CONTROLS", "control_seed", "reinit_state", "random_prune_masks"]


def control_seed(seed: int, kind: str, ratio: float, mask_from: str) -> int:
    """The seed of one control of one ticket (63 bits)."""
    if kind not in CONTROLS:
        raise ValueError(f"unknown control {kind!r} (one of {', '.join(CONTROLS)})")
    return derive_seed(seed, kind, float(ratio), str(mask_from))


def reinit_state(cfg, bundle, ratio: float, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """random_reinit's starting weights: a fresh model (every parameter and buffer) initialised
    under ``control_seed(train.seed, 'random_reinit', ratio, prune.mask_from)`` on the CPU, with
    the ticket's ``masks`` applied. The global generators are left as they were."""
    from loft_hpc.models import build_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(control_seed(cfg.train.seed, "random_reinit", ratio, cfg.prune.mask_from))
        model = build_model(cfg.model, num_classes=bundle.num_classes, in_channels=bundle.in_channels,
                            image_size=bundle.image_size, dataset=cfg.data.name)
    apply_masks_(model, masks)
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def pruned_channels(masks: dict[str, torch.Tensor], groups: list[FilterGroup]) -> dict[str, torch.Tensor]:
    """The channels kept in each filter group a structured ticket pruned (groups whose producer
    is masked and lost at least one channel), as bool per group."""
    out = {}
    for g in groups:
        if g.producer in masks:
            alive = channels_alive({g.producer: masks[g.producer].bool()}, [g])[g.name].cpu()
            if not bool(alive.all()):
                out[g.name] = alive
    return out


def _on_ticket_keys(ticket: dict[str, torch.Tensor], new: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``new`` on the ticket's set of masked tensors (all-kept where ``new`` has none)."""
    extra = sorted(set(new) - set(ticket))
    if extra:
        raise ValueError(f"the random masks name {extra[0]!r}, which the ticket does not mask")
    return {n: new[n].bool().cpu() if n in new else torch.ones(m.shape, dtype=torch.bool) for n, m in ticket.items()}


def random_prune_masks(ticket: dict[str, torch.Tensor], model: torch.nn.Module, groups: list[FilterGroup],
                       method: str, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A random mask with the per-layer sparsity of the ticket's masks ``ticket`` (bool per
    tensor, CPU), drawn from ``gen``; the same set of tensors as the ticket's.

    ``structured``: the ticket's pruned groups are read back from its masks (their producers'
    rows that are entirely masked) and must rebuild them exactly; each keeps the same number of
    channels at random. ``unstructured``: each tensor keeps the same number of entries at random."""
    ticket = {n: m.bool().cpu() for n, m in ticket.items()}
    if method == "structured":
        by_name = {g.name: g for g in groups}
        alive = pruned_channels(ticket, groups)
        sel = [by_name[n] for n in alive]
        rebuilt = _on_ticket_keys(ticket, masks_from_channels(model, sel, alive))
        bad = [n for n in ticket if not torch.equal(rebuilt[n], ticket[n])]
        if bad:
            raise ValueError(f"the ticket's mask of {bad[0]!r} is not made of whole filter channels of the model's "
                             f"groups (prune.method=structured expected)")
        keep = {}
        for g in sel:  # the model's group order: the same draws on every rank and every run
            k = int(alive[g.name].sum())
            chosen = torch.zeros(g.size, dtype=torch.bool)
            chosen[torch.randperm(g.size, generator=gen)[:k]] = True
            keep[g.name] = chosen
        return _on_ticket_keys(ticket, masks_from_channels(model, sel, keep))
    if method != "unstructured":
        raise ValueError(f"unknown pruning method {method!r}")
    out = {}
    for n in sorted(ticket):
        m = ticket[n]
        flat = torch.zeros(m.numel(), dtype=torch.bool)
        flat[torch.randperm(m.numel(), generator=gen)[:int(m.sum())]] = True
        out[n] = flat.view(m.shape)
    return out
