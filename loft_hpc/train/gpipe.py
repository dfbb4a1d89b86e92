"""GPipe pretraining: the model cut into S pipeline stages, one per rank (LOFT_SPEC 6c).

Each step takes one global batch (``data.batch_size``; every rank draws the same batch from one
stream: the first stage uses the images, the last the labels), splits it into
``train.microbatches`` micro-batches and runs ``torch.distributed.pipelining``'s GPipe schedule:
all forwards, then all backwards, the gradients summed over micro-batches and scaled by their
number (``scale_grads``: the gradient of the batch mean, as one step of plain SGD on the whole
batch). Every rank then updates its own stage's parameters with the same SGD as the other methods.
BatchNorm normalises per micro-batch (torch has no deferred BN), so GPipe with M micro-batches
trains like plain SGD with "ghost batches" of batch_size / M.

Communication: activations forward and their gradients backward across the S-1 stage
boundaries, point to point over a torch.distributed process group (gloo on CPU, NCCL on GPU)
made from the MPI ranks. Every tensor a stage sends or receives is counted where the schedule
asks the stage for its send/receive operations (:class:`CountedStage`), as kind ``p2p`` in
``/comm``; the payloads are fixed by the cut points' activation shapes, which
:func:`loft_hpc.exchange.accounting` turns into the analytic figure tests compare with. The time
the schedule waits on those transfers (:func:`timed_p2p_waits`, bubbles included) goes into
``/comm`` ``seconds`` like the collectives' time.

The stages are built in static mode (example input and output tensors from the cut shapes):
no metadata-inference forward pass runs before the first step, so BN statistics and counts see
only the real micro-batches.

At a boundary that snapshots, evaluates or saves, every rank's stage parameters and buffers are
gathered to every rank over MPI (:meth:`GPipeTrainer.assemble`), and before a file also their
momentum (:meth:`GPipeTrainer.before_save`), so evaluation, filter-score snapshots, ticket
detection and the files are the shared code of the other methods. Both gathers are counted as
kind ``assemble`` in ``/comm`` (each rank sends its stage's bytes, receives the others'), as the
lean LoFT exchange counts its own assembly: the model made whole where it is needed is traffic
of both methods, counted the same way (:func:`loft_hpc.exchange.accounting.gpipe_assemble_bytes`).
Every rank therefore holds the whole model (and, after a save, a CPU copy of all momentum): the
pipeline splits the compute and the activations, not the memory of the weights, in this package.
"""
from __future__ import annotations

import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from loft_hpc.models.pipeline import (balanced_cuts, block_flops, block_params, boundary_shapes, pipeline_blocks,
                                      stage_ranges, stage_state_names)
from loft_hpc.train import callbacks
from loft_hpc.train.engine import RoundTrainer
from loft_hpc.train.optim import make_sgd
from loft_hpc.train.schedule import set_lr


def resolve_cuts(cfg, blocks: list[tuple[str, nn.Module]], stages: int, sample: torch.Tensor) -> list[int]:
    """Block indices where stages 2..S begin: ``train.pipeline_cuts`` (block names) or balanced."""
    names = [n for n, _ in blocks]
    t = cfg.train
    if t.pipeline_cuts:
        unknown = [c for c in t.pipeline_cuts if c not in names]
        if unknown:
            raise ValueError(f"train.pipeline_cuts: {unknown[0]!r} is not a pipeline block (blocks: {', '.join(names)})")
        cuts = [names.index(c) for c in t.pipeline_cuts]
        if len(cuts) != stages - 1:
            raise ValueError(f"train.pipeline_cuts: {len(cuts)} cut(s) for {stages} stages (need {stages - 1})")
        try:
            stage_ranges(len(blocks), cuts)  # in order, non-empty stages
        except ValueError:
            raise ValueError(f"train.pipeline_cuts: {list(t.pipeline_cuts)} do not split the blocks into "
                             f"{stages} non-empty stages in order (the first stage begins at {names[0]}; cuts are "
                             f"later blocks, increasing: {', '.join(names[1:])})") from None
        return cuts
    costs = block_params(blocks) if t.pipeline_balance == "params" else block_flops(blocks, sample)
    return balanced_cuts(costs, stages)


class CountedStage:
    """Builds a ``PipelineStage`` whose send/receive operations are counted into ``counter``
    (kind ``p2p``): the bytes of every tensor the schedule sends or receives."""

    @staticmethod
    def make(submodule, index: int, stages: int, device, input_args, output_args, group, counter):
        from torch.distributed.pipelining import PipelineStage

        class _Stage(PipelineStage):
            def _count(self, ops, sent: bool):
                n = sum(op.tensor.numel() * op.tensor.element_size() for op in ops)
                counter.add("p2p", n if sent else 0, 0 if sent else n)
                return ops

            def get_fwd_send_ops(self, chunk):  # activations to the next stage
                return self._count(super().get_fwd_send_ops(chunk), True)

            def get_fwd_recv_ops(self, chunk):  # activations from the previous stage
                return self._count(super().get_fwd_recv_ops(chunk), False)

            def get_bwd_send_ops(self, chunk):  # gradients to the previous stage
                return self._count(super().get_bwd_send_ops(chunk), True)

            def get_bwd_recv_ops(self, chunk):  # gradients from the next stage
                return self._count(super().get_bwd_recv_ops(chunk), False)

        return _Stage(submodule, index, stages, device, input_args=input_args, output_args=output_args, group=group)


@contextmanager
def timed_p2p_waits(counter):
    """Adds the time the schedule spends waiting on its point-to-point transfers to ``counter``
    (kind ``p2p``, no bytes: those are counted by :class:`CountedStage`), as the collectives' time
    is: it includes waiting for the neighbouring stage (the pipeline's fill and drain bubbles),
    as an allreduce's time includes waiting for the slowest rank. The schedule waits through
    ``torch.distributed.pipelining.schedules._wait_batch_p2p``; a torch without that function
    leaves the time uncounted (0 seconds) rather than failing."""
    from torch.distributed.pipelining import schedules

    original = getattr(schedules, "_wait_batch_p2p", None)
    if original is None:
        yield
        return

    def timed(work):
        t0 = time.perf_counter()
        try:
            return original(work)
        finally:
            counter.add("p2p", 0, 0, time.perf_counter() - t0)

    schedules._wait_batch_p2p = timed
    try:
        yield
    finally:
        schedules._wait_batch_p2p = original


class GPipeTrainer(RoundTrainer):
    """One step per round; rank r trains stage r of the pipeline."""

    single_stream = True  # every rank draws the same batches (first stage: images, last: labels)
    stats_rank = -1       # the last stage sees the outputs: its running loss is the one to log

    def __init__(self, ctx, model, groups, *, lr: float, momentum: float, weight_decay: float,
                 nesterov: bool = False, sample: torch.Tensor, **kw) -> None:
        super().__init__(ctx, model, groups, steps_per_round=1, shard=False, **kw)
        from loft_hpc.utils.dist import torch_process_group

        t, S, r = self.cfg.train, self.dist.size, self.dist.rank
        self.M = t.microbatches
        self.blocks = pipeline_blocks(model)
        self.cuts = resolve_cuts(self.cfg, self.blocks, S, sample)
        self.ranges = stage_ranges(len(self.blocks), self.cuts)
        lo, hi = self.ranges[r]
        self.stage_module = nn.Sequential(*[m for _, m in self.blocks[lo:hi]])
        self.owned = stage_state_names(model, self.blocks, self.cuts)[r]
        self.owned_params = [n for n, _ in model.named_parameters() if n in set(self.owned)]
        shapes = boundary_shapes(self.blocks, self.cuts, sample)
        self.boundary = shapes
        mb = self.cfg.data.batch_size // self.M
        ins = [tuple(sample.shape[1:])] + shapes
        outs = shapes + [(model.classifier.out_features,)]
        dev = self.dist.device
        self.group = torch_process_group(self.dist)
        stage = CountedStage.make(self.stage_module, r, S, dev,
                                  torch.empty(mb, *ins[r], device=dev, requires_grad=r > 0),
                                  torch.empty(mb, *outs[r], device=dev, requires_grad=True),
                                  self.group, self.coll.counter)
        from torch.distributed.pipelining import ScheduleGPipe

        self.schedule = ScheduleGPipe(stage, n_microbatches=self.M, loss_fn=F.cross_entropy, scale_grads=True)
        self.opt = make_sgd(self.stage_module, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
        self._full_momentum: dict[str, torch.Tensor] = {}
        self._assembled_step = self._momentum_step = -1

    # ------------------------------------------------------------------ training
    def train_round(self, n_steps: int) -> None:
        self.stage_module.train()
        S, r = self.dist.size, self.dist.rank
        for i in range(n_steps):
            step = self.step + i
            set_lr(self.opt, self.lr(step))
            self.opt.zero_grad(set_to_none=True)
            x, y = self.stream.batch(step)
            callbacks.fire("step", self, step)
            with timed_p2p_waits(self.coll.counter):
                if r == 0:
                    self.schedule.step(x)
                elif r == S - 1:
                    losses = []
                    out = self.schedule.step(target=y, losses=losses)
                else:
                    self.schedule.step()
            if r == S - 1:  # the last stage sees the outputs: loss and accuracy of this step
                with torch.no_grad():
                    loss = torch.stack([lo.detach() for lo in losses]).double().mean()
                    self.run_stats += torch.stack([loss * y.numel(), (out.argmax(1) == y).sum().double(),
                                                   torch.tensor(float(y.numel()), dtype=torch.float64, device=y.device)])
            self.opt.step()

    # ------------------------------------------------------------------ the assembled model
    def _gather(self, mine: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Every rank's ``mine`` on every rank (MPI), counted as ``assemble``: sent = this rank's
        bytes, received = the other ranks'."""
        t0 = time.perf_counter()
        parts = self.dist.comm.allgather(mine)  # collective order: every rank, at assembling boundaries
        nbytes = [sum(t.nbytes for t in p.values()) for p in parts]
        r = self.dist.rank
        self.coll.counter.add("assemble", nbytes[r], sum(nbytes) - nbytes[r], time.perf_counter() - t0)
        return parts

    def assemble(self) -> None:
        """Every stage's current parameters and buffers on every rank: the full model for
        snapshots, evaluation and files. Once per step."""
        if self._assembled_step == self.step:
            return
        state = self.model.state_dict()
        parts = self._gather({n: state[n].detach().cpu() for n in self.owned})
        with torch.no_grad():
            for tensors in parts:
                for n, t in tensors.items():
                    state[n].copy_(t.to(state[n].device))
        self._assembled_step = self.step

    def before_save(self) -> None:
        """Every stage's momentum on every rank, for the file. Once per step."""
        if self._momentum_step == self.step:
            return
        self._full_momentum = {n: t for mom in self._gather(self._own_momentum()) for n, t in mom.items()}
        self._momentum_step = self.step

    def _own_momentum(self) -> dict[str, torch.Tensor]:
        params = dict(self.model.named_parameters())
        out = {}
        for n in self.owned_params:
            buf = self.opt.state.get(params[n], {}).get("momentum_buffer")
            out[n] = buf.detach().cpu().clone() if buf is not None else torch.zeros_like(params[n], device="cpu")
        return out

    def before_boundary(self) -> None:
        self.assemble()

    def before_eval(self) -> None:
        self.assemble()  # buffers are the stage owners' own: nothing to average or recalibrate

    def momentum_state(self) -> dict[str, torch.Tensor]:
        return self._full_momentum

    def load_momentum(self, momentum: dict[str, torch.Tensor]) -> None:
        params = dict(self.model.named_parameters())
        for n in self.owned_params:
            if n in momentum:
                self.opt.state[params[n]]["momentum_buffer"] = momentum[n].detach().clone().to(params[n].device)
