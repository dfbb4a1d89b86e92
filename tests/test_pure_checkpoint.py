"""The HDF5 layout's declared fields (loft_hpc/checkpoint/layout.py, against its own documentation)
and the pure parts of run identity (loft_hpc/checkpoint/identity.py: flattened config, identities,
the one-line differences; content_digest reads HDF5 files and is left out), single process (part
of the mutation-testing selection, ``make mutation``)."""
from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest

from loft_hpc.checkpoint import layout
from loft_hpc.checkpoint import identity
from loft_hpc.checkpoint.identity import OPERATIONAL, RESULT_KEYS, _plain, differences, flat_config, make_identity
from loft_hpc.config import Step, config_from_dict


# ------------------------------------------------------------------------------------ layout.py
def _doc_block(path: str) -> str:
    """The text describing ``path`` in the layout's docstring (up to the next path)."""
    doc = layout.__doc__
    start = doc.index(f"    {path} ")
    nxt = re.search(r"\n    /", doc[start + 5:])
    block = doc[start:start + 5 + nxt.start()] if nxt else doc[start:]
    return block


def test_format_and_version():
    assert layout.FORMAT == "loft_hpc"
    assert layout.FORMAT_VERSION == 2 and "(format version 2)" in layout.__doc__


def test_metric_fields_are_the_documented_columns():
    names = [n for n, _ in layout.METRIC_FIELDS]
    assert names == ["step", "round", "epoch", "step_loss", "step_acc", "train_loss", "train_acc", "test_loss",
                     "test_acc", "lr", "bytes_sent", "bytes_received", "wall_time"]
    block = _doc_block("/metrics")
    positions = [block.index(n + ("," if n != "wall_time" else ".")) for n in names]
    assert positions == sorted(positions)                        # documented in this order
    dtypes = dict(layout.METRIC_FIELDS)
    assert all(dtypes[n] == np.int64 for n in ("step", "round", "bytes_sent", "bytes_received"))
    assert all(dtypes[n] == np.float64 for n in names if n not in ("step", "round", "bytes_sent", "bytes_received"))
    np.zeros(2, dtype=layout.METRIC_FIELDS)                      # a valid compound dtype


def test_comm_and_sparsity_fields():
    assert layout.COMM_FIELDS == [("round", np.int64), ("step", np.int64), ("rank", np.int64),
                                  ("allgather_sent", np.int64), ("allgather_received", np.int64),
                                  ("allreduce_sent", np.int64), ("allreduce_received", np.int64),
                                  ("p2p_sent", np.int64), ("p2p_received", np.int64),
                                  ("alltoall_sent", np.int64), ("alltoall_received", np.int64),
                                  ("assemble_sent", np.int64), ("assemble_received", np.int64), ("seconds", np.float64)]
    block = _doc_block("/comm")
    for n, _ in layout.COMM_FIELDS:
        assert n in block, n
    assert layout.SPARSITY_FIELDS == [("name", "S256"), ("kept", np.int64), ("total", np.int64)]
    assert np.zeros(1, dtype=layout.SPARSITY_FIELDS)["name"].dtype.itemsize == 256


# ---------------------------------------------------------------------------------- identity.py
def test_plain_values():
    assert _plain(Step(20, "ep")) == "20ep"
    assert _plain([Step(1, "it"), 0.5, "x", None, True]) == ["1it", 0.5, "x", None, True]
    assert _plain((1, (2, Step(3, "ep")))) == [1, [2, "3ep"]]
    for v in (0, -3, 2.5, "", "end", None, False):
        assert _plain(v) is v
    assert _plain({"a": 1}) == "{'a': 1}"                        # anything else: its text


def test_flat_config_every_key_once():
    cfg = config_from_dict({}, ["train.lr=0.05", "train.milestones=[2ep, 100it]", "prune.ratios=[0.3]"])
    flat = flat_config(cfg)
    assert flat["train.lr"] == 0.05 and flat["train.duration"] == "20ep"
    assert flat["train.milestones"] == ["2ep", "100it"] and flat["prune.ratios"] == [0.3]
    assert flat["data.name"] == "digits" and flat["output.resume"] is True
    want = [f"{s.name}.{f.name}" for s in dataclasses.fields(cfg) for f in dataclasses.fields(getattr(cfg, s.name))]
    assert list(flat) == want


def test_make_identity_keys_per_kind(tmp_path, monkeypatch):
    cfg = config_from_dict({}, ["train.lr=0.05"])
    flat = flat_config(cfg)
    for kind, want in RESULT_KEYS.items():
        ident = make_identity(cfg, kind)
        assert ident["kind"] == kind and ident["inputs"] == {}
        expect = {k: v for k, v in flat.items()
                  if k not in OPERATIONAL and (k in want or k.split(".")[0] in want)}
        assert ident["config"] == expect, kind
    pre = make_identity(cfg, "pretrain")["config"]
    assert "train.lr" in pre and "data.name" in pre and "model.arch" in pre
    assert not any(k.startswith(("prune.", "retrain.", "output.")) for k in pre)
    assert "data.root" not in pre and "train.eval_every" not in pre and "train.threads" not in pre
    ticket = make_identity(cfg, "ticket")["config"]
    assert "prune.method" in ticket and "prune.ratios" not in ticket and "train.seed" not in ticket
    retrain = make_identity(cfg, "retrain")["config"]
    assert retrain["train.seed"] == 0 and "train.lr" not in retrain and "retrain.lr" in retrain
    # inputs: each file's content digest (of its tensors, read from the HDF5 file: not pure, replaced
    # here) under the file's name
    monkeypatch.setattr(identity, "content_digest", lambda p: f"digest of {p}")
    a, b = tmp_path / "pretrain.h5", tmp_path / "tickets_p50.h5"
    ident = make_identity(cfg, "retrain", [a, str(b)])
    assert ident["inputs"] == {"pretrain.h5": f"digest of {a}", "tickets_p50.h5": f"digest of {b}"}
    with pytest.raises(KeyError):
        make_identity(cfg, "nonsense")


def test_differences_each_kind_of_change():
    h1, h2, h3 = "a" * 64, "b" * 64, "c" * 64
    saved = {"kind": "retrain", "config": {"retrain.lr": 0.1, "train.seed": 0, "model.arch": "conv2"},
             "inputs": {"tickets_p50.h5": h1, "pretrain.h5": h2}}
    assert differences(saved, saved) == []
    assert differences({}, saved) == ["the file records no identity"]
    current = {"kind": "imp", "config": {"retrain.lr": 0.05, "train.seed": 0, "data.name": "digits"},
               "inputs": {"tickets_p50.h5": h3, "weights@8it.h5": h1}}
    assert differences(saved, current) == [
        "stage kind retrain -> imp",
        "data.name <unset> -> digits",
        "model.arch conv2 -> <unset>",
        "retrain.lr 0.1 -> 0.05",
        "input pretrain.h5 no longer used",
        f"input tickets_p50.h5 changed (sha256 {'a' * 12} -> {'c' * 12})",
        "input weights@8it.h5 new",
    ]
    # a file written before identities had inputs or config: missing parts compare as empty
    assert differences({"kind": "retrain"}, {"kind": "retrain", "config": {"x": 1}, "inputs": {"f": h1}}) == [
        "x <unset> -> 1", "input f new"]
    assert differences({"kind": "retrain", "config": {"x": 1}, "inputs": {"f": h1}}, {"kind": "retrain"}) == [
        "x 1 -> <unset>", "input f no longer used"]
    # a key that appears with the value None is not the same as a key that is absent
    assert differences({"kind": "k", "config": {}}, {"kind": "k", "config": {"x": None}}) == ["x <unset> -> None"]
    assert differences({"kind": "k", "config": {"x": None}}, {"kind": "k", "config": {}}) == ["x None -> <unset>"]
    assert differences({"kind": "k", "config": {"x": None}}, {"kind": "k", "config": {"x": None}}) == []


def test_a_zombie_holds_no_lock():
    """A killed job's rank that nobody has reaped yet is a zombie: kill(pid, 0) still succeeds, but
    the lock must count it dead (else a resumed job is refused until init reaps it)."""
    import os
    import subprocess
    import time

    from loft_hpc.checkpoint.lock import _alive

    child = subprocess.Popen(["sleep", "0"])
    deadline = time.time() + 10
    while time.time() < deadline:  # exited, not reaped: a zombie
        with open(f"/proc/{child.pid}/stat") as f:
            if f.read().rpartition(")")[2].split()[0] == "Z":
                break
        time.sleep(0.01)
    assert not _alive(child.pid)
    child.wait()
    assert _alive(os.getpid())
