"""Dense data-parallel training (``hvd.DistributedOptimizer``): the LoFT baseline, and the
retraining of tickets with their masks enforced after every step."""
from __future__ import annotations

import time

import torch

from loft_hpc.train.engine import RoundTrainer
from loft_hpc.train.optim import get_momentum, make_sgd, set_momentum
from loft_hpc.train.schedule import set_lr


class DenseTrainer(RoundTrainer):
    stage = "pretrain"

    def __init__(self, ctx, model, groups, *, lr: float, momentum: float, weight_decay: float,
                 nesterov: bool = False, stage: str = "pretrain", **kw) -> None:
        # Horovod: data parallel: ranks take disjoint shards, an epoch is one pass in total
        super().__init__(ctx, model, groups, steps_per_round=1, shard=True, **kw)
        self.stage = stage
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        base = make_sgd(model, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
        self.grad_bytes = sum(p.numel() * 4 for _, p in self.params)
        if self.dist.size > 1:
            import horovod.torch as hvd

            # Horovod: gradients averaged across ranks; named so every rank's collectives match.
            self.opt = hvd.DistributedOptimizer(base, named_parameters=model.named_parameters(), op=hvd.Average)
        else:
            self.opt = base
        if self.masks:
            self.masks = {n: m.to(self.dist.device) for n, m in self.masks.items()}
            self.apply_masks()

    def on_fresh_start(self) -> None:
        if self.dist.size > 1:
            import horovod.torch as hvd

            # Horovod: every rank starts from rank 0's parameters (a resumed job loads one checkpoint instead)
            hvd.broadcast_parameters(self.model.state_dict(), root_rank=0)
            nbytes = sum(t.numel() * t.element_size() for t in self.model.state_dict().values())
            self.coll.counter.add("broadcast", nbytes if self.dist.is_root else 0, 0 if self.dist.is_root else nbytes)

    @torch.no_grad()
    def apply_masks(self) -> None:
        params = dict(self.model.named_parameters())
        for n, m in self.masks.items():
            params[n].mul_(m)

    def train_round(self, n_steps: int) -> None:
        self.model.train()
        for i in range(n_steps):
            step = self.step + i
            set_lr(self.opt, self.lr(step))
            self.opt.zero_grad()
            self.forward_backward(self.model, step)
            if self.dist.size > 1:
                t0 = time.perf_counter()
                self.opt.synchronize()  # Horovod: wait for the gradient allreduce
                # counted as the payload handed to allreduce: every trainable gradient, float32
                # (the seconds are the wait not hidden behind the backward pass)
                self.coll.counter.add("allreduce", self.grad_bytes, self.grad_bytes, time.perf_counter() - t0)
            if self.masks:
                params = dict(self.model.named_parameters())
                for n, m in self.masks.items():
                    if params[n].grad is not None:
                        params[n].grad.mul_(m)
            if self.dist.size > 1:
                with self.opt.skip_synchronize():
                    self.opt.step()
            else:
                self.opt.step()
            if self.masks:
                self.apply_masks()  # pruned weights stay exactly zero

    def before_eval(self) -> None:
        # BN running statistics drift apart under data parallelism: average them so that every
        # rank evaluates and saves the same model.
        if self.dist.size == 1:
            return
        bufs = [(n, b) for n, b in self.model.named_buffers() if b.is_floating_point()]
        if not bufs:
            return
        flat = torch.cat([b.reshape(-1) for _, b in bufs])
        avg = self.coll.allreduce_mean(flat, name=f"dense.buffers.{self.step}")  # collective order: at eval/ckpt
        off = 0
        with torch.no_grad():
            for _, b in bufs:
                b.copy_(avg[off:off + b.numel()].view_as(b))
                off += b.numel()

    def momentum_state(self):
        return get_momentum(self.model, self.opt)

    def load_momentum(self, momentum):
        if momentum:
            set_momentum(self.model, self.opt, momentum)
