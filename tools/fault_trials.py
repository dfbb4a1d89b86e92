"""Kill one rank of a real LoFT pretraining at a random moment, resume, and check nothing was lost.

    python tools/fault_trials.py --trials 20 [--np 4] [--seed 0] [--work DIR] [section.key=value ...]

The job is the embedded default pretraining (configs/default.yaml) shortened to
``train.duration=2ep`` with a checkpoint every 10 steps (so that kills land between, inside and
during checkpoints); extra ``section.key=value`` arguments override it. First one uninterrupted
run is the reference. Then every trial:

1. runs the same job with ``LOFT_FAULT_INJECT`` (:mod:`loft_hpc.testing.faults`): SIGKILL to one
   random rank at a random round, at a random moment: in the middle of the local steps, just
   before the shard exchange (the other ranks are inside it), or half-way through writing a
   checkpoint (rank 0, the writer);
2. checks that mpirun exits non-zero within 60 s of the kill;
3. checks that the latest checkpoint (if one was written before the kill) loads;
4. resumes with the plain command and checks that the final ``pretrain.h5`` equals the reference
   in everything but wall-clock times (:func:`loft_hpc.testing.compare.run_differences`).

Prints one line per trial, then trials run, survived and the slowest exit. Exit code 0 when all
survived, 1 otherwise.
"""
from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OVERRIDES = ["train.duration=2ep", "output.checkpoint_every=10it", "train.progress=false",
                     "output.snapshot_weights=[]"]
EXIT_LIMIT = 60.0


def run(np_: int, args: list[str], env: dict | None = None, module: str = "loft_hpc.run",
        timeout: float = 1800) -> tuple[int, str, str, float]:
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    e["PATH"] = f"{Path(sys.executable).parent}:{e.get('PATH', '')}"
    e.update(env or {})
    cmd = [str(REPO / "scripts" / "mpirun.sh"), "-np", str(np_), sys.executable, "-m", module, *args]
    p = subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    return p.returncode, p.stdout, p.stderr, time.time()


def plan_rounds(out: Path) -> tuple[int, int, list[int]]:
    """(rounds, K, completed-round counts at which a checkpoint is written) of the reference run."""
    from loft_hpc.checkpoint.h5file import read_run_file

    rf = read_run_file(out / "pretrain.h5")
    import yaml

    cfg = yaml.safe_load(rf.config_yaml)
    k = int(cfg["train"]["local_steps"])
    rounds = int(rf.progress["round"])
    bpe = int(rf.progress["batches_per_epoch"])
    every = cfg["output"]["checkpoint_every"]
    from loft_hpc.config.steps import Step

    interval = Step.parse(every).iterations(bpe)
    # trainer.round when the checkpoint after round r is written is r (rounds completed)
    return rounds, k, [r for r in range(1, rounds) if (r * k) // interval > ((r - 1) * k) // interval]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--np", type=int, default=4, help="ranks (default 4)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the trial draws (rank, round, moment)")
    ap.add_argument("--config", default=str(REPO / "configs" / "default.yaml"))
    ap.add_argument("--where", default="step,exchange,checkpoint",
                    help="moments to draw from (comma list of step, exchange, checkpoint; default all three)")
    ap.add_argument("--cycle", action="store_true", help="take the moments in turn instead of at random")
    ap.add_argument("--work", default=None, help="folder for the runs (default: a temporary folder, removed)")
    ap.add_argument("overrides", nargs="*", metavar="section.key=value")
    a = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from loft_hpc.checkpoint.h5file import CheckpointError, read_run_file
    from loft_hpc.checkpoint.paths import RunPaths
    from loft_hpc.testing.compare import run_differences

    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="fault-trials-"))
    work.mkdir(parents=True, exist_ok=True)
    base = ["--stage", "pretrain", "--config", a.config, *DEFAULT_OVERRIDES, *a.overrides]
    t0 = time.time()
    ref_dir = work / "reference"
    shutil.rmtree(ref_dir, ignore_errors=True)
    rc, out, err, _ = run(a.np, [*base, f"output.dir={ref_dir}"])
    if rc != 0:
        print(f"fault_trials: the uninterrupted reference run failed (exit {rc}):\n{err[-2000:]}", file=sys.stderr)
        return 2
    ref = read_run_file(ref_dir / "pretrain.h5")
    rounds, k, ck_rounds = plan_rounds(ref_dir)
    print(f"reference: {rounds} rounds of K={k} on {a.np} ranks, checkpoints before rounds {ck_rounds} "
          f"({time.time() - t0:.0f}s)", flush=True)
    rng = random.Random(a.seed)
    survived, slowest, rows = 0, 0.0, []
    for trial in range(1, a.trials + 1):
        moments = [w for w in a.where.split(",") if w != "checkpoint" or ck_rounds]
        where = moments[(trial - 1) % len(moments)] if a.cycle else rng.choice(moments)
        if where == "checkpoint":
            rank, rnd = 0, rng.choice(ck_rounds)
        else:
            rank, rnd = rng.randrange(a.np), rng.randrange(1, rounds)
        d = work / f"trial{trial:02d}"
        shutil.rmtree(d, ignore_errors=True)
        spec = f"{rank}:{rnd}:pretrain:kill:{where}"
        start = time.time()
        rc, out, err, end = run(a.np, [*base, f"output.dir={d}"], env={"LOFT_FAULT_INJECT": spec},
                                module="loft_hpc.testing.faults")
        m = re.search(r"fault: rank \d+ acts at ([0-9.]+)", out + err)
        kill_at = float(m.group(1)) if m else start
        exit_s = end - kill_at
        problems = []
        if rc == 0:
            problems.append("the job ended 0 although a rank was killed")
        if not m:
            problems.append("the fault never fired")
        if exit_s > EXIT_LIMIT:
            problems.append(f"mpirun took {exit_s:.0f}s to exit after the kill")
        paths = RunPaths(d)
        resumed_from = "-"
        try:
            latest = paths.latest("pretrain")
            if latest is not None:
                resumed_from = str(read_run_file(latest).progress["step"])
        except CheckpointError as e:
            problems.append(f"latest checkpoint does not load: {e}")
        rc2, out2, err2, _ = run(a.np, [*base, f"output.dir={d}"])
        if rc2 != 0:
            problems.append(f"resume failed (exit {rc2}): {err2.strip().splitlines()[-1:] }")
        else:
            diff = run_differences(ref, read_run_file(d / "pretrain.h5"))
            if diff:
                problems.append(f"resumed run differs: {diff[:3]}")
        slowest = max(slowest, exit_s)
        ok = not problems
        survived += ok
        rows.append((trial, rank, rnd, where, rc, exit_s, resumed_from, ok))
        print(f"trial {trial:2d}: kill rank {rank} in round {rnd:3d} at {where:<10} mpirun exit {rc:3d} after "
              f"{exit_s:5.1f}s, resumed from step {resumed_from:>4}: {'survived' if ok else 'FAILED: ' + '; '.join(problems)}",
              flush=True)
        if ok and not a.work:
            shutil.rmtree(d, ignore_errors=True)
    print(f"trials run {a.trials}, survived {survived}, slowest exit {slowest:.1f}s "
          f"(limit {EXIT_LIMIT:.0f}s), wall {time.time() - t0:.0f}s")
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if survived == a.trials else 1


if __name__ == "__main__":
    sys.exit(main())
