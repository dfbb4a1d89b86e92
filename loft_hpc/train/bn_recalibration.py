"""Recompute BatchNorm running statistics of the assembled full model.

Under LoFT each rank's sub-network sums only its 1/S share of a partitioned block's inner
channels into the residual stream (activations are not rescaled, as in the paper), so the
running statistics that the sub-networks accumulate downstream do not describe the full model.
Before an evaluation or a checkpoint the statistics are recomputed with the full model in train
mode over ``batches`` training batches (cumulative average). All ranks use the same seeded
batches, so they end with identical statistics without communicating. Weights are untouched:
the training trajectory does not depend on this.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from loft_hpc.utils.seeding import derive_seed, generator


@torch.no_grad()
def recalibrate_bn(model: nn.Module, dataset, *, batches: int, batch_size: int, seed: int, tag, device) -> None:
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns or batches <= 0:
        return
    data = copy.copy(dataset)
    if hasattr(data, "set_augment_seed"):
        data.set_augment_seed(derive_seed(seed, "bn-recalibration", tag))
    n = min(len(data), batches * batch_size)
    idx = torch.randperm(len(data), generator=generator(seed, "bn-recalibration", tag))[:n].tolist()
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches
    was_training = model.training
    model.train()
    for x, _ in DataLoader(Subset(data, idx), batch_size=batch_size, shuffle=False,
                           generator=generator(seed, "bn-recalibration-loader", tag)):  # not the global RNG
        model(x.to(device))
    model.train(was_training)
    for m, (mom, nbt) in zip(bns, saved):
        m.momentum = mom
        m.num_batches_tracked.copy_(nbt)
