"""Run identity: checkpoints and stage files are resumed or reused only by the run that made them
(issue: a retraining checkpoint of a structured ticket resumed for an unstructured one; old
pretraining weights resumed under a new learning rate and seed)."""
from __future__ import annotations

import hashlib
import shutil

import torch

from loft_hpc.checkpoint.h5file import read_run_file, write_run_file
from loft_hpc.checkpoint.identity import differences, make_identity
from loft_hpc.checkpoint.paths import RunPaths
from loft_hpc.config import load_config
from tests.mpi_util import REPO, TINY, ok, run_job

JOB = TINY + ["train.duration=16it", "train.local_steps=4", "train.eval_every=8it", "output.checkpoint_every=4it",
              "output.snapshot_every=8it", "retrain.duration=12it", "train.seed=1", "prune.ratios=[0.5]",
              "train.bn_recalibration=2"]


def digests(folder) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def unchanged(folder, before: dict) -> bool:
    """No file that existed is modified or deleted (new files, e.g. config.2.yaml, are allowed)."""
    now = digests(folder)
    return all(now.get(k) == v for k, v in before.items())


def one_error_line(p) -> str:
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    return lines[0]


def test_identity_keeps_result_keys_and_hashes_inputs(tmp_path):
    cfg = load_config(str(REPO / "configs" / "default.yaml"), ["train.lr=0.05"])
    from tests.test_checkpoint import sample_runfile

    f = tmp_path / "tickets_p50.h5"
    rf = sample_runfile()
    write_run_file(f, rf)
    ident = make_identity(cfg, "retrain", [f])
    assert list(ident["inputs"]) == ["tickets_p50.h5"] and len(ident["inputs"]["tickets_p50.h5"]) == 64
    # the digest is of what a stage reads, not of the bytes: another creation time and other
    # wall-clock histories (a rerun of the same job) give the same digest ...
    again = sample_runfile()
    again.metrics[0]["wall_time"] = 99.0
    again.progress["wall_time"] = 12.5
    write_run_file(f, again)
    assert make_identity(cfg, "retrain", [f]) == ident
    assert "retrain.lr" in ident["config"] and "train.seed" in ident["config"]
    assert "train.lr" not in ident["config"]  # pretraining's lr does not change a retraining
    assert not any(k.startswith("output.") or k in ("data.root", "data.num_workers") for k in ident["config"])
    pre = make_identity(cfg, "pretrain")
    assert pre["config"]["train.lr"] == 0.05 and "retrain.lr" not in pre["config"]
    other = make_identity(load_config(str(REPO / "configs" / "default.yaml"), ["train.lr=0.1", "data.num_workers=2"]),
                          "pretrain")
    assert differences(pre, other) == ["train.lr 0.05 -> 0.1"]
    # ... one weight or one mask entry more or less does not
    for change in ("weight", "mask"):
        other = sample_runfile()
        if change == "weight":
            other.model["conv.weight"][0, 0, 0, 0] += 1e-6
        else:
            other.masks["conv.weight"][0, 0, 0, 0] = ~other.masks["conv.weight"][0, 0, 0, 0]
        write_run_file(f, other)
        d = differences(ident, make_identity(cfg, "retrain", [f]))
        assert len(d) == 1 and d[0].startswith("input tickets_p50.h5 changed"), (change, d)


def test_checkpoint_of_another_config_is_refused_then_restarted(tmp_path):
    out = tmp_path / "run"
    p = run_job(0, ["--stage", "pretrain", *JOB, f"output.dir={out}"], env={"LOFT_FAULT_INJECT": "0:3"})
    assert p.returncode == 1
    ck = RunPaths(out).latest("pretrain")
    assert ck.name == "ckpt-0000000012.h5"
    before = digests(out)
    # the case: pretrain.h5 absent, rerun with another lr and seed
    p = run_job(0, ["--stage", "pretrain", *JOB, "train.lr=0.02", "train.seed=2", f"output.dir={out}"])
    assert p.returncode == 2
    line = one_error_line(p)
    assert "ckpt-0000000012.h5 was written by another run" in line
    assert "train.lr 0.05 -> 0.02" in line and "train.seed 1 -> 2" in line
    assert unchanged(out, before)  # nothing was modified or deleted
    assert (out / "config.2.yaml").is_file()  # the job's own config beside, config.yaml kept
    # explicitly: start over
    p = ok(run_job(0, ["--stage", "pretrain", *JOB, "train.lr=0.02", "train.seed=2", "output.on_mismatch=restart",
                       f"output.dir={out}"]))
    assert "starting this stage over" in p.stdout and "resumed from" not in p.stdout
    fresh = tmp_path / "fresh"
    ok(run_job(0, ["--stage", "pretrain", *JOB, "train.lr=0.02", "train.seed=2", f"output.dir={fresh}"]))
    a, b = read_run_file(out / "pretrain.h5"), read_run_file(fresh / "pretrain.h5")
    assert all(torch.equal(a.model[n], b.model[n]) for n in a.model)
    # an operational key (evaluation cadence, workers) does not block a resume or reuse
    p = ok(run_job(0, ["--stage", "pretrain", *JOB, "train.lr=0.02", "train.seed=2", "train.eval_every=4it",
                       f"output.dir={out}"]))
    assert "exists, skipping" in p.stdout


def test_stage_file_of_another_config_is_refused(tmp_path):
    out = tmp_path / "run"
    ok(run_job(0, ["--stage", "pretrain", *JOB, f"output.dir={out}"]))
    before = digests(out)
    p = run_job(0, ["--stage", "pretrain", *JOB, "train.weight_decay=0.001", f"output.dir={out}"])
    assert p.returncode == 2
    line = one_error_line(p)
    assert "pretrain.h5 was made by another run (train.weight_decay 0.0005 -> 0.001)" in line
    assert unchanged(out, before)
    p = ok(run_job(0, ["--stage", "pretrain", *JOB, "train.weight_decay=0.001", "output.on_mismatch=keep",
                       f"output.dir={out}"]))
    assert "reusing" in p.stdout and unchanged(out, before)


def test_retraining_checkpoint_of_an_old_ticket_is_refused(tmp_path):
    """The issue's reproduction on 2 ranks: retraining of the structured p50 ticket killed; the
    ticket re-pruned as unstructured; the retraining must not resume the old checkpoint."""
    out = tmp_path / "run"
    p = run_job(2, ["--stage", "all", *JOB, f"output.dir={out}"], env={"LOFT_FAULT_INJECT": "0:9:retrain_p50"})
    assert p.returncode == 1
    assert RunPaths(out).latest("retrain_p50") is not None
    (out / "tickets_p50.h5").unlink()
    ok(run_job(2, ["--stage", "prune", *JOB, "prune.method=unstructured", f"output.dir={out}"]))
    before = digests(out)
    p = run_job(2, ["--stage", "retrain", *JOB, "prune.method=unstructured", f"output.dir={out}"])
    assert p.returncode == 2
    line = one_error_line(p)
    assert "retrain_p50" in line and "input tickets_p50.h5 changed" in line
    assert unchanged(out, before)
    shutil.rmtree(out / "ckpt" / "retrain_p50")
    ok(run_job(2, ["--stage", "retrain", *JOB, "prune.method=unstructured", f"output.dir={out}"]))
    rf = read_run_file(out / "retrain_p50.h5")
    assert rf.mask_attrs["method"] == "unstructured"
    for n, m in rf.masks.items():
        assert int(torch.count_nonzero(rf.model[n][~m])) == 0, f"{n}: pruned weights are not zero"
