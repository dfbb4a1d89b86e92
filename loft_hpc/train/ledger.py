"""The byte ledger of one rank: what the counted collectives moved, per round and in total.

Bytes are counted in exactly one place, :class:`loft_hpc.exchange.collectives.Collectives` (where
every collective is called); the ledger only moves those counts into ``/comm`` rows (one per round
and rank) and into this rank's running totals, which checkpoints keep per rank.
"""
from __future__ import annotations

# p2p: GPipe's activations and gradients across stage boundaries; alltoall: the lean exchange's
# slices; assemble: the lean exchange gathering the full model where it is needed
KINDS = ("allgather", "allreduce", "p2p", "alltoall", "assemble")
COLUMNS = tuple(f"{k}_{d}" for k in KINDS for d in ("sent", "received"))


class ByteLedger:
    def __init__(self, counter, rank: int) -> None:
        self.counter, self.rank = counter, rank
        self.sent = self.received = 0  # this rank, since the start of the stage
        self.seconds = 0.0              # this rank's wall time inside counted collectives
        self.pending: list[dict] = []   # this rank's rows not yet gathered to rank 0

    def record(self, round_: int, step: int) -> None:
        """Move the counts since the last call into this rank's row of ``round_`` (merged when
        the round already has one: an evaluation at the same boundary)."""
        c = self.counter.take()
        unknown = {k.rsplit("_", 1)[0] for k in c if k != "seconds"} - set(KINDS)
        if unknown:
            raise RuntimeError(f"byte ledger: collectives {sorted(unknown)} have no /comm column")
        vals = {k: c.get(k, 0) for k in COLUMNS}
        if self.pending and self.pending[-1]["round"] == round_:
            for k, v in vals.items():
                self.pending[-1][k] += v
            self.pending[-1]["seconds"] += c["seconds"]
        elif any(vals.values()):
            self.pending.append({"round": round_, "step": step, "rank": self.rank, **vals, "seconds": c["seconds"]})
        self.seconds += c["seconds"]
        self.sent += sum(vals[f"{k}_sent"] for k in KINDS)
        self.received += sum(vals[f"{k}_received"] for k in KINDS)

    def take_pending(self) -> list[dict]:
        rows, self.pending = self.pending, []
        return rows

    def state(self) -> dict:
        return {"bytes_sent": self.sent, "bytes_received": self.received, "comm_seconds": self.seconds}

    def load(self, st: dict) -> None:
        self.sent, self.received = int(st["bytes_sent"]), int(st["bytes_received"])
        self.seconds = float(st["comm_seconds"])
