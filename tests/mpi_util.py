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
        "model.inner_width_factor=1.5", "train.progress=false", "train.log_every=1000", "output.snapshot_weights=[]"]


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


WALL_CLOCK = {"wall_time", "seconds", "comm_seconds"}  # the only fields two identical runs may differ in


def _same_rows(what: str, ra: list[dict], rb: list[dict]) -> None:
    assert len(ra) == len(rb), f"{what}: {len(ra)} rows against {len(rb)}"
    for x, y in zip(ra, rb):
        for k in sorted(set(x) | set(y)):
            if k in WALL_CLOCK:
                continue
            vx, vy = x.get(k), y.get(k)
            same = (vx == vy) or (isinstance(vx, float) and isinstance(vy, float) and vx != vx and vy != vy)
            assert same, f"{what} row {x.get('step', x.get('name'))}: {k} = {vx!r} against {vy!r}"


def _same_tensors(what: str, a: dict, b: dict) -> None:
    assert set(a) == set(b), f"{what}: tensors {sorted(set(a) ^ set(b))[:4]} in only one run"
    for n in a:
        assert torch.equal(a[n], b[n]), f"{what}: {n} differs"


def assert_same_run(a, b) -> None:
    """Two RunFiles of the same job (e.g. uninterrupted and killed-then-resumed) are identical in
    everything they wrote but wall-clock times: weights, buffers, momentum, theta_0, masks, every
    column of /metrics, /comm and /sparsity, the snapshot index and scores, the weight snapshots,
    progress, identity, and every rank's RNG states, byte counters and running loss sums."""
    import numpy as np

    _same_tensors("model", a.model, b.model)
    _same_tensors("momentum", a.momentum, b.momentum)
    _same_tensors("init", a.init, b.init)
    _same_tensors("masks", a.masks, b.masks)
    _same_rows("/metrics", a.metrics, b.metrics)
    _same_rows("/comm", a.comm, b.comm)
    _same_rows("/sparsity", a.sparsity, b.sparsity)
    assert a.snap_index == b.snap_index
    assert set(a.snap_scores) == set(b.snap_scores)
    for g, per in a.snap_scores.items():
        for kind, rows in per.items():
            assert np.array_equal(np.stack(rows), np.stack(b.snap_scores[g][kind])), f"snapshot scores {g}/{kind} differ"
    assert a.weight_snapshots == b.weight_snapshots
    assert {k: v for k, v in a.progress.items() if k not in WALL_CLOCK} == \
        {k: v for k, v in b.progress.items() if k not in WALL_CLOCK}
    assert a.identity == b.identity and a.mask_attrs == b.mask_attrs and a.world_size == b.world_size
    assert len(a.ranks) == len(b.ranks)
    for r, (x, y) in enumerate(zip(a.ranks, b.ranks)):
        assert torch.equal(x["torch"], y["torch"]), f"rank {r}: torch RNG state differs"
        assert (x["numpy"], x["python"]) == (y["numpy"], y["python"]), f"rank {r}: numpy/python RNG state differs"
        for k in ("bytes_sent", "bytes_received"):
            assert x[k] == y[k], f"rank {r}: {k} {x[k]} against {y[k]}"
        assert np.array_equal(x["run_stats"], y["run_stats"]), f"rank {r}: running loss sums differ"
        _same_tensors(f"rank {r} buffers", x["buffers"], y["buffers"])
