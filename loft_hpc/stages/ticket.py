"""Stage ``prune``: find the ticket (masks) for every ratio, one-shot or by IMP.

For each ratio p and n = ``prune.levels``: level k keeps (1-p)^(k/n) of the prunable units,
ranked by the weights of ``mask_from`` (level 1) or of the level k-1 ticket retrained (k > 1).
The ticket file holds the final masks, the rewound weights (init / a pretraining step / end)
with the masks applied, and a sparsity table.
"""
from __future__ import annotations

from pathlib import Path

import torch

from loft_hpc.checkpoint.h5file import CheckpointError, RunFile, check_model_state, read_run_file, write_run_file
from loft_hpc.config import config_to_yaml
from loft_hpc.prune.masks import apply_masks_, sparsity_report, sparsity_rows, validate_masks
from loft_hpc.prune.structured import channel_keep, channels_alive, masks_from_channels
from loft_hpc.prune.unstructured import magnitude_masks
from loft_hpc.stages.common import lr_function, make_model
from loft_hpc.train.dense import DenseTrainer
from loft_hpc.train.engine import Context
from loft_hpc.utils.log import log


def load_weights(path: Path, model, arch: str) -> RunFile:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (run the stage that writes it first)")
    rf = read_run_file(path)
    check_model_state(str(path), rf.model, model, arch, rf.arch)
    return rf


def source_weights(ctx: Context, model) -> dict[str, torch.Tensor]:
    """Weights that rank filters/weights for level 1: end of pretraining or a weight snapshot."""
    cfg, paths = ctx.cfg, ctx.paths
    if cfg.prune.mask_from == "end":
        return load_weights(paths.pretrain, model, cfg.model.arch).model
    return load_weights(paths.weights_snapshot(cfg.prune.mask_from), model, cfg.model.arch).model


def rewind_weights(ctx: Context, model) -> dict[str, torch.Tensor]:
    cfg, paths = ctx.cfg, ctx.paths
    r = cfg.prune.rewind
    if r == "end":
        return load_weights(paths.pretrain, model, cfg.model.arch).model
    pre = load_weights(paths.pretrain, model, cfg.model.arch)
    if r == "init":
        if not pre.init:
            raise CheckpointError(f"{paths.pretrain}: holds no /init weights for prune.rewind=init")
        return pre.init
    label = pre.weight_snapshots.get(r)
    p = paths.weights_snapshot(r)
    if label is None and not p.is_file():
        raise CheckpointError(f"{paths.pretrain}: no weight snapshot at {r} for prune.rewind={r} "
                              f"(it is recorded only when set before pretraining)")
    return load_weights(p, model, cfg.model.arch).model


def next_masks(cfg, model, groups, weights: dict, keep_fraction: float, previous: dict | None) -> dict:
    pr = cfg.prune
    if pr.method == "structured":
        sel = [g for g in groups if g.partitioned or pr.groups == "all"]
        if not sel:
            raise CheckpointError("prune: the model has no partitioned filter group to prune (use prune.groups=all)")
        alive = channels_alive(previous, sel) if previous else None
        keep = channel_keep(weights, sel, keep_fraction, score=pr.score, scope=pr.scope, alive=alive)
        return masks_from_channels(model, sel, keep)
    names = model.prunable_weights()
    kinds = {n: model.layer_kind(n) for n in names}
    return magnitude_masks(weights, names, kinds, 1 - keep_fraction, scope=pr.scope, conv_rate=pr.conv_rate,
                           fc_rate=pr.fc_rate, previous=previous)


def run_prune(ctx: Context, bundle) -> list[Path]:
    cfg, paths, dist = ctx.cfg, ctx.paths, ctx.dist
    pr = cfg.prune
    out = []
    for ratio in pr.ratios:
        target = paths.ticket(pr.mask_from, ratio)
        out.append(target)
        if target.is_file():
            log(f"prune: {target} exists, skipping", rank=dist.rank)
            continue
        model = make_model(cfg, bundle, dist.device)
        groups = model.filter_groups()
        weights = source_weights(ctx, model)
        rewind = rewind_weights(ctx, model)
        masks = None
        for level in range(1, pr.levels + 1):
            keep_fraction = (1 - ratio) ** (level / pr.levels)
            new = next_masks(cfg, model, groups, weights, keep_fraction, masks)
            validate_masks(new, model, previous=masks)
            masks = new
            if level == pr.levels:
                break
            # IMP: retrain the level's ticket from the rewind point, its weights rank the next level
            lvl_path = paths.imp_level(pr.mask_from, ratio, level)
            model.load_state_dict({n: t.to(dist.device) for n, t in rewind.items()})
            if not lvl_path.is_file():
                log(f"prune: ratio {ratio:.0%} IMP level {level}/{pr.levels}: keep {keep_fraction:.3f}, retraining", rank=dist.rank)
                r = cfg.retrain
                DenseTrainer(ctx, model, groups, lr=r.lr, momentum=r.momentum, weight_decay=r.weight_decay,
                             stage="imp", ckpt_stage=lvl_path.stem, final_path=lvl_path, duration=r.duration,
                             lr_fn=lr_function(r), masks=masks,
                             mask_attrs={"ratio": ratio, "level": level}).run()
            weights = load_weights(lvl_path, model, cfg.model.arch).model
        model.load_state_dict({n: t.to(dist.device) for n, t in rewind.items()})
        apply_masks_(model, {n: m.to(dist.device) for n, m in masks.items()})
        table, overall = sparsity_report(masks, model)
        log(f"prune: ticket {target.name}: {pr.method} {pr.scope}, {pr.levels} level(s), rewind {pr.rewind}, "
            f"mask from {pr.mask_from}: pruned {overall:.1%} of the masked tensors\n{table}", rank=dist.rank)
        if dist.is_root:
            rf = RunFile(stage="prune", config_yaml=config_to_yaml(cfg), arch=cfg.model.arch, world_size=dist.size,
                         seed=cfg.train.seed, model={n: t.detach().cpu() for n, t in model.state_dict().items()},
                         progress={"step": 0, "round": 0, "epoch": 0}, masks=masks,
                         mask_attrs={"ratio": ratio, "method": pr.method, "scope": pr.scope, "levels": pr.levels,
                                     "mask_from": pr.mask_from, "rewind": pr.rewind, "pruned_fraction": overall},
                         sparsity=sparsity_rows(masks), complete=True)
            write_run_file(target, rf)
        dist.comm.Barrier()
    return out
