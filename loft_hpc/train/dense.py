"""Dense data-parallel training: the LoFT baseline, and the retraining of tickets (and IMP
levels) with their masks enforced after every step.

Each step every rank computes the gradient of its own shard's batch; the gradients of all
trainable parameters are averaged in one named, counted allreduce of one flat float32 buffer
(:meth:`Collectives.allreduce_mean`, where the bytes are measured), then SGD steps on every rank
identically. No gradient hooks are registered on the model, so a trainer leaves nothing behind
on the parameters it trained (IMP builds one trainer per level). Every rank starts from the same
weights (theta_0 drawn from the seed, or the same ticket file), so no initial broadcast is needed.
"""
from __future__ import annotations

import torch

from loft_hpc.train.engine import RoundTrainer
from loft_hpc.train.optim import get_momentum, make_sgd, set_momentum
from loft_hpc.train.schedule import set_lr


class DenseTrainer(RoundTrainer):
    stage = "pretrain"

    def __init__(self, ctx, model, groups, *, lr: float, momentum: float, weight_decay: float,
                 nesterov: bool = False, stage: str = "pretrain", **kw) -> None:
        # data parallel: ranks take disjoint shards, an epoch is one pass over the set in total
        super().__init__(ctx, model, groups, steps_per_round=1, shard=True, **kw)
        self.stage = stage
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = make_sgd(model, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
        if self.masks:
            self.masks = {n: m.to(self.dist.device) for n, m in self.masks.items()}
            self.apply_masks()

    @torch.no_grad()
    def apply_masks(self) -> None:
        params = dict(self.model.named_parameters())
        for n, m in self.masks.items():
            params[n].mul_(m)

    @torch.no_grad()
    def average_gradients(self, step: int) -> None:
        """Replace every rank's gradients by their average over the ranks (one collective)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        avg = self.coll.allreduce_mean(flat, name=f"dense.grads.{self.ckpt_stage}.{step}")  # collective order: every step
        off = 0
        for p in self.params:
            n = p.numel()
            p.grad = avg[off:off + n].view_as(p).clone()
            off += n

    def train_round(self, n_steps: int) -> None:
        self.model.train()
        for i in range(n_steps):
            step = self.step + i
            set_lr(self.opt, self.lr(step))
            self.opt.zero_grad(set_to_none=True)
            self.forward_backward(self.model, step)
            if self.dist.size > 1:
                self.average_gradients(step)
            if self.masks:
                params = dict(self.model.named_parameters())
                for n, m in self.masks.items():
                    if params[n].grad is not None:
                        params[n].grad.mul_(m)
            self.opt.step()
            if self.masks:
                self.apply_masks()  # pruned weights stay exactly zero

    def before_eval(self) -> None:
        # BN running statistics drift apart under data parallelism: average them so that every
        # rank evaluates and saves the same model (on a copy: see RoundTrainer.assembled).
        if self.dist.size == 1:
            return
        bufs = [b for _, b in self.model.named_buffers() if b.is_floating_point()]
        if not bufs:
            return
        flat = torch.cat([b.reshape(-1) for b in bufs])
        avg = self.coll.allreduce_mean(flat, name=f"dense.buffers.{self.ckpt_stage}.{self.step}")  # collective order: at eval
        off = 0
        with torch.no_grad():
            for b in bufs:
                b.copy_(avg[off:off + b.numel()].view_as(b))
                off += b.numel()

    def momentum_state(self):
        return get_momentum(self.model, self.opt)

    def load_momentum(self, momentum):
        if momentum:
            set_momentum(self.model, self.opt, momentum)
