"""SIGUSR1 / SIGTERM (SLURM's warning before the time limit, or scancel) request a checkpoint.

The handler only sets a flag; ranks agree on it at the next round boundary (so every rank stops
after the same round), write a checkpoint and exit with code 3 ("requeue me").
"""
from __future__ import annotations

import signal

EXIT_REQUEUE = 3


class StopRequest:
    def __init__(self) -> None:
        self.received: str | None = None

    def install(self) -> "StopRequest":
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name
