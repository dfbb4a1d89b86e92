"""A stage's files: the run file assembled from a trainer, checkpoints, the final file, weight
snapshots, and resuming from the newest usable checkpoint.

Checkpoints are for resuming: the model as training holds it (rank 0's: parameters are identical
on every rank at a round boundary) and every rank's own state (RNG, byte counters, running loss
sums, buffers as training left them). They assemble nothing and move no model data. The final
file and weight snapshots hold the assembled model (see ``RoundTrainer.assembled``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from loft_hpc.checkpoint.h5file import (CheckpointError, RunFile, check_model_state, read_run_file, rng_state,
                                        set_rng_state, write_run_file)
from loft_hpc.checkpoint.identity import differences
from loft_hpc.config import config_to_yaml
from loft_hpc.config.steps import Step
from loft_hpc.train import callbacks
from loft_hpc.utils.log import log


@dataclass
class History:
    metrics: list[dict] = field(default_factory=list)
    comm: list[dict] = field(default_factory=list)  # rank 0: rows of every rank gathered so far
    snap_index: list[tuple[int, int, int]] = field(default_factory=list)
    snap_scores: dict = field(default_factory=dict)
    weight_snapshots: dict[str, str] = field(default_factory=dict)


def runfile(tr, *, stage: str, complete: bool, light: bool = False, ranks=None) -> RunFile:
    """The trainer's state as a run file (``light``: a weight snapshot, model only)."""
    h = tr.hist
    return RunFile(
        stage=stage, config_yaml=config_to_yaml(tr.cfg), arch=tr.cfg.model.arch, world_size=tr.dist.size,
        seed=tr.cfg.train.seed, model={n: t.detach().cpu() for n, t in tr.model.state_dict().items()},
        identity=tr.identity,
        progress={"step": tr.step, "round": tr.round, "epoch": tr.step // tr.bpe, "total_steps": tr.total,
                  "wall_time": tr.wall, "batches_per_epoch": tr.bpe},
        momentum={} if light else {n: t.detach().cpu() for n, t in tr.momentum_state().items()},
        ranks=[] if light else (ranks or []), init={} if light else (tr.init or {}),
        masks=tr.masks or {}, mask_attrs=tr.mask_attrs, sparsity=tr.sparsity, coverage=tr.coverage,
        snap_index=[] if light else h.snap_index, snap_scores={} if light else h.snap_scores,
        weight_snapshots=h.weight_snapshots, metrics=[] if light else h.metrics,
        comm=[] if light else h.comm, ticket={} if light else tr.ticket_record(), complete=complete)


def gather_rank_states(tr, buffers: dict) -> list[dict] | None:
    """Every rank's own state and its pending /comm rows to rank 0 (mpi4py control messages)."""
    tr.ledger.record(tr.round, tr.step)
    mine = rng_state()
    mine.update(tr.ledger.state(), run_stats=tr.run_stats.cpu().numpy(),
                buffers={n: b.cpu() for n, b in buffers.items() if b.is_floating_point()})
    ranks = tr.dist.comm.gather(mine, root=0)  # collective order: at every checkpoint, all ranks
    rows = tr.dist.comm.gather(tr.ledger.take_pending(), root=0)  # collective order: right after
    if tr.dist.is_root:
        tr.hist.comm.extend(sorted((r for per in rows for r in per), key=lambda r: (r["round"], r["rank"])))
    return ranks


def save_checkpoint(tr) -> None:
    tr.before_boundary()  # every rank (e.g. a checkpoint for a stop signal at any round)
    tr.before_save()      # every rank: what the file needs beyond the model (the lean exchange's momentum)
    ranks = gather_rank_states(tr, dict(tr.model.named_buffers()))
    if tr.dist.is_root:
        p = tr.ctx.paths.ckpt(tr.ckpt_stage, tr.step)
        callbacks.fire("checkpoint", tr, p)
        write_run_file(p, runfile(tr, stage=tr.stage, complete=False, ranks=ranks))
        tr.ctx.paths.set_latest(tr.ckpt_stage, p, tr.cfg.output.keep_checkpoints)
    tr.dist.comm.Barrier()


def save_final(tr) -> None:
    """The stage's file, with the assembled model (which the trainer keeps afterwards)."""
    tr.before_boundary()  # every rank; nothing when the last boundary already made the model whole
    tr.before_save()
    with tr.assembled() as raw:
        ranks = gather_rank_states(tr, raw)
        if tr.dist.is_root:
            write_run_file(tr.final_path, runfile(tr, stage=tr.stage, complete=True, ranks=ranks))
            log(f"{tr.ckpt_stage}: wrote {tr.final_path}", rank=0)
        raw.clear()  # keep the assembled buffers: the file holds them
    tr.dist.comm.Barrier()


def save_weight_snapshot(tr, labels: list[str]) -> None:
    """Full weights at this round boundary, requested as ``labels``: the file is named by the
    step actually taken; every label maps to it in the stage's file."""
    with tr.assembled():
        if tr.dist.is_root:
            p = tr.ctx.paths.weights_snapshot(tr.step)
            rf = runfile(tr, stage=f"{tr.stage}-snapshot", complete=True, light=True)
            rf.progress["requested"] = ",".join(labels)
            write_run_file(p, rf)
            for lab in labels:
                tr.hist.weight_snapshots[lab] = str(p.relative_to(tr.ctx.paths.root))
            if any(Step.parse(lab).iterations(tr.bpe) != tr.step for lab in labels):
                log(f"{tr.ckpt_stage}: weight snapshot for {', '.join(labels)} taken at step {tr.step} "
                    f"(the first round boundary at or after it): {p.name}", rank=0)


def _find_checkpoint(tr) -> tuple[Path, RunFile] | None:
    """The newest readable checkpoint of the stage: LATEST, or, when that file is truncated or
    corrupt, the newest older one (with one warning line naming both)."""
    paths = tr.ctx.paths
    latest = paths.latest(tr.ckpt_stage)
    if latest is None:
        return None
    try:
        return latest, read_run_file(latest)
    except CheckpointError as e:
        for older in reversed(paths.checkpoints(tr.ckpt_stage)):
            if older.name >= latest.name:
                continue
            try:
                rf = read_run_file(older)
            except CheckpointError:
                continue
            log(f"warning: {latest} cannot be read ({str(e).split(': ', 1)[-1]}); resuming from the previous "
                f"checkpoint {older.name}", rank=0)
            return older, rf
        raise


def _resume_verdict(tr) -> tuple[str | None, str | None]:
    """Rank 0: (checkpoint to resume or None, error line or None)."""
    try:
        found = _find_checkpoint(tr)
    except CheckpointError as e:
        return None, str(e)
    if found is None:
        return None, None
    path, rf = found
    diff = differences(rf.identity, tr.identity)
    mode = tr.cfg.output.on_mismatch
    if diff and mode == "refuse":
        return None, (f"{path} was written by another run ({'; '.join(diff)}): resuming it would mix the two; "
                      f"delete {path.parent} to start this stage over, or set output.on_mismatch=restart")
    if diff and mode == "restart":
        log(f"{tr.ckpt_stage}: {path} was written by another run ({'; '.join(diff)}): starting this stage over "
            f"(output.on_mismatch=restart)", rank=0)
        return None, None
    if diff:
        log(f"warning: {tr.ckpt_stage}: resuming {path} although it was written by another run ({'; '.join(diff)}) "
            f"(output.on_mismatch=keep)", rank=0)
    if rf.world_size != tr.dist.size:
        return None, (f"{path}: written by {rf.world_size} ranks, this job has {tr.dist.size}: resume with the same "
                      f"number of ranks (or start a new output.dir)")
    return str(path), None


def try_resume(tr) -> bool:
    """Continue from the stage's newest usable checkpoint; every rank loads the same file and
    restores its own state from it. False when the stage starts from scratch."""
    if not tr.cfg.output.resume:
        return False
    verdict = _resume_verdict(tr) if tr.dist.is_root else None
    name, err = tr.dist.comm.bcast(verdict, root=0)  # control message: every rank learns rank 0's decision
    if err:
        raise CheckpointError(err, agreed=True)
    if name is None:
        return False
    rf = read_run_file(name)
    check_model_state(name, rf.model, tr.model, tr.cfg.model.arch, rf.arch)
    mine = rf.ranks[tr.dist.rank]
    with torch.no_grad():
        for n, t in tr.model.state_dict().items():
            t.copy_(rf.model[n].to(t.device))
        bufs = dict(tr.model.named_buffers())
        for n, b in mine["buffers"].items():  # this rank's buffers as training left them
            bufs[n].copy_(b.to(bufs[n].device))
    tr.load_momentum({n: t.to(tr.dist.device) for n, t in rf.momentum.items()})
    p = rf.progress
    tr.step, tr.round, tr.wall = int(p["step"]), int(p["round"]), float(p["wall_time"])
    tr.ledger.load(mine)
    tr.run_stats.copy_(torch.as_tensor(mine["run_stats"], dtype=torch.float64))
    if rf.init and tr.dist.is_root:  # only the writer keeps theta_0
        tr.init = rf.init
    set_rng_state(mine)
    h = tr.hist
    h.metrics, h.comm = rf.metrics, (rf.comm if tr.dist.is_root else [])
    h.snap_index = list(rf.snap_index)
    h.snap_scores = {g: {k: list(v) for k, v in per.items()} for g, per in rf.snap_scores.items()}
    h.weight_snapshots = dict(rf.weight_snapshots)
    log(f"{tr.ckpt_stage}: resumed from {name} at step {tr.step}/{tr.total} (round {tr.round})", rank=tr.dist.rank)
    return True
