"""Per-rank streams of training mini-batches whose position is a pure function of the step.

Rank ``r`` at global step ``t`` is in epoch ``t // B`` at batch ``t % B`` (``B`` batches per
epoch, the same on every rank: ``drop_last``). Epoch ``e``'s order is a permutation drawn from
``(seed, 'order', r, e)`` (every rank iterates the whole set in its own order, as the paper's
code), or with ``shard`` a common permutation ``(seed, 'order', e)`` of which rank ``r`` takes
every S-th sample. Augmentation is seeded by ``(seed, 'augment', r, e)`` per sample. Resuming at
step ``t`` therefore replays exactly the batches an uninterrupted run would have seen.
"""
from __future__ import annotations

import copy

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from loft_hpc.utils.seeding import derive_seed, generator


def samples_per_rank(n_train: int, world: int, shard: bool) -> int:
    """Training samples one rank iterates per epoch: ``n_train // world`` with a shard per rank,
    else the whole set."""
    return n_train // world if shard else n_train


def batches_per_epoch(n_train: int, batch_size: int, world: int, shard: bool) -> int:
    """Batches per epoch of every rank (``drop_last``); validation turns epochs into steps with
    this same function."""
    return samples_per_rank(n_train, world, shard) // batch_size


class BatchStream:
    def __init__(self, dataset: Dataset, batch_size: int, *, seed: int, rank: int, world: int,
                 shard: bool, num_workers: int = 0, device: torch.device | None = None) -> None:
        # A shallow copy: the augmentation seed this stream sets is its own, even when several
        # streams read one data set in one process (the tensors themselves are shared).
        self.dataset, self.batch_size = copy.copy(dataset), batch_size
        self.seed, self.rank, self.world, self.shard = seed, rank, world, shard
        self.num_workers = num_workers
        self.device = device or torch.device("cpu")
        n = samples_per_rank(len(dataset), world, shard)
        self.samples_per_rank = n
        self.batches_per_epoch = batches_per_epoch(len(dataset), batch_size, world, shard)
        if self.batches_per_epoch < 1:
            raise ValueError(f"data.batch_size={batch_size} is larger than the {n} training samples per rank")
        self._epoch = None
        self._iter = None
        self._next_step = None

    def order(self, epoch: int) -> torch.Tensor:
        if self.shard:
            perm = torch.randperm(len(self.dataset), generator=generator(self.seed, "order", epoch))
            perm = perm[self.rank::self.world][: self.samples_per_rank]
        else:
            perm = torch.randperm(len(self.dataset), generator=generator(self.seed, "order", self.rank, epoch))
        return perm[: self.batches_per_epoch * self.batch_size]

    def _open(self, epoch: int, start_batch: int) -> None:
        if hasattr(self.dataset, "set_augment_seed"):
            self.dataset.set_augment_seed(derive_seed(self.seed, "augment", self.rank, epoch))
        idx = self.order(epoch)[start_batch * self.batch_size:].tolist()
        loader = DataLoader(Subset(self.dataset, idx), batch_size=self.batch_size, shuffle=False,
                            drop_last=True, num_workers=self.num_workers,
                            pin_memory=self.device.type == "cuda",
                            # its own generator: opening a loader never draws from the global RNG,
                            # which only the model (dropout) may use, so resume restores it exactly
                            generator=generator(self.seed, "loader", self.rank, epoch, start_batch))
        self._iter = iter(loader)
        self._epoch = epoch

    def batch(self, step: int):
        """The mini-batch of global step ``step`` (sequential calls are streamed efficiently)."""
        epoch, b = divmod(step, self.batches_per_epoch)
        if self._next_step != step or self._epoch != epoch:
            self._open(epoch, b)
        x, y = next(self._iter)
        self._next_step = step + 1
        if (step + 1) % self.batches_per_epoch == 0:
            self._next_step = None  # next epoch opens a new loader
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
