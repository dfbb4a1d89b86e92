"""Stage ``pretrain``: LoFT (or the dense baseline) from theta_0 to ``pretrain.h5``."""
from __future__ import annotations

from loft_hpc.config.schema import rewind_point
from loft_hpc.stages.common import lr_function, make_model, reuse_existing, stage_identity
from loft_hpc.train.dense import DenseTrainer
from loft_hpc.train.engine import Context
from loft_hpc.train.loft import LoftTrainer
from loft_hpc.utils.log import log


def run_pretrain(ctx: Context, bundle) -> None:
    cfg, paths = ctx.cfg, ctx.paths
    identity = stage_identity(ctx, "pretrain")
    if reuse_existing(ctx, paths.pretrain, identity, "pretrain"):
        return
    model = make_model(cfg, bundle, ctx.dist.device)
    groups = model.filter_groups()
    # theta_0 for the file's /init: only rank 0 writes files, so only rank 0 keeps a copy (a
    # full model's worth of memory the other ranks do not hold)
    init = {n: t.detach().cpu().clone() for n, t in model.state_dict().items()} if ctx.dist.is_root else None
    t = cfg.train
    kw = dict(ckpt_stage="pretrain", final_path=paths.pretrain, duration=t.duration, init=init, identity=identity)
    if t.method == "loft":
        if t.exchange == "alltoall":
            from loft_hpc.train.loft_lean import LeanLoftTrainer

            trainer = LeanLoftTrainer(ctx, model, groups, lr_fn=lr_function(t), **kw)
        else:
            trainer = LoftTrainer(ctx, model, groups, lr_fn=lr_function(t), **kw)
        log(f"pretrain: LoFT-{ctx.dist.size}, K={t.local_steps}, momentum {t.momentum_mode}, "
            f"{sum(g.partitioned for g in groups)}/{len(groups)} filter groups partitioned, exchange {t.exchange} "
            f"over {t.backend}", rank=ctx.dist.rank)
    elif t.method == "gpipe":
        import torch

        from loft_hpc.train.gpipe import GPipeTrainer

        sample = torch.zeros(1, bundle.in_channels, bundle.image_size, bundle.image_size, device=ctx.dist.device)
        trainer = GPipeTrainer(ctx, model, groups, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay,
                               nesterov=t.nesterov, lr_fn=lr_function(t), sample=sample, **kw)
        names = [n for n, _ in trainer.blocks]
        log(f"pretrain: GPipe-{ctx.dist.size}, {t.microbatches} micro-batches of {cfg.data.batch_size // t.microbatches}, "
            f"stages begin at {', '.join(names[lo] for lo, _ in trainer.ranges)}; activation per sample at each cut "
            f"{trainer.boundary}", rank=ctx.dist.rank)
    else:
        trainer = DenseTrainer(ctx, model, groups, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay,
                               nesterov=t.nesterov, lr_fn=lr_function(t, ctx.dist.size), **kw)
        log(f"pretrain: dense data parallel on {ctx.dist.size} rank(s) over {t.backend}", rank=ctx.dist.rank)
    # weights the pruning stage will need later: output.snapshot_weights (the snapshot tickets),
    # the rewind point and mask_from (pretraining only: snapshots/weights@<N>it.h5 are its files)
    for s in [*cfg.output.snapshot_weights, rewind_point(cfg.prune), cfg.prune.mask_from]:
        if s not in ("init", "end"):
            trainer.request_weight_snapshot(s)
    log(f"pretrain: {trainer.total} steps of {trainer.bpe} batches/epoch, {bundle.name}: "
        f"{len(bundle.train)} train / {len(bundle.test)} test samples", rank=ctx.dist.rank)
    trainer.run()
