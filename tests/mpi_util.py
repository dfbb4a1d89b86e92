"""Run the real package under a real ``mpirun`` from tests."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable

# A tiny, fast job on the synthetic set (each test adds its own overrides).
TINY = ["data.name=synthetic", "data.synthetic_train_size=192", "data.synthetic_test_size=64",
        "data.batch_size=16", "data.eval_batch_size=64", "model.arch=preresnet18", "model.width=4",
        "model.inner_width_factor=1.5", "train.progress=false", "train.log_every=1000"]


def need_mpirun() -> None:
    if shutil.which("mpirun") is None:
        pytest.skip("mpirun is not installed (set-up installs openmpi-bin)")


def run_job(np: int, args: list[str], *, timeout: float = 240, env: dict | None = None,
            module: str = "loft_hpc.run") -> subprocess.CompletedProcess:
    """``scripts/mpirun.sh -np NP python -m loft_hpc.run ARGS`` (plain python when np == 0)."""
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    e["PATH"] = f"{Path(PY).parent}:{e.get('PATH', '')}"
    e.update(env or {})
    cmd = [PY, "-m", module, *args]
    if np > 0:
        need_mpirun()
        cmd = [str(REPO / "scripts" / "mpirun.sh"), "-np", str(np), *cmd]
    return subprocess.run(cmd, cwd=REPO, env=e, capture_output=True, text=True, timeout=timeout)


def ok(p: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert p.returncode == 0, f"exit {p.returncode}\n--- stdout\n{p.stdout[-4000:]}\n--- stderr\n{p.stderr[-4000:]}"
    return p


def assert_same_run(a, b) -> None:
    """Two RunFiles of the same job (e.g. uninterrupted and killed-then-resumed) are identical:
    weights and momentum bit for bit, and the same metric, communication and snapshot history."""
    for n in a.model:
        assert torch.equal(a.model[n], b.model[n]), f"{n} differs after resume"
    for n in a.momentum:
        assert torch.equal(a.momentum[n], b.momentum[n]), f"momentum of {n} differs after resume"
    assert [m["step"] for m in a.metrics] == [m["step"] for m in b.metrics]
    assert [(r["round"], r["rank"]) for r in a.comm] == [(r["round"], r["rank"]) for r in b.comm]
    assert a.snap_index == b.snap_index
