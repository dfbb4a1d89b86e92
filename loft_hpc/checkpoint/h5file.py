"""Read and write loft_hpc HDF5 files (layout: :mod:`loft_hpc.checkpoint.layout`).

``RunFile`` is the in-memory content of one file. Writes go to a temporary file in the same
folder, which is closed and then renamed: a killed job never leaves a half-written file under
the real name. The temporary file is flushed to disk (``fsync``) before the rename and the
folder after it, so a file that has its real name survives a crash of the node.
"""
from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone

import h5py
import numpy as np
import torch

from loft_hpc.checkpoint.layout import (COMM_FIELDS, COVERAGE_FIELDS, FORMAT, FORMAT_VERSION, METRIC_FIELDS,
                                       SPARSITY_FIELDS)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: the message is one line naming the file and the problem.
    ``agreed``: every rank raised it with the same message (rank 0 prints it, no abort needed)."""

    def __init__(self, message: str, agreed: bool = False) -> None:
        super().__init__(message)
        self.agreed = agreed


@dataclass
class RunFile:
    stage: str
    config_yaml: str
    arch: str
    world_size: int
    seed: int
    model: dict[str, torch.Tensor]
    progress: dict = field(default_factory=dict)
    momentum: dict[str, torch.Tensor] = field(default_factory=dict)
    ranks: list[dict] = field(default_factory=list)  # per rank: rng states, counters, run_stats, buffers
    identity: dict = field(default_factory=dict)
    init: dict[str, torch.Tensor] = field(default_factory=dict)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    mask_attrs: dict = field(default_factory=dict)
    snap_index: list[tuple[int, int, int]] = field(default_factory=list)
    snap_scores: dict[str, dict[str, list[np.ndarray]]] = field(default_factory=dict)
    weight_snapshots: dict[str, str] = field(default_factory=dict)
    metrics: list[dict] = field(default_factory=list)
    comm: list[dict] = field(default_factory=list)
    sparsity: list[dict] = field(default_factory=list)
    coverage: list[dict] = field(default_factory=list)
    ticket: dict = field(default_factory=dict)  # /ticket attrs, plus "criteria": {name: attrs + "distance"}
    complete: bool = False


def _versions() -> str:
    import yaml

    import loft_hpc

    v = {"loft_hpc": loft_hpc.__version__, "torch": str(torch.__version__), "h5py": str(h5py.__version__),
         "numpy": str(np.__version__)}
    try:
        import horovod

        v["horovod"] = str(horovod.__version__)
    except ImportError:  # a cluster without it runs with train.backend=torch
        v["horovod"] = "not installed"
    return yaml.safe_dump(v)


def _table(g: h5py.Group, name: str, fields, rows: list[dict]) -> None:
    dtype = np.dtype(fields)
    arr = np.zeros(len(rows), dtype=dtype)
    for i, r in enumerate(rows):
        for f, _ in fields:
            v = r.get(f, np.nan if dtype[f].kind == "f" else 0)
            arr[i][f] = v.encode() if isinstance(v, str) else v
    g.create_dataset(name, data=arr, maxshape=(None,), chunks=(max(1, min(len(rows), 1024)) if rows else (64,)),
                     compression="gzip", shuffle=True)


def _read_table(ds) -> list[dict]:
    out = []
    for row in ds[()]:
        d = {}
        for f in ds.dtype.names:
            v = row[f]
            d[f] = v.decode() if isinstance(v, bytes) else v.item()
        out.append(d)
    return out


def _tensors(g: h5py.Group, tensors: dict[str, torch.Tensor], compress: bool = False) -> None:
    for n, t in tensors.items():
        a = t.detach().cpu().numpy()
        kw = dict(compression="gzip", shuffle=True) if compress and a.size > 0 else {}
        g.create_dataset(n, data=a, **kw)


def _read_tensors(g: h5py.Group | None) -> dict[str, torch.Tensor]:
    return {} if g is None else {n: torch.from_numpy(np.array(g[n][()])) for n in g}


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


RANK_COUNTERS = ("bytes_sent", "bytes_received", "comm_seconds")


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename in ``folder`` durable (POSIX: fsync the directory)."""
    fd = os.open(os.fspath(folder), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def estimated_size(rf: RunFile) -> int:
    """An upper estimate of the file's size in bytes (tensors uncompressed, plus metadata)."""
    n = sum(t.numel() * t.element_size() for d in (rf.model, rf.momentum, rf.init) for t in d.values())
    n += sum(t.numel() for t in rf.masks.values())
    for st in rf.ranks:
        n += sum(t.numel() * t.element_size() for t in st.get("buffers", {}).values()) + 64 * 1024
    n += sum(len(rows) * (rows[0].size * 4 if rows else 0) for per in rf.snap_scores.values() for rows in per.values())
    n += 200 * (len(rf.metrics) + len(rf.comm) + len(rf.sparsity) + len(rf.coverage)) + len(rf.config_yaml)
    return int(n * 1.1) + (1 << 20)


def _check_free_space(path: str, folder: str, rf: RunFile) -> None:
    """Refuse to start a write that cannot fit: HDF5 may crash the process (not raise) when the
    disk fills up in the middle of a write, so a full disk must be caught before."""
    st = os.statvfs(folder)
    free, need = st.f_bavail * st.f_frsize, estimated_size(rf)
    if free < need:
        raise OSError(errno.ENOSPC, f"cannot write {path}: {os.strerror(errno.ENOSPC)} "
                                    f"({free / 1e6:.1f} MB free, about {need / 1e6:.1f} MB needed)")


def write_run_file(path: str | os.PathLike, rf: RunFile) -> None:
    path = os.fspath(path)
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    _check_free_space(path, folder, rf)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".h5", dir=folder)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600: honour the umask as open() would
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs.update(format=FORMAT, format_version=FORMAT_VERSION, stage=rf.stage, arch=rf.arch,
                           world_size=rf.world_size, seed=rf.seed, complete=int(rf.complete),
                           created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                           versions=_versions())
            f.create_dataset("config", data=rf.config_yaml, dtype=h5py.string_dtype())
            f.create_group("progress").attrs.update({k: v for k, v in rf.progress.items()})
            _tensors(f.create_group("model"), rf.model)
            if rf.momentum:
                _tensors(f.create_group("optimizer").create_group("momentum"), rf.momentum)
            f.create_dataset("identity", data=json.dumps(rf.identity, sort_keys=True), dtype=h5py.string_dtype())
            ranks = f.create_group("ranks")
            for r, st in enumerate(rf.ranks):
                g = ranks.create_group(str(r))
                g.create_dataset("torch", data=st["torch"].numpy())
                if st.get("cuda") is not None:
                    g.create_dataset("cuda", data=st["cuda"].numpy())
                if st.get("run_stats") is not None:
                    g.create_dataset("run_stats", data=np.asarray(st["run_stats"], dtype=np.float64))
                if st.get("buffers"):
                    _tensors(g.create_group("buffers"), st["buffers"])
                g.attrs.update(numpy=st["numpy"], python=st["python"],
                               **{k: st[k] for k in RANK_COUNTERS if k in st})
            if rf.init:
                _tensors(f.create_group("init"), rf.init)
            if rf.masks:
                m = f.create_group("masks")
                _tensors(m, {n: t.to(torch.uint8) for n, t in rf.masks.items()}, compress=True)
                m.attrs.update(rf.mask_attrs)
            snaps = f.create_group("snapshots")
            idx = np.array(rf.snap_index, dtype=np.int64).reshape(-1, 3)
            snaps.create_dataset("index", data=idx, maxshape=(None, 3), chunks=(64, 3))
            scores = snaps.create_group("scores")
            for gname, per in rf.snap_scores.items():
                gg = scores.create_group(gname)
                for kind, rows in per.items():
                    data = np.stack(rows).astype(np.float32) if rows else np.zeros((0, 1), np.float32)
                    gg.create_dataset(kind, data=data, maxshape=(None, data.shape[1]),
                                      chunks=(max(1, min(len(rows), 64)), data.shape[1]), compression="gzip", shuffle=True)
            snaps.create_group("weights").attrs.update(rf.weight_snapshots)
            _table(f, "metrics", METRIC_FIELDS, rf.metrics)
            _table(f, "comm", COMM_FIELDS, rf.comm)
            if rf.sparsity:
                _table(f, "sparsity", SPARSITY_FIELDS, rf.sparsity)
            if rf.coverage:
                _table(f, "coverage", COVERAGE_FIELDS, rf.coverage)
            if rf.ticket:
                _write_ticket(f, rf.ticket)
            f.flush()
        _fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(folder)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, (OSError, RuntimeError)) and not isinstance(e, CheckpointError):
            # HDF5 reports a full disk or quota as RuntimeError ("unable to extend file ...
            # errno = 28"): say which file could not be written, as an OSError with its errno
            m = re.search(r"errno = (\d+)", str(e))
            code = getattr(e, "errno", None) or (int(m.group(1)) if m else errno.EIO)
            raise OSError(code, f"cannot write {path}: {os.strerror(code)}") from None
        raise


def _write_ticket(f: h5py.File, ticket: dict) -> None:
    g = f.create_group("ticket")
    g.attrs.update({k: v for k, v in ticket.items() if k != "criteria"})
    for name, crit in ticket.get("criteria", {}).items():
        c = g.create_group(name)
        c.create_dataset("distance", data=np.asarray(crit["distance"], dtype=np.float64))
        c.attrs.update({k: v for k, v in crit.items() if k != "distance"})


def _attrs(a) -> dict:
    return {k: (v.item() if hasattr(v, "item") else _text(v) if isinstance(v, bytes) else v) for k, v in a.items()}


def _read_ticket(g: h5py.Group | None) -> dict:
    if g is None:
        return {}
    out = _attrs(g.attrs)
    out["criteria"] = {n: dict(_attrs(c.attrs), distance=np.array(c["distance"][()], dtype=np.float64))
                       for n, c in g.items()}
    return out


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def read_run_file(path: str | os.PathLike) -> RunFile:
    """The file's content; a file that is missing, not HDF5, truncated, of another format or
    version raises :class:`CheckpointError` with one line naming it."""
    path = os.fspath(path)
    try:
        f = h5py.File(path, "r")
    except (OSError, FileNotFoundError) as e:
        raise CheckpointError(f"{path}: cannot open as HDF5 ({e.__class__.__name__})") from None
    try:
        with f:
            return _read_open(path, f)
    except CheckpointError:
        raise
    except (OSError, KeyError, ValueError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{path}: unreadable (truncated or corrupt: {e.__class__.__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None


def _read_open(path: str, f: h5py.File) -> RunFile:
    if f.attrs.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a loft_hpc file (format attribute {f.attrs.get('format')!r})")
    v = int(f.attrs.get("format_version", -1))
    if v != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {v}, this loft_hpc reads version {FORMAT_VERSION}")
    ranks = []
    if "ranks" in f:
        for r in sorted(f["ranks"], key=int):
            g = f["ranks"][r]
            st = {"torch": torch.from_numpy(np.array(g["torch"][()])),
                  "cuda": torch.from_numpy(np.array(g["cuda"][()])) if "cuda" in g else None,
                  "numpy": g.attrs["numpy"], "python": g.attrs["python"],
                  "run_stats": np.array(g["run_stats"][()]) if "run_stats" in g else None,
                  "buffers": _read_tensors(g.get("buffers"))}
            st.update({k: g.attrs[k].item() for k in RANK_COUNTERS if k in g.attrs})
            ranks.append(st)
    identity = json.loads(_text(f["identity"][()])) if "identity" in f else {}
    scores = {}
    if "snapshots/scores" in f:
        for gname, gg in f["snapshots/scores"].items():
            scores[gname] = {k: list(np.array(gg[k][()])) for k in gg}
    idx = np.array(f["snapshots/index"][()]) if "snapshots/index" in f else np.zeros((0, 3))
    return RunFile(
        stage=str(f.attrs["stage"]), config_yaml=_text(f["config"][()]), identity=identity,
        arch=str(f.attrs["arch"]), world_size=int(f.attrs["world_size"]), seed=int(f.attrs["seed"]),
        model=_read_tensors(f["model"]), progress={k: v.item() if hasattr(v, "item") else v for k, v in f["progress"].attrs.items()},
        momentum=_read_tensors(f.get("optimizer/momentum")), ranks=ranks, init=_read_tensors(f.get("init")),
        masks={n: t.bool() for n, t in _read_tensors(f.get("masks")).items()},
        mask_attrs={k: (v.item() if hasattr(v, "item") else v) for k, v in f["masks"].attrs.items()} if "masks" in f else {},
        snap_index=[tuple(int(x) for x in row) for row in idx], snap_scores=scores,
        weight_snapshots={k: str(v) for k, v in f["snapshots/weights"].attrs.items()} if "snapshots/weights" in f else {},
        metrics=_read_table(f["metrics"]) if "metrics" in f else [],
        comm=_read_table(f["comm"]) if "comm" in f else [],
        sparsity=_read_table(f["sparsity"]) if "sparsity" in f else [],
        coverage=_read_table(f["coverage"]) if "coverage" in f else [],
        ticket=_read_ticket(f.get("ticket")),
        complete=bool(f.attrs.get("complete", 0)),
    )


def weight_snapshot_labels(path: str | os.PathLike) -> dict[str, str]:
    """The requested-label -> file map of a pretraining file, read cheaply (no tensors); a file
    that is not a readable loft_hpc file of this format version raises :class:`CheckpointError`."""
    path = os.fspath(path)
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != FORMAT or int(f.attrs.get("format_version", -1)) != FORMAT_VERSION:
                raise CheckpointError(f"{path}: not a loft_hpc file of format version {FORMAT_VERSION}")
            return {k: str(v) for k, v in f["snapshots/weights"].attrs.items()} if "snapshots/weights" in f else {}
    except CheckpointError:
        raise
    except (OSError, KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot be read as HDF5 ({e.__class__.__name__})") from None


def stopped_early_hint(path: str | os.PathLike) -> str:
    """``"; pretraining stopped early at step N ..."`` when the pretraining file says that
    train.stop_at_ticket ended it (so later weight snapshots were never taken), else ``""``."""
    try:
        with h5py.File(os.fspath(path), "r") as f:
            a = f["ticket"].attrs if "ticket" in f else {}
            if int(a.get("stopped_early", 0)):
                return (f"; pretraining stopped early at step {int(a['emerged_step'])} (train.stop_at_ticket), "
                        f"before any later step")
    except (OSError, KeyError, ValueError):
        pass
    return ""


def check_model_state(path: str, saved: dict[str, torch.Tensor], model: torch.nn.Module, arch: str, saved_arch: str) -> None:
    """One-line CheckpointError unless the saved tensors fit ``model`` exactly."""
    if saved_arch != arch:
        raise CheckpointError(f"{path}: holds a {saved_arch} model, the config asks for {arch}")
    state = model.state_dict()
    missing = sorted(set(state) - set(saved))
    extra = sorted(set(saved) - set(state))
    if missing or extra:
        raise CheckpointError(f"{path}: tensors do not match the model (missing {missing[:3]}, unexpected {extra[:3]})")
    for n, t in state.items():
        if tuple(saved[n].shape) != tuple(t.shape):
            raise CheckpointError(f"{path}: {n} has shape {tuple(saved[n].shape)}, the model has {tuple(t.shape)}")


def rng_state() -> dict:
    import random

    st = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
          "numpy": json.dumps([x.tolist() if hasattr(x, "tolist") else x for x in np.random.get_state()]),
          "python": repr(random.getstate())}
    return st


def set_rng_state(st: dict) -> None:
    import ast
    import random

    torch.set_rng_state(st["torch"])
    if st.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])
    s = json.loads(st["numpy"])
    np.random.set_state((s[0], np.array(s[1], dtype=np.uint32), s[2], s[3], s[4]))
    random.setstate(ast.literal_eval(st["python"]))
