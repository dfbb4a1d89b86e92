"""Analytic communication bytes of every pretraining method, in two counting conventions.

These formulas are written independently of the exchange code (the collectives count what they
move; nothing here reads those counts): the tests and ``make bench`` check that what the ranks
actually moved equals them exactly. Every tensor travels as float32: 4 bytes a float.

Symbols
-------
S   ranks (LoFT: workers; dense: data-parallel ranks; GPipe: pipeline stages)
P   floats of the partitioned tensors (every ``state_dict`` entry a partitioned filter group
    slices: conv weights, biases, BN affine parameters *and* BN running statistics)
Sh  floats of the shared floating-point tensors (everything else; integer buffers such as
    ``num_batches_tracked`` never travel)
P_par, Sh_par   the parameters among them (LoFT's ``momentum_mode=carry`` sends their momentum too:
    P' = P + P_par, Sh' = Sh + Sh_par; otherwise P' = P, Sh' = Sh)
N   trainable parameters (dense gradients); N_buf the floating buffers (BN statistics)
K   LoFT's local steps per sync; B the batch (LoFT and dense: per rank; GPipe: the global batch
    that the pipeline splits into micro-batches); n_c the per-sample activation size (floats) at
    GPipe's c-th stage boundary, c = 1 .. S-1

Conventions
-----------
fair (``*_fair_*``): total bytes over all links, both directions, each byte counted once on every
    link it crosses (LOFT_SPEC 6a), for bandwidth-optimal collectives (the ring algorithms):
    - allgather: every rank's input must reach the S-1 others, each copy over at least one link:
      (S-1) x the sum of the inputs (a ring attains it, uneven inputs included);
    - allreduce of n floats per rank: 2 (S-1) n over all links (reduce-scatter then allgather; a
      ring attains it, the classic lower bound for any algorithm);
    - point-to-point: each byte crosses one link once: the bytes sent.
    So one LoFT sync (allgather of shards + allreduce of shared tensors) moves (S-1) P + 2 (S-1) Sh
    floats, dense data parallelism 2 (S-1) N, and GPipe's activations and gradients 2 B sum_c n_c:
    each method's logs (``/comm``) give its fair bytes through the same rule, :func:`link_bytes`.
    What the MPI library underneath really does (a tree, recursive doubling) is not visible to
    Python; the rule counts what the exchange needs at least, the same way for every method.
payload (``/comm`` columns, per rank): what each rank hands to its collectives and gets back
    (allgather: sent = the rank's input, received = the output that came from the others;
    allreduce: sent = input, received = result; p2p: the tensors sent and received). It is what
    the ranks can measure, exactly, and :func:`loft_sync_bytes`, :func:`dense_step_bytes`,
    :func:`dense_eval_rank_bytes` and :func:`gpipe_rank_step_bytes` predict it per rank. It is
    not a convention for comparing methods: summed over the ranks, a collective's payload is
    S/(S-1) x its link bytes (2x at S = 2, 1.33x at S = 4) but a point-to-point transfer's is 2x at
    every S, so payload figures favour LoFT and dense against GPipe at S > 2 (by 1.5x at S = 4).
paper (``*_paper_*``): the LoFT paper's table (LOFT_SPEC 6, 6a). LoFT: a parameter server hands
    each of the S workers its sub-network, P_par/S + Sh_par parameters, one direction, per sync
    (parameters only: with them the table's ten LoFT figures imply 499.94-499.99 syncs on CIFAR
    and 5999.55-5999.57 on ImageNet, i.e. 500 and 6000 to 0.012%; adding the BN statistics moves
    every figure 0.07-0.10% away: ``loft-tools comm --paper``). GPipe: each sample's activation
    goes forward and its gradient backward across each of the S-1 stage boundaries, each counted
    once (the same as the fair convention). Dense data parallelism is not in the paper; by the
    same rule (what every worker is handed, one direction) a server hands each worker the
    averaged gradient: S N.

Per sync (one exchange; LoFT: every K steps; dense and GPipe: every step)
------------------------------------------------------------------------
=======  ==============================  ======================
method   fair                            paper
=======  ==============================  ======================
loft     4 (S-1) (P' + 2 Sh')  [1]       4 (P_par + S Sh_par)
dense    4 . 2 (S-1) N                   4 S N
gpipe    4 . 2 B sum_c n_c               4 . 2 B sum_c n_c
=======  ==============================  ======================
[1] the allgather's inputs sum to sum_s shard(s) = P'. When a tensor is sliced on two dims (every
    hidden layer of the LTH models) a shard holds only its diagonal block and sum_s shard(s) < P':
    :func:`loft_fair_sync_bytes` then applies :func:`link_bytes` to the ranks'
    :func:`loft_sync_bytes`, which is exact in every case.
With one rank nothing is communicated: every formula is 0.

Per step: LoFT per sync / K; dense and GPipe per step = per sync.
Per epoch: per step x steps per epoch (:func:`steps_per_epoch`):
  loft   floor(floor(n / S) / B) with ``data.shard``, else floor(n / B) (every worker iterates the
         whole set in its own order, the paper's code): an epoch is S passes over the data in total;
  dense  floor(floor(n / S) / B): one pass in total;
  gpipe  floor(n / B), B the global batch: one pass in total.
Dense evaluations also average the BN statistics: 4 . 2 (S-1) N_buf each (:func:`dense_eval_bytes`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

from torch import nn

from loft_hpc.models.groups import FilterGroup
from loft_hpc.partition.plan import share_size

FLOAT_BYTES = 4
METHODS = ("loft", "dense", "gpipe")


# ------------------------------------------------------------------------- model float counts
@dataclass(frozen=True)
class ModelFloats:
    """Float counts of a model under a partition (see the module's symbols)."""

    partitioned: int          # P
    shared: int               # Sh
    partitioned_params: int   # P_par
    shared_params: int        # Sh_par
    params: int               # N (trainable)
    buffers: int              # N_buf (floating buffers)

    def loft_floats(self, carry_momentum: bool) -> tuple[int, int]:
        """(P', Sh'): what LoFT's exchange moves per shard set and per rank's shared buffer."""
        if carry_momentum:
            return self.partitioned + self.partitioned_params, self.shared + self.shared_params
        return self.partitioned, self.shared


def partitioned_tensors(groups: list[FilterGroup]) -> set[str]:
    return {m.tensor for g in groups if g.partitioned for m in g.members}


def model_floats(model: nn.Module, groups: list[FilterGroup]) -> ModelFloats:
    state = model.state_dict()
    params = dict(model.named_parameters())
    part = partitioned_tensors(groups)
    floats = {n: t.numel() for n, t in state.items() if t.is_floating_point()}
    return ModelFloats(
        partitioned=sum(v for n, v in floats.items() if n in part),
        shared=sum(v for n, v in floats.items() if n not in part),
        partitioned_params=sum(v for n, v in floats.items() if n in part and n in params),
        shared_params=sum(v for n, v in floats.items() if n not in part and n in params),
        params=sum(p.numel() for p in params.values() if p.requires_grad),
        buffers=sum(b.numel() for _, b in model.named_buffers() if b.is_floating_point()),
    )


# ------------------------------------------------------------------------- per rank, /comm columns
def loft_sync_bytes(model: nn.Module, groups: list[FilterGroup], world: int, rank: int, carry_momentum: bool) -> dict:
    """``/comm`` columns of ``rank`` for one LoFT sync.

    shard(s) = sum over tensors T touched by a partitioned group of
               numel(T) / prod_{partitioned dims d} size_d * prod_d share(size_d / repeat, S, s) * repeat
               (x2 for parameters when momentum is carried)
    allgather: sent = 4 shard(s), received = 4 (sum_q shard(q) - shard(s))
    allreduce: sent = received = 4 (numel of shared float tensors + numel of shared params with carry)"""
    if world == 1:  # a single rank communicates nothing
        return {"allgather_sent": 0, "allgather_received": 0, "allreduce_sent": 0, "allreduce_received": 0}
    state = model.state_dict()
    params = {n for n, _ in model.named_parameters()}
    dims: dict[str, list[tuple[int, int, int]]] = {}
    for g in groups:
        if g.partitioned:
            for m in g.members:
                dims.setdefault(m.tensor, []).append((m.dim, g.size, m.repeat))

    def shard(s: int) -> int:
        total = 0
        for name, ds in dims.items():
            shape = list(state[name].shape)
            for d, size, rep in ds:
                shape[d] = share_size(size, world, s) * rep
            n = math.prod(shape)
            total += n * (2 if carry_momentum and name in params else 1)
        return total

    shared = [n for n, t in state.items() if n not in dims and t.is_floating_point()]
    shared_numel = sum(state[n].numel() for n in shared)
    if carry_momentum:
        shared_numel += sum(state[n].numel() for n in shared if n in params)
    own = shard(rank)
    everyone = sum(shard(q) for q in range(world))
    return {
        "allgather_sent": FLOAT_BYTES * own,
        "allgather_received": FLOAT_BYTES * (everyone - own),
        "allreduce_sent": FLOAT_BYTES * shared_numel,
        "allreduce_received": FLOAT_BYTES * shared_numel,
    }


def _homes(model: nn.Module, groups: list[FilterGroup]) -> dict[str, tuple[str, int, int]]:
    """Partitioned tensor -> (group, repeat, floats per entry) of its home dim, the lowest dim a
    partitioned group slices (the lean exchange's rule, restated here)."""
    state = model.state_dict()
    best: dict[str, tuple[int, str, int]] = {}
    for g in groups:
        if g.partitioned:
            for m in g.members:
                if m.tensor not in best or m.dim < best[m.tensor][0]:
                    best[m.tensor] = (m.dim, g.name, m.repeat)
    return {t: (g, rep, state[t].numel() // state[t].shape[d]) for t, (d, g, rep) in best.items()}


def loft_alltoall_bytes(model: nn.Module, groups: list[FilterGroup], keep_now: list[dict], keep_next: list[dict],
                        rank: int, carry_momentum: bool) -> dict:
    """``/comm`` columns of ``rank`` for one sync of the lean exchange (``train.exchange=alltoall``),
    from the ranks' filters this round (``keep_now[s]``: group -> channels) and next round.

    moving(s, q) = sum over partitioned tensors T of |now(s) ∩ next(q)| x repeat x floats per entry
                   (channels of T's home group; x2 for parameters when momentum is carried)
    alltoall: sent = 4 sum_{q != rank} moving(rank, q), received = 4 sum_{s != rank} moving(s, rank)
    allreduce: as :func:`loft_sync_bytes` (the shared tensors are averaged the same way)"""
    world = len(keep_now)
    if world == 1:
        return {"alltoall_sent": 0, "alltoall_received": 0, "allreduce_sent": 0, "allreduce_received": 0}
    params = {n for n, _ in model.named_parameters()}
    homes = _homes(model, groups)

    def moving(s: int, q: int) -> int:
        n = 0
        for t, (g, rep, per) in homes.items():
            common = set(keep_now[s][g].tolist()) & set(keep_next[q][g].tolist())
            n += len(common) * rep * per * (2 if carry_momentum and t in params else 1)
        return n

    shared = loft_sync_bytes(model, groups, world, rank, carry_momentum)
    return {"alltoall_sent": FLOAT_BYTES * sum(moving(rank, q) for q in range(world) if q != rank),
            "alltoall_received": FLOAT_BYTES * sum(moving(s, rank) for s in range(world) if s != rank),
            "allreduce_sent": shared["allreduce_sent"], "allreduce_received": shared["allreduce_received"]}


def assemble_bytes(model: nn.Module, groups: list[FilterGroup], keep: list[dict], rank: int, momentum: bool) -> dict:
    """``/comm`` assemble columns of ``rank`` for one assembly of the lean exchange: its home
    slices sent (weights; with ``momentum`` the momentum of the parameter tensors instead),
    the others' received."""
    params = {n for n, _ in model.named_parameters()}
    homes = {t: h for t, h in _homes(model, groups).items() if not momentum or t in params}

    def held(s: int) -> int:
        return sum(len(keep[s][g]) * rep * per for g, rep, per in homes.values())

    if len(keep) == 1:
        return {"assemble_sent": 0, "assemble_received": 0}
    return {"assemble_sent": FLOAT_BYTES * held(rank),
            "assemble_received": FLOAT_BYTES * sum(held(s) for s in range(len(keep)) if s != rank)}


def dense_step_bytes(model: nn.Module) -> dict:
    """``/comm`` columns of every rank (S > 1) for one dense step: the gradients of all trainable
    parameters, allreduced."""
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"allreduce_sent": FLOAT_BYTES * n, "allreduce_received": FLOAT_BYTES * n}


def gpipe_rank_step_bytes(batch: int, boundary_numels: list[int], rank: int) -> dict:
    """``/comm`` p2p columns of stage ``rank`` for one GPipe step (all micro-batches): it sends
    the activations of its outgoing boundary forward and the gradients of its incoming one
    backward, and receives the same two: sent = received = 4 B (n_rank + n_{rank-1}) (the
    missing boundary of the first and the last stage counts 0). The split into micro-batches does
    not change the bytes."""
    world = len(boundary_numels) + 1
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not a stage of a {world}-stage pipeline")
    out = boundary_numels[rank] if rank < world - 1 else 0
    inc = boundary_numels[rank - 1] if rank > 0 else 0
    b = FLOAT_BYTES * batch * (out + inc)
    return {"p2p_sent": b, "p2p_received": b}


def gpipe_assemble_bytes(model: nn.Module, stage_names: list[list[str]], rank: int, momentum: bool) -> dict:
    """``/comm`` assemble columns of stage ``rank`` for one GPipe assembly: the bytes of its own
    parameters and buffers (with ``momentum``: the momentum of its parameters, float32 of their
    shapes) sent, the other stages' received. ``stage_names``: each stage's state names
    (:func:`loft_hpc.models.pipeline.stage_state_names`)."""
    state = model.state_dict()
    params = {n for n, _ in model.named_parameters()}

    def held(names: list[str]) -> int:
        if momentum:
            return sum(FLOAT_BYTES * state[n].numel() for n in names if n in params)
        return sum(state[n].numel() * state[n].element_size() for n in names)

    per = [held(names) for names in stage_names]
    return {"assemble_sent": per[rank], "assemble_received": sum(per) - per[rank]}


# ------------------------------------------------------------------------- fair convention
def link_bytes(world: int, allgather: int = 0, allreduce: int = 0, p2p: int = 0, alltoall: int = 0,
               assemble: int = 0) -> int:
    """Bytes over all links (the fair convention) of transfers whose payload *sent*, summed over
    the ``world`` ranks, was ``allgather``, ``allreduce`` ... : (S-1) x allgather and assemble
    (the full model gathered: an allgather), 2 (S-1) / S x allreduce, p2p and alltoall as sent
    (alltoall counts only what goes to other ranks; each such byte crosses one link). Every
    allreduce runs on every rank with the same size, so its total is a multiple of S; anything
    else is a malformed log."""
    if world < 2:
        return 0
    ar, rest = divmod(2 * (world - 1) * allreduce, world)
    if rest:
        raise ValueError(f"allreduce payload {allreduce} over {world} ranks is not the same on every rank")
    return (world - 1) * (allgather + assemble) + ar + p2p + alltoall


LINK_KINDS = ("allgather", "allreduce", "p2p", "alltoall", "assemble")


def comm_link_bytes(rows, world: int, kinds=LINK_KINDS) -> int:
    """:func:`link_bytes` of ``/comm`` rows (all ranks' rows of the rounds wanted; a column the file
    lacks, e.g. p2p before GPipe, is 0), over the transfers of ``kinds``."""
    tot = {k: sum(int(r.get(f"{k}_sent", 0)) for r in rows) for k in kinds}
    return link_bytes(world, **tot)


def loft_fair_sync(partitioned: int, shared: int, world: int) -> int:
    """4 (S-1) (P' + 2 Sh') for one LoFT sync, over all links (one-dim slicing; see note [1])."""
    if world < 2:
        return 0
    return FLOAT_BYTES * (world - 1) * (partitioned + 2 * shared)


def loft_fair_sync_bytes(model: nn.Module, groups: list[FilterGroup], world: int, carry_momentum: bool) -> int:
    """One LoFT sync over all links, exact for any slicing: :func:`link_bytes` of the ranks'
    :func:`loft_sync_bytes`."""
    per = [loft_sync_bytes(model, groups, world, q, carry_momentum) for q in range(world)]
    return link_bytes(world, allgather=sum(p["allgather_sent"] for p in per), allreduce=sum(p["allreduce_sent"] for p in per))


def dense_fair_step(params: int, world: int) -> int:
    """4 . 2 (S-1) N: the ring allreduce of the N gradients."""
    return 0 if world < 2 else FLOAT_BYTES * 2 * (world - 1) * params


def dense_eval_bytes(buffers: int, world: int) -> int:
    """4 . 2 (S-1) N_buf: a dense evaluation averages the floating buffers (BN statistics) of every
    rank, over all links."""
    return 0 if world < 2 else FLOAT_BYTES * 2 * (world - 1) * buffers


def dense_eval_rank_bytes(model: nn.Module) -> dict:
    """``/comm`` columns of every rank (S > 1) for one dense evaluation: the floating buffers, allreduced."""
    n = sum(b.numel() for _, b in model.named_buffers() if b.is_floating_point())
    return {"allreduce_sent": FLOAT_BYTES * n, "allreduce_received": FLOAT_BYTES * n}


def gpipe_fair_step(batch: int, boundary_numels: list[int]) -> int:
    """4 . 2 B sum_c n_c: activations forward and gradients backward, each crossing its boundary's
    link once (the p2p bytes sent, summed over the stages: :func:`gpipe_rank_step_bytes`)."""
    return FLOAT_BYTES * 2 * batch * sum(boundary_numels)


# ------------------------------------------------------------------------- paper convention
def loft_paper_sync(partitioned: int, shared: int, world: int) -> int:
    """4 (P_par + S Sh_par): a parameter server hands each worker its sub-network (P_par/S + Sh_par
    parameters), one direction (the paper's LoFT column, LOFT_SPEC 6a). Pass the parameter counts
    (``ModelFloats.partitioned_params``, ``shared_params``): no BN statistics, no momentum."""
    if world < 2:
        return 0
    return FLOAT_BYTES * (partitioned + world * shared)


def dense_paper_step(params: int, world: int) -> int:
    """4 S N: the paper's rule applied to data parallelism (each worker handed the averaged gradient)."""
    return 0 if world < 2 else FLOAT_BYTES * world * params


def gpipe_paper_step(batch: int, boundary_numels: list[int]) -> int:
    """4 . 2 B sum_c n_c: activation forward + gradient backward per sample and boundary."""
    return FLOAT_BYTES * 2 * batch * sum(boundary_numels)


def gpipe_bytes(epochs: int, samples: int, boundary_numels: list[int]) -> int:
    """Total GPipe pretraining bytes in the paper's convention (LOFT_SPEC section 6): epochs x
    samples x 2 x 4 x sum_c n_c (= :func:`gpipe_paper_step` with B = epochs x samples)."""
    return gpipe_paper_step(epochs * samples, boundary_numels)


# ------------------------------------------------------------------------- per step, per epoch
def steps_per_epoch(method: str, n_train: int, batch: int, world: int, shard: bool = False) -> int:
    """Steps of every rank in one epoch (``drop_last``; the same rule as
    :func:`loft_hpc.train.stream.batches_per_epoch`, rewritten here)."""
    if method == "loft":
        per_rank = n_train // world if shard else n_train
    elif method == "dense":
        per_rank = n_train // world
    elif method == "gpipe":
        per_rank = n_train  # every stage sees every sample of the global batch
    else:
        raise ValueError(f"unknown method {method!r}; one of {', '.join(METHODS)}")
    return per_rank // batch


@dataclass(frozen=True)
class MethodBytes:
    """Both conventions of one method on one setting: per sync, per step and per epoch (exact
    fractions: a LoFT sync every K steps need not divide an epoch)."""

    method: str
    world: int
    steps_per_epoch: int
    steps_per_sync: int       # LoFT: K; dense, GPipe: 1
    fair_per_sync: int
    paper_per_sync: int
    samples_per_epoch: int    # training samples the job processes in one epoch (all ranks)

    @property
    def syncs_per_epoch(self) -> Fraction:
        return Fraction(self.steps_per_epoch, self.steps_per_sync)

    @property
    def fair_per_step(self) -> Fraction:
        return Fraction(self.fair_per_sync, self.steps_per_sync)

    @property
    def paper_per_step(self) -> Fraction:
        return Fraction(self.paper_per_sync, self.steps_per_sync)

    @property
    def fair_per_epoch(self) -> Fraction:
        return self.fair_per_sync * self.syncs_per_epoch

    @property
    def paper_per_epoch(self) -> Fraction:
        return self.paper_per_sync * self.syncs_per_epoch

    def fair_for_steps(self, steps: int) -> int:
        """Bytes over all links (fair) of a run of ``steps`` steps (LoFT: ceil(steps / K) syncs, the
        last one after a shorter round)."""
        return self.fair_per_sync * -(-steps // self.steps_per_sync)


def method_bytes(method: str, model: nn.Module, groups: list[FilterGroup], *, world: int, batch: int, n_train: int,
                 local_steps: int = 1, carry_momentum: bool = False, shard: bool = False,
                 boundary_numels: list[int] | None = None) -> MethodBytes:
    """:class:`MethodBytes` of ``method`` for ``model`` (GPipe: with the per-sample activation
    sizes at its S-1 stage boundaries, ``boundary_numels``)."""
    f = model_floats(model, groups)
    spe = steps_per_epoch(method, n_train, batch, world, shard)
    if method == "loft":
        return MethodBytes(method, world, spe, local_steps, loft_fair_sync_bytes(model, groups, world, carry_momentum),
                           loft_paper_sync(f.partitioned_params, f.shared_params, world), world * spe * batch)
    if method == "dense":
        return MethodBytes(method, world, spe, 1, dense_fair_step(f.params, world), dense_paper_step(f.params, world),
                           world * spe * batch)
    if boundary_numels is None or len(boundary_numels) != world - 1:
        raise ValueError(f"gpipe on {world} stages needs {world - 1} boundary activation sizes, got {boundary_numels}")
    return MethodBytes(method, world, spe, 1, gpipe_fair_step(batch, boundary_numels),
                       gpipe_paper_step(batch, boundary_numels), spe * batch)
