"""Same config, seed and ranks: the same files (everything but wall-clock times), for a whole
chain on 2 ranks; train.deterministic=true (torch's deterministic algorithms, needed for
bit-identical reruns on CUDA) changes nothing on CPU."""
from __future__ import annotations

from loft_hpc.checkpoint.h5file import read_run_file
from loft_hpc.checkpoint.identity import differences
from loft_hpc.testing.compare import run_differences
from tests.mpi_util import TINY, ok, run_job

CHAIN = TINY + ["train.duration=12it", "train.local_steps=4", "train.eval_every=8it", "output.checkpoint_every=8it",
                "output.snapshot_weights=[4it]", "prune.rewind=4it", "prune.ratios=[0.5]", "retrain.duration=6it",
                "data.augment=true"]


def h5_files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.h5"))


def test_two_runs_write_the_same_files(tmp_path):
    runs = []
    for name, extra in (("a", []), ("b", []), ("c", ["train.deterministic=true"])):
        out = tmp_path / name
        ok(run_job(2, ["--stage", "all", *CHAIN, *extra, f"output.dir={out}"]))
        runs.append(out)
    a = runs[0]
    names = h5_files(a)
    assert {"pretrain.h5", "tickets_p50.h5", "retrain_p50.h5", "snapshots/weights@4it.h5"} <= set(names)
    assert any(n.startswith("ckpt/") for n in names)
    for other in runs[1:]:
        assert h5_files(other) == names
        for n in names:
            fa, fo = read_run_file(a / n), read_run_file(other / n)
            diff = run_differences(fa, fo)
            if other.name == "c":
                # the flag is in the identity of every file (it changes CUDA numerics), and so in
                # the digests of the inputs downstream: nothing else may differ
                diff = [d for d in diff if d != "identity differs"]
                for d in differences(fa.identity, fo.identity):
                    assert d == "train.deterministic False -> True" or d.startswith("input "), (n, d)
            assert not diff, f"{other.name}/{n}: {diff[:5]}"
        assert (a / "summary.txt").read_text() == (other / "summary.txt").read_text()
