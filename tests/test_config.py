"""The typed job configuration: shipped configs, help text, overrides, one-line errors, YAML round
trip, ``Step``, the learning-rate schedules and schedule points against the length of their stage
(all in-process, no training, except one CLI run that ends in validation)."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import yaml

from loft_hpc.config import SECTIONS, ConfigError, JobConfig, Step, config_from_dict, config_to_yaml, load_config
from loft_hpc.stages.common import lr_function
from loft_hpc.train.schedule import lr_at
from loft_hpc.validate import batches_per_epoch, check_schedule_points

REPO = Path(__file__).resolve().parent.parent
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
PAPER = [p for p in CONFIGS if not p.name.startswith(("default", "digits_"))]  # the paper's settings
DEFAULT = REPO / "configs" / "default.yaml"
DIGITS_HARD = REPO / "configs" / "digits_hard.yaml"


def _load(path: Path, overrides: list[str] = ()) -> JobConfig:
    raw = yaml.safe_load(path.read_text()) or {}
    extra = ["data.root=/x"] if not (raw.get("data") or {}).get("root") and \
        (raw.get("data") or {}).get("name") in ("cifar10", "cifar100", "imagenet") else []
    return load_config(path, extra + list(overrides))


def _err(overrides: list[str], raw: dict | None = None, *needles: str) -> str:
    """config_from_dict raises a ConfigError of one line that contains every needle."""
    with pytest.raises(ConfigError) as exc:
        config_from_dict(raw or {}, overrides)
    msg = str(exc.value)
    assert msg and "\n" not in msg, repr(msg)
    for n in needles:
        assert n in msg, (n, msg)
    return msg


# --- shipped configs -----------------------------------------------------------------------------

def test_configs_are_shipped():
    names = {p.name for p in CONFIGS}
    assert "default.yaml" in names
    assert len(PAPER) >= 10, names
    for ds in ("cifar10", "cifar100", "imagenet"):
        assert any(p.name.startswith(ds + "_") for p in PAPER), ds


def _same_value(got, raw) -> bool:
    """A config value equals what the YAML file wrote (steps parsed, '1e-5' as a number)."""
    if isinstance(got, list):
        return isinstance(raw, list) and len(got) == len(raw) and all(map(_same_value, got, raw))
    if isinstance(got, Step):
        return Step.parse(raw) == got
    if isinstance(got, float):
        return not isinstance(raw, bool) and math.isclose(float(raw), got, rel_tol=1e-12)
    return got == raw


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads(path):
    cfg = _load(path)
    # every value the file writes is the loaded config's value (the file is read, not the defaults)
    raw = yaml.safe_load(path.read_text())
    for section, values in raw.items():
        for key, value in values.items():
            if (section, key) == ("data", "root") and not value:
                continue  # _load sets data.root=/x for the external data sets
            got = getattr(getattr(cfg, section), key)
            assert _same_value(got, value), f"{path.name}: {section}.{key} = {got!r}, the file says {value!r}"
    # the file names say what the config is
    stem = path.stem
    if path in PAPER:  # <data>_<arch>_loft<S>
        data, arch, loft = stem.split("_")
        assert cfg.data.name == data
        assert cfg.model.arch == arch
        assert loft in ("loft2", "loft4")
        assert cfg.train.method == "loft"
        assert Path(cfg.output.dir).name == stem  # each config writes into its own folder


@pytest.mark.parametrize("path", [p for p in PAPER if p.name.startswith("cifar")], ids=lambda p: p.name)
def test_empty_data_root_is_required_for_cifar(path):
    assert not yaml.safe_load(path.read_text())["data"]["root"]
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert "data.root" in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.name)
def test_paper_settings(path):
    """LOFT_SPEC.md sections 3-4: the release's pretraining and fine-tuning settings."""
    cfg = _load(path)
    t, r, p = cfg.train, cfg.retrain, cfg.prune
    imagenet = cfg.data.name == "imagenet"
    assert cfg.data.batch_size == (512 if imagenet else 128)
    assert t.method == "loft"
    assert t.local_steps == 15
    assert t.lr == pytest.approx(0.1)
    assert t.momentum == pytest.approx(0.9)
    assert t.weight_decay == pytest.approx(1e-5)
    assert t.duration == Step(20, "ep")
    assert t.schedule == "multistep" and t.gamma == pytest.approx(0.1)
    # the release's milestones (3800/7600/11400 syncs of K = 15) lie beyond 20 epochs: ours are
    # 50% and 75% of pretraining (the YAML comment says so)
    assert t.milestones == [Step(10, "ep"), Step(15, "ep")]
    assert "3800, 7600, 11400 syncs" in path.read_text()
    if imagenet:
        assert cfg.model.arch == "preresnet18" and cfg.model.stem == "imagenet"
    else:
        assert cfg.model.arch in ("preresnet34", "resnet34")
    assert cfg.model.width == 64
    assert p.method == "structured"
    for ratio in (0.8, 0.5, 0.3):
        assert any(abs(x - ratio) < 1e-9 for x in p.ratios), (ratio, p.ratios)
    assert r.duration == Step(90, "ep")
    assert r.lr == pytest.approx(0.1)
    assert r.momentum == pytest.approx(0.9)
    assert r.weight_decay == pytest.approx(5e-4)
    assert r.schedule == "multistep" and r.gamma == pytest.approx(0.1)
    assert r.milestones == [Step(30, "ep"), Step(60, "ep"), Step(80, "ep")]


def test_default_is_digits_and_loft():
    cfg = load_config(DEFAULT)
    assert cfg.data.name == "digits"
    assert not cfg.data.root  # embedded data: runs offline with no data.root
    assert cfg.train.method == "loft"
    assert cfg.model.arch == "preresnet18"
    assert cfg.model.partition_rule == "loft"
    # loading with no file at all gives the schema defaults, which are the paper's pretraining
    # settings too
    bare = load_config(None)
    assert bare == JobConfig()
    assert bare.train.local_steps == 15 and bare.train.duration == Step(20, "ep")


# --- help text -----------------------------------------------------------------------------------

def test_every_field_has_help():
    assert set(SECTIONS) == {f.name for f in dataclasses.fields(JobConfig)}
    for name, (cls, desc) in SECTIONS.items():
        assert isinstance(desc, str) and desc.strip(), name
        for f in dataclasses.fields(cls):
            h = f.metadata.get("help")
            assert isinstance(h, str) and h.strip(), f"{name}.{f.name} has no help text"
            choices = f.metadata.get("choices")
            if choices:
                default = getattr(cls(), f.name)
                assert default in choices, f"{name}.{f.name}: default {default!r} not in {choices}"


def test_defaults_pass_their_own_checks():
    for name, (cls, _) in SECTIONS.items():
        obj = cls()
        for f in dataclasses.fields(cls):
            check = f.metadata.get("check")
            if check:
                assert check[0](getattr(obj, f.name)), f"{name}.{f.name}"


# --- overrides -----------------------------------------------------------------------------------

def test_override_scalar_float():
    cfg = load_config(DEFAULT, ["train.lr=0.2"])
    assert cfg.train.lr == pytest.approx(0.2) and isinstance(cfg.train.lr, float)
    # the file's other values are kept
    assert cfg.train.local_steps == load_config(DEFAULT).train.local_steps


def test_override_int_given_to_float_field():
    cfg = config_from_dict({}, ["model.inner_width_factor=2"])
    assert cfg.model.inner_width_factor == 2.0 and isinstance(cfg.model.inner_width_factor, float)


def test_override_list():
    cfg = load_config(DEFAULT, ["prune.ratios=[0.3,0.6]"])
    assert cfg.prune.ratios == [0.3, 0.6]
    cfg = load_config(DEFAULT, ["prune.ratios=[0.3, 0.6, 0.9]"])
    assert cfg.prune.ratios == [0.3, 0.6, 0.9]


def test_override_steps():
    cfg = load_config(DEFAULT, ["train.duration=500it", "retrain.duration=3ep",
                                "train.milestones=[10ep, 600it]", "train.eval_every=250"])
    assert cfg.train.duration == Step(500, "it")
    assert cfg.retrain.duration == Step(3, "ep")
    assert cfg.train.milestones == [Step(10, "ep"), Step(600, "it")]
    assert cfg.train.eval_every == Step(250, "it")  # a bare integer is iterations


@pytest.mark.parametrize("text,value,yaml_type", [("5e-4", 5e-4, str), ("1.0e-5", 1e-5, float), ("1E-3", 1e-3, str),
                                                  ("3", 3.0, int)])
def test_override_float_exponent(text, value, yaml_type):
    # PyYAML (YAML 1.1) reads 5e-4 and 1E-3 as strings, 1.0e-5 as a float, 3 as an int: each must
    # become the float it names
    assert type(yaml.safe_load(text)) is yaml_type
    cfg = config_from_dict({}, [f"train.weight_decay={text}"])
    assert cfg.train.weight_decay == pytest.approx(value) and isinstance(cfg.train.weight_decay, float)


def test_yaml_file_float_exponent(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  weight_decay: 5e-4\n  lr: 1e-2\nretrain:\n  weight_decay: 5e-4\n")
    cfg = load_config(p)
    assert cfg.train.weight_decay == pytest.approx(5e-4)
    assert cfg.train.lr == pytest.approx(1e-2)
    assert cfg.retrain.weight_decay == pytest.approx(5e-4)


def test_override_beats_file_and_later_override_wins(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: 0.5\n  local_steps: 7\n")
    cfg = load_config(p, ["train.lr=0.25", "train.lr=0.125"])
    assert cfg.train.lr == pytest.approx(0.125)
    assert cfg.train.local_steps == 7


def test_overrides_do_not_mutate_raw_dict():
    raw = {"train": {"lr": 0.5}}
    config_from_dict(raw, ["train.lr=0.2", "data.batch_size=32"])
    assert raw == {"train": {"lr": 0.5}}


def test_override_string_with_equals_and_path(tmp_path):
    cfg = config_from_dict({}, [f"output.dir={tmp_path}/a=b"])
    assert cfg.output.dir == f"{tmp_path}/a=b"


def test_mask_from_snapshot_is_accepted_and_normalised():
    cfg = config_from_dict({}, ["output.snapshot_weights=[500it, 5ep]", "prune.mask_from= 5ep"])
    assert cfg.prune.mask_from == "5ep"
    assert cfg.output.snapshot_weights == [Step(500, "it"), Step(5, "ep")]


@pytest.mark.parametrize("rewind", ["init", "end", "500it", "2ep"])
def test_rewind_values(rewind):
    assert config_from_dict({}, [f"prune.rewind={rewind}"]).prune.rewind == rewind


# --- errors: one line naming key and value -------------------------------------------------------

def test_unknown_key_suggests():
    _err(["train.lcoal_steps=3"], None, "train.lcoal_steps", "local_steps")


def test_unknown_key_in_file_suggests(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lerning_rate: 0.1\n  lr: 0.2\n")
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    assert "lerning_rate" in str(exc.value) and "\n" not in str(exc.value)


def test_unknown_section_suggests():
    _err(["trian.lr=0.1"], None, "trian", "'train'")
    _err([], {"modle": {"arch": "preresnet18"}}, "modle", "'model'")


def test_unknown_section_no_close_match():
    msg = _err(["zzzz.lr=0.1"], None, "zzzz")
    assert "did you mean" not in msg


@pytest.mark.parametrize("override,needles", [
    ("train.local_steps=1.5", ("train.local_steps", "1.5", "integer")),
    ("data.batch_size=true", ("data.batch_size", "True")),
    ("data.batch_size=abc", ("data.batch_size", "abc")),
    ("train.lr=abc", ("train.lr", "abc")),
    ("train.lr=true", ("train.lr", "True")),
    ("data.augment=1", ("data.augment", "1")),
    ("model.arch=3", ("model.arch", "3")),
    ("prune.ratios=0.5", ("prune.ratios", "0.5", "list")),
    ("train.milestones=10ep", ("train.milestones", "10ep", "list")),
])
def test_wrong_type(override, needles):
    _err([override], None, *needles)


@pytest.mark.parametrize("override,needles", [
    ("train.lr=0", ("train.lr", "0")),
    ("train.lr=-0.1", ("train.lr", "-0.1")),
    ("train.momentum=1.0", ("train.momentum", "1.0")),
    ("train.momentum=-0.5", ("train.momentum", "-0.5")),
    ("prune.ratios=[1.2]", ("prune.ratios", "1.2")),
    ("prune.ratios=[0.5, 0]", ("prune.ratios", "0")),
    ("prune.ratios=[]", ("prune.ratios", "[]")),
    ("data.batch_size=0", ("data.batch_size", "0")),
    ("train.local_steps=0", ("train.local_steps", "0")),
    ("train.weight_decay=-1e-4", ("train.weight_decay",)),
    ("train.seed=-1", ("train.seed", "-1")),
    ("data.test_fraction=1", ("data.test_fraction", "1")),
    ("data.synthetic_classes=1", ("data.synthetic_classes", "1")),
    ("prune.fc_rate=1.5", ("prune.fc_rate", "1.5")),
    ("output.keep_checkpoints=0", ("output.keep_checkpoints", "0")),
])
def test_out_of_range(override, needles):
    _err([override], None, *needles)


def test_bad_choice_suggests():
    msg = _err(["model.arch=resnet99"], None, "model.arch", "resnet99")
    assert "did you mean" in msg and "resnet34" in msg
    _err(["train.method=lofty"], None, "train.method", "lofty", "'loft'")
    _err(["train.schedule=cosin"], None, "train.schedule", "cosin", "'cosine'")
    _err(["data.name=mnist"], None, "data.name", "mnist")


@pytest.mark.parametrize("override,key,value", [
    ("train.duration=5x", "train.duration", "5x"),
    ("train.duration=-5", "train.duration", "-5"),
    ("train.duration=3.5ep", "train.duration", "3.5ep"),
    ("train.duration=ep", "train.duration", "ep"),
    ("retrain.duration=true", "retrain.duration", "True"),
    ("output.checkpoint_every=1epoch", "output.checkpoint_every", "1epoch"),
    ("train.milestones=[10ep, 5x]", "train.milestones", "5x"),
    ("retrain.milestones=[-3]", "retrain.milestones", "-3"),
    ("output.snapshot_weights=[2 epochs]", "output.snapshot_weights", "2 epochs"),
])
def test_bad_step(override, key, value):
    _err([override], None, key, value)


@pytest.mark.parametrize("override", ["train.lr", "train.lr 0.1", "trainlr=0.1", "train.=0.1", "=0.1"])
def test_malformed_override(override):
    _err([override], None, override)


@pytest.mark.parametrize("rewind", ["bogus", "5x", "-2ep", "start"])
def test_bad_rewind(rewind):
    _err([f"prune.rewind={rewind}"], None, "prune.rewind", rewind)


def test_bad_mask_from():
    msg = _err(["prune.mask_from=5ep"], None, "prune.mask_from", "5ep", "output.snapshot_weights")
    assert "5ep" in msg
    # present in the default config's snapshot list ['2ep'], but not 5ep
    with pytest.raises(ConfigError) as exc:
        load_config(DEFAULT, ["prune.mask_from=5ep"])
    assert "'2ep'" in str(exc.value) and "\n" not in str(exc.value)
    _err(["prune.mask_from=soon"], None, "prune.mask_from", "soon")


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "imagenet"])
def test_external_data_needs_root(name):
    _err([f"data.name={name}"], None, "data.root", name)
    assert config_from_dict({}, [f"data.name={name}", "data.root=/x"]).data.root == "/x"


def test_invalid_yaml_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  lr: [0.1\n  local_steps: 3\n")
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    msg = str(exc.value)
    assert "\n" not in msg and str(p) in msg and "YAML" in msg


@pytest.mark.parametrize("text,needle", [("- 1\n- 2\n", "mapping"), ("train: 3\n", "train")])
def test_yaml_file_of_wrong_shape(tmp_path, text, needle):
    p = tmp_path / "shape.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_missing_config_file(tmp_path):
    p = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError) as exc:
        load_config(p, ["train.lr=0.1"])
    assert str(p) in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(ConfigError):
        load_config(tmp_path)  # a folder is not a config file


def test_empty_yaml_file_is_the_defaults(tmp_path):
    p = tmp_path / "empty.yaml"
    p.write_text("# nothing here\n")
    assert load_config(p) == JobConfig()


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)


def test_override_into_empty_yaml_section(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  # all keys commented out\nretrain:\n")
    assert load_config(p) == JobConfig()  # an empty section alone is accepted ...
    cfg = load_config(p, ["train.lr=0.2"])  # ... and so must be an override into it
    assert cfg.train.lr == pytest.approx(0.2)


def test_list_of_floats_in_exponent_form():
    assert config_from_dict({}, ["prune.ratios=[5e-1, 8e-1]"]).prune.ratios == [0.5, 0.8]


def test_ratios_naming_the_same_ticket_are_rejected():
    with pytest.raises(ConfigError, match=r"prune.ratios: 0.5 and 0.501 name the same ticket \(p50\)"):
        config_from_dict({}, ["prune.ratios=[0.5, 0.501]"])


def test_infinite_lr_and_numeric_text():
    with pytest.raises(ConfigError, match="train.lr: inf must be > 0 and finite"):
        config_from_dict({}, ["train.lr=.inf"])
    assert config_from_dict({}, ["output.dir=2024"]).output.dir == "2024"


# --- YAML round trip -----------------------------------------------------------------------------

@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_yaml_round_trip(path):
    cfg = _load(path)
    text = config_to_yaml(cfg)
    back = config_from_dict(yaml.safe_load(text))
    assert back == cfg
    assert config_to_yaml(back) == text


def test_yaml_round_trip_with_overrides():
    cfg = load_config(DEFAULT, ["train.weight_decay=5e-4", "prune.ratios=[0.3,0.6]", "train.duration=500it",
                                "output.snapshot_weights=[100it, 1ep]", "prune.mask_from=100it",
                                "prune.rewind=2ep", "train.milestones=[1ep, 300it]", "train.schedule=multistep",
                                "model.inner_width_factor=1.5", "data.augment=false"])
    text = config_to_yaml(cfg)
    data = yaml.safe_load(text)
    assert list(data) == list(SECTIONS)  # every section, in order
    assert data["train"]["duration"] == "500it"
    assert data["train"]["milestones"] == ["1ep", "300it"]
    back = config_from_dict(data)
    assert back == cfg


# --- Step ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,value,unit", [
    ("30ep", 30, "ep"), ("500it", 500, "it"), (" 7 ep ", 7, "ep"), ("0it", 0, "it"), (500, 500, "it"), (0, 0, "it"),
])
def test_step_parse(text, value, unit):
    s = Step.parse(text)
    assert (s.value, s.unit) == (value, unit)
    assert Step.parse(str(s)) == s
    assert Step.parse(s) is s


def test_step_iterations_and_str():
    assert Step.parse("3ep").iterations(21) == 63
    assert Step.parse("500it").iterations(21) == 500
    assert Step.parse(40).iterations(7) == 40
    assert str(Step(30, "ep")) == "30ep" and str(Step(500, "it")) == "500it"
    assert Step.parse("2ep") == Step(2, "ep") and Step(2, "ep") != Step(2, "it")
    assert hash(Step(2, "ep")) == hash(Step.parse("2ep"))


@pytest.mark.parametrize("bad", [-1, "-3ep", "5x", "", "ep", "3.5ep", "3 epochs", True, False, 3.5, None, "1e3it"])
def test_step_rejects(bad):
    with pytest.raises(ValueError):
        Step.parse(bad)


# --- learning-rate schedules ---------------------------------------------------------------------

def test_lr_constant():
    for step in (0, 5, 1000):
        assert lr_at(step, base=0.1, schedule="constant", milestones=[Step(1, "it")], gamma=0.1, total=10,
                     batches_per_epoch=5) == 0.1


def test_lr_multistep_epochs():
    ms = [Step(30, "ep"), Step(60, "ep"), Step(80, "ep")]
    bpe = 10

    def lr(s):
        return lr_at(s, base=0.1, schedule="multistep", milestones=ms, gamma=0.1, total=900, batches_per_epoch=bpe)

    assert lr(0) == pytest.approx(0.1)
    assert lr(299) == pytest.approx(0.1)
    assert lr(300) == pytest.approx(0.01)  # the milestone step itself already runs at the new lr
    assert lr(599) == pytest.approx(0.01)
    assert lr(600) == pytest.approx(1e-3)
    assert lr(800) == pytest.approx(1e-4)
    assert lr(899) == pytest.approx(1e-4)


def test_lr_multistep_iterations_mixed_and_unsorted():
    ms = [Step(20, "it"), Step(1, "ep")]  # 1ep = 7 iterations: the order written does not matter
    kw = dict(base=0.5, schedule="multistep", milestones=ms, gamma=0.5, total=100, batches_per_epoch=7)
    assert lr_at(6, **kw) == pytest.approx(0.5)
    assert lr_at(7, **kw) == pytest.approx(0.25)
    assert lr_at(19, **kw) == pytest.approx(0.25)
    assert lr_at(20, **kw) == pytest.approx(0.125)
    assert lr_at(10 ** 6, **kw) == pytest.approx(0.125)
    # no milestones: constant
    assert lr_at(50, base=0.5, schedule="multistep", milestones=[], gamma=0.1, total=100, batches_per_epoch=7) == 0.5


def test_lr_cosine():
    kw = dict(base=0.2, schedule="cosine", milestones=[], gamma=0.1, batches_per_epoch=10)
    assert lr_at(0, total=100, **kw) == pytest.approx(0.2)
    assert lr_at(50, total=100, **kw) == pytest.approx(0.1)
    assert lr_at(25, total=100, **kw) == pytest.approx(0.1 * (1 + math.cos(math.pi / 4)))
    assert lr_at(100, total=100, **kw) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(150, total=100, **kw) == pytest.approx(0.0, abs=1e-12)  # clamped past the end
    vals = [lr_at(s, total=100, **kw) for s in range(101)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))  # monotone non-increasing
    assert lr_at(0, total=0, **kw) == pytest.approx(0.2)  # a zero-length schedule does not divide by 0


def test_lr_unknown_schedule():
    with pytest.raises(ValueError):
        lr_at(0, base=0.1, schedule="linear", milestones=[], gamma=0.1, total=10, batches_per_epoch=1)


def test_lr_function_follows_config_section():
    cfg = config_from_dict({}, ["retrain.schedule=multistep", "retrain.milestones=[2ep, 4ep]", "retrain.lr=0.4",
                                "retrain.gamma=0.5"])
    fn = lr_function(cfg.retrain)
    assert [fn(s, 60, 10) for s in (0, 19, 20, 39, 40)] == pytest.approx([0.4, 0.4, 0.2, 0.2, 0.1])


# --- schedule points against the length of their stage (loft_hpc.validate) ---------------------
# Epochs become steps only with the data set loaded, so these checks live in validate_job; here
# they are called with a training-set size (the paper data sets are not on this machine).

TRAIN_SIZE = {"cifar10": 50_000, "cifar100": 50_000, "imagenet": 1_281_167}
ALL_STAGES = ["pretrain", "prune", "retrain"]


def _points_err(overrides: list[str], n_train: int, world: int = 1, stages=ALL_STAGES, *needles: str) -> str:
    cfg = config_from_dict({}, overrides)
    with pytest.raises(ConfigError) as exc:
        check_schedule_points(cfg, n_train, world, stages)
    msg = str(exc.value)
    assert msg and "\n" not in msg, repr(msg)
    for n in needles:
        assert n in msg, (n, msg)
    return msg


@pytest.mark.parametrize("n,batch,world,shard", [(1348, 64, 1, False), (1348, 64, 4, False), (1348, 64, 4, True),
                                                 (192, 16, 2, True), (1000, 7, 3, True), (50, 50, 1, False)])
def test_batches_per_epoch_is_the_streams(n, batch, world, shard):
    import torch
    from torch.utils.data import TensorDataset

    from loft_hpc.train.stream import BatchStream

    ds = TensorDataset(torch.zeros(n, 1))
    for rank in range(world):
        s = BatchStream(ds, batch, seed=0, rank=rank, world=world, shard=shard)
        assert batches_per_epoch(n, batch, world, shard) == s.batches_per_epoch


def test_release_imagenet_milestones_are_rejected():
    # the release's milestones on the ImageNet config: 20 epochs of 2502 batches = 50,040 steps
    cfg = _load(REPO / "configs" / "imagenet_preresnet18_loft4.yaml",
                ["train.milestones=[57000it, 114000it, 171000it]"])
    with pytest.raises(ConfigError) as exc:
        check_schedule_points(cfg, TRAIN_SIZE["imagenet"], 4, ALL_STAGES)
    assert str(exc.value) == "train.milestones: 57000it is at or beyond the end of pretraining (50040 steps = 20ep)"


# 1,000 samples of batch 100: 10 batches per epoch
@pytest.mark.parametrize("overrides,stages,message", [
    (["train.schedule=multistep", "train.duration=2ep", "train.milestones=[5it, 20it]"], ["pretrain"],
     "train.milestones: 20it is at or beyond the end of pretraining (20 steps = 2ep)"),
    (["train.schedule=multistep", "train.duration=25it", "train.milestones=[3ep]"], ["pretrain"],
     "train.milestones: 3ep (30 steps) is at or beyond the end of pretraining (25 steps)"),
    (["retrain.schedule=multistep", "retrain.duration=4ep", "retrain.milestones=[1ep, 4ep]"], ["retrain"],
     "retrain.milestones: 4ep (40 steps) is at or beyond the end of retraining (40 steps = 4ep)"),
    # IMP retrains every level with the retraining schedule
    (["retrain.schedule=multistep", "retrain.duration=4ep", "retrain.milestones=[50it]", "prune.levels=3"], ["prune"],
     "retrain.milestones: 50it is at or beyond the end of retraining (40 steps = 4ep)"),
    (["train.duration=3ep", "prune.rewind=3ep"], ["prune"],
     "prune.rewind: 3ep (30 steps) is at or beyond the end of pretraining (30 steps = 3ep)"),
    (["train.duration=3ep", "prune.rewind=31it"], ["pretrain"], "prune.rewind: 31it is at or beyond"),
    (["train.duration=3ep", "output.snapshot_weights=[5it, 4ep]", "prune.mask_from=4ep"], ["prune", "retrain"],
     "prune.mask_from: 4ep (40 steps) is at or beyond the end of pretraining (30 steps = 3ep)"),
    (["train.duration=30it", "output.snapshot_weights=[1ep, 3ep]"], ["pretrain"],
     "output.snapshot_weights: 3ep (30 steps) is at or beyond the end of pretraining (30 steps)"),
])
def test_schedule_point_at_or_beyond_the_end_is_rejected(overrides, stages, message):
    msg = _points_err(["data.batch_size=100", *overrides], 1000, 1, stages)
    assert msg.startswith(message), msg
    key = message.split(":")[0]
    if key in ("prune.rewind", "prune.mask_from"):
        assert msg.endswith(f"(use {key}=end for the end of pretraining)"), msg


@pytest.mark.parametrize("overrides,stages", [
    (["train.schedule=multistep", "train.duration=2ep", "train.milestones=[19it, 1ep]"], ALL_STAGES),
    (["retrain.schedule=multistep", "retrain.duration=4ep", "retrain.milestones=[39it]"], ALL_STAGES),
    (["train.duration=3ep", "prune.rewind=29it", "output.snapshot_weights=[2ep, 29it]", "prune.mask_from=29it"], ALL_STAGES),
    # points that no requested stage uses are not checked ...
    (["train.schedule=multistep", "train.duration=2ep", "train.milestones=[3ep]"], ["retrain"]),
    (["train.duration=1ep", "output.snapshot_weights=[2ep]"], ["prune", "retrain"]),
    (["retrain.schedule=multistep", "retrain.duration=1ep", "retrain.milestones=[2ep]"], ["pretrain", "prune"]),
    # ... nor milestones of a schedule that has none
    (["train.schedule=cosine", "train.duration=2ep", "train.milestones=[3ep]"], ALL_STAGES),
])
def test_schedule_points_inside_their_stage_are_accepted(overrides, stages):
    check_schedule_points(config_from_dict({}, ["data.batch_size=100", *overrides]), 1000, 1, stages)


def test_epoch_points_follow_the_shard():
    # 1,000 samples over 4 ranks of batch 50: 20 batches per epoch, 5 with data.shard
    over = ["data.batch_size=50", "train.schedule=multistep", "train.duration=100it", "train.milestones=[4ep]"]
    check_schedule_points(config_from_dict({}, over), 1000, 4, ["pretrain"])  # 80 < 100
    _points_err([*over, "train.duration=1ep"], 1000, 4, ["pretrain"], "train.milestones: 4ep (80 steps)")
    check_schedule_points(config_from_dict({}, [*over, "data.shard=true", "train.duration=5ep"]), 1000, 4, ["pretrain"])
    _points_err([*over, "data.shard=true", "train.duration=20it"], 1000, 4, ["pretrain"], "4ep (20 steps)", "(20 steps)")


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.name)
def test_shipped_paper_configs_schedule_points_validate(path):
    cfg = _load(path)
    world = int(path.stem[-1])
    for w in sorted({1, world}):
        check_schedule_points(cfg, TRAIN_SIZE[cfg.data.name], w, ALL_STAGES)
    if cfg.data.name == "imagenet":  # the milestones really fall inside pretraining now
        bpe = batches_per_epoch(TRAIN_SIZE["imagenet"], 512, world, cfg.data.shard)
        assert bpe == 2502
        assert [m.iterations(bpe) for m in cfg.train.milestones] == [25020, 37530]
        assert all(m.iterations(bpe) < cfg.train.duration.iterations(bpe) for m in cfg.train.milestones)


def test_shipped_default_config_validates():
    from loft_hpc.validate import validate_job

    cfg = load_config(DEFAULT)
    for world in (1, 4):  # the embedded digits: the whole-job check, data loaded
        validate_job(cfg, world, ALL_STAGES)


def test_shipped_digits_hard_config_validates_with_snapshots_and_early_stop():
    """The README's harder setting: tickets at 90% with both controls, a snapshot ticket per epoch
    rewound to its snapshot, and an early stop the detection can reach before the end."""
    from loft_hpc.validate import validate_job

    cfg = load_config(DIGITS_HARD, ["train.stop_at_ticket=true"])
    assert (cfg.prune.ratios, cfg.prune.rewind, cfg.retrain.controls) == ([0.9], "mask_from", ["random_reinit", "random_prune"])
    assert [str(s) for s in cfg.output.snapshot_weights] == ["1ep", "2ep", "3ep", "4ep", "5ep"]
    for world in (2, 4):
        validate_job(cfg, world, ["pretrain", "prune", "retrain", "snapshots"])


def test_bad_milestone_on_the_cli_exits_2_with_one_line(tmp_path):
    from tests.mpi_util import run_job

    # digits: 1,348 training images of batch 64 = 21 batches per epoch; 12 epochs = 252 steps
    p = run_job(0, ["--stage", "pretrain", "train.schedule=multistep", "train.milestones=[100it, 12ep]",
                    f"output.dir={tmp_path / 'out'}"], timeout=120)
    assert p.returncode == 2, p.stdout + p.stderr
    lines = p.stderr.splitlines()
    assert lines == ["loft_hpc: error: train.milestones: 12ep (252 steps) is at or beyond the end of pretraining "
                     "(252 steps = 12ep)"], p.stderr
    assert not (tmp_path / "out" / "pretrain.h5").exists()


def test_data_parallel_stages_count_epochs_over_shards():
    """Retraining, IMP levels and dense pretraining shard the data: on 4 ranks an epoch of 1,000
    samples at batch 50 is 5 steps, not LoFT's 20."""
    over = ["data.batch_size=50", "retrain.schedule=multistep", "retrain.duration=10it", "retrain.milestones=[1ep]"]
    check_schedule_points(config_from_dict({}, over), 1000, 4, ["retrain"])  # 5 < 10
    _points_err([*over, "retrain.duration=5it"], 1000, 4, ["retrain"], "retrain.milestones: 1ep (5 steps)")
    dense = ["data.batch_size=50", "train.method=dense", "train.schedule=multistep", "train.duration=10it",
             "train.milestones=[2ep]"]
    _points_err(dense, 1000, 4, ["pretrain"], "train.milestones: 2ep (10 steps)")
    # LoFT iterates the whole set on every rank: 2ep = 40 steps, beyond 10 as well, but the message says 40
    _points_err([*dense, "train.method=loft"], 1000, 4, ["pretrain"], "train.milestones: 2ep (40 steps)")


def test_rewind_to_step_zero_asks_for_init():
    _points_err(["data.batch_size=100", "prune.rewind=0it"], 1000, 1, ["prune"],
                "prune.rewind: 0it is the start of pretraining: use prune.rewind=init")


@pytest.mark.parametrize("overrides,needle", [
    (["model.arch=lenet300_100", "prune.method=unstructured", "prune.fc_rate=0"], "prune.fc_rate=0.0: nothing of lenet300_100"),
    (["model.arch=conv2", "prune.method=unstructured", "prune.conv_rate=0", "prune.fc_rate=0"], "nothing of conv2"),
    (["model.arch=lenet300_100", "prune.method=unstructured", "prune.scope=global", "prune.fc_rate=0"], "nothing of lenet300_100"),
])
def test_unstructured_rates_that_prune_nothing_are_rejected(overrides, needle, tmp_path):
    from loft_hpc.validate import validate_job

    cfg = load_config(DEFAULT, ["data.name=synthetic", "data.synthetic_train_size=64", "data.batch_size=16",
                                "model.inner_width_factor=1", f"output.dir={tmp_path}", *overrides])
    with pytest.raises(ConfigError) as e:
        validate_job(cfg, 1, ALL_STAGES)
    assert needle in str(e.value), str(e.value)
