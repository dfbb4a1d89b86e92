"""Config validation paths that had no test (issue 18, item 5j), in-process: one test per raise of
loft_hpc/config/load.py and loft_hpc/validate.py that tests/test_config.py (and the rest of the
suite) did not reach, each asserting the one-line message that names the key and the value.

Inventory (raise -> where tested):
  load.py  _coerce Step / bool / int / float / list           test_config (wrong type, bad step)
           _coerce str field given a non-string  -> here: test_string_field_given_a_non_string
           _check_field choices / check                        test_config
           _check_field check raising TypeError  -> here: test_range_check_of_the_wrong_element_type
           _build_section not a mapping / unknown key          test_config
           _parse_override malformed                           test_config
           _parse_override YAML error: the raw text is kept (no raise) -> here
           config_from_dict unknown section (file, override)   test_config
           config_from_dict override into a non-mapping section -> here
           load_config missing / folder / YAML / not a mapping test_config
           load_config not UTF-8                  -> here: test_config_file_that_is_not_utf8
           load_config unreadable (OSError)       -> here: test_config_file_that_cannot_be_read
           _steps, rewind, ratios, mask_from, data.root        test_config
  validate.py _check_before_end (milestones, snapshots, rewind, mask_from)  test_config
           rewind at step 0                                    test_config
           mask_from at step 0                    -> here (and its hint)
           make_model ValueError -> ConfigError   -> here: test_impossible_model_is_a_config_error
           check_partitionable                                 test_loft_mpi (CLI, 4 ranks)
           batch size larger than the samples per rank -> here (pretraining LoFT / dense, retraining)
           unstructured rates that prune nothing               test_config
           prune.groups=partitioned without partitioned groups -> here
           --stage prune without pretrain.h5      -> here
           --stage retrain without the ticket     -> here
  output.snapshot_weights=[0it] is stored (theta_0, on a fresh start)  -> here
  the mask_from-at-step-0 hint names a value mask_from accepts         -> here
"""
from __future__ import annotations

from pathlib import Path

import pytest

from loft_hpc.config import ConfigError, config_from_dict, load_config
from loft_hpc.validate import validate_job
from tests.mpi_util import REPO, run_job

DEFAULT = REPO / "configs" / "default.yaml"
# a small synthetic job: 64 training samples, so validation loads it in milliseconds
SMALL = ["data.name=synthetic", "data.synthetic_train_size=64", "data.synthetic_test_size=32", "data.batch_size=16",
         "model.width=4", "model.inner_width_factor=1", "output.snapshot_weights=[]"]


def one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert msg and "\n" not in msg, repr(msg)
    return msg


def cfg_for(tmp_path: Path, extra: list[str]):
    return load_config(DEFAULT, [*SMALL, f"output.dir={tmp_path / 'out'}", *extra])


# ------------------------------------------------------------------------------------- load.py
@pytest.mark.parametrize("override,message", [
    ("data.root=[a]", "data.root: expected a string, got ['a']"),
    ("output.dir=true", "output.dir: expected a string, got True"),
    ("model.stem={a: 1}", "model.stem: expected a string, got {'a': 1}"),
])
def test_string_field_given_a_non_string(override, message):
    with pytest.raises(ConfigError) as e:
        config_from_dict({}, [override])
    assert one_line(e) == message


def test_range_check_of_the_wrong_element_type():
    """A check that cannot compare the value (a TypeError inside it) is a failed check, not a crash."""
    with pytest.raises(ConfigError) as e:
        config_from_dict({}, ["prune.ratios=[a, b]"])
    assert one_line(e) == "prune.ratios: ['a', 'b'] must be a non-empty list of values in (0, 1)"


def test_override_that_is_not_yaml_keeps_its_text():
    """_parse_override: a value YAML cannot parse is taken as the raw text (not an error), and then
    checked like any other value."""
    assert config_from_dict({}, ["output.dir=x: y: z"]).output.dir == "x: y: z"
    with pytest.raises(ConfigError) as e:
        config_from_dict({}, ["model.arch=[unclosed"])
    assert one_line(e).startswith("model.arch: '[unclosed' must be one of preresnet18")


@pytest.mark.parametrize("raw", [{"train": 3}, {"train": [1, 2]}, {"train": "lr"}])
def test_override_into_a_section_that_is_not_a_mapping(raw):
    with pytest.raises(ConfigError) as e:
        config_from_dict(raw, ["train.lr=0.1"])
    assert one_line(e) == f"train: expected a mapping of keys, got {raw['train']!r}"


def test_config_file_that_is_not_utf8(tmp_path):
    p = tmp_path / "latin1.yaml"
    data = "train:\n  lr: 0.1  # caf\xe9\n".encode("latin-1")
    p.write_bytes(data)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    at = data.index(bytes([0xE9]))  # the first byte that is not UTF-8
    assert one_line(e) == f"--config {str(p)!r}: not UTF-8 text (byte {at})"


def test_config_file_that_cannot_be_read(tmp_path, monkeypatch):
    """An existing file whose read fails (permissions; as root a chmod does not stop the read,
    so the failure is injected into Path.read_text)."""
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: 0.1\n")
    real = Path.read_text

    def denied(self, *a, **k):
        if self == p:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "read_text", denied)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert one_line(e) == f"--config {str(p)!r}: cannot be read (Permission denied)"


# --------------------------------------------------------------------------------- validate.py
@pytest.mark.parametrize("extra,message", [
    (["model.arch=lenet300_100", "model.inner_width_factor=1.5"],
     "model.arch=lenet300_100: lenet300_100: inner_width_factor applies to ResNets only, got 1.5"),
    (["model.arch=conv2", "model.stem=imagenet"],
     "model.arch=conv2: conv2 has no stem to choose: model.stem must be auto or cifar, got imagenet"),
    (["model.arch=conv6", "data.image_size=4"],
     "model.arch=conv6: conv6 max-pools 3 times: image_size must be >= 8, got 4"),
])
def test_impossible_model_is_a_config_error(tmp_path, extra, message):
    with pytest.raises(ConfigError) as e:
        validate_job(cfg_for(tmp_path, extra), 1, ["pretrain"])
    assert one_line(e) == message


@pytest.mark.parametrize("extra,world,stages,message", [
    # LoFT without data.shard: every rank iterates all 64 samples
    (["data.batch_size=80"], 2, ["pretrain"],
     "data.batch_size: 80 is larger than the 64 training samples per rank of pretraining on 2 ranks"),
    # LoFT with data.shard, and the dense baseline: 64 / 2 = 32 per rank
    (["data.batch_size=48", "data.shard=true"], 2, ["pretrain"],
     "data.batch_size: 48 is larger than the 32 training samples per rank of pretraining on 2 ranks"),
    (["data.batch_size=48", "train.method=dense"], 2, ["pretrain"],
     "data.batch_size: 48 is larger than the 32 training samples per rank of pretraining on 2 ranks"),
    # retraining always shards: 64 / 4 = 16 per rank (checked before the ticket's existence)
    (["data.batch_size=20"], 4, ["retrain"],
     "data.batch_size: 20 is larger than the 16 training samples per rank of retraining on 4 ranks"),
    # IMP levels are retrained: the prune stage with levels > 1 checks it too
    (["data.batch_size=20", "prune.levels=2"], 4, ["prune"],
     "data.batch_size: 20 is larger than the 16 training samples per rank of retraining on 4 ranks"),
])
def test_batch_larger_than_the_samples_per_rank(tmp_path, extra, world, stages, message):
    with pytest.raises(ConfigError) as e:
        validate_job(cfg_for(tmp_path, extra), world, stages)
    assert one_line(e) == message


def test_mask_from_at_step_zero(tmp_path):
    cfg = cfg_for(tmp_path, ["output.snapshot_weights=[0it]", "prune.mask_from=0it"])
    with pytest.raises(ConfigError) as e:
        validate_job(cfg, 1, ["prune"])
    assert one_line(e) == ("prune.mask_from: 0it is the start of pretraining: theta_0 ranks nothing that "
                           "training found: use a later step or prune.mask_from=end")


def test_mask_from_at_step_zero_hint_is_a_valid_value(tmp_path):
    """The value the hint names is one prune.mask_from accepts (and validation passes with it)."""
    cfg = cfg_for(tmp_path, ["output.snapshot_weights=[0it]", "prune.mask_from=0it"])
    with pytest.raises(ConfigError) as e:
        validate_job(cfg, 1, ["pretrain", "prune"])
    hint = one_line(e).rsplit(" ", 1)[-1]
    assert hint == "prune.mask_from=end"
    validate_job(cfg_for(tmp_path, ["output.snapshot_weights=[0it]", hint]), 1, ["pretrain", "prune"])


def test_structured_pruning_of_partitioned_groups_needs_some(tmp_path):
    cfg = cfg_for(tmp_path, ["model.partition_rule=none"])
    with pytest.raises(ConfigError) as e:
        validate_job(cfg, 1, ["prune"])
    assert one_line(e) == ("prune.groups=partitioned: the model has no partitioned filter group "
                           "(use prune.groups=all or model.partition_rule=all)")
    # prune.groups=all gets past it, to the missing pretraining file
    with pytest.raises(ConfigError, match="pretrain.h5 does not exist"):
        validate_job(cfg_for(tmp_path, ["model.partition_rule=none", "prune.groups=all"]), 1, ["prune"])


def test_prune_stage_without_the_pretraining_file(tmp_path):
    cfg = cfg_for(tmp_path, [])
    with pytest.raises(ConfigError) as e:
        validate_job(cfg, 1, ["prune", "retrain"])
    out = tmp_path / "out"
    assert one_line(e) == (f"--stage prune: {out}/pretrain.h5 does not exist (run --stage pretrain with "
                           f"output.dir={out} first)")
    validate_job(cfg, 1, ["pretrain", "prune"])  # pretraining in the same job writes it


def test_retrain_stage_without_the_ticket(tmp_path):
    cfg = cfg_for(tmp_path, ["prune.ratios=[0.3, 0.5]"])
    out = tmp_path / "out"
    with pytest.raises(ConfigError) as e:
        validate_job(cfg, 1, ["retrain"])
    assert one_line(e) == f"--stage retrain: {out}/tickets_p30.h5 does not exist (run --stage prune first)"
    out.mkdir()
    (out / "tickets_p30.h5").write_bytes(b"")  # existence is what validation checks; the stage reads it
    with pytest.raises(ConfigError) as e:
        validate_job(cfg, 1, ["retrain"])
    assert one_line(e) == f"--stage retrain: {out}/tickets_p50.h5 does not exist (run --stage prune first)"
    validate_job(cfg, 1, ["pretrain", "prune", "retrain"])  # pruning in the same job writes them


def test_weight_snapshot_at_step_zero_is_rejected_or_stored(tmp_path):
    """A requested weight snapshot at step 0 must either be refused by validation (exit 2, one
    line naming output.snapshot_weights, as prune.rewind=0it is) or be written."""
    from loft_hpc.checkpoint.h5file import read_run_file

    out = tmp_path / "out"
    p = run_job(0, ["--stage", "pretrain", *SMALL, "output.snapshot_weights=[0it]", "train.duration=4it",
                    "train.local_steps=2", "train.eval_every=4it", "output.checkpoint_every=4it",
                    "output.snapshot_every=4it", "train.progress=false", f"output.dir={out}"], timeout=180)
    if p.returncode == 2:
        assert "output.snapshot_weights" in p.stderr, p.stderr
        return
    assert p.returncode == 0, p.stderr[-2000:]
    assert "0it" in read_run_file(out / "pretrain.h5").weight_snapshots
    assert (out / "snapshots" / "weights@0it.h5").is_file()
