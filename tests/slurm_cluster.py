"""A real, single-machine SLURM cluster for tests (pytest plugin).

Use it from a test module with ``from tests.slurm_cluster import slurm_cluster  # noqa: F401``
or register it once with ``pytest_plugins = ["tests.slurm_cluster"]`` in ``tests/conftest.py``.

The session-scoped fixture ``slurm_cluster``:

* skips when the SLURM / munge daemons are not installed or the tests do not run as root
  (``SlurmUser=root`` and munge need it);
* reuses a running ``munged`` (``munge -n | unmunge`` works) or starts one the way
  /work/shared/PLATFORM.md describes;
* writes its own ``slurm.conf`` under a temporary folder (host name, CPUs and RealMemory from
  ``slurmd -C``; state, spool, log and pid files in the folder; free TCP ports so that it does not
  collide with another cluster on the same machine; ``OverSubscribe=FORCE:4`` so that jobs can
  share the cores; four stand-in GPUs, ``Gres=gpu:4`` backed by character devices like
  /dev/null, so that GPU-shaped jobs (``--gres=gpu:N``) are accepted and run on the CPU), starts ``slurmctld`` and ``slurmd`` with ``-f`` and points the clients at it
  with ``SLURM_CONF`` (set in ``os.environ`` while the fixture lives, and in ``cluster.env``);
* waits until ``sinfo`` shows the node idle; if SLURM is installed but does not come up, the
  test FAILS with the tail of the daemons' logs (a broken installation must not hide as a skip);
* at the end cancels every job and stops the two daemons (``scontrol shutdown``, then the pids it
  started).  munged is a shared system service and is left running.

No accounting database is configured, so job states come from ``scontrol show job`` (kept for
``MinJobAge=600`` seconds after a job ends).
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path
from typing import Dict, Iterable, Mapping, Optional, Sequence

import pytest

__all__ = ["SlurmCluster", "slurm_cluster", "TERMINAL_STATES", "JobResult"]

#: Job states after which a job never runs again.
TERMINAL_STATES = frozenset({
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL",
    "DEADLINE", "OUT_OF_MEMORY", "REVOKED",
})

_DAEMONS = ("slurmctld", "slurmd", "munged")
_CLIENTS = ("sbatch", "scontrol", "sinfo", "scancel", "squeue", "munge", "unmunge")
_SBIN = ("/usr/sbin", "/sbin", "/usr/local/sbin")


def _which(name: str) -> Optional[str]:
    path = shutil.which(name)
    if path:
        return path
    for d in _SBIN:
        p = os.path.join(d, name)
        if os.access(p, os.X_OK):
            return p
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 40) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as e:
        return f"<{path}: {e}>"
    return "\n".join(lines[-n:])


class JobResult(dict):
    """``{"state": "COMPLETED", "exit_code": 0, "signal": 0, ...}`` plus the raw scontrol fields."""

    @property
    def state(self) -> str:
        return self["state"]

    @property
    def exit_code(self) -> Optional[int]:
        return self["exit_code"]


def parse_scontrol(line: str) -> Dict[str, str]:
    """Key=value pairs of one ``scontrol -o show ...`` line (values without spaces)."""
    return dict(re.findall(r"(?:^|\s)([A-Za-z][\w:/]*)=(\S*)", line))


class SlurmCluster:
    """One slurmctld + one slurmd on this machine, configured under ``root``."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        self.log_dir = self.root / "log"
        self.env: Dict[str, str] = {}
        self.node = ""
        self.cpus = 0
        self.partition = "debug"
        #: GPUs the node declares (count only, no devices: GPU-shaped jobs run on the CPU)
        self.gpus = 4
        self._pids: Dict[str, int] = {}
        self._old_slurm_conf: Optional[str] = None
        self.started_munged = False

    # ------------------------------------------------------------------ set-up
    @staticmethod
    def missing_requirements() -> Optional[str]:
        """Why this machine cannot run the cluster (None when it can)."""
        missing = [b for b in _DAEMONS + _CLIENTS if _which(b) is None]
        if missing:
            return "SLURM/munge not installed (missing: %s)" % ", ".join(missing)
        if os.geteuid() != 0:
            return "the single-machine SLURM cluster needs root (SlurmUser=root, munged)"
        return None

    def client_env(self, extra: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
        """os.environ for SLURM clients of this cluster: SLURM_CONF set, the SLURM_* variables
        of an enclosing job (if pytest itself runs inside one) dropped, EXTRA added."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env.update(self.env)
        env.update(extra or {})
        return env

    def _run(self, *cmd: str, check: bool = True, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
        env = self.client_env(kw.pop("env", None))
        return subprocess.run(list(cmd), env=env, check=check, timeout=timeout,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)

    def _ensure_munge(self) -> None:
        def works() -> bool:
            try:
                enc = subprocess.run([_which("munge"), "-n"], stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, timeout=10)
                if enc.returncode != 0:
                    return False
                dec = subprocess.run([_which("unmunge")], input=enc.stdout, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, timeout=10)
                return dec.returncode == 0
            except (OSError, subprocess.SubprocessError):
                return False

        if works():
            return
        if not Path("/etc/munge/munge.key").exists():
            pytest.fail("munge is installed but /etc/munge/munge.key is missing "
                        "(create one with mungekey or reinstall munge)")
        for d in ("/var/log/munge", "/var/lib/munge", "/run/munge"):
            os.makedirs(d, exist_ok=True)
            shutil.chown(d, "munge", "munge")
        res = subprocess.run(["su", "-s", "/bin/sh", "munge", "-c", _which("munged")],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=30)
        self.started_munged = True
        deadline = time.time() + 15
        while time.time() < deadline:
            if works():
                return
            time.sleep(0.3)
        pytest.fail("munged did not start (rc=%s): %s\n%s" % (
            res.returncode, res.stdout.strip(), _tail(Path("/var/log/munge/munged.log"))))

    def _node_config(self) -> Dict[str, str]:
        out = subprocess.run([_which("slurmd"), "-C"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, timeout=30)
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("NodeName=")), "")
        fields = parse_scontrol(line)
        if not fields.get("NodeName"):
            pytest.fail("`slurmd -C` gave no NodeName line: %s %s" % (out.stdout, out.stderr))
        return fields

    def write_conf(self) -> None:
        hw = self._node_config()
        self.node = hw["NodeName"]
        self.cpus = int(hw.get("CPUs", "1"))
        # Leave the kernel some memory; a node that reports less than RealMemory is drained.
        mem = max(100, int(int(hw.get("RealMemory", "1000")) * 0.9))
        hw_keys = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore")
        hw_spec = " ".join(f"{k}={hw[k]}" for k in hw_keys if k in hw)
        for sub in ("state", "spool", "log", "run"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        r = self.root
        self.ctld_port, self.slurmd_port = _free_port(), _free_port()
        # Stand-in GPUs: character devices like /dev/null (SLURM's gres/gpu wants device files).
        # Jobs ask for --gres=gpu:N as on a GPU cluster and get SLURM_GPUS_ON_NODE, while they
        # run on the CPU (torch sees no CUDA device).
        dev = self.root / "dev"
        dev.mkdir(parents=True, exist_ok=True)
        for i in range(self.gpus):
            if not (dev / f"gpu{i}").exists():
                os.mknod(dev / f"gpu{i}", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        (self.root / "gres.conf").write_text(
            f"NodeName={self.node} Name=gpu File={dev}/gpu[0-{self.gpus - 1}]\n" if self.gpus else "")
        self.conf.write_text(f"""\
# Written by tests/slurm_cluster.py for a throw-away single-machine cluster.
ClusterName=loft{os.getpid()}
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={self.ctld_port}
SlurmdPort={self.slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# Requeued jobs wait cred_expire seconds (default 120) before they may start again.
AuthInfo=cred_expire=5
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
JobRequeue=1
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MailProg=/bin/true
MinJobAge=600
KillWait=5
SchedulerParameters=sched_interval=2
SchedulerType=sched/backfill
GresTypes=gpu
NodeName={self.node} NodeAddr=127.0.0.1 {hw_spec} RealMemory={mem} {f"Gres=gpu:{self.gpus} " if self.gpus else ""}State=UNKNOWN
PartitionName={self.partition} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
""")

    def start(self, timeout: float = 60) -> "SlurmCluster":
        self._ensure_munge()
        self.write_conf()
        self.env = {"SLURM_CONF": str(self.conf)}
        self._old_slurm_conf = os.environ.get("SLURM_CONF")
        os.environ["SLURM_CONF"] = str(self.conf)
        for daemon in ("slurmctld", "slurmd"):
            res = self._run(_which(daemon), "-f", str(self.conf), check=False)
            if res.returncode != 0:
                self.stop()
                pytest.fail(f"{daemon} failed to start (rc={res.returncode}): {res.stderr.strip()}\n"
                            + self.logs())
        deadline = time.time() + timeout
        state = ""
        while time.time() < deadline:
            res = self._run(_which("sinfo"), "-h", "-N", "-o", "%N %t", check=False)
            state = res.stdout.strip() + res.stderr.strip()
            # "idle*" (asterisk) = slurmd has not registered yet
            if res.returncode == 0 and re.search(rf"^{re.escape(self.node)} idle$", res.stdout, re.M):
                self._read_pids()
                return self
            time.sleep(0.5)
        self.stop()
        pytest.fail(f"SLURM is installed but the node did not become idle in {timeout:.0f} s "
                    f"(sinfo: {state!r})\n" + self.logs())

    def _read_pids(self) -> None:
        for name in ("slurmctld", "slurmd"):
            try:
                self._pids[name] = int((self.root / "run" / f"{name}.pid").read_text().strip())
            except (OSError, ValueError):
                pass

    def logs(self, n: int = 40) -> str:
        return "\n".join(f"--- {p.name} (last {n} lines)\n{_tail(p, n)}"
                         for p in sorted(self.log_dir.glob("*.log")))

    # ------------------------------------------------------------------ tear-down
    def stop(self) -> None:
        self._read_pids()
        if self._pids.get("slurmctld"):
            self._run(_which("scancel"), "--user", "root", check=False)
            time.sleep(0.5)
            self._run(_which("scontrol"), "shutdown", check=False)
        deadline = time.time() + 15
        for name, pid in list(self._pids.items()):
            while time.time() < deadline and _alive(pid, name):
                time.sleep(0.2)
            if _alive(pid, name):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        self._pids.clear()
        if self._old_slurm_conf is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = self._old_slurm_conf

    # ------------------------------------------------------------------ helpers for tests
    def sbatch(self, *argv: str, env: Optional[Mapping[str, str]] = None,
               cwd: Optional[os.PathLike] = None) -> str:
        """``sbatch --parsable ARGV...``; returns the job id (fails the test on an error)."""
        res = self._run(_which("sbatch"), "--parsable", *argv, env=dict(env or {}), cwd=cwd, check=False)
        if res.returncode != 0:
            pytest.fail(f"sbatch {' '.join(argv)} failed (rc={res.returncode}): {res.stderr.strip()}")
        return res.stdout.strip().split(";")[0]

    def submit(self, script: os.PathLike, *args: str, sbatch_args: Sequence[str] = (),
               env: Optional[Mapping[str, str]] = None, cwd: Optional[os.PathLike] = None) -> str:
        """Submit SCRIPT ARGS... with extra sbatch options; ENV is added to the submitter's
        environment (sbatch exports it to the job).  Returns the job id."""
        return self.sbatch(*sbatch_args, str(script), *args, env=env, cwd=cwd)

    def job_records(self, job_id: str) -> list:
        """All ``scontrol show job`` records of a job (one per task for a job array)."""
        res = self._run(_which("scontrol"), "-o", "show", "job", str(job_id), check=False)
        if res.returncode != 0:
            return []
        return [parse_scontrol(ln) for ln in res.stdout.splitlines() if ln.startswith("JobId=")]

    def job_info(self, job_id: str) -> Optional[Dict[str, str]]:
        """The ``scontrol show job`` fields of a job, or None when SLURM no longer knows it."""
        recs = self.job_records(job_id)
        return recs[0] if recs else None

    def job_state(self, job_id: str) -> Optional[str]:
        """JobState of a job (of the least advanced task for an array); None if unknown."""
        recs = self.job_records(job_id)
        return self._result(recs).state if recs else None

    @staticmethod
    def _one(info: Mapping[str, str]) -> JobResult:
        rc, sig = ((info.get("ExitCode") or ":") + ":").split(":")[:2]
        return JobResult(info, state=info.get("JobState", "UNKNOWN"),
                         exit_code=int(rc) if rc.isdigit() else None,
                         signal=int(sig) if sig.isdigit() else None,
                         restarts=int(info.get("Restarts", "0") or 0),
                         start_time=info.get("StartTime"), end_time=info.get("EndTime"),
                         reason=info.get("Reason"), tasks=[])

    def _result(self, recs: Sequence[Mapping[str, str]]) -> JobResult:
        if not recs:
            return self._one({})
        if len(recs) == 1:
            return self._one(recs[0])
        # A job array: running/pending tasks first, then the first task that did not complete.
        tasks = [self._one(r) for r in recs]
        pick = next((t for t in tasks if t.state not in TERMINAL_STATES), None) \
            or next((t for t in tasks if t.state != "COMPLETED"), tasks[0])
        res = JobResult(pick)
        res["tasks"] = tasks
        return res

    def result(self, job_id: str) -> JobResult:
        """State, exit code, restarts, start/end time and the raw fields of a job."""
        return self._result(self.job_records(job_id))

    def wait_jobs(self, job_ids: Iterable[str], timeout: float = 120, poll: float = 0.5,
                  raise_on_timeout: bool = True) -> Dict[str, JobResult]:
        """Wait until every job is in a terminal state.  Returns ``{id: JobResult}`` with
        ``state`` and ``exit_code``; on a timeout fails the test (or, with
        ``raise_on_timeout=False``, returns the states it saw)."""
        ids = [str(j) for j in job_ids]
        deadline = time.time() + timeout
        while True:
            results = {j: self.result(j) for j in ids}
            if all(r.state in TERMINAL_STATES for r in results.values()):
                return results
            if time.time() >= deadline:
                if not raise_on_timeout:
                    return results
                summary = {j: (r.state, r.get("reason")) for j, r in results.items()}
                pytest.fail(f"jobs did not finish within {timeout:.0f} s: {summary}\n" + self.logs(20))
            time.sleep(poll)


def _alive(pid: int, name: str) -> bool:
    """Is PID still the daemon NAME (not a recycled pid)?"""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip() == name
    except OSError:
        return False


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory) -> SlurmCluster:
    why = SlurmCluster.missing_requirements()
    if why:
        pytest.skip(why)
    # A short path: SLURM truncates long paths in a few places (sockets, pid files).
    root = Path(tmp_path_factory.mktemp("slurm"))
    cluster = SlurmCluster(root).start()
    try:
        yield cluster
    finally:
        cluster.stop()
