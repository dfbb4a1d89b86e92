"""Stage ``prune``: find the ticket (masks) for every ratio, one-shot or by IMP.

For each ratio p and n = ``prune.levels``: level k keeps (1-p)^(k/n) of the prunable units,
ranked by the weights of ``mask_from`` (level 1) or of the level k-1 ticket retrained (k > 1).
The ticket file holds the final masks, the rewound weights (init / a pretraining step / end)
with the masks applied, and a sparsity table.
"""
from __future__ import annotations

from pathlib import Path

import torch

from loft_hpc.checkpoint.h5file import (CheckpointError, RunFile, check_model_state, read_run_file, stopped_early_hint,
                                        write_run_file)
from loft_hpc.config import config_to_yaml
from loft_hpc.prune.masks import apply_masks_, sparsity_report, sparsity_rows, validate_masks
from loft_hpc.prune.structured import channel_keep, channels_alive, masks_from_channels
from loft_hpc.prune.unstructured import magnitude_masks
from loft_hpc.config.schema import rewind_point
from loft_hpc.config.steps import Step
from loft_hpc.stages.common import lr_function, make_model, reuse_existing, stage_identity
from loft_hpc.train.dense import DenseTrainer
from loft_hpc.train.engine import Context
from loft_hpc.utils.log import log


def load_weights(path: Path, model, arch: str) -> RunFile:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (run the stage that writes it first)")
    rf = read_run_file(path)
    check_model_state(str(path), rf.model, model, arch, rf.arch)
    return rf


def weights_at(ctx: Context, pre: RunFile, point: str, key: str) -> tuple[dict[str, torch.Tensor], Path, int]:
    """Weights of pretraining at ``point`` ('end', 'init' or a step label of a weight snapshot):
    (weights, the file they come from, the step at which they were actually taken)."""
    paths = ctx.paths
    if point == "end":
        return pre.model, paths.pretrain, int(pre.progress.get("step", 0))
    if point == "init":
        if not pre.init:
            raise CheckpointError(f"{paths.pretrain}: holds no /init weights for {key}=init", agreed=True)
        return pre.init, paths.pretrain, 0
    label = str(Step.parse(point))
    rel = pre.weight_snapshots.get(label)
    if rel is None:
        raise CheckpointError(f"{paths.pretrain}: no weight snapshot for {key}={point} (snapshots: "
                              f"{', '.join(sorted(pre.weight_snapshots)) or 'none'}; a snapshot is stored only when "
                              f"requested before pretraining, by prune.rewind, prune.mask_from or output.snapshot_weights)"
                              f"{stopped_early_hint(paths.pretrain)}", agreed=True)  # every rank reads the same file
    p = paths.root / rel
    rf = read_run_file(p)
    return rf.model, p, int(rf.progress.get("step", -1))


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
    pr, r = cfg.prune, cfg.retrain
    probe = make_model(cfg, bundle)
    pre = load_weights(paths.pretrain, probe, cfg.model.arch)
    source, source_path, source_step = weights_at(ctx, pre, pr.mask_from, "prune.mask_from")
    rewind, rewind_path, rewind_step = weights_at(ctx, pre, rewind_point(pr), "prune.rewind")
    for point, step in dict.fromkeys([(pr.mask_from, source_step), (rewind_point(pr), rewind_step)]):
        if point not in ("init", "end") and Step.parse(point).iterations(int(pre.progress["batches_per_epoch"])) != step:
            log(f"prune: the snapshot requested at {point} was taken at step {step} (the first round boundary "
                f"at or after it): its weights are used", rank=dist.rank)
    inputs = list(dict.fromkeys([paths.pretrain, source_path, rewind_path]))
    identity = stage_identity(ctx, "ticket" if pr.levels == 1 else "ticket-imp", inputs)
    out = []
    for ratio in pr.ratios:
        target = paths.ticket(pr.mask_from, ratio)
        out.append(target)
        if reuse_existing(ctx, target, identity, "prune"):
            continue
        model = make_model(cfg, bundle, dist.device)
        groups = model.filter_groups()
        weights = source
        masks = None
        previous_level: list[Path] = []
        for level in range(1, pr.levels + 1):
            keep_fraction = (1 - ratio) ** (level / pr.levels)
            new = next_masks(cfg, model, groups, weights, keep_fraction, masks)
            validate_masks(new, model, previous=masks)
            masks = new
            if level == pr.levels:
                break
            # IMP: retrain the level's ticket from the rewind point, its weights rank the next level.
            # Each level trains a fresh model with a fresh optimizer: no gradient hooks of an earlier
            # level's DistributedOptimizer remain on the parameters it trains.
            lvl_path = paths.imp_level(pr.mask_from, ratio, level)
            lvl_identity = stage_identity(ctx, "imp", inputs + previous_level)
            if not reuse_existing(ctx, lvl_path, lvl_identity, f"prune IMP level {level}"):
                log(f"prune: ratio {ratio:.0%} IMP level {level}/{pr.levels}: keep {keep_fraction:.3f}, retraining", rank=dist.rank)
                lvl_model = make_model(cfg, bundle, dist.device)
                lvl_model.load_state_dict({n: t.to(dist.device) for n, t in rewind.items()})
                DenseTrainer(ctx, lvl_model, groups, lr=r.lr, momentum=r.momentum, weight_decay=r.weight_decay,
                             stage="imp", ckpt_stage=lvl_path.stem, final_path=lvl_path, duration=r.duration,
                             lr_fn=lr_function(r, dist.size), masks=masks, identity=lvl_identity,
                             mask_attrs={"ratio": ratio, "level": level}).run()
                del lvl_model
            weights = load_weights(lvl_path, model, cfg.model.arch).model
            previous_level = [lvl_path]
        model.load_state_dict({n: t.to(dist.device) for n, t in rewind.items()})
        apply_masks_(model, {n: m.to(dist.device) for n, m in masks.items()})
        table, overall = sparsity_report(masks, model)
        log(f"prune: ticket {target.name}: {pr.method} {pr.scope}, {pr.levels} level(s), rewind {pr.rewind} "
            f"(step {rewind_step}), mask from {pr.mask_from} (step {source_step}): pruned {overall:.1%} of the "
            f"masked tensors\n{table}", rank=dist.rank)
        if dist.is_root:
            rf = RunFile(stage="prune", config_yaml=config_to_yaml(cfg), arch=cfg.model.arch, world_size=dist.size,
                         seed=cfg.train.seed, model={n: t.detach().cpu() for n, t in model.state_dict().items()},
                         progress={"step": 0, "round": 0, "epoch": 0}, masks=masks, identity=identity,
                         mask_attrs={"ratio": ratio, "method": pr.method, "scope": pr.scope, "levels": pr.levels,
                                     "mask_from": pr.mask_from, "mask_from_step": source_step, "rewind": pr.rewind,
                                     "rewind_step": rewind_step, "pruned_fraction": overall},
                         sparsity=sparsity_rows(masks), complete=True)
            write_run_file(target, rf)
        dist.comm.Barrier()
    return out
