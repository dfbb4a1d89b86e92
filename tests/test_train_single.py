"""Single-process training on the embedded digits: dense pretraining reaches a real accuracy, the
mini-batch stream is an exact function of the step (resume), and evaluation counts every test
sample once."""
from __future__ import annotations

import copy
import time

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from loft_hpc.checkpoint.h5file import read_run_file
from loft_hpc.config.schema import DataConfig
from loft_hpc.data import build_datasets
from loft_hpc.exchange.collectives import Collectives
from loft_hpc.train.evaluate import evaluate
from loft_hpc.train.stream import BatchStream
from loft_hpc.utils.seeding import derive_seed
from tests.mpi_util import ok, run_job

torch.set_num_threads(1)

DIGITS_TRAIN, DIGITS_TEST = 1348, 449  # the fixed stratified split of the 1,797 images (test_fraction 0.25)


@pytest.fixture(scope="module")
def digits():
    return build_datasets(DataConfig(name="digits", image_size=8, augment=True))


# --- dense pretraining on digits -----------------------------------------------------------------

def test_dense_digits_accuracy(tmp_path):
    """default.yaml (reduced PreResNet-18 on 16x16 digits) with dense data-parallel training on one
    process for 5 epochs (105 steps of 64): measured 0.9978 test accuracy, about 20 s of training on
    2 cores (4 epochs: 0.9955; 6 epochs: 0.9978)."""
    out = tmp_path / "dense"
    started = time.monotonic()
    p = ok(run_job(0, ["--stage", "pretrain", "train.method=dense", "train.duration=5ep", "train.eval_every=5ep",
                       "output.checkpoint_every=5ep", "train.progress=false", f"output.dir={out}"], timeout=300))
    job_seconds = time.monotonic() - started
    assert "Traceback" not in p.stderr
    rf = read_run_file(out / "pretrain.h5")
    assert rf.stage == "pretrain" and rf.world_size == 1
    last = rf.metrics[-1]
    bpe = DIGITS_TRAIN // 64
    assert last["step"] == 5 * bpe
    assert last["epoch"] == pytest.approx(5.0)
    acc, wall = last["test_acc"], last["wall_time"]
    print(f"\ndense digits: test_acc {acc:.4f} after {last['step']} steps, training wall time {wall:.1f}s")
    assert acc >= 0.95, last
    assert last["bytes_sent"] == 0 and last["bytes_received"] == 0  # one process: nothing exchanged
    # the recorded training time is a real duration in seconds of this job: it grew while the job
    # ran and cannot exceed the job's lifetime (a time stamp, milliseconds or a sum counted
    # twice would not fit); the file's progress carries the same clock
    assert 0 < wall <= job_seconds, (wall, job_seconds)
    assert rf.progress["wall_time"] >= wall


# --- BatchStream -----------------------------------------------------------------------------------

def _same(a, b) -> bool:
    return torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_stream_batches_per_epoch(digits):
    n = len(digits.train)
    assert n == DIGITS_TRAIN and len(digits.test) == DIGITS_TEST
    for bs in (1, 64, 100, n):
        s = BatchStream(digits.train, bs, seed=0, rank=0, world=1, shard=False)
        assert s.batches_per_epoch == n // bs and s.samples_per_rank == n
    s = BatchStream(digits.train, 64, seed=0, rank=1, world=4, shard=False)
    assert s.batches_per_epoch == n // 64  # without shard every rank iterates the whole set
    s = BatchStream(digits.train, 64, seed=0, rank=1, world=4, shard=True)
    assert s.samples_per_rank == n // 4 and s.batches_per_epoch == (n // 4) // 64
    with pytest.raises(ValueError, match="batch_size"):
        BatchStream(digits.train, n + 1, seed=0, rank=0, world=1, shard=False)
    with pytest.raises(ValueError, match="batch_size"):
        BatchStream(digits.train, n // 2 + 1, seed=0, rank=0, world=2, shard=True)


def test_stream_resume_is_exact(digits):
    """The batch of step t is the same whether reached from step 0 or opened directly at t
    (mid-epoch, at an epoch boundary, in a later epoch), augmentation included."""
    bs = 64
    a = BatchStream(digits.train, bs, seed=5, rank=1, world=2, shard=False)
    bpe = a.batches_per_epoch
    total = 2 * bpe + 4
    seq = [a.batch(t) for t in range(total)]
    for x, y in seq:
        assert x.shape == (bs, 1, 8, 8) and y.shape == (bs,)
    for t in (0, 3, bpe - 1, bpe, bpe + 7, 2 * bpe + 1):
        b = BatchStream(digits.train, bs, seed=5, rank=1, world=2, shard=False)
        assert _same(b.batch(t), seq[t]), t
        # ... and streams on from there
        for u in range(t + 1, min(t + 4, total)):
            assert _same(b.batch(u), seq[u]), (t, u)
    # jumping backwards and repeating a step reproduce the batch as well
    b = BatchStream(digits.train, bs, seed=5, rank=1, world=2, shard=False)
    for t in (bpe + 2, 4, 4, 2 * bpe, 1):
        assert _same(b.batch(t), seq[t]), t
    # augmentation is on and seeded per epoch: the stream's copy of the data set has the augment
    # seed of the epoch it is in, and a sample looks different in two epochs
    ref = copy.copy(digits.train)
    views = []
    for epoch in (0, 1):
        ref.set_augment_seed(derive_seed(5, "augment", 1, epoch))
        views.append(torch.stack([ref[i][0] for i in range(16)]))
    assert not torch.equal(views[0], views[1])


def test_stream_batches_are_the_orders_samples(digits):
    bs = 32
    s = BatchStream(digits.train, bs, seed=2, rank=0, world=3, shard=True)
    ref = copy.copy(digits.train)
    for epoch, b in ((0, 0), (0, 5), (1, 2)):
        idx = s.order(epoch)[b * bs:(b + 1) * bs].tolist()
        ref.set_augment_seed(derive_seed(2, "augment", 0, epoch))
        x = torch.stack([ref[i][0] for i in idx])
        y = torch.tensor([ref[i][1] for i in idx])
        assert _same(s.batch(epoch * s.batches_per_epoch + b), (x, y)), (epoch, b)


def test_stream_ranks_see_different_orders(digits):
    n = len(digits.train)
    streams = [BatchStream(digits.train, 64, seed=0, rank=r, world=4, shard=False) for r in range(4)]
    orders = [s.order(0) for s in streams]
    for r, o in enumerate(orders):
        assert len(set(o.tolist())) == len(o) == streams[r].batches_per_epoch * 64  # no repeats in an epoch
        assert all(0 <= i < n for i in o.tolist())
    for r in range(4):
        for q in range(r + 1, 4):
            assert not torch.equal(orders[r], orders[q]), (r, q)
    assert not _same(streams[0].batch(0), streams[1].batch(0))
    # a new epoch, a new order; the same (seed, rank) again, the same order; another seed, another
    assert not torch.equal(streams[0].order(0), streams[0].order(1))
    assert torch.equal(BatchStream(digits.train, 64, seed=0, rank=2, world=4, shard=False).order(3),
                       streams[2].order(3))
    assert not torch.equal(BatchStream(digits.train, 64, seed=1, rank=0, world=4, shard=False).order(0), orders[0])


@pytest.mark.parametrize("world", [2, 3, 4])
def test_stream_shard_is_disjoint(digits, world):
    n, bs = len(digits.train), 16
    for epoch in (0, 1):
        seen = []
        for r in range(world):
            s = BatchStream(digits.train, bs, seed=7, rank=r, world=world, shard=True)
            o = s.order(epoch).tolist()
            assert len(o) == s.batches_per_epoch * bs
            seen.append(set(o))
            assert len(seen[-1]) == len(o)
        for r in range(world):
            for q in range(r + 1, world):
                assert not seen[r] & seen[q], (epoch, r, q)
        union = set().union(*seen)
        assert len(union) == sum(len(x) for x in seen) and union <= set(range(n))
    # the shards are re-dealt every epoch
    s = BatchStream(digits.train, bs, seed=7, rank=0, world=world, shard=True)
    assert set(s.order(0).tolist()) != set(s.order(1).tolist())


def test_streams_sharing_a_dataset_do_not_interfere(digits):
    """Two streams on one dataset object, interleaved step by step, give the batches each gives alone
    (each stream sets its own augmentation seed on its own shallow copy)."""
    steps = range(0, 25)
    alone = {}
    for r in (0, 1):
        s = BatchStream(digits.train, 64, seed=3, rank=r, world=2, shard=False)
        alone[r] = [s.batch(t) for t in steps]
    s0 = BatchStream(digits.train, 64, seed=3, rank=0, world=2, shard=False)
    s1 = BatchStream(digits.train, 64, seed=3, rank=1, world=2, shard=False)
    for t in steps:
        assert _same(s0.batch(t), alone[0][t]) and _same(s1.batch(t), alone[1][t]), t


# --- evaluate --------------------------------------------------------------------------------------

def _model(in_features: int, classes: int = 10, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(in_features, 32), torch.nn.BatchNorm1d(32),
                               torch.nn.ReLU(), torch.nn.Linear(32, classes))


def test_evaluate_world1_matches_manual_loop(digits):
    test = digits.test
    model = _model(64)
    model.train()
    coll = Collectives(1)
    res = evaluate(model, test, rank=0, world=1, batch_size=100, device=torch.device("cpu"), coll=coll)
    assert model.training  # the mode is restored
    assert coll.counter.total_sent == 0 and coll.counter.total_received == 0  # control message, not counted
    model.eval()
    loss, correct = 0.0, 0
    with torch.no_grad():
        for i in range(len(test)):
            x, y = test[i]
            out = model(x.unsqueeze(0))
            loss += F.cross_entropy(out, torch.tensor([y]), reduction="sum").item()
            correct += int(out.argmax(1).item() == y)
    assert res["loss"] == pytest.approx(loss / len(test), rel=1e-5)
    assert res["acc"] == pytest.approx(correct / len(test), abs=1e-12)
    # the reference is not degenerate: some but not all samples right, so the equality above tells
    # a correct count from one that drops or repeats samples
    assert 0 < correct < len(test), correct
    # the batch size does not change the result (449 is divisible by neither)
    res2 = evaluate(model, test, rank=0, world=1, batch_size=64, device=torch.device("cpu"), coll=coll)
    assert res2["acc"] == res["acc"]
    assert res2["loss"] == pytest.approx(res["loss"], rel=1e-6)


class _Recorder(torch.nn.Module):
    """Predicts class (index mod 3) of items whose single feature is their index; records the
    indices it is shown."""

    def __init__(self):
        super().__init__()
        self.seen: list[int] = []

    def forward(self, x):
        idx = x[:, 0].long()
        self.seen.extend(idx.tolist())
        return F.one_hot(idx % 3, 3).float() * 5.0


class _SumStub:
    """Stands in for the allreduce of one simulated rank: keeps the rank's local sums."""

    def __init__(self, n: int):
        self.n, self.local = n, None

    def allreduce_sum(self, t, name, count=True):
        self.local = t.clone()
        out = t.clone()
        out[2] = self.n  # what the sum over all ranks will hold
        return out


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
def test_evaluate_counts_every_sample_once(world):
    n = 23
    labels = torch.tensor([i % 3 if i % 5 else (i + 1) % 3 for i in range(n)])
    ds = TensorDataset(torch.arange(n, dtype=torch.float32).unsqueeze(1), labels)
    seen, totals = [], torch.zeros(3, dtype=torch.float64)
    for r in range(world):
        m, stub = _Recorder(), _SumStub(n)
        evaluate(m, ds, rank=r, world=world, batch_size=4, device=torch.device("cpu"), coll=stub)
        seen.extend(m.seen)
        totals += stub.local
    assert sorted(seen) == list(range(n))  # each sample on exactly one rank
    ref = evaluate(_Recorder(), ds, rank=0, world=1, batch_size=4, device=torch.device("cpu"), coll=Collectives(1))
    assert totals[2] == n
    assert totals[1] / n == pytest.approx(ref["acc"])
    assert totals[0] / n == pytest.approx(ref["loss"])
    assert ref["acc"] == pytest.approx(sum(1 for i in range(n) if i % 5) / n)


def test_evaluate_detects_a_miscount():
    ds = TensorDataset(torch.arange(10, dtype=torch.float32).unsqueeze(1), torch.zeros(10, dtype=torch.long))
    # two ranks' shards but an identity "allreduce": only half the samples are counted
    with pytest.raises(RuntimeError, match="counted"):
        evaluate(_Recorder(), ds, rank=0, world=2, batch_size=4, device=torch.device("cpu"), coll=Collectives(1))
