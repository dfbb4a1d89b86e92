"""Run identity: what made a checkpoint or a stage's file, so that nothing is resumed or reused
under another config or from other inputs.

An identity is ``{"kind", "config": {"section.key": value}, "inputs": {name: sha256}}``:

- ``config`` holds the keys that change the results of that *kind* of stage (``RESULT_KEYS``):
  pretraining depends on data, model and train; a ticket on model and prune (and, with IMP, on
  what retrains the levels); a retraining or an IMP level on data, model, retrain and the seed.
  Keys that only change how a job runs or reports (``OPERATIONAL``: data location, loader
  workers, evaluation cadence, logging, threads, device, output) are left out, so moving the data
  or evaluating more often never blocks a resume.
- ``inputs`` holds the content digest of every file the stage read (the pretraining file, the
  ticket, the previous IMP level, weight snapshots: :func:`content_digest`, the SHA-256 of its
  tensors and identity, not of its bytes, which hold creation and wall-clock times): re-pruning
  with another method rewrites the ticket, and the retraining checkpoint made from the old ticket
  is then refused; re-running the same job gives the same digests.

Every checkpoint and final file stores its identity (``/identity``). :func:`differences` names
what changed, in one line.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

from loft_hpc.config import JobConfig

# section (or section.key) that the results of each kind of stage depend on
RESULT_KEYS = {
    "pretrain": ("data", "model", "train"),
    "ticket": ("model", "prune"),
    # train.backend: on more than 2 ranks torch.distributed may sum in another order (last bits)
    "ticket-imp": ("data", "model", "prune", "retrain", "train.seed", "train.backend"),
    "imp": ("data", "model", "prune", "retrain", "train.seed", "train.backend"),
    "retrain": ("data", "model", "retrain", "train.seed", "train.backend"),
    # a control of a ticket (retrain.controls): its own kind, so a control file is never reused as another
    "retrain-random_reinit": ("data", "model", "retrain", "train.seed", "train.backend"),
    "retrain-random_prune": ("data", "model", "retrain", "train.seed", "train.backend"),
}
# keys that never change results: where the data lives, how it is loaded, how often the job
# evaluates, logs or checks, on which device and threads it runs, where it writes
OPERATIONAL = {
    "data.root", "data.num_workers", "data.verify_checksums", "data.eval_batch_size",
    "train.eval_every", "train.train_eval_samples", "train.log_every", "train.check_sync", "train.progress",
    "train.threads", "train.device",
    "train.exchange",  # allgather and alltoall give bit-identical weights and momentum (tested): only data moves differently
    "train.workers",  # a check of the job's rank count (0 or S), not a setting
    "prune.ratios",  # one file per ratio: the ratio is in the file's name
    "retrain.controls",  # which control files are made (each named by its control and of its own kind)
}


def flat_config(cfg: JobConfig) -> dict[str, object]:
    out = {}
    for sec in dataclasses.fields(cfg):
        for f in dataclasses.fields(getattr(cfg, sec.name)):
            v = getattr(getattr(cfg, sec.name), f.name)
            out[f"{sec.name}.{f.name}"] = _plain(v)
    return out


def _plain(v):
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    return str(v)  # Step -> '20ep'


def content_digest(path: str | os.PathLike) -> str:
    """SHA-256 of what a stage reads from a run file: its tensors (model, masks, theta_0, by name),
    mask attributes and its own identity. Creation times and wall-clock histories are left out,
    so two identical runs give files with the same digest."""
    import json

    from loft_hpc.checkpoint.h5file import read_run_file

    rf = read_run_file(path)
    h = hashlib.sha256()
    for part, tensors in (("model", rf.model), ("masks", rf.masks), ("init", rf.init)):
        for n in sorted(tensors):
            t = tensors[n].detach().cpu().contiguous()
            h.update(f"{part}/{n}/{t.dtype}/{tuple(t.shape)}".encode())
            h.update(t.numpy().tobytes())
    h.update(json.dumps({"mask_attrs": rf.mask_attrs, "identity": rf.identity}, sort_keys=True, default=str).encode())
    return h.hexdigest()


def make_identity(cfg: JobConfig, kind: str, inputs: list[Path] = ()) -> dict:
    want = RESULT_KEYS[kind]
    config = {k: v for k, v in flat_config(cfg).items()
              if k not in OPERATIONAL and (k in want or k.split(".", 1)[0] in want)}
    return {"kind": kind, "config": config, "inputs": {Path(p).name: content_digest(p) for p in inputs}}


def differences(saved: dict, current: dict) -> list[str]:
    """Short descriptions of what differs ('train.lr 0.1 -> 0.05', 'input tickets_p50.h5 changed')."""
    if not saved:
        return ["the file records no identity"]
    out = []
    if saved.get("kind") != current.get("kind"):
        out.append(f"stage kind {saved.get('kind')} -> {current.get('kind')}")
    a, b = saved.get("config", {}), current.get("config", {})
    for k in sorted(set(a) | set(b)):
        if a.get(k, "<unset>") != b.get(k, "<unset>"):
            out.append(f"{k} {a.get(k, '<unset>')} -> {b.get(k, '<unset>')}")
    a, b = saved.get("inputs", {}), current.get("inputs", {})
    for k in sorted(set(a) | set(b)):
        if k not in a:
            out.append(f"input {k} new")
        elif k not in b:
            out.append(f"input {k} no longer used")
        elif a[k] != b[k]:
            out.append(f"input {k} changed (sha256 {a[k][:12]} -> {b[k][:12]})")
    return out
