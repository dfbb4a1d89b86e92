"""Whole-job validation, run on every rank with the world size known, before any collective.

Everything that could otherwise fail after the ranks have started talking is checked here and
reported as one :class:`ConfigError` line: data files, model/partition compatibility, batch
sizes against the samples per rank, schedule points (learning-rate milestones, rewind and
snapshot steps) against the length of their stage, and the inputs each requested stage needs.
"""
from __future__ import annotations

from loft_hpc.config import ConfigError, JobConfig
from loft_hpc.config.steps import Step
from loft_hpc.config.schema import rewind_point
from loft_hpc.train.stream import batches_per_epoch, samples_per_rank  # the streams' own rule


def pretrain_shards(cfg: JobConfig) -> bool:
    """Whether pretraining splits the training set across ranks: always for the dense
    (data-parallel) baseline, for LoFT only with ``data.shard`` (the paper lets every rank
    iterate the whole set); never for GPipe (one stream of global batches feeds the pipeline).
    Retraining and IMP levels always shard. Mirrors the trainers
    (:class:`loft_hpc.train.dense.DenseTrainer`, :class:`loft_hpc.train.loft.LoftTrainer`,
    :class:`loft_hpc.train.gpipe.GPipeTrainer`)."""
    return cfg.train.method == "dense" or (cfg.data.shard and cfg.train.method == "loft")


def _steps_text(step: Step, bpe: int) -> str:
    return f"{step}" if step.unit == "it" else f"{step} ({step.iterations(bpe)} steps)"


def _check_before_end(key: str, points: list[Step], duration: Step, bpe: int, stage: str, hint: str = "") -> None:
    total = duration.iterations(bpe)
    length = f"{total} steps" + (f" = {duration}" if duration.unit == "ep" else "")
    for p in points:
        if p.iterations(bpe) >= total:
            raise ConfigError(f"{key}: {_steps_text(p, bpe)} is at or beyond the end of {stage} ({length}){hint}")


def check_schedule_points(cfg: JobConfig, n_train: int, world: int, stages: list[str]) -> None:
    """Reject a learning-rate milestone or a rewind/snapshot step at or beyond the end of its stage
    (a milestone there never decays the learning rate; a snapshot there is never written).

    Checked for the stages that use them: ``train.milestones`` and ``output.snapshot_weights``
    with pretraining, ``prune.rewind`` / ``prune.mask_from`` (steps of pretraining) with
    pretraining or pruning, ``retrain.milestones`` with retraining or IMP (``prune.levels`` > 1,
    whose levels are retrained). Milestones count only under ``schedule: multistep``.
    ``n_train`` is the size of the training set; epochs are converted with
    :func:`batches_per_epoch` of each stage.
    """
    bs = cfg.data.batch_size
    t, r, p = cfg.train, cfg.retrain, cfg.prune
    pre_bpe = batches_per_epoch(n_train, bs, world, pretrain_shards(cfg))
    re_bpe = batches_per_epoch(n_train, bs, world, True)  # retraining and IMP levels: data parallel
    if "pretrain" in stages:
        if t.schedule == "multistep":
            _check_before_end("train.milestones", t.milestones, t.duration, pre_bpe, "pretraining")
        _check_before_end("output.snapshot_weights", cfg.output.snapshot_weights, t.duration, pre_bpe, "pretraining",
                          " (the end of pretraining is pretrain.h5 itself)")
        if t.stop_at_ticket:
            total = t.duration.iterations(pre_bpe)
            snap_every = cfg.output.snapshot_every.iterations(pre_bpe)
            every = max(snap_every, t.ticket_every.iterations(pre_bpe))
            # step 0, every `every` steps, the end (0: snapshots at step 0 and at the end only)
            snaps = 1 + (total // every if every > 0 and snap_every > 0 else 1)
            if snaps < t.ticket_window + 2:
                raise ConfigError(f"train.stop_at_ticket: the detection sees {snaps} filter-score snapshot(s) in "
                                  f"pretraining (step 0 and every output.snapshot_every={cfg.output.snapshot_every}, "
                                  f"train.ticket_every={t.ticket_every}) and compares each with the previous "
                                  f"train.ticket_window={t.ticket_window}: it could only fire at the end; lower the "
                                  f"window or train.ticket_every")
    if "pretrain" in stages or "prune" in stages:
        for key, value in (("prune.rewind", rewind_point(p)), ("prune.mask_from", p.mask_from)):
            if value not in ("init", "end") and Step.parse(value).iterations(pre_bpe) == 0:
                hint = f"use {key}=init (theta_0)" if key == "prune.rewind" else \
                    "theta_0 ranks nothing that training found: use a later step or prune.mask_from=end"
                raise ConfigError(f"{key}: {value} is the start of pretraining: {hint}")
            if value not in ("init", "end"):
                _check_before_end(key, [Step.parse(value)], t.duration, pre_bpe, "pretraining",
                                  f" (use {key}=end for the end of pretraining)")
    if ("retrain" in stages or ("prune" in stages and p.levels > 1)) and r.schedule == "multistep":
        _check_before_end("retrain.milestones", r.milestones, r.duration, re_bpe, "retraining")


def check_gpipe(cfg: JobConfig, model, bundle, world: int) -> None:
    """GPipe's own checks: a model with a pipeline layout, at most one stage per block, equal
    micro-batches, cut points that exist and split the blocks in order."""
    import torch

    from loft_hpc.models.pipeline import pipeline_blocks
    from loft_hpc.train.gpipe import resolve_cuts

    t = cfg.train
    try:
        blocks = pipeline_blocks(model)
    except ValueError as e:
        raise ConfigError(f"train.method=gpipe: model.arch={cfg.model.arch}: {e}") from None
    if world < 2:
        raise ConfigError("train.method=gpipe: needs at least 2 ranks (one pipeline stage per rank); on one rank "
                          "use train.method=dense")
    if world > len(blocks):
        raise ConfigError(f"train.method=gpipe: {world} ranks, but {cfg.model.arch} has only {len(blocks)} pipeline "
                          f"blocks (one stage per rank, a residual block is never cut)")
    if cfg.data.batch_size % t.microbatches:
        raise ConfigError(f"train.microbatches={t.microbatches}: data.batch_size={cfg.data.batch_size} is not a "
                          f"multiple of it (GPipe splits every batch into equal micro-batches)")
    if cfg.data.shard:
        raise ConfigError("data.shard: GPipe feeds one stream of global batches to the pipeline (no shards); "
                          "set data.shard=false")
    sample = torch.zeros(1, bundle.in_channels, bundle.image_size, bundle.image_size)
    try:
        resolve_cuts(cfg, blocks, world, sample)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def validate_job(cfg: JobConfig, world: int, stages: list[str]):
    """Returns the data bundle (loaded once here, reused by the stages)."""
    asked = "prune" if "prune" in stages else "snapshots"  # the stage named in messages about inputs
    if "snapshots" in stages:  # it prunes and retrains: every check of those stages applies
        stages = list(stages) + [s for s in ("prune", "retrain") if s not in stages]
    if "pretrain" in stages and cfg.train.workers and cfg.train.workers != world:
        raise ConfigError(f"train.workers={cfg.train.workers}: this config pretrains on {cfg.train.workers} ranks, "
                          f"the job has {world} (start {cfg.train.workers} ranks, or set train.workers={world} or 0 "
                          f"to pretrain {'LoFT-' + str(world) if cfg.train.method == 'loft' else 'on ' + str(world) + ' ranks'})")
    if world > 1 and cfg.train.backend == "horovod":
        from loft_hpc.exchange.backends import horovod_problem

        problem = horovod_problem()
        if problem:
            raise ConfigError(problem)
    if cfg.train.exchange == "alltoall" and "pretrain" in stages and cfg.train.method != "loft":
        raise ConfigError(f"train.exchange=alltoall: LoFT's exchange; train.method={cfg.train.method} has none "
                          f"(set train.exchange=allgather, the default)")
    from loft_hpc.checkpoint.h5file import CheckpointError, stopped_early_hint, weight_snapshot_labels
    from loft_hpc.checkpoint.paths import RunPaths
    from loft_hpc.data import build_datasets, check_data
    from loft_hpc.partition.plan import check_partitionable
    from loft_hpc.stages.common import make_model

    check_data(cfg.data)
    bundle = build_datasets(cfg.data)
    try:
        model = make_model(cfg, bundle)
    except ValueError as e:
        raise ConfigError(f"model.arch={cfg.model.arch}: {e}") from None
    groups = model.filter_groups()
    if cfg.train.method == "loft" and "pretrain" in stages:
        msg = check_partitionable(groups, world)
        if msg:
            raise ConfigError(f"train.method=loft: {msg}")
    if cfg.train.method == "gpipe" and "pretrain" in stages:
        check_gpipe(cfg, model, bundle, world)
    sharded = []
    if "pretrain" in stages:
        sharded.append(("pretraining", pretrain_shards(cfg)))
    if "retrain" in stages or ("prune" in stages and cfg.prune.levels > 1):
        sharded.append(("retraining", True))
    for what, shard in sharded:
        if batches_per_epoch(len(bundle.train), cfg.data.batch_size, world, shard) < 1:
            n = samples_per_rank(len(bundle.train), world, shard)
            raise ConfigError(f"data.batch_size: {cfg.data.batch_size} is larger than the {n} training samples per rank "
                              f"of {what} on {world} ranks")
    if "prune" in stages and cfg.prune.method == "unstructured":
        kinds = {model.layer_kind(n) for n in model.prunable_weights()}
        rates = {"conv": cfg.prune.conv_rate, "fc": cfg.prune.fc_rate}
        prunable = any(rates[k] > 0 for k in kinds) if cfg.prune.scope == "layerwise" else \
            ("conv" in kinds or cfg.prune.fc_rate > 0)  # global: conv layers, fc ones when fc_rate > 0
        if not prunable:
            raise ConfigError(f"prune.conv_rate={cfg.prune.conv_rate}, prune.fc_rate={cfg.prune.fc_rate}: "
                              f"nothing of {cfg.model.arch} ({', '.join(sorted(kinds))} layers) would be pruned")
    check_schedule_points(cfg, len(bundle.train), world, stages)
    if cfg.prune.method == "structured" and cfg.prune.groups == "partitioned" and not any(g.partitioned for g in groups) \
            and "prune" in stages:
        raise ConfigError("prune.groups=partitioned: the model has no partitioned filter group "
                          "(use prune.groups=all or model.partition_rule=all)")
    paths = RunPaths(cfg.output.dir)
    if "pretrain" not in stages and "prune" in stages and not paths.pretrain.is_file():
        raise ConfigError(f"--stage {asked}: {paths.pretrain} does not exist (run --stage pretrain with output.dir={cfg.output.dir} first)")
    if "pretrain" not in stages and "prune" in stages:
        try:
            labels = weight_snapshot_labels(paths.pretrain)
        except CheckpointError as e:
            raise ConfigError(f"--stage {asked}: {e}") from None
        for key, value in (("prune.mask_from", cfg.prune.mask_from), ("prune.rewind", rewind_point(cfg.prune))):
            if value not in ("init", "end") and str(Step.parse(value)) not in labels:
                raise ConfigError(f"{key}={value}: {paths.pretrain} holds no weight snapshot requested at {value} "
                                  f"(it has: {', '.join(sorted(labels)) or 'none'}); snapshots are stored only when "
                                  f"requested before pretraining (prune.rewind, prune.mask_from, output.snapshot_weights)"
                                  f"{stopped_early_hint(paths.pretrain)}")
    if "snapshots" in stages:
        from loft_hpc.stages.snapshot_tickets import snapshot_points

        points = snapshot_points(cfg)[:-1]
        if not points:
            raise ConfigError("--stage snapshots: output.snapshot_weights lists no pretraining step after 0 "
                              "(e.g. output.snapshot_weights=[1ep,2ep,4ep], set before pretraining)")
        if "pretrain" not in stages:
            if not paths.pretrain.is_file():
                raise ConfigError(f"--stage snapshots: {paths.pretrain} does not exist (run --stage pretrain with "
                                  f"output.dir={cfg.output.dir} first)")
            try:
                labels = weight_snapshot_labels(paths.pretrain)
            except CheckpointError as e:
                raise ConfigError(f"--stage snapshots: {e}") from None
            missing = [p for p in points if p not in labels]
            if missing:
                raise ConfigError(f"--stage snapshots: {paths.pretrain} holds no weight snapshot at {', '.join(missing)} "
                                  f"(it has: {', '.join(sorted(labels)) or 'none'}; output.snapshot_weights must be "
                                  f"set before pretraining){stopped_early_hint(paths.pretrain)}")
    if "prune" not in stages and "retrain" in stages:
        for r in cfg.prune.ratios:
            t = paths.ticket(cfg.prune.mask_from, r)
            if not t.is_file():
                raise ConfigError(f"--stage retrain: {t} does not exist (run --stage prune first)")
        if "random_prune" in cfg.retrain.controls and not paths.pretrain.is_file():
            raise ConfigError(f"retrain.controls=random_prune: {paths.pretrain} does not exist (the control starts "
                              f"from the ticket's unmasked rewound weights, read from it)")
    return bundle
