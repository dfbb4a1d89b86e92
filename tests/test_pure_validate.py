"""The pure part of whole-job validation (loft_hpc/validate.py: samples and batches per rank, which
stages shard, schedule points against the end of their stage), with step counts worked out by
hand in the comments and each message exactly as written, single process (part of the
mutation-testing selection, ``make mutation``)."""
from __future__ import annotations

import pytest

from loft_hpc.config import ConfigError, Step, config_from_dict
from loft_hpc.validate import (_check_before_end, _steps_text, batches_per_epoch, check_schedule_points,
                               pretrain_shards, samples_per_rank)


@pytest.mark.parametrize("n, world, shard, want", [
    (1000, 4, True, 250), (1001, 4, True, 250), (1003, 4, True, 250), (1000, 4, False, 1000),
    (7, 8, True, 0), (7, 1, True, 7), (1348, 3, False, 1348), (1348, 3, True, 449),
])
def test_samples_per_rank(n, world, shard, want):
    assert samples_per_rank(n, world, shard) == want


@pytest.mark.parametrize("n, batch, world, shard, want", [
    (1000, 100, 1, False, 10), (1000, 100, 4, False, 10), (1000, 100, 4, True, 2),   # 250 // 100
    (1000, 50, 4, True, 5), (1000, 33, 1, False, 30), (99, 100, 1, False, 0), (1348, 64, 2, True, 10),
])
def test_batches_per_epoch(n, batch, world, shard, want):
    assert batches_per_epoch(n, batch, world, shard) == want


def test_pretrain_shards():
    assert pretrain_shards(config_from_dict({}, ["train.method=dense"])) is True
    assert pretrain_shards(config_from_dict({}, ["train.method=dense", "data.shard=true"])) is True
    assert pretrain_shards(config_from_dict({}, ["train.method=loft"])) is False
    assert pretrain_shards(config_from_dict({}, ["train.method=loft", "data.shard=true"])) is True


def test_steps_text():
    assert _steps_text(Step(30, "it"), 7) == "30it"
    assert _steps_text(Step(3, "ep"), 7) == "3ep (21 steps)"
    assert _steps_text(Step(0, "ep"), 7) == "0ep (0 steps)"


def test_check_before_end_messages():
    _check_before_end("k", [Step(9, "it"), Step(1, "ep")], Step(2, "ep"), 5, "pretraining")   # 9 < 10, 5 < 10
    _check_before_end("k", [], Step(0, "it"), 5, "pretraining")
    with pytest.raises(ConfigError) as e:
        _check_before_end("k", [Step(9, "it"), Step(10, "it")], Step(2, "ep"), 5, "pretraining")
    assert str(e.value) == "k: 10it is at or beyond the end of pretraining (10 steps = 2ep)"
    with pytest.raises(ConfigError) as e:
        _check_before_end("k", [Step(3, "ep")], Step(12, "it"), 5, "retraining", " (a hint)")
    assert str(e.value) == "k: 3ep (15 steps) is at or beyond the end of retraining (12 steps) (a hint)"
    with pytest.raises(ConfigError) as e:   # exactly at the end is refused too
        _check_before_end("k", [Step(12, "it")], Step(12, "it"), 5, "retraining")
    assert str(e.value) == "k: 12it is at or beyond the end of retraining (12 steps)"


def points(overrides, n=1000, world=1, stages=("pretrain", "prune", "retrain")):
    check_schedule_points(config_from_dict({}, ["data.batch_size=100", *overrides]), n, world, list(stages))


def points_err(overrides, n=1000, world=1, stages=("pretrain", "prune", "retrain")) -> str:
    with pytest.raises(ConfigError) as e:
        points(overrides, n, world, stages)
    return str(e.value)


# 1,000 samples, batch 100: 10 batches per epoch on one rank
def test_pretraining_milestones_only_under_multistep():
    assert points_err(["train.schedule=multistep", "train.duration=2ep", "train.milestones=[1ep, 20it]"],
                      stages=["pretrain"]) == \
        "train.milestones: 20it is at or beyond the end of pretraining (20 steps = 2ep)"
    points(["train.schedule=multistep", "train.duration=2ep", "train.milestones=[1ep, 19it]"], stages=["pretrain"])
    points(["train.schedule=cosine", "train.duration=2ep", "train.milestones=[5ep]"], stages=["pretrain"])
    points(["train.schedule=multistep", "train.duration=2ep", "train.milestones=[5ep]"], stages=["prune", "retrain"])


def test_snapshot_weights_with_pretraining_only():
    assert points_err(["train.duration=30it", "output.snapshot_weights=[3ep]"], stages=["pretrain"]) == (
        "output.snapshot_weights: 3ep (30 steps) is at or beyond the end of pretraining (30 steps) "
        "(the end of pretraining is pretrain.h5 itself)")
    points(["train.duration=30it", "output.snapshot_weights=[3ep]"], stages=["prune", "retrain"])


@pytest.mark.parametrize("stages", [["pretrain"], ["prune"], ["pretrain", "prune", "retrain"]])
def test_rewind_and_mask_from_with_pretraining_or_pruning(stages):
    assert points_err(["train.duration=3ep", "prune.rewind=30it"], stages=stages) == (
        "prune.rewind: 30it is at or beyond the end of pretraining (30 steps = 3ep) "
        "(use prune.rewind=end for the end of pretraining)")
    assert points_err(["prune.rewind=0ep"], stages=stages) == (
        "prune.rewind: 0ep is the start of pretraining: use prune.rewind=init (theta_0)")
    assert points_err(["output.snapshot_weights=[0it]", "prune.mask_from=0it"], stages=stages) == (
        "prune.mask_from: 0it is the start of pretraining: theta_0 ranks nothing that training found: "
        "use a later step or prune.mask_from=end")
    points(["train.duration=3ep", "prune.rewind=29it", "output.snapshot_weights=[2ep]", "prune.mask_from=2ep"],
           stages=stages)
    points(["train.duration=3ep", "prune.rewind=init", "prune.mask_from=end"], stages=stages)


def test_rewind_not_checked_for_retraining_alone():
    points(["train.duration=3ep", "prune.rewind=5ep"], stages=["retrain"])
    points(["prune.rewind=0it"], stages=["retrain"])


def test_mask_from_beyond_the_end():
    assert points_err(["train.duration=3ep", "output.snapshot_weights=[4ep]", "prune.mask_from=4ep"],
                      stages=["prune"]) == (
        "prune.mask_from: 4ep (40 steps) is at or beyond the end of pretraining (30 steps = 3ep) "
        "(use prune.mask_from=end for the end of pretraining)")


def test_retraining_milestones_with_retraining_or_imp():
    over = ["retrain.schedule=multistep", "retrain.duration=4ep", "retrain.milestones=[1ep, 40it]"]
    want = "retrain.milestones: 40it is at or beyond the end of retraining (40 steps = 4ep)"
    assert points_err(over, stages=["retrain"]) == want
    assert points_err([*over, "prune.levels=2"], stages=["prune"]) == want
    points(over, stages=["prune"])                                   # one-shot: no level is retrained
    points(over, stages=["pretrain"])
    points([*over, "retrain.schedule=constant"], stages=["retrain"])
    points(["retrain.schedule=multistep", "retrain.duration=4ep", "retrain.milestones=[39it]"], stages=["retrain"])


def test_epochs_follow_each_stages_sharding():
    # 4 ranks: LoFT pretraining iterates all 1,000 samples per rank (10 batches per epoch), retraining
    # and dense pretraining a shard of 250 (2 batches per epoch)
    assert points_err(["train.schedule=multistep", "train.duration=15it", "train.milestones=[2ep]"], world=4,
                      stages=["pretrain"]) == "train.milestones: 2ep (20 steps) is at or beyond the end of pretraining (15 steps)"
    points(["train.method=dense", "train.schedule=multistep", "train.duration=15it", "train.milestones=[2ep]"],
           world=4, stages=["pretrain"])                                # 4 steps
    points(["data.shard=true", "train.schedule=multistep", "train.duration=15it", "train.milestones=[2ep]"],
           world=4, stages=["pretrain"])
    assert points_err(["retrain.schedule=multistep", "retrain.duration=5it", "retrain.milestones=[3ep]"], world=4,
                      stages=["retrain"]) == "retrain.milestones: 3ep (6 steps) is at or beyond the end of retraining (5 steps)"
    points(["retrain.schedule=multistep", "retrain.duration=7it", "retrain.milestones=[3ep]"], world=4,
           stages=["retrain"])
