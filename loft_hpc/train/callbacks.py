"""Callbacks into the round loop, for tests and tools (fault injection, tracing).

Production runs install none, so the loop only iterates an empty list. A callback is any object
with some of the methods ``round_start(trainer)``, ``step(trainer, step)``, ``exchange(trainer)``
(LoFT, before the shard exchange of a round) and ``checkpoint(trainer, path)`` (rank 0, before a
checkpoint file is written). :mod:`loft_hpc.testing.faults` installs one from the environment.
"""
from __future__ import annotations

_INSTALLED: list = []


def install(callback) -> None:
    _INSTALLED.append(callback)


def clear() -> None:
    _INSTALLED.clear()


def fire(event: str, *args) -> None:
    for cb in _INSTALLED:
        fn = getattr(cb, event, None)
        if fn is not None:
            fn(*args)
