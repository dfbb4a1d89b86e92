"""Whole-job validation, run on every rank with the world size known, before any collective.

Everything that could otherwise fail after the ranks have started talking is checked here and
reported as one :class:`ConfigError` line: data files, model/partition compatibility, batch
sizes against the samples per rank, and the inputs each requested stage needs.
"""
from __future__ import annotations

from loft_hpc.config import ConfigError, JobConfig


def validate_job(cfg: JobConfig, world: int, stages: list[str]):
    """Returns the data bundle (loaded once here, reused by the stages)."""
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
    n = len(bundle.train) // world if cfg.data.shard else len(bundle.train)
    if cfg.data.batch_size > n:
        raise ConfigError(f"data.batch_size: {cfg.data.batch_size} is larger than the {n} training samples per rank")
    if cfg.prune.method == "structured" and cfg.prune.groups == "partitioned" and not any(g.partitioned for g in groups) \
            and "prune" in stages:
        raise ConfigError("prune.groups=partitioned: the model has no partitioned filter group "
                          "(use prune.groups=all or model.partition_rule=all)")
    paths = RunPaths(cfg.output.dir)
    if "pretrain" not in stages and "prune" in stages and not paths.pretrain.is_file():
        raise ConfigError(f"--stage prune: {paths.pretrain} does not exist (run --stage pretrain with output.dir={cfg.output.dir} first)")
    if "prune" not in stages and "retrain" in stages:
        for r in cfg.prune.ratios:
            t = paths.ticket(cfg.prune.mask_from, r)
            if not t.is_file():
                raise ConfigError(f"--stage retrain: {t} does not exist (run --stage prune first)")
    return bundle
