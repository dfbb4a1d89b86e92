"""Stage ``snapshots``: the ticket found at every weight snapshot of pretraining, retrained.

"Evaluate snapshots of tickets during training by rewinding & retraining" (the LoFT poster; the
Early-Bird paper's figure 1): for every step of ``output.snapshot_weights`` after step 0, and for
the end of pretraining, the prune and retrain stages run with ``prune.mask_from`` set to that
point, writing ``tickets@<S>_pNN.h5`` / ``retrain@<S>_pNN.h5`` (the end: ``tickets_pNN.h5`` /
``retrain_pNN.h5``, the files of the ordinary prune and retrain stages, reused when they exist)
and each point's summary. ``prune.rewind: mask_from`` restarts every ticket from its own
snapshot, as if pretraining had stopped there; ``loft-tools tickets`` tabulates and plots the
retrained accuracy against the snapshot's epoch. The SLURM template
``slurm/retrain_snapshots_array.sh`` runs the same work as one array task per snapshot.
"""
from __future__ import annotations

import dataclasses

from loft_hpc.config import JobConfig
from loft_hpc.train.engine import Context
from loft_hpc.utils.log import log


def snapshot_points(cfg: JobConfig) -> list[str]:
    """The mask_from points of the stage: the weight snapshots after step 0, then ``end``."""
    return [str(s) for s in cfg.output.snapshot_weights if s.value > 0] + ["end"]


def at_point(cfg: JobConfig, point: str) -> JobConfig:
    """The job config with ``prune.mask_from`` set to ``point``."""
    return dataclasses.replace(cfg, prune=dataclasses.replace(cfg.prune, mask_from=point))


def run_snapshot_tickets(ctx: Context, bundle, end_summary: bool = True) -> bool:
    """Prune and retrain at every point. False when a stop was requested between two points
    (the finished points are written; the job exits for requeue). A point whose weight snapshot
    pretraining never took (it stopped early at the ticket, train.stop_at_ticket) is skipped with a
    line. ``end_summary``: write the end's summary (False when this job's retrain stage just did)."""
    from loft_hpc.checkpoint.h5file import stopped_early_hint, weight_snapshot_labels
    from loft_hpc.stages.retrain import run_retrain
    from loft_hpc.stages.summary import finish_summary
    from loft_hpc.stages.ticket import run_prune

    labels = weight_snapshot_labels(ctx.paths.pretrain)  # every rank reads the same file: same verdict
    points = [p for p in snapshot_points(ctx.cfg) if p == "end" or p in labels]
    for p in snapshot_points(ctx.cfg):
        if p not in points:
            log(f"snapshots: {ctx.paths.pretrain.name} holds no weight snapshot at {p}"
                f"{stopped_early_hint(ctx.paths.pretrain)}: skipped", rank=ctx.dist.rank)
    for i, point in enumerate(points):
        if i and ctx.dist.any_flag(ctx.stop.received is not None):  # collective: every rank, between points
            log("stop requested: the finished snapshot tickets are written; exiting for requeue", rank=ctx.dist.rank)
            return False
        log(f"snapshots: ticket {i + 1}/{len(points)} from {'the end of pretraining' if point == 'end' else 'snapshot ' + point}",
            rank=ctx.dist.rank)
        sub = dataclasses.replace(ctx, cfg=at_point(ctx.cfg, point))
        run_prune(sub, bundle)
        run_retrain(sub, bundle)
        if ctx.dist.is_root and (point != "end" or end_summary):
            finish_summary(ctx.paths, ctx.cfg.prune.ratios, point, ctx.cfg.retrain.controls)
    return True
