"""The distributed context: MPI world, Horovod, device per local rank.

``Dist`` wraps what the trainers need (rank, size, device, collectives) so that a job of one
rank runs the same code path. Collectives that move model data are in :mod:`loft_hpc.exchange`;
the ones here are small control messages (agreeing on errors, signals, metric sums).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch


@dataclass
class Dist:
    rank: int
    size: int
    local_rank: int
    local_size: int
    comm: object  # mpi4py communicator
    device: torch.device
    before_abort: object = None  # called (once) before an abort: e.g. rank 0 frees the run lock

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def agree_errors(self, message: str | None) -> list[tuple[int, str]]:
        """Every rank learns every rank's error (None = fine). An mpi4py gather of short strings,
        issued before any Horovod collective so that a bad input on one rank cannot cause a hang."""
        msgs = self.comm.allgather(message)  # order: same on every rank (collective)
        return [(r, m) for r, m in enumerate(msgs) if m]

    def any_flag(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on at least one (signal agreement)."""
        from mpi4py import MPI

        return bool(self.comm.allreduce(1 if flag else 0, op=MPI.MAX))

    def agree_bits(self, bits: int) -> int:
        """The bitwise OR of ``bits`` over every rank (several flags agreed in one collective)."""
        from mpi4py import MPI

        return int(self.comm.allreduce(int(bits), op=MPI.BOR))

    def abort(self, code: int = 1) -> None:
        """Stop every rank of the job now (used when a rank fails mid-round: never a hang)."""
        sys.stdout.flush()
        sys.stderr.flush()
        hook, self.before_abort = self.before_abort, None
        if hook is not None:
            try:
                hook()
            except Exception:  # noqa: BLE001 - aborting anyway
                pass
        if self.size > 1:
            self.comm.Abort(code)
        os._exit(code)


def set_deterministic(on: bool) -> None:
    """torch's deterministic algorithms for the whole process (before the first CUDA kernel)."""
    if not on:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def init_mpi(device_pref: str = "auto", threads: int = 0) -> tuple[Dist, str | None]:
    """MPI only (mpi4py initialises it): enough to validate inputs and agree on errors before
    the first Horovod collective. One device per local rank; torch threads per rank. A device
    that cannot be had is returned as an error line (with a CPU device), never raised: the one
    collective here (Split_type) has then run on every rank, and the ranks agree on the error."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)  # collective: every rank, once
    local_rank, local_size = local.Get_rank(), local.Get_size()
    device, err = torch.device("cpu"), None
    if device_pref == "cuda" or (device_pref == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            err = "train.device=cuda but CUDA is not available on this node"
        else:
            dev = local_rank % torch.cuda.device_count()
            torch.cuda.set_device(dev)
            device = torch.device("cuda", dev)
    torch.set_num_threads(threads_per_rank(threads, local_size))
    return Dist(comm.Get_rank(), comm.Get_size(), local_rank, local_size, comm, device), err


def threads_per_rank(threads: int, local_size: int) -> int:
    """``train.threads`` if set, else ``OMP_NUM_THREADS`` if set, else cores / local ranks."""
    if threads:
        return threads
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, (os.cpu_count() or 1) // local_size)


def torch_process_group(dist: Dist):
    """A torch.distributed process group over the MPI ranks (GPipe's point-to-point transfers,
    the collectives of ``train.backend=torch``): gloo on CPU, NCCL on CUDA. Rank 0 picks its host's address and a free port and broadcasts
    them over MPI (a control message): no launcher or environment is needed. Made once per
    process; None for a single rank."""
    if dist.size == 1:
        return None
    import socket

    import torch.distributed as tdist

    if not tdist.is_initialized():
        addr = None
        if dist.is_root:
            # MASTER_ADDR when the site sets it (an interface other ranks reach); else this host's
            # address (one node: loopback). The port is probed free; a race for it fails in one
            # line on rank 0 (the job aborts), never hangs.
            host = os.environ.get("MASTER_ADDR") or (
                socket.gethostbyname(socket.getfqdn()) if dist.local_size < dist.size else "127.0.0.1")
            with socket.socket() as s:
                s.bind(("", 0))
                addr = (host, s.getsockname()[1])
        host, port = dist.comm.bcast(addr, root=0)  # control message: every rank, before the group exists
        backend = "nccl" if dist.device.type == "cuda" else "gloo"
        tdist.init_process_group(backend, init_method=f"tcp://{host}:{port}", rank=dist.rank, world_size=dist.size,
                                 device_id=dist.device if dist.device.type == "cuda" else None)
    return tdist.group.WORLD



def close_torch_group() -> None:
    """Destroy the torch.distributed process group of this process, if there is one (at the
    end of a job: every rank calls it)."""
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()
