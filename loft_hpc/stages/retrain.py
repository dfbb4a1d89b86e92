"""Stage ``retrain``: every ticket trained data-parallel with its mask enforced after each step."""
from __future__ import annotations

from loft_hpc.prune.masks import validate_masks
from loft_hpc.stages.common import lr_function, make_model, reuse_existing, stage_identity
from loft_hpc.stages.ticket import load_weights
from loft_hpc.train.dense import DenseTrainer
from loft_hpc.train.engine import Context
from loft_hpc.utils.log import log


def run_retrain(ctx: Context, bundle) -> None:
    cfg, paths, dist = ctx.cfg, ctx.paths, ctx.dist
    r = cfg.retrain
    for ratio in cfg.prune.ratios:
        target = paths.retrain(cfg.prune.mask_from, ratio)
        ticket_path = paths.ticket(cfg.prune.mask_from, ratio)
        identity = stage_identity(ctx, "retrain", [ticket_path])
        if reuse_existing(ctx, target, identity, "retrain"):
            continue
        model = make_model(cfg, bundle, dist.device)
        ticket = load_weights(ticket_path, model, cfg.model.arch)
        validate_masks(ticket.masks, model)
        model.load_state_dict({n: t.to(dist.device) for n, t in ticket.model.items()})
        log(f"retrain: {target.name} from {paths.ticket(cfg.prune.mask_from, ratio).name} "
            f"(pruned {ticket.mask_attrs.get('pruned_fraction', float('nan')):.1%})", rank=dist.rank)
        DenseTrainer(ctx, model, model.filter_groups(), lr=r.lr, momentum=r.momentum, weight_decay=r.weight_decay,
                     stage="retrain", ckpt_stage=target.stem, final_path=target, duration=r.duration,
                     lr_fn=lr_function(r, dist.size), masks=ticket.masks, mask_attrs=ticket.mask_attrs, identity=identity,
                     sparsity=ticket.sparsity).run()
