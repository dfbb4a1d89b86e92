"""tools/fault_trials.py on a tiny job: a rank SIGKILLed inside the exchange and half-way through
a checkpoint write; mpirun ends, the latest checkpoint loads, the resumed run equals the
uninterrupted one (the tool checks all three and says so per trial)."""
from __future__ import annotations

import re
import subprocess

from tests.mpi_util import PY, REPO, TINY, job_env


def test_two_fault_trials_survive(tmp_path):
    cmd = [PY, str(REPO / "tools" / "fault_trials.py"), "--trials", "2", "--np", "2", "--seed", "3",
           "--where", "exchange,checkpoint", "--cycle", "--work", str(tmp_path), *TINY,
           "train.duration=16it", "train.local_steps=4", "output.checkpoint_every=8it"]
    p = subprocess.run(cmd, env=job_env(None), capture_output=True, text=True, timeout=600, cwd=REPO)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("trial ")]
    assert len(lines) == 2 and all(ln.endswith("survived") for ln in lines), p.stdout
    assert " at exchange " in lines[0] and " at checkpoint " in lines[1]
    assert re.search(r"mpirun exit 137", lines[0]) and re.search(r"mpirun exit 137", lines[1])
    assert "kill rank 0" in lines[1]  # the checkpoint writer
    assert "trials run 2, survived 2" in p.stdout
    # killed half-way through the first checkpoint (step 8): nothing under a checkpoint's real
    # name, LATEST never moved; the resumed run started over and still equals the reference
    assert "resumed from step    -" in lines[1]
