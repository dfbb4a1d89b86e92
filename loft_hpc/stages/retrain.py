"""Stage ``retrain``: every ticket trained data-parallel with its mask enforced after each step,
then each of its controls (``retrain.controls``, :mod:`loft_hpc.prune.controls`) with the same
budget, each into its own file (``RunPaths.control``). A control file stores its starting weights
as ``/init`` and its control kind in its identity and in the ``/masks`` attribute ``control``."""
from __future__ import annotations

from pathlib import Path

import torch

from loft_hpc.checkpoint.h5file import CheckpointError, read_run_file, weight_snapshot_labels
from loft_hpc.config.steps import Step
from loft_hpc.prune.controls import control_seed, random_prune_masks, reinit_state
from loft_hpc.prune.masks import sparsity_report, sparsity_rows, validate_masks
from loft_hpc.stages.common import lr_function, make_model, reuse_existing, stage_identity
from loft_hpc.stages.ticket import load_weights
from loft_hpc.train.dense import DenseTrainer
from loft_hpc.train.engine import Context
from loft_hpc.utils.log import log
from loft_hpc.utils.seeding import generator


def _trainer(ctx: Context, model, target: Path, **kw) -> DenseTrainer:
    r, dist = ctx.cfg.retrain, ctx.dist
    return DenseTrainer(ctx, model, model.filter_groups(), lr=r.lr, momentum=r.momentum, weight_decay=r.weight_decay,
                        stage="retrain", ckpt_stage=target.stem, final_path=target, duration=r.duration,
                        lr_fn=lr_function(r, dist.size), **kw)


def run_retrain(ctx: Context, bundle) -> None:
    cfg, paths, dist = ctx.cfg, ctx.paths, ctx.dist
    for ratio in cfg.prune.ratios:
        target = paths.retrain(cfg.prune.mask_from, ratio)
        ticket_path = paths.ticket(cfg.prune.mask_from, ratio)
        identity = stage_identity(ctx, "retrain", [ticket_path])
        if not reuse_existing(ctx, target, identity, "retrain"):
            model = make_model(cfg, bundle, dist.device)
            ticket = load_weights(ticket_path, model, cfg.model.arch)
            validate_masks(ticket.masks, model)
            model.load_state_dict({n: t.to(dist.device) for n, t in ticket.model.items()})
            log(f"retrain: {target.name} from {ticket_path.name} "
                f"(pruned {ticket.mask_attrs.get('pruned_fraction', float('nan')):.1%})", rank=dist.rank)
            _trainer(ctx, model, target, masks=ticket.masks, mask_attrs=ticket.mask_attrs, identity=identity,
                     sparsity=ticket.sparsity).run()
        for kind in cfg.retrain.controls:
            retrain_control(ctx, bundle, kind, ratio)


def _rewind_point(attrs: dict, cfg) -> str:
    """The pretraining point the ticket's weights were rewound to (its own record first)."""
    point = str(attrs.get("rewind", cfg.prune.rewind))
    return str(attrs.get("mask_from", cfg.prune.mask_from)) if point == "mask_from" else point


def _rewind_file(ctx: Context, ticket_path: Path) -> tuple[str, Path]:
    """(rewind point, the file holding the ticket's unmasked rewound weights), decided by rank 0
    from the ticket's record and pretrain.h5's snapshot map; every rank gets the same answer."""
    paths, answer = ctx.paths, (None, None, None)
    if ctx.dist.is_root:
        try:
            if not ticket_path.is_file():
                raise CheckpointError(f"{ticket_path}: missing (run the stage that writes it first)")
            point = _rewind_point(read_run_file(ticket_path).mask_attrs, ctx.cfg)
            if not paths.pretrain.is_file():
                raise CheckpointError(f"retrain.controls=random_prune: {paths.pretrain} is missing: the control "
                                      f"starts from the ticket's unmasked weights at prune.rewind={point}")
            if point in ("init", "end"):
                answer = (point, paths.pretrain, None)
            else:
                rel = weight_snapshot_labels(paths.pretrain).get(str(Step.parse(point)))
                if rel is None:
                    raise CheckpointError(f"retrain.controls=random_prune: {paths.pretrain} holds no weight snapshot "
                                          f"at {point}, the rewind point of {ticket_path.name}")
                answer = (point, paths.root / rel, None)
        except (CheckpointError, ValueError) as e:
            answer = (None, None, str(e))
    point, path, err = ctx.dist.comm.bcast(answer, root=0)  # control message: every rank at the same point
    if err:
        raise CheckpointError(err, agreed=True)
    return point, path


def _rewound_weights(point: str, path: Path, ticket) -> dict[str, torch.Tensor]:
    """The unmasked rewound weights, checked against the ticket (which holds them masked)."""
    rf = read_run_file(path)
    weights = rf.init if point == "init" else rf.model
    if not weights:
        raise CheckpointError(f"{path}: holds no /init weights for prune.rewind=init", agreed=True)
    for n, t in ticket.model.items():
        want = weights.get(n)
        if want is not None and n in ticket.masks:
            want = want * ticket.masks[n].to(want.dtype)
        if want is None or not torch.equal(want, t):
            raise CheckpointError(f"{path.name} at prune.rewind={point} is not what the ticket was rewound to ({n} "
                                  f"differs): was pretraining run again after pruning? Prune again (--stage prune)",
                                  agreed=True)  # the same files compared on every rank
    return weights


def retrain_control(ctx: Context, bundle, kind: str, ratio: float) -> None:
    """Retrain one control of the ticket of ``ratio`` into ``paths.control(kind, ...)``: skipped
    when that file exists with this identity, resumed from its own checkpoints."""
    cfg, paths, dist = ctx.cfg, ctx.paths, ctx.dist
    mask_from = cfg.prune.mask_from
    target = paths.control(kind, mask_from, ratio)
    ticket_path = paths.ticket(mask_from, ratio)
    inputs = [ticket_path]
    if kind == "random_prune":
        point, rewind_path = _rewind_file(ctx, ticket_path)
        inputs = list(dict.fromkeys([ticket_path, rewind_path]))
    identity = stage_identity(ctx, f"retrain-{kind}", inputs)
    if reuse_existing(ctx, target, identity, f"retrain {kind}"):
        return
    model = make_model(cfg, bundle)  # on the CPU: the control is drawn there, identically on every rank
    ticket = load_weights(ticket_path, model, cfg.model.arch)
    validate_masks(ticket.masks, model)
    masks = {n: m.bool().cpu() for n, m in ticket.masks.items()}
    seed = control_seed(cfg.train.seed, kind, ratio, mask_from)
    if kind == "random_reinit":
        start = reinit_state(cfg, bundle, ratio, masks)
    else:
        weights = _rewound_weights(point, rewind_path, ticket)
        method = str(ticket.mask_attrs.get("method", cfg.prune.method))
        try:
            masks = random_prune_masks(masks, model, model.filter_groups(), method, generator(seed))
        except ValueError as e:
            raise CheckpointError(f"retrain.controls=random_prune: {ticket_path.name}: {e}", agreed=True) from None
        validate_masks(masks, model)
        start = {n: w * masks[n].to(w.dtype) if n in masks else w.clone() for n, w in weights.items()}
    model.load_state_dict(start)
    _, pruned = sparsity_report(masks, model)
    model = model.to(dist.device)
    attrs = dict(ticket.mask_attrs, control=kind, control_seed=seed, pruned_fraction=pruned)
    log(f"retrain: {target.name}: control {kind} of {ticket_path.name} (pruned {pruned:.1%})", rank=dist.rank)
    _trainer(ctx, model, target, masks=masks, mask_attrs=attrs, identity=identity, sparsity=sparsity_rows(masks),
             init=start).run()
