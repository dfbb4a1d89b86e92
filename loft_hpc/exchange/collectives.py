"""Counted collectives: every byte handed to or received from a collective is logged.

Accounting (per rank, payload bytes; the wire bytes of the MPI algorithm underneath are not
visible to Python and are not claimed; methods are compared by the bytes over all links computed
from this payload, :func:`loft_hpc.exchange.accounting.link_bytes`):
- ``allgather``: sent = bytes of this rank's input; received = bytes of the output that came
  from the other ranks (output minus own part).
- ``allreduce``: sent = bytes of the input; received = bytes of the result.
- ``alltoall``: sent = the parts for the other ranks; received = the parts from them (a rank's
  part for itself stays in place and is not counted).
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
    """The collectives with byte counting, over ``backend`` (:mod:`loft_hpc.exchange.backends`:
    Horovod or torch.distributed; None for one rank, where they are exact identities that move
    nothing and count 0 bytes). Kinds counted: ``allgather``, ``alltoall``, ``allreduce`` (by
    default) and whatever kind a caller names (``assemble``: gathering the full model of the
    lean exchange)."""

    def __init__(self, size: int, counter: CommCounter | None = None, backend=None, rank: int = 0) -> None:
        if size > 1 and backend is None:
            raise ValueError(f"{size} ranks need a backend to move data")
        self.size, self.rank = size, rank
        self.counter = counter or CommCounter()
        self.backend = backend

    def _count(self, kind: str, sent: int, received: int, t0: float | None = None) -> None:
        """Record one collective; a single rank moves nothing, so it counts 0 bytes."""
        if self.size == 1:
            sent = received = 0
        self.counter.add(kind, sent, received, time.perf_counter() - t0 if t0 is not None else 0.0)

    def allgather(self, t: torch.Tensor, name: str, sizes: list[int], kind: str = "allgather") -> torch.Tensor:
        """Every rank's ``t`` (1-D), concatenated in rank order. ``sizes``: every rank's numel,
        which every caller knows from its plan (the torch backend needs them)."""
        t = t.contiguous().reshape(-1)
        t0 = time.perf_counter()
        if self.size == 1:
            out = t
        else:
            out = self.backend.allgather(t, list(sizes), name)
            if out.numel() != sum(sizes):
                raise RuntimeError(f"{name}: allgather returned {out.numel()} floats, the plan says {sum(sizes)}")
        self._count(kind, t.nbytes, out.nbytes - t.nbytes, t0)
        return out

    def alltoall(self, t: torch.Tensor, send: list[int], recv: list[int], name: str) -> torch.Tensor:
        """Part q of ``t`` (``send[q]`` floats, in rank order) to rank q; returns the parts the
        ranks sent here (``recv[q]`` from rank q), concatenated in rank order. Counted: what
        goes to and comes from *other* ranks (a rank's part for itself never leaves it)."""
        t = t.contiguous().reshape(-1)
        if t.numel() != sum(send):
            raise RuntimeError(f"{name}: alltoall input has {t.numel()} floats, the splits {sum(send)}")
        t0 = time.perf_counter()
        if self.size == 1:
            out = t
        else:
            out = self.backend.alltoall(t, list(send), list(recv), name)
            if out.numel() != sum(recv):
                raise RuntimeError(f"{name}: alltoall returned {out.numel()} floats, the plan says {sum(recv)}")
        el = t.element_size()
        self._count("alltoall", el * (sum(send) - send[self.rank]), el * (sum(recv) - recv[self.rank]), t0)
        return out

    def allreduce_mean(self, t: torch.Tensor, name: str) -> torch.Tensor:
        t = t.contiguous()
        t0 = time.perf_counter()
        out = t.clone() if self.size == 1 else self.backend.allreduce(t, True, name)
        self._count("allreduce", t.nbytes, out.nbytes, t0)
        return out

    def allreduce_sum(self, t: torch.Tensor, name: str, count: bool = True) -> torch.Tensor:
        t = t.contiguous()
        t0 = time.perf_counter()
        out = t.clone() if self.size == 1 else self.backend.allreduce(t, False, name)
        if count:
            self._count("allreduce", t.nbytes, out.nbytes, t0)
        return out
