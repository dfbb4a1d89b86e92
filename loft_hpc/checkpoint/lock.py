"""One writer per run folder and output: a lock file taken before the first write.

A job locks the *scopes* it writes: ``pretrain`` (``pretrain.h5``, its checkpoints and weight
snapshots) and ``tickets-<mask_from>`` (the tickets, IMP levels and retrainings found from the end
of pretraining or from one snapshot). Two jobs on one folder that would write the same files are
refused, the second with one line naming the holder; the chain's prune/retrain jobs and the tasks
of the snapshot array (``prune.mask_from=<step>``) write different scopes and run side by side.

``<dir>/.lock-<scope>`` holds JSON ``{host, pid, job, restart, since}`` and is created with
``O_EXCL``. A lock whose holder is dead is recognised and taken over: on the same host its pid no
longer runs, or it was taken by an earlier run of the same SLURM job (another
``SLURM_RESTART_COUNT``: requeued, possibly onto another node). A lock of a job on another host
is not taken over (its pid cannot be checked from here): the line names the file to delete. The
takeover renames the stale file aside, checks it is still the one it read (else gives it back),
then creates the lock as usual. An aborting job frees its lock first.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path


class LockError(RuntimeError):
    """The folder is in use: the message is one line naming the holder."""


def job_scopes(stages: list[str], mask_from: str, snapshot_points: list[str] = ()) -> list[str]:
    """The lock scopes a job writes: pretraining, and the tickets of each mask_from point
    (``snapshot_points``: those of the ``snapshots`` stage)."""
    scopes = []
    if "pretrain" in stages:
        scopes.append("pretrain")
    if "prune" in stages or "retrain" in stages:
        scopes.append(f"tickets-{mask_from}")
    for p in snapshot_points:
        if f"tickets-{p}" not in scopes:
            scopes.append(f"tickets-{p}")
    return scopes


def _me() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "job": os.environ.get("SLURM_JOB_ID", ""),
            "restart": os.environ.get("SLURM_RESTART_COUNT", "0"), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}


def _stale(holder: dict, me: dict) -> bool:
    """The holder is dead: on this host its pid no longer runs; elsewhere, it is an earlier run
    (restart count) of this very SLURM job (requeued, possibly onto another node)."""
    try:
        pid = int(holder.get("pid", -1))
    except (TypeError, ValueError):
        return False
    if holder.get("host") == me["host"]:
        return not _alive(pid)
    return bool(me["job"]) and holder.get("job") == me["job"] and str(holder.get("restart", "0")) != me["restart"]


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a running process. A zombie (killed, not yet reaped: a killed job's ranks
    whose parent died with them wait for init) is dead: it holds no file and will never write."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):  # no /proc (or it ended meanwhile): kill(0) answered
        return True
    return state not in ("Z", "X")


class RunLock:
    def __init__(self, root: str | os.PathLike, scopes: list[str]) -> None:
        self.root = Path(root)
        self.files = [self.root / f".lock-{s}" for s in sorted(scopes)]
        self.held: list[Path] = []
        self.notes: list[str] = []  # stale locks taken over (for the log)

    def acquire(self) -> "RunLock":
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            for f in self.files:
                self._take(f)
        except BaseException:
            self.release()
            raise
        return self

    def _take(self, f: Path) -> None:
        me = _me()
        for _ in range(5):
            try:
                fd = os.open(f, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                holder = self._read(f)
                if holder is None:  # being written or removed right now: look again
                    time.sleep(0.05)
                    continue
                if holder.get("host") == me["host"] and holder.get("pid") == me["pid"]:
                    self.held.append(f)
                    return
                if not _stale(holder, me):
                    job = f", SLURM job {holder['job']}" if holder.get("job") else ""
                    raise LockError(f"{self.root} is in use by another job writing the same files (pid "
                                    f"{holder.get('pid')} on {holder.get('host')}{job}, since {holder.get('since')}): "
                                    f"wait for it to end, or if it is dead delete {f}")
                aside = f.with_name(f"{f.name}.stale-{me['host']}-{me['pid']}")
                try:
                    os.rename(f, aside)
                except FileNotFoundError:
                    continue
                if self._read(aside) != holder:
                    # another contender replaced the stale lock with its own meanwhile: give it back
                    try:
                        os.link(aside, f)
                    except FileExistsError:
                        pass
                    aside.unlink(missing_ok=True)
                    continue
                aside.unlink(missing_ok=True)
                self.notes.append(f"took over the stale lock {f.name} of pid {holder.get('pid')} on "
                                  f"{holder.get('host')}")
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump(me, fh)
                fh.flush()
                os.fsync(fh.fileno())
            self.held.append(f)
            return
        raise LockError(f"{f}: could not take the lock (empty or unreadable, or another job is starting here "
                        f"right now): if no other job uses {self.root}, delete {f}")

    @staticmethod
    def _read(f: Path) -> dict | None:
        try:
            h = json.loads(f.read_text())
        except (OSError, ValueError):  # missing, being written, not JSON, not UTF-8
            return None
        return h if isinstance(h, dict) else None

    def release(self) -> None:
        me = _me()
        for f in self.held:
            h = self._read(f)
            if h and h.get("host") == me["host"] and h.get("pid") == me["pid"]:
                f.unlink(missing_ok=True)
        self.held = []
