"""Evaluation of the full model: the test set split across ranks, sums allreduced."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from loft_hpc.exchange.collectives import Collectives


@torch.no_grad()
def evaluate(model, dataset, *, rank: int, world: int, batch_size: int, device, coll: Collectives,
             num_workers: int = 0) -> dict:
    """Loss and accuracy over the whole test set; every sample is counted exactly once
    (contiguous shards, no padding), so the result does not depend on the number of ranks
    beyond float summation order."""
    n = len(dataset)
    lo, hi = rank * n // world, (rank + 1) * n // world
    loader = DataLoader(Subset(dataset, range(lo, hi)), batch_size=batch_size, shuffle=False,
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
        raise RuntimeError(f"evaluation counted {int(count)} samples, the test set has {n}")
    return {"test_loss": loss / count, "test_acc": correct / count}
