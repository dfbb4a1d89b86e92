"""Log lines from rank 0 (other ranks stay quiet unless something is wrong)."""
from __future__ import annotations

import sys
import time

_T0 = time.time()


def log(msg: str, *, rank: int = 0, all_ranks: bool = False) -> None:
    if rank == 0 or all_ranks:
        prefix = f"[loft {time.time() - _T0:7.1f}s]" if rank == 0 else f"[loft rank {rank}]"
        print(f"{prefix} {msg}", flush=True)


def error_line(msg: str) -> None:
    print(f"loft_hpc: error: {msg}", file=sys.stderr, flush=True)
