"""``python -m loft_hpc.testing.faults [loft_hpc.run arguments]``: the real program with one
injected fault, for the failure tests and ``tools/fault_trials.py``.

``LOFT_FAULT_INJECT=RANK:ROUND[:STAGE[:ACTION[:WHERE]]]`` makes rank RANK, in round ROUND of the
checkpoint stage STAGE (``pretrain``, ``retrain_p50``, ...; empty = any stage):

- ACTION: ``raise`` (default: an exception, the program's failure path), ``kill`` (SIGKILL to
  itself: a node or OOM kill), ``usr1`` / ``term`` (the stop signals SLURM and scancel send);
- WHERE: ``round_start`` (default), ``step`` (in the middle of the round's local steps),
  ``exchange`` (LoFT: just before the shard exchange, while the other ranks enter it) or
  ``checkpoint`` (rank 0: half-way through writing the checkpoint file of the end of round
  ROUND - 1, i.e. when ``trainer.round == ROUND``).

The fault is installed as a :mod:`loft_hpc.train.callbacks` callback (and, for ``checkpoint``, by
wrapping the tensor writer of :mod:`loft_hpc.checkpoint.h5file`); the production loop knows
nothing of it.
"""
from __future__ import annotations

import os
import signal
import sys

ACTIONS = ("raise", "kill", "usr1", "term")
WHERES = ("round_start", "step", "exchange", "checkpoint")


def parse(value: str) -> dict:
    parts = value.split(":") + [""] * 3
    f = {"rank": int(parts[0]), "round": int(parts[1]), "stage": parts[2] or None,
         "action": parts[3] or "raise", "where": parts[4] or "round_start"}
    if f["action"] not in ACTIONS or f["where"] not in WHERES:
        raise ValueError(f"LOFT_FAULT_INJECT={value!r}: action one of {ACTIONS}, where one of {WHERES}")
    return f


def act(action: str, rank: int, round_: int, where: str) -> None:
    import time

    print(f"fault: rank {rank} acts at {time.time():.3f} ({action} in round {round_} at {where})", file=sys.stderr,
          flush=True)
    if action == "raise":
        raise RuntimeError(f"injected fault (LOFT_FAULT_INJECT) on rank {rank} in round {round_} at {where}")
    sys.stdout.flush()
    os.kill(os.getpid(), {"kill": signal.SIGKILL, "usr1": signal.SIGUSR1, "term": signal.SIGTERM}[action])


class Fault:
    def __init__(self, spec: dict) -> None:
        self.spec = spec
        self.done = False

    def _hit(self, tr, where: str) -> bool:
        s = self.spec
        return (not self.done and s["where"] == where and tr.dist.rank == s["rank"] and tr.round == s["round"]
                and s["stage"] in (None, tr.ckpt_stage))

    def _fire(self, tr, where: str) -> None:
        self.done = True
        act(self.spec["action"], tr.dist.rank, tr.round, where)

    def round_start(self, tr) -> None:
        if self._hit(tr, "round_start"):
            self._fire(tr, "round_start")

    def step(self, tr, step: int) -> None:
        if self._hit(tr, "step") and step == tr.step + max(tr.K // 2, 0):
            self._fire(tr, "step")

    def exchange(self, tr) -> None:
        if self._hit(tr, "exchange"):
            self._fire(tr, "exchange")

    def checkpoint(self, tr, path) -> None:
        if self._hit(tr, "checkpoint"):
            self.done = True
            _arm_mid_write(self.spec["action"], tr.dist.rank, tr.round)


def _arm_mid_write(action: str, rank: int, round_: int) -> None:
    """Act after the first half of the model's tensors are in the temporary file."""
    from loft_hpc.checkpoint import h5file

    real = h5file._tensors

    def half_then_act(g, tensors, compress=False):
        items = list(tensors.items())
        real(g, dict(items[: len(items) // 2]), compress)
        g.file.flush()
        h5file._tensors = real
        act(action, rank, round_, "checkpoint")
        real(g, dict(items[len(items) // 2:]), compress)

    h5file._tensors = half_then_act


def main(argv: list[str] | None = None) -> int:
    from loft_hpc.run import main as run_main
    from loft_hpc.train import callbacks

    value = os.environ.get("LOFT_FAULT_INJECT")
    if value:
        callbacks.install(Fault(parse(value)))
    return run_main(argv)


if __name__ == "__main__":
    sys.exit(main())
