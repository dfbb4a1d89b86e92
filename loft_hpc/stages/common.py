"""What every stage needs: the model built from the config, its groups, lr functions."""
from __future__ import annotations

import torch

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


def lr_function(sec):
    """lr(step, total, batches_per_epoch) for a config section with lr/schedule/milestones/gamma."""
    def fn(step: int, total: int, bpe: int) -> float:
        return lr_at(step, base=sec.lr, schedule=sec.schedule, milestones=sec.milestones, gamma=sec.gamma,
                     total=total, batches_per_epoch=bpe)
    return fn
