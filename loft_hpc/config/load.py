"""Read a YAML config plus ``section.key=value`` overrides into a typed :class:`JobConfig`.

Every failure raises :class:`ConfigError` with one line that names the key and the value.
"""
from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any

import yaml

from loft_hpc.config.errors import ConfigError
from loft_hpc.config.schema import SECTIONS, JobConfig
from loft_hpc.config.steps import Step


def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Convert ``value`` to the type of the field's ``default`` or raise ConfigError."""
    bad = lambda what: ConfigError(f"{key}: expected {what}, got {value!r}")  # noqa: E731
    if isinstance(default, Step):
        try:
            return Step.parse(value)
        except ValueError as e:
            raise ConfigError(f"{key}: {e}") from None
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if isinstance(default, float):
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads 5e-4 as a string
            try:
                return float(value)
            except ValueError:
                raise bad("a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        return float(value)
    if isinstance(default, str):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # output.dir=2024
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if isinstance(default, list):
        if not isinstance(value, list):
            raise bad("a list")
        return [_number_or_text(v) for v in value]
    return value


def _number_or_text(v):
    """List items: PyYAML reads 5e-1 as a string; numbers written that way become floats."""
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    return v


def _check_field(key: str, f: dataclasses.Field, value: Any) -> None:
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(choices)}{_suggest(str(value), choices)}")
    check = f.metadata.get("check")
    if check is not None:
        fn, what = check
        try:
            ok = fn(value)
        except TypeError:
            ok = False
        if not ok:
            hint = _suggest(str(value), f.metadata["suggest"]) if f.metadata.get("suggest") else ""
            raise ConfigError(f"{key}: {value!r} {what}{hint}")


def _build_section(name: str, raw: Any):
    cls, _ = SECTIONS[name]
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{name}: expected a mapping of keys, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    obj = cls()
    for key, value in raw.items():
        if key not in fields:
            raise ConfigError(f"unknown key {name}.{key}{_suggest(str(key), fields)}")
        f = fields[key]
        v = _coerce(f"{name}.{key}", value, getattr(obj, key))
        setattr(obj, key, v)
    for key, f in fields.items():
        _check_field(f"{name}.{key}", f, getattr(obj, key))
    return obj


def _parse_override(text: str) -> tuple[str, str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.key=value")
    path, _, raw = text.partition("=")
    section, dot, key = path.strip().partition(".")
    if not dot or not key:
        raise ConfigError(f"override {text!r}: expected section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return section, key, value


def config_from_dict(raw: dict | None, overrides: list[str] = ()) -> JobConfig:
    raw = dict(raw or {})
    for name in raw:
        if name not in SECTIONS:
            raise ConfigError(f"unknown section {name!r}{_suggest(str(name), SECTIONS)}")
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for o in overrides:
        section, key, value = _parse_override(o)
        if section not in SECTIONS:
            raise ConfigError(f"override {o!r}: unknown section {section!r}{_suggest(section, SECTIONS)}")
        if raw.get(section) is None:  # absent, or an empty "train:" in the YAML file
            raw[section] = {}
        sec = raw[section]
        if not isinstance(sec, dict):
            raise ConfigError(f"{section}: expected a mapping of keys, got {sec!r}")
        sec[key] = value
    job = JobConfig(**{name: _build_section(name, raw.get(name)) for name in SECTIONS})
    _check_cross_fields(job)
    return job


def load_config(path: str | Path | None, overrides: list[str] = ()) -> JobConfig:
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"--config {str(path)!r}: no such file")
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as e:
            raise ConfigError(f"--config {str(path)!r}: not UTF-8 text (byte {e.start})") from None
        except OSError as e:
            raise ConfigError(f"--config {str(path)!r}: cannot be read ({e.strerror})") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"--config {str(path)!r}: not valid YAML{where}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"--config {str(path)!r}: expected a mapping of sections")
    return config_from_dict(raw, overrides)


def _steps(key: str, values: list) -> list[Step]:
    out = []
    for v in values:
        try:
            out.append(Step.parse(v))
        except ValueError as e:
            raise ConfigError(f"{key}: {e}") from None
    return out


def _check_cross_fields(job: JobConfig) -> None:
    """Checks that need more than one field but not the world size."""
    job.train.milestones = _steps("train.milestones", job.train.milestones)
    job.retrain.milestones = _steps("retrain.milestones", job.retrain.milestones)
    job.output.snapshot_weights = _steps("output.snapshot_weights", job.output.snapshot_weights)
    r = job.prune.rewind
    if r not in ("init", "end", "mask_from"):
        try:
            Step.parse(r)
        except ValueError:
            raise ConfigError(f"prune.rewind: {r!r} is not init, end, mask_from or a step like '500it'") from None
    tags = {}
    for r in job.prune.ratios:
        tag = round(r * 100)
        if tag in tags:
            raise ConfigError(f"prune.ratios: {tags[tag]} and {r} name the same ticket (p{tag:02d}): use ratios that differ by a whole percent")
        tags[tag] = r
    mf = job.prune.mask_from
    if mf != "end":
        try:
            step = Step.parse(mf)
        except ValueError:
            raise ConfigError(f"prune.mask_from: {mf!r} is not end or a step like '5ep'") from None
        if step not in job.output.snapshot_weights:
            raise ConfigError(f"prune.mask_from: {mf!r} is not among output.snapshot_weights "
                              f"{[str(s) for s in job.output.snapshot_weights]}: add it there before pretraining")
        job.prune.mask_from = str(step)
    if job.data.name in ("cifar10", "cifar100", "imagenet") and not job.data.root:
        raise ConfigError(f"data.root: required for data.name={job.data.name} (the folder with the data set files)")


def config_to_dict(job: JobConfig) -> dict:
    def plain(v):
        if isinstance(v, Step):
            return str(v)
        if isinstance(v, list):
            return [plain(x) for x in v]
        return v

    return {name: {f.name: plain(getattr(getattr(job, name), f.name)) for f in dataclasses.fields(getattr(job, name))} for name in SECTIONS}


def config_to_yaml(job: JobConfig) -> str:
    return yaml.safe_dump(config_to_dict(job), sort_keys=False)
