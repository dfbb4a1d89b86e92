"""Run the real package under a real ``mpirun`` from tests."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from loft_hpc.utils.procs import kill_session as _kill_session
from loft_hpc.utils.procs import session_pids  # noqa: F401 - tests use it from here

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable

# A tiny, fast job on the synthetic set (each test adds its own overrides).
TINY = ["data.name=synthetic", "data.synthetic_train_size=192", "data.synthetic_test_size=64",
        "data.batch_size=16", "data.eval_batch_size=64", "model.arch=preresnet18", "model.width=4",
        "model.inner_width_factor=1.5", "train.progress=false", "train.log_every=1000", "output.snapshot_weights=[]"]


def need_mpirun() -> None:
    """The set-up (scripts/setup_env.sh) always installs Open MPI: without it the tests fail, they do
    not skip."""
    if shutil.which("mpirun") is None:
        pytest.fail("mpirun is not on PATH: run scripts/setup_env.sh (it installs openmpi-bin)", pytrace=False)


# Every job a test starts runs in its own session: when the test fails, times out (pytest-timeout)
# or is interrupted, every process of that session -- mpirun.sh, mpirun and every rank (Open MPI
# puts each rank in a process group of its own, but they stay in the session) -- is killed, never
# left running. tests/conftest.py kills whatever is still alive after each test.
_LIVE: set[subprocess.Popen] = set()
_LIVE_LOCK = threading.Lock()


def job_env(env: dict | None = None) -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    e["PATH"] = f"{Path(PY).parent}:{e.get('PATH', '')}"
    e.update(env or {})
    return e


def job_command(np: int, args: list[str], module: str = "loft_hpc.run") -> list[str]:
    cmd = [PY, "-m", module, *args]
    if np > 0:
        need_mpirun()
        cmd = [str(REPO / "scripts" / "mpirun.sh"), "-np", str(np), *cmd]
    return cmd


def start_job(cmd: list[str], *, env: dict | None = None, **popen) -> subprocess.Popen:
    """``Popen(cmd)`` as the leader of a new session, registered so that ``kill_session`` and
    ``kill_all_jobs`` can end it and everything it started."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=job_env(env), start_new_session=True, **popen)
    with _LIVE_LOCK:
        _LIVE.add(proc)
    return proc


def kill_session(proc: subprocess.Popen) -> None:
    """Kill every process of the job's session and forget the job (:func:`loft_hpc.utils.procs.kill_session`)."""
    _kill_session(proc)
    with _LIVE_LOCK:
        _LIVE.discard(proc)


def finish_job(proc: subprocess.Popen) -> None:
    """The job's leader has ended: kill what it may have left in its session (a rank that outlived
    mpirun)."""
    kill_session(proc)


def kill_all_jobs() -> None:
    with _LIVE_LOCK:
        live = list(_LIVE)
    for proc in live:
        kill_session(proc)


def run_job(np: int, args: list[str], *, timeout: float = 240, env: dict | None = None,
            module: str = "loft_hpc.run") -> subprocess.CompletedProcess:
    """``scripts/mpirun.sh -np NP python -m loft_hpc.run ARGS`` (plain python when np == 0).

    A job that has not ended after ``timeout`` seconds fails the test (subprocess.TimeoutExpired);
    on a timeout, a failure or an interrupt every process of the job's session is killed."""
    if module == "loft_hpc.run" and "LOFT_FAULT_INJECT" in (env or {}):
        module = "loft_hpc.testing.faults"  # the real program with the fault callback installed
    cmd = job_command(np, args, module)
    proc = start_job(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as e:
        kill_session(proc)
        try:
            out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:  # a process outside the session still holds the pipes
            out, err = e.output, e.stderr
        raise subprocess.TimeoutExpired(cmd, timeout, output=out, stderr=err) from e
    except BaseException:
        kill_session(proc)
        raise
    finish_job(proc)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)



class LiveJob:
    """A job started with ``start_job`` whose stdout and stderr are read on threads, so that a test
    can wait for a line with a deadline (``wait_for``) instead of blocking in ``readline``."""

    def __init__(self, cmd: list[str], *, env: dict | None = None, stdin=subprocess.DEVNULL):
        self.cmd = cmd
        self.proc = start_job(cmd, env=env, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.out: list[str] = []
        self.err: list[str] = []
        self._cond = threading.Condition()
        self._readers = [threading.Thread(target=self._read, args=(s, into), daemon=True)
                         for s, into in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        self._open = len(self._readers)
        for t in self._readers:
            t.start()

    def _read(self, stream, into: list[str]) -> None:
        for line in stream:
            with self._cond:
                into.append(line)
                self._cond.notify_all()
        with self._cond:
            self._open -= 1
            self._cond.notify_all()

    def wait_for(self, text: str, timeout: float) -> bool:
        """True as soon as a stdout line contains ``text``; False when stdout ends without one or
        ``timeout`` seconds pass."""
        def seen():
            return any(text in ln for ln in self.out)

        with self._cond:
            self._cond.wait_for(lambda: seen() or self._open == 0, timeout)
            return seen()

    def finish(self, timeout: float) -> int:
        """Wait for the job to end (subprocess.TimeoutExpired after ``timeout`` s, which fails the
        test), kill what it left in its session, read the rest of its output; the exit code."""
        self.proc.wait(timeout=timeout)
        return self.close()

    def close(self) -> int:
        """Kill the job's whole session (if still running) and read what it wrote up to then."""
        kill_session(self.proc)
        for t in self._readers:
            t.join(timeout=30)
        return self.proc.returncode

    @property
    def stdout(self) -> str:
        with self._cond:
            return "".join(self.out)

    @property
    def stderr(self) -> str:
        with self._cond:
            return "".join(self.err)

def ok(p: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert p.returncode == 0, f"exit {p.returncode}\n--- stdout\n{p.stdout[-4000:]}\n--- stderr\n{p.stderr[-4000:]}"
    return p


def stop_and_resume(np: int, args: list[str], out, fault: str, stop_step: int, total: int, reference,
                    assembles: list[tuple[int, int]] | None = None) -> None:
    """``args`` (writing to ``out``) with the stop signal ``fault`` (LOFT_FAULT_INJECT
    rank:round:stage:term) reaching one rank: rank 0, which logs, stops because the ranks agreed
    on the request, the checkpoint is written at ``stop_step``, the job exits 3 without a final
    file; the same command (a requeued job) resumes at ``stop_step`` of ``total`` and ends with
    exactly ``reference`` (the uninterrupted run's pretrain.h5). ``assembles``: the method gathers
    the model for a file (GPipe, the lean exchange), so the stop's extra checkpoint moved bytes the
    reference did not, each rank's (sent, received) given: :func:`assert_same_run_but_stop_assembly`."""
    from loft_hpc.checkpoint.h5file import read_run_file

    env = {"LOFT_FAULT_INJECT": fault}
    p = run_job(np, args, env=env)
    assert p.returncode == 3, f"exit {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
    assert f"stop requested (on another rank), checkpoint written at step {stop_step}" in p.stdout, p.stdout[-2000:]
    assert not (out / "pretrain.h5").exists()
    ckpt = f"ckpt-{stop_step:010d}.h5"
    latest = (out / "ckpt" / "pretrain" / "LATEST").read_text().strip()
    assert latest.endswith(ckpt), latest
    assert read_run_file(out / "ckpt" / "pretrain" / ckpt).progress["step"] == stop_step
    p = ok(run_job(np, args, env=env))
    assert "resumed from" in p.stdout and f"at step {stop_step}/{total}" in p.stdout, p.stdout[-2000:]
    if assembles is not None:
        assert_same_run_but_stop_assembly(read_run_file(out / "pretrain.h5"), read_run_file(reference), stop_step,
                                          assembles)
    else:
        assert_same_run(read_run_file(out / "pretrain.h5"), read_run_file(reference))


def assert_same_run_but_stop_assembly(a, b, stop_step: int, extra_per_rank: list[tuple[int, int]]) -> None:
    """``a`` (stopped at ``stop_step``, checkpointed there and resumed) equals ``b`` (uninterrupted)
    in everything but the bytes of the extra checkpoint's assembly: every rank's /comm row at
    ``stop_step`` has exactly ``extra_per_rank[rank]`` (sent, received) more ``assemble`` bytes in
    ``a``, each rank's byte counters differ by exactly that, and every /metrics row after the stop
    by the sum over the ranks; nothing else differs."""
    from loft_hpc.testing.compare import run_differences

    cols = ("assemble_sent", "assemble_received", "bytes_sent", "bytes_received")
    diff = [d for d in run_differences(a, b) if not any(c in d for c in cols)]
    assert not diff, "runs differ: " + "; ".join(diff[:8])
    extra = {}
    for ra, rb in zip(a.comm, b.comm):
        assert (ra["round"], ra["rank"], ra["step"]) == (rb["round"], rb["rank"], rb["step"])
        d = (int(ra["assemble_sent"]) - int(rb["assemble_sent"]), int(ra["assemble_received"]) - int(rb["assemble_received"]))
        if int(ra["step"]) == stop_step:
            assert d[0] > 0 and d[1] > 0, (ra, rb)
            extra[int(ra["rank"])] = d
        else:
            assert d == (0, 0), (ra, rb)
    assert [extra[q] for q in sorted(extra)] == [tuple(e) for e in extra_per_rank], (extra, extra_per_rank)
    for q, (sa, sb) in enumerate(zip(a.ranks, b.ranks)):
        assert (sa["bytes_sent"] - sb["bytes_sent"], sa["bytes_received"] - sb["bytes_received"]) == extra[q]
    for ma, mb in zip(a.metrics, b.metrics):
        after = int(ma["step"]) >= stop_step
        for k, i in (("bytes_sent", 0), ("bytes_received", 1)):
            assert ma[k] - mb[k] == (sum(e[i] for e in extra.values()) if after else 0), (k, ma["step"])


def assert_same_run(a, b) -> None:
    """Two RunFiles of the same job (e.g. uninterrupted and killed-then-resumed) are identical in
    everything they wrote but wall-clock times (:func:`loft_hpc.testing.compare.run_differences`:
    weights, buffers, momentum, theta_0, masks, every column of /metrics, /comm, /sparsity and
    /coverage, the snapshot index and scores, progress, identity, and every rank's RNG states, byte
    counters, running loss sums and buffers)."""
    from loft_hpc.testing.compare import run_differences

    diff = run_differences(a, b)
    assert not diff, "runs differ: " + "; ".join(diff[:8])


