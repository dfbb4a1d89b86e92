"""The collectives' transports: Horovod, or torch.distributed (``train.backend``).

Both offer the same four operations on flat (1-D) tensors, the only ones the package moves model
data with; :class:`loft_hpc.exchange.collectives.Collectives` counts their bytes the same way
whichever moves them:

- ``allgather(t, sizes)``: the concatenation, in rank order, of every rank's ``t`` (``sizes``:
  every rank's numel, known to the caller from the partition plan);
- ``alltoall(t, send, recv)``: ``t`` is the concatenation of the parts for ranks 0..S-1
  (``send[q]`` floats for rank q); returns the concatenation of what ranks 0..S-1 sent here
  (``recv[q]`` floats from rank q);
- ``allreduce(t, average)``: the elementwise sum over the ranks, times 1/S when ``average``;
- ``broadcast(t, root)``: root's ``t`` on every rank.

Horovod (``horovod.torch`` on the MPI communicator) is the package's default. Its last release
is from 2023 and has to be patched to build against current torch, so every method also runs
over torch.distributed: a process group made from the MPI ranks (gloo on CPU, NCCL on CUDA;
:func:`loft_hpc.utils.dist.torch_process_group`), the same operations, the same results (an
average is a sum times 1/S in both, as Horovod scales it; at 2 ranks bit for bit, at more the
order of the reduction may differ in the last bits), the same byte counts. An allgather of
unequal parts has no torch.distributed primitive on gloo; it is an all-to-all in which every
rank sends its part to every rank (no padding, so the bytes moved are the allgather's).
"""
from __future__ import annotations

import torch

NAMES = ("horovod", "torch")


class BackendError(RuntimeError):
    """The transport cannot be had (not installed, not built with what the job needs)."""


def horovod_problem() -> str | None:
    """Why ``train.backend=horovod`` cannot run here (one line), or None."""
    try:
        import horovod.torch as hvd  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any failure to load it is the same answer
        text = str(e).strip().splitlines()
        return (f"train.backend=horovod: horovod.torch cannot be imported ({type(e).__name__}: "
                f"{text[0] if text else ''}); set train.backend=torch to run over torch.distributed")
    return None


class HorovodBackend:
    name = "horovod"

    def __init__(self, dist) -> None:
        import horovod.torch as hvd

        hvd.init(comm=dist.comm)
        if hvd.rank() != dist.rank or hvd.size() != dist.size:
            raise BackendError(f"horovod ranks ({hvd.rank()} of {hvd.size()}) differ from MPI's "
                               f"({dist.rank} of {dist.size})")
        self.hvd, self.size = hvd, dist.size

    def allgather(self, t: torch.Tensor, sizes: list[int], name: str) -> torch.Tensor:
        return self.hvd.allgather(t, name=name)

    def alltoall(self, t: torch.Tensor, send: list[int], recv: list[int], name: str) -> torch.Tensor:
        out = self.hvd.alltoall(t, splits=torch.tensor(send, dtype=torch.int32), name=name)
        return out[0] if isinstance(out, tuple) else out

    def allreduce(self, t: torch.Tensor, average: bool, name: str) -> torch.Tensor:
        return self.hvd.allreduce(t, name=name, op=self.hvd.Average if average else self.hvd.Sum)

    def broadcast(self, t: torch.Tensor, root: int, name: str) -> torch.Tensor:
        return self.hvd.broadcast(t, root_rank=root, name=name)


class TorchBackend:
    name = "torch"

    def __init__(self, dist) -> None:
        import torch.distributed as tdist

        from loft_hpc.utils.dist import torch_process_group

        self.tdist, self.size = tdist, dist.size
        self.group = torch_process_group(dist)

    def allgather(self, t: torch.Tensor, sizes: list[int], name: str) -> torch.Tensor:
        out = t.new_empty(sum(sizes))
        # every rank sends its whole part to every rank: an allgather of unequal parts
        self.tdist.all_to_all_single(out, t.repeat(self.size), output_split_sizes=list(sizes),
                                     input_split_sizes=[t.numel()] * self.size, group=self.group)
        return out

    def alltoall(self, t: torch.Tensor, send: list[int], recv: list[int], name: str) -> torch.Tensor:
        out = t.new_empty(sum(recv))
        self.tdist.all_to_all_single(out, t, output_split_sizes=list(recv), input_split_sizes=list(send),
                                     group=self.group)
        return out

    def allreduce(self, t: torch.Tensor, average: bool, name: str) -> torch.Tensor:
        out = t.clone()
        self.tdist.all_reduce(out, op=self.tdist.ReduceOp.SUM, group=self.group)
        if average:
            out.mul_(1.0 / self.size)  # as Horovod averages: the sum scaled by 1/S
        return out

    def broadcast(self, t: torch.Tensor, root: int, name: str) -> torch.Tensor:
        out = t.clone()
        self.tdist.broadcast(out, src=root, group=self.group)
        return out


def make_backend(name: str, dist):
    """The transport ``name`` over the job's ranks; None for a single rank (nothing moves)."""
    if dist.size == 1:
        return None
    if name == "horovod":
        return HorovodBackend(dist)
    if name == "torch":
        return TorchBackend(dist)
    raise BackendError(f"train.backend={name!r}: one of {', '.join(NAMES)}")
