"""One writer per run folder and output: a lock file taken before the first write.

A job locks the *scopes* it writes: ``pretrain`` (``pretrain.h5``, its checkpoints and weight
snapshots) and ``tickets-<mask_from>`` (the tickets, IMP levels and retrainings found from the end
of pretraining or from one snapshot). Two jobs on one folder that would write the same files are
refused, the second with one line naming the holder; the chain's prune/retrain jobs and the tasks
of the snapshot array (``prune.mask_from=<step>``) write different scopes and run side by side.

``<dir>/.lock-<scope>`` holds JSON ``{host, pid, job, since}`` and is created with ``O_EXCL``. A lock
whose holder is dead is recognised and taken over: same host and its pid no longer runs, or the
same SLURM job id (a requeued job, possibly on another node). The takeover renames the stale file
away first (only one contender can), then creates the lock as usual.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path


class LockError(RuntimeError):
    """The folder is in use: the message is one line naming the holder."""


def job_scopes(stages: list[str], mask_from: str) -> list[str]:
    scopes = []
    if "pretrain" in stages:
        scopes.append("pretrain")
    if "prune" in stages or "retrain" in stages:
        scopes.append(f"tickets-{mask_from}")
    return scopes


def _me() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "job": os.environ.get("SLURM_JOB_ID", ""),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S")}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
                stale = (holder.get("host") == me["host"] and not _alive(int(holder.get("pid", -1)))) or \
                    (me["job"] and holder.get("job") == me["job"])
                if not stale:
                    job = f", SLURM job {holder['job']}" if holder.get("job") else ""
                    raise LockError(f"{self.root} is in use by another job writing the same files (pid "
                                    f"{holder.get('pid')} on {holder.get('host')}{job}, since {holder.get('since')}): "
                                    f"wait for it to end, or if it is dead delete {f}")
                aside = f.with_name(f"{f.name}.stale-{me['host']}-{me['pid']}")
                try:
                    os.rename(f, aside)  # atomic: one contender wins, the others find the new lock
                    aside.unlink()
                    self.notes.append(f"took over the stale lock {f.name} of pid {holder.get('pid')} on "
                                      f"{holder.get('host')}")
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump(me, fh)
                fh.flush()
                os.fsync(fh.fileno())
            self.held.append(f)
            return
        raise LockError(f"{f}: could not take the lock (it keeps changing: another job is starting here)")

    @staticmethod
    def _read(f: Path) -> dict | None:
        try:
            text = f.read_text()
            return json.loads(text) if text.strip() else None
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def release(self) -> None:
        me = _me()
        for f in self.held:
            h = self._read(f)
            if h and h.get("host") == me["host"] and h.get("pid") == me["pid"]:
                f.unlink(missing_ok=True)
        self.held = []
