"""The processes of a job started as the leader of its own session (mpirun.sh, mpirun and every
rank stay in it): list them and kill them all. Used by the benchmark suite and the tests."""
from __future__ import annotations

import os
import signal
import subprocess


def session_pids(sid: int, name: str | None = None) -> list[int]:
    """Live processes of session ``sid`` (from /proc: the session is field 6 of /proc/PID/stat),
    only those whose command name is ``name`` when given."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                comm, _, rest = f.read().rpartition(")")
            fields = rest.split()
        except OSError:  # ended meanwhile
            continue
        if int(fields[3]) == sid and fields[0] != "Z" and (name is None or comm.partition("(")[2] == name):
            out.append(int(d))
    return out


def kill_session(proc: subprocess.Popen, rounds: int = 50) -> None:
    """SIGKILL every process of the job's session (the leader's pid is the session id), reap the
    leader. Repeated until none is left: a process may fork while the first ones are killed."""
    for _ in range(rounds):
        pids = session_pids(proc.pid) if os.path.isdir("/proc") else [proc.pid]
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            proc.wait(timeout=0.1)
        except subprocess.TimeoutExpired:
            pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
