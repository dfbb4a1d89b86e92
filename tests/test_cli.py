"""The command line (``python -m loft_hpc.run``) as a user meets it, in real subprocesses: help,
--print-config, and bad input ending the job with exit code 2 and one line on stderr, on one
process and on two real MPI ranks.

Every job of this file is started at once by one module fixture (two at a time: each spends
seconds importing torch), so the file stays fast on a small machine.
"""
from __future__ import annotations

import dataclasses
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from loft_hpc.config import SECTIONS, ConfigError, config_from_dict, load_config
from loft_hpc.run import STAGES, parse_stages
from tests.mpi_util import REPO, kill_all_jobs, run_job

DEFAULT = REPO / "configs" / "default.yaml"
PRINT_OVERRIDES = ["train.lr=0.2", "prune.ratios=[0.3,0.6]", "train.duration=500it", "train.weight_decay=5e-4",
                   "data.batch_size=32", "model.arch=resnet34"]
ERROR_LINE = "loft_hpc: error: "


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """name -> CompletedProcess for every CLI call below ("_tmp": their folder). Each job ends
    within run_job's timeout or fails the tests (bad input must end the job, never hang it)."""
    tmp = tmp_path_factory.mktemp("cli")
    empty = tmp / "empty_run"
    empty.mkdir()
    calls = {
        "help": (0, ["--help"]),
        "print": (0, ["--print-config", *PRINT_OVERRIDES, f"output.dir={tmp}/printed"]),
        "bad_key": (0, ["--stage", "pretrain", "train.lcoal_steps=3", f"output.dir={tmp}/k"]),
        "bad_stage": (0, ["--stage", "bogus", f"output.dir={tmp}/s"]),
        "missing_config": (0, ["--config", "missing.yaml"]),
        "big_batch": (0, ["--stage", "pretrain", "data.batch_size=100000", f"output.dir={tmp}/b"]),
        "prune_no_pretrain": (0, ["--stage", "prune", f"output.dir={empty}"]),
        "retrain_no_tickets": (0, ["--stage", "retrain", f"output.dir={empty}"]),
        # 1,348 digits training samples: a batch of 1000 fits one rank, not a 1/2 shard (674)
        "mpi_shard_batch": (2, ["--stage", "pretrain", "data.shard=true", "data.batch_size=1000",
                                f"output.dir={tmp}/ms"]),
    }

    def one(item):
        name, (np, args) = item
        return name, run_job(np, args, timeout=120)

    # MPI jobs first: they are the longest
    order = sorted(calls.items(), key=lambda kv: -kv[1][0])
    ex = ThreadPoolExecutor(max_workers=2)
    try:
        out = dict(ex.map(one, order))
    except BaseException:  # a job timed out, or this fixture did: end the other jobs too
        ex.shutdown(wait=False, cancel_futures=True)
        kill_all_jobs()
        raise
    finally:
        ex.shutdown(wait=True)
    for name, p in out.items():
        print(f"{name}: exit {p.returncode}")
    out["_tmp"] = tmp
    return out


def _error(p, *needles: str, whole_job: bool = False) -> str:
    """Exit 2, exactly one line ``loft_hpc: error: ...`` naming every needle, no traceback.
    ``whole_job``: under mpirun, one such line for all ranks together (other output allowed)."""
    assert p.returncode == 2, f"exit {p.returncode}\n--- stdout\n{p.stdout}\n--- stderr\n{p.stderr}"
    if whole_job:
        lines = [ln for ln in (p.stderr + p.stdout).splitlines() if ERROR_LINE in ln]
    else:
        lines = p.stderr.splitlines()
    assert len(lines) == 1, f"expected one error line for the whole job:\n{p.stderr}"
    assert lines[0].startswith(ERROR_LINE), lines[0]
    assert "Traceback" not in p.stderr + p.stdout
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


# --- help ----------------------------------------------------------------------------------------

def test_help_lists_stages_sections_and_keys(jobs):
    p = jobs["help"]
    assert p.returncode == 0, p.stderr
    out = p.stdout
    # the "stages:" block: exactly the four stages, in pipeline order, each with its description
    block = out.split("\nstages:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    listed = [ln.split(None, 1) for ln in block]
    assert [name for name, _ in listed] == ["pretrain", "prune", "retrain", "snapshots", "all"], block
    for name, desc in listed:
        assert desc == STAGES[name], (name, desc)
    for name, (cls, desc) in SECTIONS.items():
        assert f"  {name} " in out and desc in out, name
        for f in dataclasses.fields(cls):
            assert f"{name}.{f.name} " in out, f"{name}.{f.name} missing from --help"
    for key in ("train.local_steps", "train.method", "prune.ratios", "output.dir", "data.root"):
        assert key in out
    assert "--config" in out and "--stage" in out and "--print-config" in out
    assert "exit codes" in out


# --- --print-config ------------------------------------------------------------------------------

def test_print_config_reflects_overrides(jobs):
    p = jobs["print"]
    assert p.returncode == 0, p.stderr
    data = yaml.safe_load(p.stdout)
    assert list(data) == list(SECTIONS)
    assert data["train"]["lr"] == pytest.approx(0.2)
    assert data["prune"]["ratios"] == [0.3, 0.6]
    assert data["train"]["duration"] == "500it"
    assert float(data["train"]["weight_decay"]) == pytest.approx(5e-4)
    assert data["data"]["batch_size"] == 32
    assert data["model"]["arch"] == "resnet34"
    # the rest is the embedded default (configs/default.yaml), and it loads back to the same config
    tmp = jobs["_tmp"]
    expected = load_config(DEFAULT, PRINT_OVERRIDES + [f"output.dir={tmp}/printed"])
    assert config_from_dict(data) == expected
    assert data["data"]["name"] == "digits"
    # printing runs nothing and writes nothing
    assert not (tmp / "printed").exists()


# --- bad input: exit 2, one line -----------------------------------------------------------------

def test_bad_key(jobs):
    _error(jobs["bad_key"], "train.lcoal_steps", "local_steps")
    assert not (jobs["_tmp"] / "k").exists()


def test_bad_stage(jobs):
    _error(jobs["bad_stage"], "--stage", "bogus")


def test_missing_config(jobs):
    _error(jobs["missing_config"], "--config", "missing.yaml")


def test_batch_larger_than_training_set(jobs):
    _error(jobs["big_batch"], "data.batch_size", "100000", "1348")
    assert not (jobs["_tmp"] / "b").exists()


def test_prune_without_pretrain(jobs):
    _error(jobs["prune_no_pretrain"], "--stage prune", "pretrain.h5")


def test_retrain_without_tickets(jobs):
    _error(jobs["retrain_no_tickets"], "--stage retrain", "tickets_")
    assert list((jobs["_tmp"] / "empty_run").iterdir()) == []  # nothing written on the way out


# --- two real MPI ranks --------------------------------------------------------------------------

def test_mpi_bad_value_one_line(jobs):
    """A bad value only known with the world size (the 1/2 shard of 1,348 samples holds 674 < 1000):
    both ranks find it, the job prints it once, without a rank prefix, and exits 2 (within the
    fixture's job timeout)."""
    p = jobs["mpi_shard_batch"]
    line = _error(p, "data.batch_size", "1000", "674", whole_job=True)
    assert not re.search(r"\brank \d+:", line), line  # every rank had the same error: reported once, no "rank N:"
    assert not (jobs["_tmp"] / "ms").exists()


# --- --stage parsing (in-process) ----------------------------------------------------------------

@pytest.mark.parametrize("text,stages", [
    ("pretrain", ["pretrain"]),
    ("retrain", ["retrain"]),
    ("all", ["pretrain", "prune", "retrain"]),
    ("retrain,pretrain", ["pretrain", "retrain"]),  # run in pipeline order whatever the order written
    ("prune, retrain", ["prune", "retrain"]),
    ("pretrain,all", ["pretrain", "prune", "retrain"]),
    ("snapshots,pretrain", ["pretrain", "snapshots"]),
    ("all,snapshots", ["pretrain", "prune", "retrain", "snapshots"]),
])
def test_parse_stages(text, stages):
    assert parse_stages(text) == stages


@pytest.mark.parametrize("text", ["bogus", "pretrain,bogus", "Pretrain"])
def test_parse_stages_rejects(text):
    with pytest.raises(ConfigError) as exc:
        parse_stages(text)
    assert "\n" not in str(exc.value) and "--stage" in str(exc.value)


def test_default_config_path_is_the_shipped_default():
    from loft_hpc.run import default_config_path

    assert Path(default_config_path()).resolve() == DEFAULT.resolve()
