"""``train.backend: horovod | torch`` under real mpirun: the same collectives over Horovod or over
torch.distributed (gloo here) give the same files.

- 2 ranks: LoFT (allgather + allreduce, momentum carried, sync checked every round), dense
  pretraining and masked retraining: every tensor, every /metrics and /comm column, every rank's
  state equal, bit for bit; the identities differ only in train.backend.
- 4 ranks, LoFT with an uneven deal: the same bytes, the weights equal to float rounding (the
  reduction order of a 4-rank sum may differ).
- Without Horovod: a ``horovod`` package that fails to import, put first on the ranks'
  PYTHONPATH, stands in for a cluster where it does not build (this machine has it installed):
  LoFT, dense and GPipe still run every stage with ``train.backend=torch``, and
  ``train.backend=horovod`` ends in one line naming the fix, exit 2, on every rank.
"""
from __future__ import annotations

import h5py
import pytest
import torch
import yaml

from loft_hpc.checkpoint.h5file import read_run_file
from loft_hpc.config import load_config
from loft_hpc.data import build_datasets
from loft_hpc.exchange.accounting import comm_link_bytes, loft_fair_sync_bytes
from loft_hpc.stages.common import make_model
from loft_hpc.testing.compare import run_differences
from tests.mpi_util import REPO, TINY, ok, run_job

SHORT = TINY + ["train.duration=12it", "train.eval_every=6it", "train.local_steps=4", "train.seed=5",
                "prune.ratios=[0.5]", "retrain.duration=4it", "output.snapshot_every=4it"]


def _pair(tmp_path, np_: int, extra: list[str], stages: str = "pretrain") -> dict:
    out = {}
    for be in ("horovod", "torch"):
        d = tmp_path / be
        p = ok(run_job(np_, ["--stage", stages, *SHORT, *extra, f"train.backend={be}", f"output.dir={d}"]))
        assert f"collectives over {be}" in p.stdout, p.stdout[-1500:]
        out[be] = d
    return out


def _same_but_backend(a, b) -> None:
    diff = run_differences(a, b)
    assert diff == ["identity differs"], diff
    ca, cb = a.identity["config"], b.identity["config"]
    assert {k for k in set(ca) | set(cb) if ca.get(k) != cb.get(k)} == {"train.backend"}


COLLECTIVES = r"""
import sys
import torch
from loft_hpc.exchange.backends import make_backend
from loft_hpc.utils.dist import close_torch_group, init_mpi

dist, err = init_mpi("cpu", 1)
assert err is None, err
S, r = dist.size, dist.rank
got = {}
for name in ("horovod", "torch"):
    b = make_backend(name, dist)
    mine = torch.arange(r + 1, dtype=torch.float32) + 10 * r           # unequal parts: r + 1 floats
    sizes = [q + 1 for q in range(S)]
    send = [(r + q) % 3 for q in range(S)]                               # rank r sends send[q] floats to q
    recv = [(q + r) % 3 for q in range(S)]
    part = torch.cat([torch.full((send[q],), 100.0 * r + q) for q in range(S)])
    got[name] = [b.allgather(mine, sizes, f"{name}.ag"), b.alltoall(part, send, recv, f"{name}.a2a"),
                 b.allreduce(torch.full((3,), float(r + 1)), True, f"{name}.avg"),
                 b.allreduce(torch.full((3,), float(r + 1)), False, f"{name}.sum"),
                 b.broadcast(torch.full((2,), float(r)), S - 1, f"{name}.bc")]
want = [torch.cat([torch.arange(q + 1, dtype=torch.float32) + 10 * q for q in range(S)]),
        torch.cat([torch.full(((q + r) % 3,), 100.0 * q + r) for q in range(S)]),
        torch.full((3,), (S + 1) / 2), torch.full((3,), S * (S + 1) / 2), torch.full((2,), float(S - 1))]
for name, vals in got.items():
    for i, (g, w) in enumerate(zip(vals, want)):
        assert torch.allclose(g, w), (name, i, g, w)
close_torch_group()
print(f"collectives ok on rank {r}", flush=True)
"""


def test_each_collective_gives_the_expected_result_over_both_backends(tmp_path):
    """allgather of unequal parts, alltoall with uneven splits (some empty), allreduce (average
    and sum) and broadcast, on 3 ranks over Horovod and over torch.distributed: the same, expected
    values on every rank."""
    (tmp_path / "collectives_check.py").write_text(COLLECTIVES)
    p = ok(run_job(3, [], module="collectives_check", env={"PYTHONPATH": str(tmp_path)}))
    assert sorted(ln for ln in p.stdout.splitlines() if ln.startswith("collectives ok")) == [
        f"collectives ok on rank {r}" for r in range(3)], p.stdout


@pytest.mark.parametrize("exchange, moved", [("allgather", "allgather_sent"), ("alltoall", "alltoall_sent")])
def test_two_ranks_loft_is_identical_over_both_backends(tmp_path, exchange, moved):
    runs = _pair(tmp_path, 2, ["train.check_sync=true", f"train.exchange={exchange}"])
    a, b = (read_run_file(runs[be] / "pretrain.h5") for be in ("horovod", "torch"))
    assert any(r[moved] for r in a.comm) and any(r["allreduce_sent"] for r in a.comm)
    _same_but_backend(a, b)


def test_two_ranks_dense_pretraining_and_retraining_are_identical(tmp_path):
    runs = _pair(tmp_path, 2, ["train.method=dense"], stages="pretrain,prune,retrain")
    for f in ("pretrain.h5", "retrain_p50.h5"):
        _same_but_backend(*(read_run_file(runs[be] / f) for be in ("horovod", "torch")))


def test_four_ranks_uneven_deal_same_bytes_weights_to_rounding(tmp_path):
    # inner width 6 on 4 ranks: shares of 2, 2, 1, 1 filters
    runs = _pair(tmp_path, 4, ["train.check_sync=true"])
    a, b = (read_run_file(runs[be] / "pretrain.h5") for be in ("horovod", "torch"))
    cols = [k for k in a.comm[0] if k != "seconds"]
    assert [[r[k] for k in cols] for r in a.comm] == [[r[k] for k in cols] for r in b.comm]
    for n in a.model:
        torch.testing.assert_close(a.model[n], b.model[n], rtol=1e-4, atol=1e-5, msg=n)
    for n in a.momentum:
        torch.testing.assert_close(a.momentum[n], b.momentum[n], rtol=1e-4, atol=1e-5, msg=n)
    for ra, rb in zip(a.metrics, b.metrics):
        assert ra["test_acc"] == pytest.approx(rb["test_acc"], abs=1 / 64 + 1e-9)
    # a real 4-rank file in the fair convention: 3 syncs (12 steps, K = 4) of (S-1) x the shards
    # + 2 (S-1) x the shared floats, as the accounting's closed form has it
    cfg = load_config(str(REPO / "configs" / "default.yaml"), [*SHORT, "output.dir=unused"])
    model = make_model(cfg, build_datasets(cfg.data))
    assert comm_link_bytes(a.comm, 4) == 3 * loft_fair_sync_bytes(model, model.filter_groups(), 4, True) > 0


@pytest.fixture
def no_horovod(tmp_path):
    """A PYTHONPATH whose ``horovod`` package cannot be imported."""
    shim = tmp_path / "shim" / "horovod"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('horovod is not installed on this cluster (test shim)')\n")
    (shim / "torch.py").write_text("raise ImportError('horovod is not installed on this cluster (test shim)')\n")
    return {"PYTHONPATH": str(tmp_path / "shim")}


@pytest.mark.parametrize("method", ["loft", "dense", "gpipe"])
def test_every_method_runs_without_horovod_over_torch(tmp_path, no_horovod, method):
    d = tmp_path / method
    p = ok(run_job(2, ["--stage", "all", *SHORT, f"train.method={method}", "train.backend=torch", f"output.dir={d}"],
                   env=no_horovod))
    assert "collectives over torch" in p.stdout and (d / "summary.txt").is_file()
    assert read_run_file(d / "retrain_p50.h5").complete
    with h5py.File(d / "pretrain.h5", "r") as f:  # the versions the file records: no horovod was loaded
        assert yaml.safe_load(f.attrs["versions"])["horovod"] == "not installed"


def test_horovod_backend_without_horovod_is_one_line_exit_2(tmp_path, no_horovod):
    p = run_job(2, ["--stage", "pretrain", *SHORT, f"output.dir={tmp_path / 'x'}"], env=no_horovod)
    assert p.returncode == 2, (p.returncode, p.stdout[-1500:], p.stderr[-1500:])
    lines = [ln for ln in (p.stdout + p.stderr).splitlines() if "error" in ln]
    assert lines == ["loft_hpc: error: train.backend=horovod: horovod.torch cannot be imported (ImportError: horovod "
                     "is not installed on this cluster (test shim)); set train.backend=torch to run over "
                     "torch.distributed"], p.stdout + p.stderr
    assert "Traceback" not in p.stderr
