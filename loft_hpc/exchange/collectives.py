"""Counted Horovod collectives: every byte handed to or received from a collective is logged.

Accounting (per rank, payload bytes; the wire bytes of the MPI algorithm underneath are not
visible to Python and are not claimed; methods are compared by the bytes over all links computed
from this payload, :func:`loft_hpc.exchange.accounting.link_bytes`):
- ``allgather``: sent = bytes of this rank's input; received = bytes of the output that came
  from the other ranks (output minus own part).
- ``allreduce``: sent = bytes of the input; received = bytes of the result.
"""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch


@dataclass
class CommCounter:
    """Bytes per collective kind since the last :meth:`take`, and in total."""

    sent: dict = field(default_factory=lambda: defaultdict(int))
    received: dict = field(default_factory=lambda: defaultdict(int))
    calls: dict = field(default_factory=lambda: defaultdict(int))
    seconds: float = 0.0  # wall time inside counted collectives since the last take()
    total_sent: int = 0
    total_received: int = 0

    def add(self, kind: str, sent: int, received: int, seconds: float = 0.0) -> None:
        self.seconds += seconds
        self.sent[kind] += sent
        self.received[kind] += received
        self.calls[kind] += 1
        self.total_sent += sent
        self.total_received += received

    def take(self) -> dict:
        """The counts since the last call, as a flat dict, and reset them."""
        out = {}
        for kind in sorted(set(self.sent) | set(self.received)):
            out[f"{kind}_sent"] = self.sent[kind]
            out[f"{kind}_received"] = self.received[kind]
            out[f"{kind}_calls"] = self.calls[kind]
        out["seconds"] = self.seconds
        self.sent.clear(); self.received.clear(); self.calls.clear()
        self.seconds = 0.0
        return out


class Collectives:
    """Horovod collectives with byte counting; with one rank they are exact identities that
    move nothing, and count 0 bytes."""

    def __init__(self, size: int, counter: CommCounter | None = None) -> None:
        self.size = size
        self.counter = counter or CommCounter()
        if size > 1:
            import horovod.torch as hvd

            self._hvd = hvd

    def _count(self, kind: str, sent: int, received: int, t0: float | None = None) -> None:
        """Record one collective; a single rank moves nothing, so it counts 0 bytes."""
        if self.size == 1:
            sent = received = 0
        self.counter.add(kind, sent, received, time.perf_counter() - t0 if t0 is not None else 0.0)

    def allgather(self, t: torch.Tensor, name: str) -> torch.Tensor:
        t = t.contiguous()
        t0 = time.perf_counter()
        out = t if self.size == 1 else self._hvd.allgather(t, name=name)
        self._count("allgather", t.nbytes, out.nbytes - t.nbytes, t0)
        return out

    def allreduce_mean(self, t: torch.Tensor, name: str) -> torch.Tensor:
        t = t.contiguous()
        t0 = time.perf_counter()
        out = t.clone() if self.size == 1 else self._hvd.allreduce(t, name=name, op=self._hvd.Average)
        self._count("allreduce", t.nbytes, out.nbytes, t0)
        return out

    def allreduce_sum(self, t: torch.Tensor, name: str, count: bool = True) -> torch.Tensor:
        t = t.contiguous()
        t0 = time.perf_counter()
        out = t.clone() if self.size == 1 else self._hvd.allreduce(t, name=name, op=self._hvd.Sum)
        if count:
            self._count("allreduce", t.nbytes, out.nbytes, t0)
        return out
