"""Stage ``pretrain``: LoFT (or the dense baseline) from theta_0 to ``pretrain.h5``."""
from __future__ import annotations

from loft_hpc.config.steps import Step
from loft_hpc.stages.common import lr_function, make_model
from loft_hpc.train.dense import DenseTrainer
from loft_hpc.train.engine import Context
from loft_hpc.train.loft import LoftTrainer
from loft_hpc.utils.log import log


def run_pretrain(ctx: Context, bundle) -> None:
    cfg, paths = ctx.cfg, ctx.paths
    if paths.pretrain.is_file():
        log(f"pretrain: {paths.pretrain} exists, skipping (delete it to pretrain again)", rank=ctx.dist.rank)
        return
    model = make_model(cfg, bundle, ctx.dist.device)
    groups = model.filter_groups()
    init = {n: t.detach().cpu().clone() for n, t in model.state_dict().items()}
    t = cfg.train
    kw = dict(ckpt_stage="pretrain", final_path=paths.pretrain, duration=t.duration, lr_fn=lr_function(t), init=init)
    if t.method == "loft":
        trainer = LoftTrainer(ctx, model, groups, **kw)
        log(f"pretrain: LoFT-{ctx.dist.size}, K={t.local_steps}, momentum {t.momentum_mode}, "
            f"{sum(g.partitioned for g in groups)}/{len(groups)} filter groups partitioned", rank=ctx.dist.rank)
    else:
        trainer = DenseTrainer(ctx, model, groups, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay,
                               nesterov=t.nesterov, **kw)
        log(f"pretrain: dense data parallel on {ctx.dist.size} rank(s)", rank=ctx.dist.rank)
    # weights the pruning stage will need later: the rewind point and the snapshot tickets
    for s in [cfg.prune.rewind, cfg.prune.mask_from]:
        if s not in ("init", "end"):
            st = Step.parse(s)
            trainer.weight_steps.setdefault(st.iterations(trainer.bpe), str(st))
    log(f"pretrain: {trainer.total} steps of {trainer.bpe} batches/epoch, {bundle.name}: "
        f"{len(bundle.train)} train / {len(bundle.test)} test samples", rank=ctx.dist.rank)
    trainer.run()
