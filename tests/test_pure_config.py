"""Reading configs (loft_hpc/config/load.py and steps.py): each type conversion, each one-line error
exactly as written, overrides, files and the checks across fields, single process (part of the
mutation-testing selection, ``make mutation``)."""
from __future__ import annotations

import dataclasses

import pytest
import yaml

from loft_hpc.config import ConfigError, JobConfig, Step, config_from_dict, config_to_dict, config_to_yaml, load_config
from loft_hpc.config.load import _coerce, _number_or_text, _parse_override, _suggest


def err(overrides, raw=None) -> str:
    with pytest.raises(ConfigError) as e:
        config_from_dict(raw or {}, overrides)
    return str(e.value)


# ---------------------------------------------------------------------------------- conversions
def test_suggest():
    assert _suggest("lcoal_steps", ["lr", "local_steps"]) == " (did you mean 'local_steps'?)"
    assert _suggest("zzz", ["lr", "local_steps"]) == ""
    assert _suggest("lr", []) == ""


@pytest.mark.parametrize("default, value, want", [
    (Step(1, "ep"), "3ep", Step(3, "ep")),
    (Step(1, "ep"), 40, Step(40, "it")),
    (True, False, False),
    (3, 7, 7),
    (0.5, 2, 2.0),
    (0.5, "5e-4", 5e-4),
    (0.5, 0.25, 0.25),
    ("x", "y", "y"),
    ("x", 2024, "2024"),
    ("x", 1.5, "1.5"),
    ([], [1, "5e-1", "10ep"], [1, 0.5, "10ep"]),
    (None, {"any": 1}, {"any": 1}),          # a field of another type takes the value as given
])
def test_coerce_accepts(default, value, want):
    got = _coerce("s.k", value, default)
    assert got == want and type(got) is type(want)


@pytest.mark.parametrize("default, value, message", [
    (Step(1, "ep"), "3 epochs", "s.k: expected a step like '30ep' or '500it', got '3 epochs'"),
    (Step(1, "ep"), -2, "s.k: a step must be >= 0, got -2"),
    (Step(1, "ep"), True, "s.k: expected a step like '30ep' or '500it', got True"),
    (True, 1, "s.k: expected true or false, got 1"),
    (True, "yes", "s.k: expected true or false, got 'yes'"),
    (3, True, "s.k: expected an integer, got True"),
    (3, 1.5, "s.k: expected an integer, got 1.5"),
    (3, "3", "s.k: expected an integer, got '3'"),
    (0.5, "fast", "s.k: expected a number, got 'fast'"),
    (0.5, False, "s.k: expected a number, got False"),
    (0.5, [1], "s.k: expected a number, got [1]"),
    ("x", True, "s.k: expected a string, got True"),
    ("x", ["a"], "s.k: expected a string, got ['a']"),
    ([], 0.5, "s.k: expected a list, got 0.5"),
    ([], "a", "s.k: expected a list, got 'a'"),
])
def test_coerce_rejects_with_key_and_value(default, value, message):
    with pytest.raises(ConfigError) as e:
        _coerce("s.k", value, default)
    assert str(e.value) == message


def test_number_or_text():
    assert _number_or_text("5e-1") == 0.5 and isinstance(_number_or_text("2"), float)
    assert _number_or_text("10ep") == "10ep"
    assert _number_or_text(3) == 3 and _number_or_text(None) is None


# ----------------------------------------------------------------------------- fields, sections
def test_choice_and_range_messages():
    assert err(["train.method=lofty"]) == "train.method: 'lofty' is not one of loft, dense, gpipe (did you mean 'loft'?)"
    assert err(["model.stem=qqq"]) == "model.stem: 'qqq' is not one of auto, cifar, imagenet"
    assert err(["train.lr=0"]) == "train.lr: 0.0 must be > 0 and finite"
    assert err(["train.momentum=1"]) == "train.momentum: 1.0 must be in [0, 1)"
    # a check that cannot compare the value (strings in a list of ratios) rejects it too
    assert err(["prune.ratios=[a, b]"]) == "prune.ratios: ['a', 'b'] must be a non-empty list of values in (0, 1)"
    assert config_from_dict({}, ["train.momentum=0"]).train.momentum == 0.0


def test_sections_and_keys():
    assert err([], {"train": 5}) == "train: expected a mapping of keys, got 5"
    assert err([], {"train": {"lrr": 0.1}}) == "unknown key train.lrr (did you mean 'lr'?)"
    assert err([], {"trian": {}}) == "unknown section 'trian' (did you mean 'train'?)"
    assert config_from_dict({"train": None, "data": {}}) == JobConfig()
    assert config_from_dict(None) == JobConfig()
    cfg = config_from_dict({"train": {"lr": 0.3, "local_steps": 4}})
    assert (cfg.train.lr, cfg.train.local_steps, cfg.train.momentum) == (0.3, 4, 0.9)


# ------------------------------------------------------------------------------------ overrides
def test_parse_override():
    assert _parse_override("train.lr=0.5") == ("train", "lr", 0.5)
    assert _parse_override(" train.lr =0.5") == ("train", "lr", 0.5)
    assert _parse_override("output.dir=a=b") == ("output", "dir", "a=b")
    assert _parse_override("output.dir=") == ("output", "dir", "")
    assert _parse_override("output.dir=   ") == ("output", "dir", "")
    assert _parse_override("prune.ratios=[0.3, 0.6]") == ("prune", "ratios", [0.3, 0.6])
    assert _parse_override("output.dir=[oops") == ("output", "dir", "[oops")   # not YAML: the text itself
    assert _parse_override(".lr=1") == ("", "lr", 1)            # rejected later as an unknown section
    assert _parse_override("train.a.b=1") == ("train", "a.b", 1)  # the section ends at the first dot
    assert err(["train.lr.x=1"]) == "unknown key train.lr.x (did you mean 'lr'?)"
    for bad in ("train.lr", "trainlr=1", "train.=1"):
        with pytest.raises(ConfigError) as e:
            _parse_override(bad)
        assert str(e.value) == f"override {bad!r}: expected section.key=value"


def test_override_errors_and_order():
    assert err(["trian.lr=0.1"]) == "override 'trian.lr=0.1': unknown section 'trian' (did you mean 'train'?)"
    assert err(["zz.lr=0.1"]) == "override 'zz.lr=0.1': unknown section 'zz'"
    assert err([".lr=0.1"]) == "override '.lr=0.1': unknown section ''"
    assert err(["train.lr=0.1"], {"train": [1, 2]}) == "train: expected a mapping of keys, got [1, 2]"
    raw = {"train": {"lr": 0.5}}
    cfg = config_from_dict(raw, ["train.local_steps=3", "train.lr=0.2", "train.lr=0.125"])
    assert (cfg.train.lr, cfg.train.local_steps) == (0.125, 3)
    assert raw == {"train": {"lr": 0.5}}
    assert config_from_dict({"train": None}, ["train.lr=0.2"]).train.lr == 0.2
    assert config_from_dict({}, ["output.dir="]).output.dir == ""


# -------------------------------------------------------------------------------- config files
def test_load_config_files(tmp_path):
    assert load_config(None) == JobConfig()
    assert load_config(None, ["train.lr=0.25"]).train.lr == 0.25
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: 0.5\n", encoding="utf-8")
    assert load_config(str(p), ["train.local_steps=2"]).train.lr == 0.5
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as e:
        load_config(missing)
    assert str(e.value) == f"--config {str(missing)!r}: no such file"
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path)
    assert str(e.value) == f"--config {str(tmp_path)!r}: no such file"
    utf8 = tmp_path / "utf8.yaml"
    utf8.write_bytes("output:\n  dir: runs/caf\u00e9 \u2013 1\n".encode("utf-8"))   # read as UTF-8 whatever the locale
    assert load_config(utf8).output.dir == "runs/caf\u00e9 \u2013 1"
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"train:\n  lr: 0.1 # caf\xe9\n")
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    assert str(e.value) == f"--config {str(bad)!r}: not UTF-8 text (byte 22)"
    broken = tmp_path / "broken.yaml"
    broken.write_text("train:\n  lr: 0.1\n  milestones: [1ep\n  gamma: 0.5\n")
    with pytest.raises(ConfigError) as e:
        load_config(broken)
    assert str(e.value).startswith(f"--config {str(broken)!r}: not valid YAML line ")
    assert str(e.value) == f"--config {str(broken)!r}: not valid YAML line {_yaml_error_line(broken)}"
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError) as e:
        load_config(lst)
    assert str(e.value) == f"--config {str(lst)!r}: expected a mapping of sections"
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(empty) == JobConfig()


def _yaml_error_line(path) -> int:
    try:
        yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        return e.problem_mark.line + 1
    raise AssertionError("expected a YAML error")


def test_yaml_error_without_position(tmp_path, monkeypatch):
    p = tmp_path / "c.yaml"
    p.write_text("train: {}\n")

    def boom(text):
        raise yaml.YAMLError("no mark")

    monkeypatch.setattr(yaml, "safe_load", boom)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value) == f"--config {str(p)!r}: not valid YAML"


def test_unreadable_file(tmp_path, monkeypatch):
    p = tmp_path / "c.yaml"
    p.write_text("train: {}\n")

    def denied(self, *a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(type(p), "read_text", denied)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value) == f"--config {str(p)!r}: cannot be read (Permission denied)"


# --------------------------------------------------------------------------- across the fields
def test_steps_lists_are_parsed():
    cfg = config_from_dict({}, ["train.milestones=[2ep, 100]", "retrain.milestones=[30ep]",
                                "output.snapshot_weights=[5it]"])
    assert cfg.train.milestones == [Step(2, "ep"), Step(100, "it")]
    assert cfg.retrain.milestones == [Step(30, "ep")]
    assert cfg.output.snapshot_weights == [Step(5, "it")]
    assert err(["train.milestones=[2ep, soon]"]) == "train.milestones: expected a step like '30ep' or '500it', got 'soon'"
    assert err(["retrain.milestones=[x]"]).startswith("retrain.milestones: expected a step")
    assert err(["output.snapshot_weights=[-1]"]) == "output.snapshot_weights: a step must be >= 0, got -1"


def test_rewind_mask_from_and_ticket_names():
    assert err(["prune.rewind=later"]) == "prune.rewind: 'later' is not init, end, mask_from or a step like '500it'"
    for ok in ("init", "end", "3ep", "12it"):
        assert config_from_dict({}, [f"prune.rewind={ok}"]).prune.rewind == ok
    assert err(["prune.ratios=[0.3, 0.5, 0.304]"]) == (
        "prune.ratios: 0.3 and 0.304 name the same ticket (p30): use ratios that differ by a whole percent")
    assert err(["prune.ratios=[0.05, 0.054]"]).startswith("prune.ratios: 0.05 and 0.054 name the same ticket (p05)")
    assert config_from_dict({}, ["prune.ratios=[0.3, 0.31]"]).prune.ratios == [0.3, 0.31]
    assert err(["prune.mask_from=soon"]) == "prune.mask_from: 'soon' is not end or a step like '5ep'"
    assert err(["output.snapshot_weights=[2ep, 10it]", "prune.mask_from=3ep"]) == (
        "prune.mask_from: '3ep' is not among output.snapshot_weights ['2ep', '10it']: add it there before pretraining")
    cfg = config_from_dict({}, ["output.snapshot_weights=[10it]", "prune.mask_from=10 it"])
    assert cfg.prune.mask_from == "10it"
    assert config_from_dict({}, []).prune.mask_from == "end"


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "imagenet"])
def test_data_root_required(name):
    assert err([f"data.name={name}"]) == (
        f"data.root: required for data.name={name} (the folder with the data set files)")


def test_data_root_not_required_for_embedded_sets():
    for name in ("digits", "synthetic"):
        assert config_from_dict({}, [f"data.name={name}"]).data.root == ""


# -------------------------------------------------------------------------------------- writing
def test_config_to_dict_and_yaml():
    cfg = config_from_dict({}, ["train.milestones=[2ep, 100it]", "train.duration=7ep", "prune.ratios=[0.3]"])
    d = config_to_dict(cfg)
    assert list(d) == ["data", "model", "train", "prune", "retrain", "output"]
    assert list(d["train"]) == [f.name for f in dataclasses.fields(cfg.train)]
    assert d["train"]["duration"] == "7ep" and d["train"]["milestones"] == ["2ep", "100it"]
    assert d["prune"]["ratios"] == [0.3] and d["train"]["lr"] == 0.1 and d["data"]["augment"] is True
    text = config_to_yaml(cfg)
    assert text.index("data:") < text.index("model:") < text.index("train:") < text.index("output:")
    assert text.index("  name:") < text.index("  root:")            # fields in declaration order
    assert yaml.safe_load(text) == d
    assert config_from_dict(yaml.safe_load(text)) == cfg
