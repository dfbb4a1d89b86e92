"""Reading loft_hpc run files for the offline tools (``loft-tools``), and the one-line errors.

``load_run(path)`` gives the :class:`~loft_hpc.checkpoint.h5file.RunFile` of a file or raises
:class:`ToolError` with one line naming it: missing, a folder, unreadable, empty, not HDF5,
truncated or corrupt, an HDF5 file of something else, another format version, a loft_hpc file
without its required parts. Those checks use h5py only (no torch), so a bad path fails fast.
``load_run(path, needs=(...))`` also checks, still with h5py only, that the file has what a tool
needs (:data:`NEEDS`: a pretraining file, snapshots, /metrics rows, /comm, /ticket).

The other helpers read what the tools show: the filter groups in the model's order and which of
them LoFT partitions (:func:`group_info`, rebuilding the model from the file's config), a group's
score history (:func:`history`), the step / round / epoch of every snapshot (:func:`snapshot_axis`).
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np

from loft_hpc.checkpoint.layout import FORMAT, FORMAT_VERSION

SCORE_TEXT = {"l2": "squared L2 norm", "l1": "L1 norm"}
PRETRAIN_STAGE = "pretrain"
# what read_run_file needs in every loft_hpc file
REQUIRED_ATTRS = ("stage", "arch", "world_size", "seed")
REQUIRED_MEMBERS = ("config", "progress", "model")


class ToolError(RuntimeError):
    """A one-line problem with the command line or an input file (``loft-tools`` prints it and
    exits with status 2)."""


# ------------------------------------------------------------------------------------ opening
def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else e.__class__.__name__


def check_file(path: str | os.PathLike, needs: tuple[str, ...] = ()) -> None:
    """Raise :class:`ToolError` (one line naming ``path``) unless it is a readable loft_hpc file of
    this format version with the parts every such file has, and what ``needs`` names (keys of
    :data:`NEEDS`: ``pretraining``, ``snapshots``, ``metrics``, ``comm``, ``ticket``). h5py only:
    no torch import, so a bad file fails fast."""
    p = os.fspath(path)
    if not os.path.lexists(p):
        raise ToolError(f"{p}: no such file")
    if not os.path.exists(p):
        raise ToolError(f"{p}: no such file (a broken symbolic link)")
    if os.path.isdir(p):
        raise ToolError(f"{p}: is a folder, not a loft_hpc file (give the .h5 file in it, e.g. {p}/pretrain.h5)")
    if not os.path.isfile(p):
        raise ToolError(f"{p}: not a regular file")
    try:
        with open(p, "rb") as fh:
            head = fh.read(8)
    except OSError as e:
        raise ToolError(f"{p}: cannot be read ({e.strerror or e.__class__.__name__})") from None
    if not head:
        raise ToolError(f"{p}: empty file (0 bytes), not a loft_hpc file")
    import h5py

    try:
        hdf5 = h5py.is_hdf5(p)
    except (OSError, ValueError):
        hdf5 = False
    if not hdf5:
        raise ToolError(f"{p}: not an HDF5 file (no HDF5 signature; loft_hpc files are HDF5)")
    try:
        f = h5py.File(p, "r")
    except (OSError, ValueError, RuntimeError) as e:
        raise ToolError(f"{p}: truncated or corrupt HDF5 file, cannot be opened ({_first_line(e)})") from None
    try:
        with f:
            fmt = _text(f.attrs.get("format"))
            if fmt != FORMAT:
                what = "no format attribute" if fmt is None else f"format attribute {fmt!r}"
                raise ToolError(f"{p}: an HDF5 file but not a loft_hpc file ({what}, expected {FORMAT!r})")
            version = f.attrs.get("format_version")
            if version is None or int(version) != FORMAT_VERSION:
                raise ToolError(f"{p}: loft_hpc format version {version if version is not None else '(none)'}; "
                                f"this loft_hpc reads format version {FORMAT_VERSION}")
            lacking = [f"attribute {a}" for a in REQUIRED_ATTRS if a not in f.attrs]
            lacking += [f"/{m}" for m in REQUIRED_MEMBERS if m not in f]
            if lacking:
                raise ToolError(f"{p}: incomplete loft_hpc file: no {', no '.join(lacking)}")
            for need in needs:
                NEEDS[need](f, p)
    except ToolError:
        raise
    except (OSError, KeyError, ValueError, TypeError, RuntimeError) as e:
        raise ToolError(f"{p}: truncated or corrupt HDF5 file ({_first_line(e)})") from None


def load_run(path: str | os.PathLike, needs: tuple[str, ...] = ()):
    """The :class:`~loft_hpc.checkpoint.h5file.RunFile` of ``path``; any problem with the file, or
    a part of ``needs`` (see :func:`check_file`) it lacks, is a one-line :class:`ToolError`."""
    check_file(path, needs)
    from loft_hpc.checkpoint.h5file import CheckpointError, read_run_file

    try:
        return read_run_file(path)
    except CheckpointError as e:
        raise ToolError(str(e)) from None


def _text(v):
    return v.decode() if isinstance(v, bytes) else v


# ------------------------------------------------------------------------ what a tool needs
# Each takes the open h5py.File and the path; a file without the part raises a one-line ToolError.
def need_pretraining(f, path) -> None:
    """A pretraining file or checkpoint (stage ``pretrain``)."""
    stage = str(_text(f.attrs["stage"]))
    if stage != PRETRAIN_STAGE:
        hint = " (a weight snapshot: model only)" if stage.endswith("-snapshot") else ""
        raise ToolError(f"{path}: a {stage} file{hint}, not a pretraining file (stage '{PRETRAIN_STAGE}': "
                        "pretrain.h5 or its checkpoint)")


def need_snapshots(f, path) -> None:
    """At least one filter-score snapshot."""
    n = f["snapshots/index"].shape[0] if "snapshots/index" in f else 0
    if n == 0 or "snapshots/scores" not in f or len(f["snapshots/scores"]) == 0:
        raise ToolError(f"{path}: no filter-score snapshots (/snapshots is empty in this "
                        f"{_text(f.attrs['stage'])} file; pretrain.h5 and its checkpoints have them)")


def need_metrics(f, path) -> None:
    """At least one /metrics row (an evaluation)."""
    if "metrics" not in f or f["metrics"].shape[0] == 0:
        raise ToolError(f"{path}: no /metrics rows (no evaluation recorded in this {_text(f.attrs['stage'])} file)")


def need_comm(f, path) -> None:
    """A /comm table (it may be empty: one rank moves nothing)."""
    if "comm" not in f:
        raise ToolError(f"{path}: no /comm table (a {_text(f.attrs['stage'])} file without communication records)")


def need_ticket(f, path) -> None:
    """A /ticket group (the online ticket detection of pretraining)."""
    if "ticket" not in f:
        raise ToolError(f"{path}: no /ticket group (written by pretraining with ticket detection)")


NEEDS = {"pretraining": need_pretraining, "snapshots": need_snapshots, "metrics": need_metrics, "comm": need_comm,
         "ticket": need_ticket}


def require_snapshots(rf, path, at_least: int = 1) -> None:
    """At least ``at_least`` filter-score snapshots in a loaded file."""
    n = len(rf.snap_index)
    if not rf.snap_scores or n == 0:
        raise ToolError(f"{path}: no filter-score snapshots (/snapshots is empty in this {rf.stage} file; "
                        "pretrain.h5 and its checkpoints have them)")
    if n < at_least:
        raise ToolError(f"{path}: {n} filter-score snapshot(s), at least {at_least} needed")


def root_attrs(path: str | os.PathLike) -> dict:
    """The root attributes of an (already checked) file, text decoded ({} when unreadable)."""
    import h5py

    try:
        with h5py.File(os.fspath(path), "r") as f:
            return {k: (v.decode() if isinstance(v, bytes) else v.item() if hasattr(v, "item") else v)
                    for k, v in f.attrs.items()}
    except (OSError, ValueError):
        return {}


# ------------------------------------------------------------------------------------ config
def config_dict(rf) -> dict:
    """The file's /config as a plain dict of sections ({} when it is not readable YAML)."""
    import yaml

    try:
        raw = yaml.safe_load(rf.config_yaml)
    except yaml.YAMLError:
        return {}
    return raw if isinstance(raw, dict) else {}


def config_value(rf, key: str, default=None):
    """``section.key`` of the file's /config, or ``default`` when it lacks it."""
    section, _, name = key.partition(".")
    sec = config_dict(rf).get(section)
    return sec.get(name, default) if isinstance(sec, dict) else default


def config_default(key: str):
    """The default of ``section.key`` in this loft_hpc's config schema."""
    import dataclasses

    from loft_hpc.config.schema import SECTIONS

    section, _, name = key.partition(".")
    cls = SECTIONS[section][0]
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.default if f.default is not dataclasses.MISSING else f.default_factory()
    raise KeyError(key)


# ----------------------------------------------------------------------------------- groups
def _natural_key(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def build_model(rf):
    """``(model, config)`` described by the file's config, shapes checked against ``/model``; None
    when that is not possible (a config this version cannot read, a data module that is missing)."""
    try:
        import importlib

        import yaml

        from loft_hpc.config import config_from_dict
        from loft_hpc.data.datasets import REGISTRY
        from loft_hpc.models import build_model as _build

        cfg = config_from_dict(yaml.safe_load(rf.config_yaml))
        # the output layer: the package's models call it classifier; any other model's is its last linear weight
        out = "classifier.weight" if "classifier.weight" in rf.model else [
            n for n, t in rf.model.items() if n.endswith(".weight") and t.dim() == 2][-1]
        num_classes = int(rf.model[out].shape[0])
        try:
            native = getattr(importlib.import_module(REGISTRY[cfg.data.name]), "NATIVE_SIZE", 32)
        except Exception:  # noqa: BLE001 - only the size guess depends on it
            native = 224 if cfg.data.name == "imagenet" else 32
        size = cfg.data.image_size or native
        for in_ch in (3, 1):
            try:
                m = _build(cfg.model, num_classes=num_classes, in_channels=in_ch, image_size=size,
                           dataset=cfg.data.name)
            except ValueError:
                continue
            st = m.state_dict()
            if set(st) == set(rf.model) and all(tuple(st[n].shape) == tuple(rf.model[n].shape) for n in st):
                return m, cfg
    except Exception:  # noqa: BLE001 - the tools fall back to what the file itself holds
        pass
    return None


def group_info(rf) -> tuple[list[str], set[str]]:
    """Snapshot group names in the model's group order, and the partitioned ones (empty when the
    model cannot be rebuilt; the order is then the natural sort of the names)."""
    names = list(rf.snap_scores)
    built = build_model(rf)
    if built is None:
        return sorted(names, key=_natural_key), set()
    groups = built[0].filter_groups()
    order = {g.name: i for i, g in enumerate(groups)}
    ordered = sorted(names, key=lambda n: (order.get(n, len(order)), _natural_key(n)))
    return ordered, {g.name for g in groups if g.partitioned}


def select_groups(rf, wanted: list[str] | None, ordered: list[str], path=None) -> list[str]:
    """``wanted`` (checked against the file) or every group in ``ordered``."""
    where = f"{path}: " if path is not None else ""
    if not ordered:
        raise ToolError(f"{where}no filter-score snapshots (/snapshots/scores is empty)")
    if not wanted:
        return ordered
    missing = [g for g in wanted if g not in rf.snap_scores]
    if missing:
        raise ToolError(f"{where}no filter group {', '.join(missing)}; the file has: {', '.join(ordered)}")
    return list(dict.fromkeys(wanted))


# ---------------------------------------------------------------------------------- history
def history(rf, group: str, score: str, path=None) -> np.ndarray:
    """(T, C) float64 scores of ``group`` at every snapshot."""
    rows = rf.snap_scores.get(group, {}).get(score)
    if not rows:
        where = f"{path}: " if path is not None else ""
        raise ToolError(f"{where}group {group}: no {score} scores stored")
    return np.stack([np.asarray(r, dtype=np.float64) for r in rows])


def snapshot_axis(rf) -> dict[str, np.ndarray]:
    """step, round and (fractional where batches per epoch is known) epoch of every snapshot."""
    idx = np.array(rf.snap_index, dtype=np.int64).reshape(-1, 3)
    bpe = rf.progress.get("batches_per_epoch")
    epoch = idx[:, 0] / float(bpe) if bpe else idx[:, 2].astype(np.float64)
    return {"step": idx[:, 0], "round": idx[:, 1], "epoch": epoch}


def step_epoch(rf, step: int) -> float:
    """The (fractional) epoch of ``step``; NaN when the file does not say how long an epoch is."""
    bpe = rf.progress.get("batches_per_epoch")
    return step / float(bpe) if bpe else math.nan


def total_steps(rf) -> int | None:
    """The stage's planned length in steps (/progress total_steps), None when unknown."""
    t = rf.progress.get("total_steps")
    return int(t) if t else None


# ----------------------------------------------------------------------------------- output
def run_label(path: str | os.PathLike) -> str:
    """The run file as a figure title names it: its folder (the run) and its name."""
    p = Path(os.path.abspath(path))
    return f"{p.parent.name}/{p.name}" if p.parent.name else p.name


def pyplot():
    """matplotlib.pyplot on the Agg backend (imported only by the commands that draw)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def output_path(path: str | os.PathLike, flag: str) -> Path:
    """``path`` as an output file: its folder is made; a folder given as the file is refused."""
    p = Path(path)
    if p.is_dir():
        raise ToolError(f"{flag} {p}: is a folder; give a file name")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ToolError(f"{flag} {p}: cannot make its folder ({e.strerror or e.__class__.__name__})") from None
    return p


def save_figure(fig, path: str | os.PathLike, flag: str, dpi: int) -> None:
    """Write a matplotlib figure, a one-line :class:`ToolError` when it cannot be written."""
    p = output_path(path, flag)
    try:
        fig.savefig(p, dpi=dpi)
    except (OSError, ValueError) as e:
        raise ToolError(f"{flag} {p}: cannot be written ({_first_line(e)})") from None
    finally:
        pyplot().close(fig)
