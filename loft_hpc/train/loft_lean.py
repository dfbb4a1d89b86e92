"""LoFT pretraining with the lean exchange (``train.exchange: alltoall``).

Each rank holds its home slices (:mod:`loft_hpc.exchange.lean`: the partitioned entries of the
filters it trains this round, with their momentum), its sub-network (which shares storage with
the home slices wherever a tensor is sliced on one dim only) and the shared tensors with their
momentum: about P/S + Sh floats of model and as many of momentum, where the allgather exchange
holds the full model and its full momentum on every rank. The arithmetic is the allgather path's,
step for step (same sub-network values, same SGD, same shared averaging), so the weights and
momentum after every round are bit-identical to it; only the data moves differently.

The full model is assembled only where it is needed: before a boundary that snapshots,
evaluates, recalibrates BN or saves (weights), and for checkpoints and the final file (momentum
too), by an allgather of every rank's home slices counted as ``assemble`` in ``/comm``. It is
released when training resumes.
"""
from __future__ import annotations

import hashlib

import torch

from loft_hpc.exchange.lean import LeanLayout
from loft_hpc.partition.slicing import subnetwork
from loft_hpc.train import callbacks
from loft_hpc.train.loft import LoftTrainer
from loft_hpc.train.optim import make_sgd


def _set_tensor(module: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    """Point ``module``'s parameter or buffer ``name`` at ``value`` (a parameter keeps its identity)."""
    mod_name, _, attr = name.rpartition(".")
    mod = module.get_submodule(mod_name) if mod_name else module
    if attr in mod._parameters:
        mod._parameters[attr].data = value
    else:
        mod._buffers[attr] = value


class LeanLoftTrainer(LoftTrainer):
    sync_check_says = "shared tensors identical on all ranks and the home slices partitioning every partitioned tensor"

    def __init__(self, ctx, model, groups, **kw) -> None:
        super().__init__(ctx, model, groups, **kw)
        self.layout = LeanLayout(model, self.slicer, self.carry)
        self.store = None            # the home slices of plan(self.round), once training has started
        self.sub = None              # this rank's sub-network (its shape is the same every round)
        self.shared_mom: dict[str, torch.Tensor] = {}
        self._full_step = self.step  # the step at which self.model holds the full model (None: released)
        self._mom_step = None        # ... and self.full_mom the full momentum

    # ------------------------------------------------------------------ start, release
    def _start(self) -> None:
        """Home slices and sub-network cut from the full model (fresh start or resume), then the
        full model released."""
        keep = self.plan(self.round).keep(self.dist.rank)
        state = self.model.state_dict()
        mom = self.full_mom if self.full_mom else {n: torch.zeros_like(p) for n, p in self.model.named_parameters()}
        self.store = self.layout.store_from_full(state, mom, keep)
        self.sub = subnetwork(self.model, self.slicer, keep)
        self._share_home_storage()
        if self.carry:
            self.shared_mom = {n: mom[n].detach().clone() for n in self.exchange.shared_params}
        self._release()

    def _share_home_storage(self) -> None:
        """Tensors sliced on their home dim only: the sub-network's tensor is the home slice."""
        for t, h in self.layout.homes.items():
            if not h.other:
                _set_tensor(self.sub, t, self.store.w[t])

    def _release(self) -> None:
        """Drop the full model's floating tensors and the full momentum (held only at boundaries)."""
        if self._full_step is None:
            return
        for n, v in list(self.model.state_dict(keep_vars=True).items()):
            if v.is_floating_point():
                _set_tensor(self.model, n, v.new_empty(0))
        self.full_mom = {}
        self._full_step = self._mom_step = None

    # ------------------------------------------------------------------ one round
    def train_round(self, n_steps: int) -> None:
        t = self.cfg.train
        if self.store is None:
            self._start()
        self._release()
        plan = self.plan(self.round)
        keep = self.store.keep
        sub, L = self.sub, self.layout
        with torch.no_grad():
            for n, h in L.homes.items():  # two-dim tensors: this round's columns of the home rows
                if h.other:
                    _set_tensor(sub, n, L.sub_value(n, self.store.w[n], keep).clone())
        sub.train()
        opt = make_sgd(sub, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay, nesterov=t.nesterov)
        params = dict(sub.named_parameters())
        if self.carry:  # the same momentum values the allgather path extracts from its full momentum
            for n, p in params.items():
                if n in L.homes:
                    buf = L.sub_value(n, self.store.m[n], keep)
                    opt.state[p]["momentum_buffer"] = buf if buf.data_ptr() == self.store.m[n].data_ptr() else buf.clone()
                else:
                    opt.state[p]["momentum_buffer"] = self.shared_mom[n]
        self.local_steps(sub, opt, n_steps)
        callbacks.fire("exchange", self)
        sstate = sub.state_dict()
        with torch.no_grad():
            for n in L.homes:
                L.write_sub(n, self.store.w[n], sstate[n], keep)
            sub_mom = {}
            if self.carry:
                sub_mom = {n: opt.state[p]["momentum_buffer"] for n, p in params.items()}
                for n in L.with_mom:
                    L.write_sub(n, self.store.m[n], sub_mom[n], keep)
            # Horovod / torch: every rank averages the shared tensors, then runs the alltoall, once per round
            self.exchange.average_shared(sstate, sub_mom, sstate, self.shared_mom, self.round)
            nxt = self.plan(self.round + 1)
            self.store = L.exchange(self.coll, self.store, plan, nxt, self.dist.rank, name=f"loft.lean.r{self.round}")
            self._share_home_storage()
        if t.check_sync:
            self._check_sync()

    def _check_sync(self) -> None:
        """Every rank holds the same shared tensors and momentum, bit for bit, and the ranks' home
        slices partition every partitioned tensor (MPI control messages, not counted)."""
        h = hashlib.sha256()
        state = self.sub.state_dict()
        for d in ({n: state[n] for n in self.exchange.shared}, self.shared_mom):
            for n in sorted(d):
                h.update(n.encode())
                h.update(d[n].detach().cpu().contiguous().numpy().tobytes())
        rows = {t: self.layout.homes[t].member.entries(self.store.keep[self.layout.homes[t].group]).tolist()
                for t in self.layout.homes}
        got = self.dist.comm.allgather((h.hexdigest(), rows))  # control message, every round
        if len({g[0] for g in got}) != 1:
            raise RuntimeError(f"round {self.round}: ranks disagree on the shared tensors after the exchange")
        for t, shape in self.layout.shapes.items():
            held = sorted(r for g in got for r in g[1][t])
            if held != list(range(shape[self.layout.homes[t].dim])):
                raise RuntimeError(f"round {self.round}: the home slices of {t} do not partition it")
        self.sync_checks += 1

    # ------------------------------------------------------------------ the full model, where needed
    def before_boundary(self) -> None:
        """The full model on every rank: the home slices gathered (counted as ``assemble``), the
        shared tensors and integer buffers from the sub-network."""
        if self._full_step == self.step or self.store is None:
            return
        L = self.layout
        full = {t: torch.empty(shape, dtype=L.dtypes[t], device=self.dist.device) for t, shape in L.shapes.items()}
        L.assemble(self.coll, self.store, self.plan(self.round), self.dist.rank, full, momentum=False,
                   name=f"loft.assemble.w{self.step}")
        sstate = self.sub.state_dict()
        with torch.no_grad():
            for n, v in self.model.state_dict(keep_vars=True).items():
                _set_tensor(self.model, n, full[n] if n in full else sstate[n].detach().clone())
        self._full_step = self.step

    def before_save(self) -> None:
        """The full momentum on every rank (checkpoints and the final file)."""
        self.before_boundary()
        if not self.carry or self._mom_step == self.step or self.store is None:
            return
        L = self.layout
        full = {t: torch.zeros(L.shapes[t], dtype=L.dtypes[t], device=self.dist.device) for t in L.with_mom}
        L.assemble(self.coll, self.store, self.plan(self.round), self.dist.rank, full, momentum=True,
                   name=f"loft.assemble.m{self.step}")
        self.full_mom = {**full, **{n: m.detach().clone() for n, m in self.shared_mom.items()}}
        self._mom_step = self.step

    def load_momentum(self, momentum):
        if self.carry:  # a resume: kept whole until the home slices are cut from it
            self.full_mom = {n: t.detach().clone() for n, t in momentum.items()}
            self._mom_step = self.step
