"""LoFT pretraining: every round each rank trains the sub-network of its filters for K steps,
then the shards are exchanged (:class:`loft_hpc.exchange.shards.ShardExchange`).

Momentum: ``reset`` re-creates SGD every round (the paper's release); ``carry`` keeps a full-size
momentum per parameter whose slices travel with the filters (shared momentum averaged).
"""
from __future__ import annotations

import hashlib

import torch

from loft_hpc.exchange.shards import ShardExchange
from loft_hpc.partition.coverage import trained_fraction
from loft_hpc.partition.plan import PartitionPlan
from loft_hpc.train.bn_recalibration import recalibrate_bn
from loft_hpc.partition.slicing import TensorSlicer, subnetwork
from loft_hpc.train import callbacks
from loft_hpc.train.engine import RoundTrainer
from loft_hpc.train.optim import get_momentum, make_sgd, set_momentum
from loft_hpc.train.schedule import set_lr
from loft_hpc.utils.log import log


class LoftTrainer(RoundTrainer):
    stage = "pretrain"
    sync_check_says = "all ranks identical"

    def __init__(self, ctx, model, groups, **kw) -> None:
        super().__init__(ctx, model, groups, steps_per_round=ctx.cfg.train.local_steps, shard=ctx.cfg.data.shard, **kw)
        self.slicer = TensorSlicer([g for g in groups if g.partitioned])
        self.partitioned = [g for g in groups if g.partitioned]
        t = self.cfg.train
        self.carry = t.momentum_mode == "carry" and t.momentum > 0
        self.exchange = ShardExchange(model, self.slicer, self.coll, carry_momentum=self.carry)
        self.full_mom = {n: torch.zeros_like(p) for n, p in model.named_parameters()} if self.carry else {}
        self.sync_checks = 0
        # the same every round (each rank's share size is fixed): recorded once, in /coverage
        frac = trained_fraction(self.slicer, self.plan(0))
        self.coverage = [{"name": n, "trained_fraction": f} for n, f in frac.items()]
        partial = {n: f for n, f in frac.items() if f < 1}
        if partial:
            log("pretrain: tensors sliced on two dims train only the ranks' diagonal blocks each round "
                "(independent subnets; the others keep their weights and momentum): "
                + ", ".join(f"{n} {f:.3f}" for n, f in partial.items()), rank=self.dist.rank)

    def plan(self, round_: int) -> PartitionPlan:
        return PartitionPlan.draw(self.cfg.train.seed, round_, self.partitioned, self.dist.size)

    def train_round(self, n_steps: int) -> None:
        t = self.cfg.train
        plan = self.plan(self.round)
        keep = plan.keep(self.dist.rank)
        sub = subnetwork(self.model, self.slicer, keep)
        sub.train()
        opt = make_sgd(sub, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay, nesterov=t.nesterov)
        sub_names = dict(sub.named_parameters())
        if self.carry:
            set_momentum(sub, opt, {n: self.slicer.extract(n, self.full_mom[n], keep) for n in sub_names})
        self.local_steps(sub, opt, n_steps)
        sub_mom = get_momentum(sub, opt) if self.carry else {}
        callbacks.fire("exchange", self)
        # Horovod: every rank calls exchange once per round, in the same round order.
        self.exchange.exchange(self.model, sub, self.full_mom, sub_mom, plan, self.dist.rank, self.round)
        if t.check_sync:
            self._check_sync()

    def local_steps(self, sub, opt, n_steps: int) -> None:
        """The round's K local SGD steps of this rank's sub-network (both exchanges)."""
        for i in range(n_steps):
            step = self.step + i
            set_lr(opt, self.lr(step))
            opt.zero_grad(set_to_none=True)
            self.forward_backward(sub, step)
            opt.step()

    def _check_sync(self) -> None:
        """All ranks must now hold the same full model and momentum, bit for bit."""
        h = hashlib.sha256()
        for d in (self.model.state_dict(), self.full_mom):
            for n in sorted(d):
                h.update(n.encode())
                h.update(d[n].detach().cpu().contiguous().numpy().tobytes())
        digests = self.dist.comm.allgather(h.hexdigest())  # control message, every round
        if len(set(digests)) != 1:
            raise RuntimeError(f"round {self.round}: ranks disagree on the model after the exchange: {digests}")
        self.sync_checks += 1

    step_loss_name = "sub_loss"  # the rank's sub-network during its local steps, not the full model

    def before_eval(self) -> None:
        t = self.cfg.train
        if t.bn_recalibration > 0:
            recalibrate_bn(self.model, self.ctx.train_set, batches=t.bn_recalibration, batch_size=self.cfg.data.batch_size,
                           seed=t.seed, tag=self.step, device=self.dist.device)

    def _finish(self) -> None:
        super()._finish()
        if self.cfg.train.check_sync:
            log(f"sync check: {self.sync_checks} rounds, {self.sync_check_says} after every exchange", rank=self.dist.rank)

    def momentum_state(self):
        return self.full_mom

    def load_momentum(self, momentum):
        if self.carry:
            for n, t in momentum.items():
                self.full_mom[n].copy_(t)
