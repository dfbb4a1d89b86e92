"""Evaluation of the full model on a data set split across ranks, sums allreduced: the test set,
and a fixed sample of the training set (the assembled model's training loss)."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from loft_hpc.exchange.collectives import Collectives
from loft_hpc.utils.seeding import generator


def train_eval_subset(train_set, samples: int, seed: int):
    """``samples`` training images drawn once from (seed, 'train-eval'), without augmentation: the
    fixed sample on which the assembled model's training loss is measured at every evaluation
    (None when ``samples`` is 0)."""
    if samples <= 0:
        return None
    data = copy.copy(train_set)
    if hasattr(data, "augment"):
        data.augment = False
    idx = torch.randperm(len(data), generator=generator(seed, "train-eval"))[:samples]
    return Subset(data, torch.sort(idx).values.tolist())


@torch.no_grad()
def evaluate(model, dataset, *, rank: int, world: int, batch_size: int, device, coll: Collectives,
             num_workers: int = 0) -> dict:
    """Loss and accuracy (``{"loss", "acc"}``) over the whole data set; every sample is counted exactly once
    (contiguous shards, no padding), so the result does not depend on the number of ranks
    beyond float summation order."""
    n = len(dataset)
    lo, hi = rank * n // world, (rank + 1) * n // world
    loader = DataLoader(Subset(dataset, range(lo, hi)), batch_size=batch_size, shuffle=False,
                        generator=torch.Generator().manual_seed(0),  # never draws from the global RNG
                        num_workers=num_workers)
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64)
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        out = model(x)
        sums[0] += F.cross_entropy(out, y, reduction="sum").item()
        sums[1] += (out.argmax(1) == y).sum().item()
        sums[2] += y.numel()
    model.train(was_training)
    # control message, not model exchange: not counted in the communication log
    sums = coll.allreduce_sum(sums, name="eval.sums", count=False)  # collective order: every rank evaluates
    loss, correct, count = sums.tolist()
    if int(count) != n:
        raise RuntimeError(f"evaluation counted {int(count)} samples, the data set has {n}")
    return {"loss": loss / count, "acc": correct / count}
