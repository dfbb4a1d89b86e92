"""Run a Python module as ``__main__`` in this process and record the process's peak memory.

    python -m loft_hpc.bench.probe OUT_DIR MODULE [ARGS ...]

Under ``mpirun`` every rank runs this instead of ``python -m MODULE ARGS``: the module runs in the
very process (``runpy``: same interpreter, same MPI rank), and when it ends, however it ends
short of being killed, this writes ``OUT_DIR/rank<R>.json`` with

- ``maxrss_bytes``: the kernel's high-water mark of the process's resident set size
  (``getrusage(RUSAGE_SELF).ru_maxrss``, KiB on Linux; the same figure as VmHWM in
  /proc/<pid>/status and /usr/bin/time's "Maximum resident set size"), so it includes the
  interpreter, torch, MPI/Horovod and the data set, as the operating system sees the rank;
- ``maxrss_children_bytes``: the same for the process's waited-for children (DataLoader workers);
- ``cuda_max_allocated_bytes`` / ``cuda_max_reserved_bytes``: torch's peak of tensor memory on the
  rank's CUDA device when CUDA was used, else null;
- ``train_rss_max_bytes`` / ``train_tensor_bytes``: memory while the rank trains
  (:class:`TrainingSampler`, a round-loop callback the probe installs), or null;
- ``rank`` (from the MPI launcher's environment), ``exit_code``, ``seconds`` (the module's wall time).

The probe imports nothing heavy before the module runs, so it adds only its own few kilobytes.
"""
from __future__ import annotations

import json
import os
import resource
import runpy
import sys
import time

RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID")


def launcher_rank() -> int:
    for v in RANK_VARS:
        if os.environ.get(v, "").isdigit():
            return int(os.environ[v])
    return 0


def _cuda_peaks() -> tuple[int | None, int | None]:
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None, None
    return int(torch.cuda.max_memory_allocated()), int(torch.cuda.max_memory_reserved())


class TrainingSampler:
    """A round-loop callback (:mod:`loft_hpc.train.callbacks`) that samples this rank's memory
    while it trains, away from start-up and from the boundaries that assemble the full model:

    - ``train_rss_max_bytes``: the largest resident set (``/proc/self/statm``) at the start of a
      step from the second round on (model, optimiser state and the data loader, as training
      holds them; freed memory returns to the system when large blocks are mmapped, which the
      bench ensures with ``MALLOC_MMAP_THRESHOLD_``);
    - ``train_tensor_bytes``: the bytes of every distinct tensor storage alive in the process at
      the start of the second round's second step (the garbage collector's view: parameters,
      buffers, momentum, home slices, gradients not yet freed), the CPU analogue of CUDA's
      allocated memory.
    """

    def __init__(self) -> None:
        self.rss_max = None
        self.tensor_bytes = None

    def step(self, trainer, step: int) -> None:
        k = max(1, int(getattr(trainer, "K", 1)))
        if step < k:
            return
        rss = _rss_bytes()
        if rss is not None:
            self.rss_max = rss if self.rss_max is None else max(self.rss_max, rss)
        if self.tensor_bytes is None and step >= k + 1:
            self.tensor_bytes = _tensor_bytes()


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _tensor_bytes() -> int:
    import gc
    import warnings

    torch = sys.modules["torch"]
    seen = {}
    with warnings.catch_warnings():  # isinstance on some torch module objects warns (deprecated aliases)
        warnings.simplefilter("ignore")
        objects = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    for o in objects:
        if o.device.type != "cpu":
            continue
        try:
            st = o.untyped_storage()
        except RuntimeError:  # a tensor without storage (meta, sparse)
            continue
        seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
    return sum(seen.values())


def record(out_dir: str, rank: int, exit_code: int, seconds: float, sampler: TrainingSampler | None = None) -> dict:
    kib = 1024 if sys.platform.startswith("linux") else 1  # macOS reports bytes
    alloc, reserved = _cuda_peaks()
    rec = {"rank": rank, "pid": os.getpid(), "exit_code": exit_code, "seconds": seconds,
           "maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * kib,
           "maxrss_children_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * kib,
           "cuda_max_allocated_bytes": alloc, "cuda_max_reserved_bytes": reserved,
           "train_rss_max_bytes": sampler.rss_max if sampler else None,
           "train_tensor_bytes": sampler.tensor_bytes if sampler else None}
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, f".rank{rank}.json.tmp")
    with open(tmp, "w") as f:
        json.dump(rec, f)
    os.replace(tmp, os.path.join(out_dir, f"rank{rank}.json"))
    return rec


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2:
        print("usage: python -m loft_hpc.bench.probe OUT_DIR MODULE [ARGS ...]", file=sys.stderr)
        return 2
    out_dir, module, args = argv[0], argv[1], argv[2:]
    rank = launcher_rank()
    from loft_hpc.train import callbacks  # light: no torch yet

    sampler = TrainingSampler()
    callbacks.install(sampler)
    sys.argv = [module, *args]
    code = 0
    t0 = time.perf_counter()
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        code = 1
        raise
    finally:
        record(out_dir, rank, code, time.perf_counter() - t0, sampler)
    return code


if __name__ == "__main__":
    sys.exit(main())
