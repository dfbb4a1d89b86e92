"""What every stage needs: the model built from the config, its groups, lr functions, and the
identity checks of the files it resumes or reuses."""
from __future__ import annotations

from pathlib import Path

import torch

from loft_hpc.checkpoint.h5file import CheckpointError, read_run_file
from loft_hpc.checkpoint.identity import differences, make_identity
from loft_hpc.utils.log import log

from loft_hpc.config import JobConfig
from loft_hpc.models import build_model
from loft_hpc.train.schedule import lr_at
from loft_hpc.utils.seeding import derive_seed


def make_model(cfg: JobConfig, bundle, device=None):
    """The model with theta_0 drawn from (seed, 'init'): identical on every rank, no broadcast needed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.train.seed, "init") % (2**63))
        model = build_model(cfg.model, num_classes=bundle.num_classes, in_channels=bundle.in_channels,
                            image_size=bundle.image_size, dataset=cfg.data.name)
    return model.to(device) if device is not None else model


def lr_function(sec, world: int = 1):
    """lr(step, total, batches_per_epoch) for a config section with lr/schedule/milestones/gamma
    (and lr_scaling: ``linear`` multiplies the base lr by the ranks, for the global batch)."""
    base = sec.lr * (world if getattr(sec, "lr_scaling", "none") == "linear" else 1)

    def fn(step: int, total: int, bpe: int) -> float:
        return lr_at(step, base=base, schedule=sec.schedule, milestones=sec.milestones, gamma=sec.gamma,
                     total=total, batches_per_epoch=bpe)
    return fn


def stage_identity(ctx, kind: str, inputs: list[Path] = ()) -> dict:
    """The identity of what this stage makes (rank 0 hashes the input files, every rank gets it)."""
    ident, err = None, None
    if ctx.dist.is_root:
        missing = [str(p) for p in inputs if not Path(p).is_file()]
        if missing:
            err = f"{missing[0]}: missing (run the stage that writes it first)"
        else:
            try:
                ident = make_identity(ctx.cfg, kind, list(inputs))
            except CheckpointError as e:  # rank 0 alone reads the inputs: it must reach the bcast
                err = str(e)
    ident, err = ctx.dist.comm.bcast((ident, err), root=0)  # control message: every rank at the same point
    if err:
        raise CheckpointError(err, agreed=True)
    return ident


def reuse_existing(ctx, path: Path, identity: dict, what: str) -> bool:
    """True when ``path`` exists and was made with this identity (the stage is skipped). A file
    made by another config or from other inputs is refused with one line (every rank), unless
    ``output.on_mismatch=keep``."""
    verdict = None
    if ctx.dist.is_root and path.is_file():
        try:
            diff = differences(read_run_file(path).identity, identity)
        except CheckpointError as e:
            diff = [str(e)]
        verdict = diff
    verdict = ctx.dist.comm.bcast(verdict, root=0)  # control message
    if verdict is None:
        return False
    if not verdict:
        log(f"{what}: {path} exists, skipping (delete it to run this stage again)", rank=ctx.dist.rank)
        return True
    if ctx.cfg.output.on_mismatch == "keep":
        log(f"warning: {what}: reusing {path} although it was made by another run ({'; '.join(verdict)}) "
            f"(output.on_mismatch=keep)", rank=ctx.dist.rank)
        return True
    raise CheckpointError(f"{path} was made by another run ({'; '.join(verdict)}): delete it to run {what} again "
                          f"with this config, use another output.dir, or set output.on_mismatch=keep to reuse it",
                          agreed=True)
