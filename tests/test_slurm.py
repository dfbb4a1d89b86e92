"""The SLURM side of loft_hpc: job templates under slurm/, tested on a real single-machine SLURM.

* Without a cluster: every slurm/*.sh parses (bash -n), the launch wrapper composes the right
  mpirun/srun lines, and the signal wrapper forwards USR1/TERM and passes exit code 3 through.
* With the ``slurm_cluster`` fixture (real slurmctld + slurmd + munge): afterok chains run in
  order, a failed job cancels its dependents (--kill-on-invalid-dep=yes), exit code 3 requeues the
  job through slurm/common.sh, a USR1 to the batch shell reaches every MPI rank through mpirun, and
  the real templates (chain.sh, pretrain.sh, prune.sh, retrain.sh, the snapshot array) submit and
  run the stages in order, with a launcher stand-in that records what it was asked to run: no two
  jobs write the same file (the snapshot array beside the chain), IMP pruning gets the retrain
  job's shape, and every rank sees Horovod's stall check.
* The real pipeline (``python -m loft_hpc.run`` on the digits data set) through slurm/chain.sh,
  when the package provides it.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.datafiles import write_cifar, write_imagefolder
from tests.slurm_cluster import TERMINAL_STATES as TERMINAL
from tests.slurm_cluster import slurm_cluster  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[1]
SLURM = REPO / "slurm"
JOB_SCRIPTS = ["pretrain.sh", "prune.sh", "retrain.sh", "retrain_snapshots_array.sh",
               "imagenet_loft4.sh", "cifar10_loft2.sh", "cifar10_loft4.sh", "cifar100_loft4.sh"]
DATASET_SCRIPTS = {  # script -> (config, nodes x ranks per node)
    "imagenet_loft4.sh": ("configs/imagenet_preresnet18_loft4.yaml", 4),
    "cifar10_loft2.sh": ("configs/cifar10_preresnet34_loft2.yaml", 2),
    "cifar10_loft4.sh": ("configs/cifar10_preresnet34_loft4.yaml", 4),
    "cifar100_loft4.sh": ("configs/cifar100_preresnet34_loft4.yaml", 4),
}


@pytest.fixture(autouse=True)
def _no_loft_env(monkeypatch):
    """LOFT_* variables of the caller's shell must not leak into the jobs under test."""
    for k in list(os.environ):
        if k.startswith("LOFT_"):
            monkeypatch.delenv(k)


def _venv_env() -> dict:
    """How the jobs find python: the venv running these tests (activated by common.sh)."""
    if (Path(sys.prefix) / "bin" / "activate").exists():
        return {"LOFT_VENV": sys.prefix}
    return {"LOFT_PYTHON": sys.executable}


def _script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)
    return path


def _headers(path: Path) -> dict:
    """#SBATCH options of a job script as {option: value}."""
    out = {}
    for line in path.read_text().splitlines():
        m = re.match(r"#SBATCH\s+(--[\w-]+)(?:=(\S+))?", line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def _bash(code: str, env: dict | None = None, cwd=None, timeout: float = 30) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LOFT_"))}
    full.update(env or {})
    return subprocess.run(["bash", "-c", code], env=full, cwd=cwd, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, timeout=timeout)


def _wait_for(pred, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


# ====================================================================== no cluster needed
def _fresh_copy(dst: Path) -> Path:
    """The repository as a fresh clone of this working tree has it: tracked and new (not ignored)
    files, symbolic links kept, no venv, no build outputs."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           stdout=subprocess.PIPE, check=True).stdout.decode().split("\0")
    for name in filter(None, names):
        src, out = REPO / name, dst / name
        if not (src.is_symlink() or src.is_file()):
            continue  # deleted in the working tree
        out.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            os.symlink(os.readlink(src), out)
        else:
            shutil.copy2(src, out)
    return dst


def test_setup_installs_the_package_for_jobs_from_any_folder(tmp_path):
    """scripts/setup_env.sh, run in a fresh copy of the repository (as `make` does, from its
    folder), installs the package: from another folder `loft-run --help` works and loft_hpc
    imports from the copy with its default config; a second run installs nothing.  (The check
    used to import loft_hpc from the repository folder, which always succeeds, so the install
    never happened and jobs submitted from elsewhere failed with No module named 'loft_hpc'.)
    A wheel of the copy carries the configs: an installed package finds its default config.
    The venv borrows this one's packages (a .pth file) and Horovod build stamp: only the package
    itself is installed."""
    import sysconfig

    stamp = Path(sys.prefix) / ".loft-horovod.sha"
    if not stamp.is_file():
        pytest.skip(f"{sys.prefix} was not made by scripts/setup_env.sh (no {stamp.name}): a venv on top of it "
                    "would rebuild Horovod")
    clone = _fresh_copy(tmp_path / "clone")
    venv = tmp_path / "venv"
    subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(venv)], check=True)
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               stdout=subprocess.PIPE, text=True, check=True).stdout.strip())
    (site / "zz_loft_base.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    shutil.copy2(stamp, venv / stamp.name)
    # The pinned packages are there too (step 2 of the set-up would only confirm it, slowly): its
    # stamp, computed as the script does (if that ever differs, the script just checks them).
    pins = (clone / "constraints.txt").read_text().splitlines(keepends=True)
    cfile = "".join(ln for ln in pins if not re.match(r"(torch|torchvision|horovod)==", ln)) + "".join(
        ln for name in ("torch", "torchvision") for ln in pins if ln.startswith(f"{name}=="))
    (venv / ".loft-deps.sha").write_text(hashlib.sha256(
        (cfile + (clone / "setup.cfg").read_text()).encode()).hexdigest() + "\n")
    env = {"LOFT_SKIP_APT": "1", "LOFT_VENV": str(venv)}
    first = _bash("bash scripts/setup_env.sh", env, cwd=clone, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "installing loft_hpc (editable)" in first.stderr, first.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    res = _bash(f"{venv}/bin/loft-run --help", cwd=elsewhere)
    assert res.returncode == 0 and "usage:" in res.stdout and "train.workers" in res.stdout, res.stderr
    res = _bash(f"{venv}/bin/python -c 'import loft_hpc.run as r; print(r.__file__); print(r.default_config_path())'",
                cwd=elsewhere)
    assert res.stdout.split() == [str(clone / "loft_hpc" / "run.py"), str(clone / "configs" / "default.yaml")], res
    again = _bash("bash scripts/setup_env.sh", env, cwd=clone, timeout=600)
    assert again.returncode == 0 and "installing loft_hpc" not in again.stderr, again.stderr[-3000:]
    # not editable: the wheel carries loft_hpc/configs/*.yaml
    target = tmp_path / "site"
    res = _bash(f"{venv}/bin/python -m pip install -q --no-deps --no-build-isolation --target {target} {clone}",
                cwd=elsewhere, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    res = _bash(f"{venv}/bin/python -c 'from loft_hpc.run import default_config_path as d; "
                f"from loft_hpc.config.load import load_config; print(d()); load_config(d(), [])'",
                {"PYTHONPATH": str(target)}, cwd=elsewhere)
    assert res.returncode == 0 and res.stdout.strip() == str(target / "loft_hpc" / "configs" / "default.yaml"), res


def test_expected_scripts_exist():
    for name in JOB_SCRIPTS + ["common.sh", "chain.sh", "README.md"]:
        assert (SLURM / name).is_file(), f"slurm/{name} is missing"


@pytest.mark.parametrize("script", sorted(p.name for p in SLURM.glob("*.sh")))
def test_bash_syntax(script):
    res = subprocess.run(["bash", "-n", str(SLURM / script)], stderr=subprocess.PIPE, text=True)
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("script", JOB_SCRIPTS)
def test_job_headers_checkpoint_and_requeue(script):
    h = _headers(SLURM / script)
    assert "--requeue" in h, "a job that exits 3 must be requeueable"
    assert re.fullmatch(r"B:USR1@\d+", h.get("--signal") or ""), "the batch shell must get USR1"
    assert h.get("--open-mode") == "append", "a requeued run must not truncate the log"
    assert h.get("--output"), "name the log file"
    assert h.get("--time"), "a time limit is what makes the signal useful"


@pytest.mark.parametrize("script", sorted(DATASET_SCRIPTS))
def test_dataset_scripts_one_rank_per_gpu(script):
    config, ranks = DATASET_SCRIPTS[script]
    text = (SLURM / script).read_text()
    h = _headers(SLURM / script)
    nodes, per_node = int(h["--nodes"]), int(h["--ntasks-per-node"])
    assert nodes * per_node == ranks
    gpus = h.get("--gres") or h.get("--gpus-per-node") or ""
    assert gpus.split(":")[-1] == str(per_node) or h.get("--gpus-per-task") == "1", \
        "one rank per GPU"
    assert int(h["--cpus-per-task"]) >= 1
    assert config in text
    assert "loft_pretrain_job" in text


@pytest.mark.parametrize("script", sorted(DATASET_SCRIPTS))
def test_dataset_script_runs_its_config_outside_slurm(script, tmp_path):
    """`bash slurm/<script>` (no SLURM): finds common.sh next to itself, runs the pretraining
    stage of its own config through the launcher, submits nothing."""
    config, ranks = DATASET_SCRIPTS[script]
    launcher = _script(tmp_path / "launcher.sh", 'echo "$*" >> "$DIR/calls"\n')
    res = _bash(f"bash {SLURM / script}", dict(_venv_env(), DIR=str(tmp_path),
                LOFT_LAUNCHER=str(launcher), LOFT_NP=str(ranks), LOFT_DATA="data"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    (call,) = (tmp_path / "calls").read_text().splitlines()
    assert call.startswith(f"-np {ranks} ")
    assert f"--config {REPO / config} --stage pretrain" in call
    assert f"output.dir={tmp_path}/runs/{Path(config).stem}" in call
    assert f"data.root={tmp_path}/data" in call


@pytest.mark.parametrize("script", JOB_SCRIPTS)
def test_job_log_names_have_one_prefix(script):
    """The log of job NAME with id N is NAME-N.out (NAME already starts with loft-), never
    loft-loft-...; it lands where the job was submitted from (no folder that may not exist)."""
    h = _headers(SLURM / script)
    assert h["--job-name"].startswith("loft-")
    assert re.fullmatch(r"%x-%(j|A_%a)\.out", h["--output"]), h["--output"]


def test_snapshot_array_header():
    h = _headers(SLURM / "retrain_snapshots_array.sh")
    assert re.fullmatch(r"0-\d+", h["--array"])
    assert "%a" in h["--output"]


def _compose(code: str, env: dict, cwd=None) -> list:
    res = _bash(f"source {SLURM}/common.sh; {code}", env, cwd=cwd)
    assert res.returncode == 0, res.stderr
    return res.stdout.split()


def test_launcher_lines():
    mpirun = _compose('loft_launcher_cmd 4; printf "%s\\n" "${LOFT_LAUNCH_CMD[@]}"',
                      {"LOFT_OVERSUBSCRIBE": "1", "OMP_NUM_THREADS": "1"})
    # --quiet: no "Primary job terminated normally, but 1 process returned a non-zero exit code"
    # banner when the ranks exit 3 for a requeue
    assert mpirun[:4] == ["mpirun", "--quiet", "-np", "4"]
    assert "--oversubscribe" in mpirun
    assert ("--allow-run-as-root" in mpirun) == (os.geteuid() == 0)
    assert "OMP_NUM_THREADS" in mpirun
    for v in ("HOROVOD_STALL_CHECK_TIME_SECONDS", "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS"):
        assert mpirun[mpirun.index(v) - 1] == "-x", "mpirun must hand the stall check to every rank"
    plain = _compose('loft_launcher_cmd 2; printf "%s\\n" "${LOFT_LAUNCH_CMD[@]}"', {})
    assert "--oversubscribe" not in plain
    # more ranks (LOFT_NP) than the job's task slots: they share them
    assert "--oversubscribe" in _compose('loft_launcher_cmd 4; printf "%s\\n" "${LOFT_LAUNCH_CMD[@]}"',
                                         {"SLURM_NTASKS": "2"})
    assert "--oversubscribe" not in _compose('loft_launcher_cmd 2; printf "%s\\n" "${LOFT_LAUNCH_CMD[@]}"',
                                             {"SLURM_NTASKS": "2"})
    srun = _compose('loft_launcher_cmd 4; printf "%s\\n" "${LOFT_LAUNCH_CMD[@]}"',
                    {"LOFT_LAUNCHER": "srun", "SLURM_CPUS_PER_TASK": "8"})
    assert srun[0] == "srun" and "--mpi=pmix" in srun and "--ntasks=4" in srun
    assert "--cpus-per-task=8" in srun and "--allow-run-as-root" not in srun
    custom = _compose('loft_launcher_cmd 3; printf "%s\\n" "${LOFT_LAUNCH_CMD[@]}"',
                      {"LOFT_LAUNCHER": "horovodrun --verbose"})
    assert custom == ["horovodrun", "--verbose", "-np", "3"]


def test_stage_command_line(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("x: 1\n")
    (tmp_path / "prune.ratios=0").write_text("")  # a glob would expand prune.ratios=[0.5] to this
    argv = _compose('loft_resolve_paths; loft_stage_cmd prune,retrain prune.mask_from=5ep; '
                    'printf "%s\\n" "${LOFT_STAGE_CMD[@]}"',
                    {"LOFT_CONFIG": str(cfg), "LOFT_OUT": "rel/out", "LOFT_DATA": "/d",
                     "LOFT_OVERRIDES": "train.duration=30it prune.ratios=[0.5]",
                     "LOFT_PRUNE_OVERRIDES": "prune.x=1", "LOFT_PRETRAIN_OVERRIDES": "no.no=1",
                     "LOFT_PYTHON": "py"}, cwd=tmp_path)
    i = argv.index("--stage")
    assert argv[:i] == ["py", "-m", "loft_hpc.run", "--config", str(cfg)]
    assert argv[i + 1] == "prune,retrain"
    assert argv[i + 2:] == [f"output.dir={tmp_path}/rel/out", "data.root=/d",
                            "train.duration=30it", "prune.ratios=[0.5]", "prune.x=1",
                            "prune.mask_from=5ep"]
    res = _bash(f"source {SLURM}/common.sh; loft_resolve_paths", {"LOFT_CONFIG": "no/such.yaml"})
    assert res.returncode == 2 and "config file not found" in res.stderr


def _stall(env: dict) -> subprocess.CompletedProcess:
    return _bash(f"source {SLURM}/common.sh; loft_launcher_cmd 2 >/dev/null; "
                 'echo "$HOROVOD_STALL_CHECK_TIME_SECONDS $HOROVOD_STALL_SHUTDOWN_TIME_SECONDS"', env)


def test_stall_check_defaults_and_overrides(monkeypatch):
    """The launcher of every job exports Horovod's stall check: warn after 60 s, end the job after
    600 s; either can be set (a shorter shutdown pulls the default warning time down with it),
    0 only warns, anything but whole seconds is a configuration error."""
    for v in ("HOROVOD_STALL_CHECK_TIME_SECONDS", "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS"):
        monkeypatch.delenv(v, raising=False)
    S, C = "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS", "HOROVOD_STALL_CHECK_TIME_SECONDS"
    for env, want in [({}, "60 600"), ({S: "30"}, "30 30"), ({S: "0"}, "60 0"),
                      ({C: "90", S: "30"}, "90 30"), ({C: "5", S: "1800"}, "5 1800")]:
        res = _stall(env)
        assert (res.returncode, res.stdout.strip()) == (0, want), (env, res.stderr)
    res = _stall({S: "10m"})
    assert res.returncode == 2 and "expected whole seconds, got '10m'" in res.stderr


def test_prune_job_shape_one_shot_and_imp(tmp_path):
    """One-shot pruning is one task on one node; with prune.levels > 1 (read with the package's
    config loader from LOFT_CONFIG + overrides) the prune job gets the retrain job's shape:
    ranks, nodes, GPUs, partition, time (LOFT_RETRAIN_TIME, else retrain.sh's header) and signal."""
    retrain_time = _headers(SLURM / "retrain.sh")["--time"]
    job = {"LOFT_CONFIG": "configs/default.yaml", "LOFT_INHERIT_SHAPE": "1", "SLURM_NTASKS": "4",
           "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_GPUS_ON_NODE": "2",
           "LOFT_PRUNE_PARTITION": "cpu", "LOFT_RETRAIN_PARTITION": "gpu", "LOFT_PRUNE_TIME": "0:20:00",
           "LOFT_PYTHON": sys.executable}
    show = 'loft_resolve_paths; loft_prune_shape; printf "%s\\n" "${LOFT_SHAPE[@]}"'
    one = _compose(show, job)
    assert one == ["--nodes=1", "--ntasks=1", "--partition=cpu", "--time=0:20:00"]
    imp = _compose(show, dict(job, LOFT_PRUNE_OVERRIDES="prune.levels=2"))
    assert imp == ["--nodes=2", "--ntasks=4", "--ntasks-per-node=2", "--gres=gpu:2",
                   "--partition=gpu", f"--time={retrain_time}",
                   f"--signal={_headers(SLURM / 'retrain.sh')['--signal']}"]
    imp = _compose(show, dict(job, LOFT_OVERRIDES="prune.levels=3", LOFT_RETRAIN_TIME="3:00:00"))
    assert "--time=3:00:00" in imp and "--ntasks=4" in imp
    # without a python that loads the config: the prune.levels override, else the YAML text
    cfg = tmp_path / "c.yaml"
    cfg.write_text("prune:\n  ratios: [0.5]\n  levels: 2\ntrain:\n  levels: 1\n")
    imp = _compose(show, dict(job, LOFT_PYTHON="/bin/false", LOFT_CONFIG=str(cfg)))
    assert "--ntasks=4" in imp
    one = _compose(show, dict(job, LOFT_PYTHON="/bin/false", LOFT_CONFIG=str(cfg),
                              LOFT_OVERRIDES="prune.levels=1"))
    assert "--ntasks=1" in one


_SHOW_RETRAIN = 'loft_shape_args retrain; printf "%s\\n" "${LOFT_SHAPE[@]}"'


def test_follow_up_shape_is_the_first_jobs_allocation():
    """A pretraining job submitted with --nodes=1 --ntasks-per-node=2 and LOFT_NP=4 (4 ranks on 2
    cores) submits a retrain job with the same allocation, --nodes=1 --ntasks=2
    --ntasks-per-node=2, in which it again starts 4 ranks (never --ntasks=4 --ntasks-per-node=2
    on one node, which SLURM keeps PENDING forever); GPUs, CPUs, memory and --overcommit follow
    the first job; LOFT_NODES / LOFT_NTASKS_PER_NODE give nodes x tasks per node."""
    job = {"LOFT_INHERIT_SHAPE": "1", "SLURM_JOB_NUM_NODES": "1", "SLURM_NTASKS": "2",
           "SLURM_NTASKS_PER_NODE": "2", "SLURM_CPUS_PER_TASK": "1", "SLURM_MEM_PER_NODE": "4096",
           "LOFT_NP": "4"}
    assert _compose(_SHOW_RETRAIN, job) == ["--nodes=1", "--ntasks=2", "--ntasks-per-node=2",
                                            "--cpus-per-task=1", "--mem=4096M"]
    gpu = dict(job, SLURM_JOB_NUM_NODES="2", SLURM_NTASKS="4", SLURM_GPUS_ON_NODE="2", LOFT_NP="")
    assert _compose(_SHOW_RETRAIN, gpu)[:4] == ["--nodes=2", "--ntasks=4", "--ntasks-per-node=2", "--gres=gpu:2"]
    small = {"LOFT_INHERIT_SHAPE": "1", "SLURM_JOB_NUM_NODES": "1", "SLURM_NTASKS": "4",
             "SLURM_OVERCOMMIT": "1", "LOFT_NP": "4"}
    assert _compose(_SHOW_RETRAIN, small) == ["--nodes=1", "--ntasks=4", "--overcommit"]
    # chain.sh (nothing inherited): the variables; both nodes and tasks per node give the tasks
    assert _compose(_SHOW_RETRAIN, {"LOFT_NP": "4", "LOFT_NODES": "1", "LOFT_NTASKS_PER_NODE": "2"}) == \
        ["--nodes=1", "--ntasks=2", "--ntasks-per-node=2"]
    assert _compose(_SHOW_RETRAIN, {"LOFT_NP": "4"}) == ["--ntasks=4"]
    # LOFT_SBATCH_ARGS, then LOFT_RETRAIN_SBATCH_ARGS, come last (they win)
    assert _compose(_SHOW_RETRAIN, {"LOFT_NP": "2", "LOFT_SBATCH_ARGS": "--qos=a",
                                    "LOFT_RETRAIN_SBATCH_ARGS": "--qos=b"})[-2:] == ["--qos=a", "--qos=b"]


@pytest.mark.parametrize("snaps", ["1ep end", "1ep 2ep 1ep"])
def test_snapshot_array_refuses_end_and_repeated_steps(tmp_path, snaps):
    """A snapshot task writes only tickets@<step>_pNN.h5 / retrain@<step>_pNN.h5: "end" (the main
    chain's tickets_pNN.h5 / retrain_pNN.h5) and a repeated step are refused before anything runs,
    by the array task and by chain.sh (which then submits nothing)."""
    launcher = _script(tmp_path / "launcher.sh", 'echo "$*" >> "$DIR/calls"\n')
    env = dict(_venv_env(), DIR=str(tmp_path), LOFT_LAUNCHER=str(launcher), LOFT_SNAPSHOTS=snaps,
               LOFT_SNAPSHOT_INDEX="0", LOFT_OUT=str(tmp_path / "out"))
    res = _bash(f"bash {SLURM}/retrain_snapshots_array.sh", env, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert ("'end' is not a snapshot" if "end" in snaps else "listed twice") in res.stderr
    # chain.sh stops before sbatch: a stand-in sbatch first on PATH would record any submission
    _script(tmp_path / "sbatch", 'echo "$*" >> "$DIR/submitted"; echo 1\n')
    res = _bash(f"bash {SLURM}/chain.sh", dict(env, PATH=f"{tmp_path}:{os.environ['PATH']}"),
                cwd=tmp_path)
    assert res.returncode == 2 and res.stdout == "", res.stderr
    assert not (tmp_path / "calls").exists() and not (tmp_path / "submitted").exists()
    default = re.search(r"LOFT_SNAPSHOTS:-([^}]*)}", (SLURM / "retrain_snapshots_array.sh").read_text())
    assert "end" not in default.group(1).split()
    assert _headers(SLURM / "retrain_snapshots_array.sh")["--array"] == f"0-{len(default.group(1).split()) - 1}"


_TRAPPING_CHILD = r"""
trap 'echo "child got USR1" >> "$LOG"; exit 3' USR1
trap 'echo "child got TERM" >> "$LOG"; exit 9' TERM
touch "$LOG.ready"
for i in $(seq 300); do sleep 0.1; done
exit 1
"""


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_is_forwarded_as_usr1_and_exit_3_returned_outside_slurm(tmp_path, sig):
    """USR1 or TERM to the wrapper reaches the launcher as USR1 (mpirun passes USR1 on to the
    ranks but kills them on TERM); without SLURM_JOB_ID exit code 3 comes back unchanged."""
    log = tmp_path / "log"
    child = _script(tmp_path / "child.sh", _TRAPPING_CHILD)
    full = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LOFT_"))}
    full["LOG"] = str(log)
    proc = subprocess.Popen(["bash", "-c", f'source {SLURM}/common.sh; loft_run_requeueable {child}; '
                             'echo "wrapper returned $?" >> "$LOG"'],
                            env=full, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: Path(f"{log}.ready").exists(), 10, "the child to start")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert log.read_text().splitlines() == ["child got USR1", "wrapper returned 3"], err


# ====================================================================== mechanism, real SLURM
STEP = """#SBATCH --requeue
echo "$STEP start $(date +%s.%N) $SLURM_JOB_ID" >> "$LOG"
sleep "${NAP:-0}"
echo "$STEP end $(date +%s.%N)" >> "$LOG"
exit "${RC:-0}"
"""


def _step(tmp_path: Path, name: str, rc: int = 0, nap: float = 0) -> Path:
    body = STEP.replace("$STEP", name).replace("${RC:-0}", str(rc)).replace("${NAP:-0}", str(nap))
    return _script(tmp_path / f"{name}.sh", body)


def _log_lines(path: Path) -> list:
    return [ln.split() for ln in path.read_text().splitlines()] if path.exists() else []


def test_afterok_chain_runs_in_order(slurm_cluster, tmp_path):
    log = tmp_path / "log"
    env = {"LOG": str(log)}
    out = [f"--output={tmp_path}/%x-%j.out"]
    a = slurm_cluster.submit(_step(tmp_path, "a", nap=1.5), sbatch_args=out, env=env)
    b = slurm_cluster.submit(_step(tmp_path, "b"), env=env, sbatch_args=out + [
        f"--dependency=afterok:{a}", "--kill-on-invalid-dep=yes"])
    c = slurm_cluster.submit(_step(tmp_path, "c"), env=env, sbatch_args=out + [
        f"--dependency=afterok:{b}", "--kill-on-invalid-dep=yes"])
    assert slurm_cluster.job_state(b) == "PENDING"  # a sleeps 1.5 s
    res = slurm_cluster.wait_jobs([a, b, c], timeout=60)
    assert {j: r.state for j, r in res.items()} == {a: "COMPLETED", b: "COMPLETED", c: "COMPLETED"}
    lines = _log_lines(log)
    assert [(ln[0], ln[1]) for ln in lines] == [
        ("a", "start"), ("a", "end"), ("b", "start"), ("b", "end"), ("c", "start"), ("c", "end")]
    times = [float(ln[2]) for ln in lines]
    assert times == sorted(times)


def test_failed_job_cancels_its_dependents(slurm_cluster, tmp_path):
    log = tmp_path / "log"
    env = {"LOG": str(log)}
    out = [f"--output={tmp_path}/%x-%j.out"]
    a = slurm_cluster.submit(_step(tmp_path, "a", rc=1), sbatch_args=out, env=env)
    b = slurm_cluster.submit(_step(tmp_path, "b"), env=env, sbatch_args=out + [
        f"--dependency=afterok:{a}", "--kill-on-invalid-dep=yes"])
    c = slurm_cluster.submit(_step(tmp_path, "c"), env=env, sbatch_args=out + [
        f"--dependency=afterok:{b}", "--kill-on-invalid-dep=yes"])
    # Without --kill-on-invalid-dep the dependent would wait forever (PLATFORM.md).
    d = slurm_cluster.submit(_step(tmp_path, "d"), env=env, sbatch_args=out + [
        f"--dependency=afterok:{a}", "--kill-on-invalid-dep=no"])
    res = slurm_cluster.wait_jobs([a, b, c], timeout=60)
    assert (res[a].state, res[a].exit_code) == ("FAILED", 1)
    assert res[b].state == "CANCELLED" and res[c].state == "CANCELLED"
    assert [ln[0] for ln in _log_lines(log)] == ["a", "a"], "dependents of a failed job ran"
    assert not list(tmp_path.glob("b.sh-*.out")) and not list(tmp_path.glob("c.sh-*.out"))
    info = slurm_cluster.result(d)
    assert info.state == "PENDING" and info["reason"] == "DependencyNeverSatisfied"
    subprocess.run(["scancel", d], env=slurm_cluster.client_env(), check=True)


_EXIT_3_ONCE = r"""
n=$(( $(cat "$DIR/count" 2>/dev/null || echo 0) + 1 )); echo $n > "$DIR/count"
echo "call $n restart=${SLURM_RESTART_COUNT:-0} $*" >> "$DIR/calls"
[ "$n" = 1 ] && exit 3
exit 0
"""


def test_exit_3_requeues_the_job_through_common_sh(slurm_cluster, tmp_path):
    fake = _script(tmp_path / "launcher.sh", _EXIT_3_ONCE)
    job = _script(tmp_path / "job.sh", f"""#SBATCH --requeue
#SBATCH --open-mode=append
source {SLURM}/common.sh
loft_run_requeueable {fake} -np 2 stage
echo "job script went on with $?" >> "$DIR/calls"
""")
    jid = slurm_cluster.submit(job, env={"DIR": str(tmp_path)},
                               sbatch_args=[f"--output={tmp_path}/job.out"])
    res = slurm_cluster.wait_jobs([jid], timeout=60)[jid]
    assert (res.state, res.exit_code, res["restarts"]) == ("COMPLETED", 0, 1), \
        (tmp_path / "job.out").read_text()
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls == ["call 1 restart=0 -np 2 stage", "call 2 restart=1 -np 2 stage",
                     "job script went on with 0"]
    log = (tmp_path / "job.out").read_text().splitlines()
    # the run that requeued ends with one plain line (LOFT_OUT unset: no checkpoint to name)
    assert re.fullmatch(rf"\[loft [^]]+\] job {jid} run 1: stopped after a checkpoint \(exit code 3\); "
                        r"requeued, run 2 resumes from there", log[-1]), log


_FAKE_RANK = r"""
r=${OMPI_COMM_WORLD_RANK:-${SLURM_PROCID:-x}}
echo "rank $r restart=${SLURM_RESTART_COUNT:-0} OMP=$OMP_NUM_THREADS $*" >> "$DIR/ranks"
if [ "${SLURM_RESTART_COUNT:-0}" = 0 ]; then
  # like loft_hpc.run: on USR1 every rank checkpoints, then all exit 3 together
  trap 'echo "rank $r got USR1" >> "$DIR/signals"; sleep 0.5; exit 3' USR1
  touch "$DIR/ready.$r"
  for i in $(seq 600); do sleep 0.1; done
  exit 1
fi
exit 0
"""


def test_usr1_to_batch_shell_reaches_every_rank_and_requeues(slurm_cluster, tmp_path):
    """What --signal=B:USR1@300 does near the time limit: the batch shell gets USR1, common.sh
    hands it to the launcher (mpirun, and srun --mpi=pmix), which hands it to every rank; the
    ranks exit 3 and the job requeues itself.  Both launchers run at the same time."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("x: 1\n")
    jobs = {}
    for launcher in ("mpirun", "srun"):
        d = tmp_path / launcher
        d.mkdir()
        fake_python = _script(d / "python.sh", _FAKE_RANK)
        env = {"DIR": str(d), "LOFT_PYTHON": str(fake_python), "LOFT_CONFIG": str(cfg),
               "LOFT_OUT": str(d / "out"), "LOFT_SUBMIT_FOLLOWUPS": "0", "LOFT_NP": "2",
               "LOFT_LAUNCHER": launcher}
        jobs[launcher] = slurm_cluster.submit(
            SLURM / "pretrain.sh", env=env, cwd=d,
            sbatch_args=["--ntasks=2", f"--output={d}/pretrain.out"])
    for launcher, jid in jobs.items():
        d = tmp_path / launcher
        _wait_for(lambda: all((d / f"ready.{r}").exists() for r in (0, 1))
                  or slurm_cluster.job_state(jid) in ("FAILED", "COMPLETED"), 60,
                  f"both ranks under {launcher}")
        subprocess.run(["scancel", "--batch", "--signal=USR1", jid],
                       env=slurm_cluster.client_env(), check=True)
    done = slurm_cluster.wait_jobs(jobs.values(), timeout=60)
    for launcher, jid in jobs.items():
        d, res = tmp_path / launcher, done[jid]
        log = (d / "pretrain.out").read_text()
        assert (res.state, res.exit_code, res["restarts"]) == ("COMPLETED", 0, 1), log
        # (under mpirun a rank may get it twice: from mpirun and straight from common.sh)
        assert sorted(set((d / "signals").read_text().splitlines())) == [
            "rank 0 got USR1", "rank 1 got USR1"], log
        ranks = (d / "ranks").read_text().splitlines()
        assert len(ranks) == 4 and all("--stage pretrain" in ln and "OMP=1" in ln for ln in ranks)
        assert sorted(ln.split()[2] for ln in ranks) == ["restart=0"] * 2 + ["restart=1"] * 2
        assert "sending SIGUSR1 to the launcher" in log
        assert f"running: {launcher} " in log


_STALL_RANK = r"""
r=${OMPI_COMM_WORLD_RANK:-${SLURM_PROCID:-x}}
echo "rank $r ${HOROVOD_STALL_CHECK_TIME_SECONDS:-unset} ${HOROVOD_STALL_SHUTDOWN_TIME_SECONDS:-unset}" >> "$DIR/stall"
"""


def test_every_rank_of_a_slurm_job_sees_the_stall_check(slurm_cluster, tmp_path, monkeypatch):
    """Horovod's stall check reaches the ranks of a SLURM job through mpirun and srun: by default
    a collective stuck for 600 s ends the job (not the time limit, hours later); a value set at
    submission wins."""
    for v in ("HOROVOD_STALL_CHECK_TIME_SECONDS", "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS"):
        monkeypatch.delenv(v, raising=False)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("x: 1\n")
    jobs = {}
    for launcher, extra in (("mpirun", {}), ("srun", {"HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": "45"})):
        d = tmp_path / launcher
        d.mkdir()
        env = dict(extra, DIR=str(d), LOFT_PYTHON=str(_script(d / "python.sh", _STALL_RANK)),
                   LOFT_CONFIG=str(cfg), LOFT_SUBMIT_FOLLOWUPS="0", LOFT_NP="2", LOFT_LAUNCHER=launcher)
        jobs[launcher] = slurm_cluster.submit(SLURM / "pretrain.sh", env=env, cwd=d,
                                              sbatch_args=["--ntasks=2", f"--output={d}/job.out"])
    done = slurm_cluster.wait_jobs(jobs.values(), timeout=60)
    for launcher, want in (("mpirun", "60 600"), ("srun", "45 45")):
        d = tmp_path / launcher
        assert done[jobs[launcher]].state == "COMPLETED", (d / "job.out").read_text()
        assert sorted((d / "stall").read_text().splitlines()) == [f"rank 0 {want}", f"rank 1 {want}"]


_RECORDING_LAUNCHER = r"""
stage=$(printf '%s\n' "$@" | sed -n '/^--stage$/{n;p}')
n=$(( $(cat "$DIR/count.$stage" 2>/dev/null || echo 0) + 1 )); echo $n > "$DIR/count.$stage"
echo "$stage job=$SLURM_JOB_ID restart=${SLURM_RESTART_COUNT:-0} $*" >> "$DIR/calls"
[ "$stage" = pretrain ] && [ "$n" = 1 ] && [ -n "${EXIT3_ONCE:-}" ] && exit 3
exit 0
"""


def _calls(tmp_path: Path) -> list:
    return (tmp_path / "calls").read_text().splitlines()


def test_pretrain_job_submits_prune_and_retrain_once(slurm_cluster, tmp_path):
    """`sbatch slurm/pretrain.sh` is the whole chain: on its first run it submits prune and
    retrain (afterok), after a requeue it does not submit them again, and they run after it."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("x: 1\n")
    launcher = _script(tmp_path / "launcher.sh", _RECORDING_LAUNCHER)
    out = tmp_path / "out"
    env = dict(_venv_env(), DIR=str(tmp_path), LOFT_LAUNCHER=str(launcher), EXIT3_ONCE="1",
               LOFT_CONFIG=str(cfg), LOFT_OUT=str(out), LOFT_LOG_DIR=str(tmp_path / "logs"))
    pre = slurm_cluster.submit(SLURM / "pretrain.sh", env=env, cwd=tmp_path,
                               sbatch_args=["--ntasks=2", f"--output={tmp_path}/pretrain.out"])
    _wait_for(lambda: "retrain=" in (tmp_path / "pretrain.out").read_text()
              if (tmp_path / "pretrain.out").exists() else False, 30, "the follow-up jobs")
    log = (tmp_path / "pretrain.out").read_text()
    prune = re.search(r"^prune=(\d+)$", log, re.M).group(1)
    retrain = re.search(r"^retrain=(\d+)$", log, re.M).group(1)
    res = slurm_cluster.wait_jobs([pre, prune, retrain], timeout=90)
    log = (tmp_path / "pretrain.out").read_text()
    assert {j: r.state for j, r in res.items()} == dict.fromkeys([pre, prune, retrain], "COMPLETED"), log
    assert res[pre]["restarts"] == 1
    assert log.count("prune=") == 1, "follow-ups submitted again after the requeue"
    assert len((out / "slurm_jobs.txt").read_text().splitlines()) == 1
    calls = _calls(tmp_path)
    assert [c.split()[0] for c in calls] == ["pretrain", "pretrain", "prune", "retrain"]
    assert "restart=1" in calls[1]
    assert " -np 2 " in calls[0] and " -np 1 " in calls[2] and " -np 2 " in calls[3]
    for c in calls:
        assert f"--config {cfg}" in c and f"output.dir={out}" in c
    assert sorted(p.name.split("-")[1] for p in (tmp_path / "logs").glob("*.out")) == \
        ["prune", "retrain"]


def _files_written(call: str, out: Path) -> set:
    """The files and checkpoint folders of OUT that the recorded stage call writes, named by the
    package's own RunPaths (config.yaml, written by every job through a unique temporary name,
    is left out)."""
    from loft_hpc.checkpoint.paths import RunPaths
    paths, argv = RunPaths(out), call.split()
    stages = argv[0].split(",")
    mask = ([a.split("=", 1)[1] for a in argv if a.startswith("prune.mask_from=")] or ["end"])[-1]
    ratios = [float(r) for a in argv if a.startswith("prune.ratios=[")
              for r in a.split("=", 1)[1].strip("[]").split(",")]
    files = set()
    if "pretrain" in stages:
        files |= {paths.pretrain, paths.ckpt_dir("pretrain")}
    for r in ratios:
        if "prune" in stages:
            files.add(paths.ticket(mask, r))
        if "retrain" in stages:
            files |= {paths.retrain(mask, r), paths.ckpt_dir(paths.retrain_stage(mask, r))}
    return files


def _assert_no_shared_files(calls: list, out: Path) -> None:
    """No file or checkpoint folder is written by two different jobs (job=<id> of each call)."""
    owner = {}
    for c in calls:
        job = re.search(r" job=(\d+) ", c).group(1)
        for f in _files_written(c, out):
            assert owner.setdefault(f, job) == job, \
                f"{f.name} is written by job {owner[f]} and by job {job} ({c.split()[0]})"


def test_snapshot_array_beside_the_chain_writes_only_its_own_files(slurm_cluster, tmp_path):
    """The chain (pretrain -> prune -> retrain) and the snapshot array submitted by hand as
    documented (its default steps, afterok on the pretraining job) share one output folder: the
    array's tasks run beside the prune and retrain jobs, and no two jobs may write the same file
    (a task for the end of pretraining would write tickets_p50.h5, retrain_p50.h5 and
    ckpt/retrain_p50/ as the chain's jobs do)."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("x: 1\n")
    launcher = _script(tmp_path / "launcher.sh", _RECORDING_LAUNCHER)
    out = tmp_path / "out"
    env = slurm_cluster.client_env(dict(
        _venv_env(), DIR=str(tmp_path), LOFT_LAUNCHER=str(launcher), LOFT_CONFIG=str(cfg),
        LOFT_OUT=str(out), LOFT_NP="2", LOFT_OVERRIDES="prune.ratios=[0.5,0.8]"))
    res = subprocess.run(["bash", str(SLURM / "chain.sh")], env=env, cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    ids = res.stdout.split()
    snaps = slurm_cluster.submit(SLURM / "retrain_snapshots_array.sh", env=env, cwd=tmp_path, sbatch_args=[
        "--ntasks=2", f"--dependency=afterok:{ids[0]}", f"--output={tmp_path}/snap-%a.out"])
    done = slurm_cluster.wait_jobs(ids + [snaps], timeout=90)
    assert {j: r.state for j, r in done.items()} == dict.fromkeys(ids + [snaps], "COMPLETED")
    calls = _calls(tmp_path)
    masks = sorted(re.search(r"prune\.mask_from=(\S+)", c).group(1)
                   for c in calls if c.startswith("prune,retrain"))
    assert len(masks) == len(done[snaps]["tasks"]) and "end" not in masks, masks
    _assert_no_shared_files(calls, out)


def test_imp_prune_job_gets_the_retrain_jobs_shape(slurm_cluster, tmp_path):
    """prune.levels=2 retrains a level inside the prune job: chain.sh submits it with the retrain
    job's task count and time limit (as SLURM records them), and it runs on that many ranks."""
    launcher = _script(tmp_path / "launcher.sh", _RECORDING_LAUNCHER)
    env = slurm_cluster.client_env(dict(
        _venv_env(), DIR=str(tmp_path), LOFT_LAUNCHER=str(launcher), LOFT_CONFIG="configs/default.yaml",
        LOFT_OUT=str(tmp_path / "out"), LOFT_NP="2", LOFT_PRUNE_OVERRIDES="prune.levels=2",
        LOFT_LOG_DIR=str(tmp_path / "logs")))
    res = subprocess.run(["bash", str(SLURM / "chain.sh")], env=env, cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    pre, prune, retrain = res.stdout.split()
    p, r = slurm_cluster.job_info(prune), slurm_cluster.job_info(retrain)
    assert (p["NumTasks"], p["TimeLimit"]) == (r["NumTasks"], r["TimeLimit"]) == ("2", "1-00:00:00"), \
        (p, res.stderr)
    done = slurm_cluster.wait_jobs([pre, prune, retrain], timeout=90)
    assert {j: d.state for j, d in done.items()} == dict.fromkeys([pre, prune, retrain], "COMPLETED")
    (call,) = [c for c in _calls(tmp_path) if c.startswith("prune ")]
    assert " -np 2 " in call and "prune.levels=2" in call


def _pretrain_with_recorder(cluster, tmp_path: Path, sbatch_args: list, script: str = "pretrain.sh", **env):
    """Submit slurm/SCRIPT (from TMP_PATH) with the recording launcher; returns the job id."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("x: 1\n")
    launcher = _script(tmp_path / "launcher.sh", _RECORDING_LAUNCHER)
    env = dict(_venv_env(), DIR=str(tmp_path), LOFT_LAUNCHER=str(launcher), LOFT_CONFIG=str(cfg),
               LOFT_OUT=str(tmp_path / "out"), **env)
    return cluster.submit(SLURM / script, env=env, cwd=tmp_path, sbatch_args=sbatch_args)


def test_follow_ups_of_more_ranks_than_tasks_can_run(slurm_cluster, tmp_path):
    """Submitted with --nodes=1 --ntasks-per-node=2 and LOFT_NP=4 (4 ranks on a 2-core node), the
    chain runs: the retrain job gets the pretraining job's allocation (1 node, 2 tasks) and both
    start 4 ranks; it used to get --ntasks=4 --ntasks-per-node=2 on one node and stay PENDING."""
    pre = _pretrain_with_recorder(slurm_cluster, tmp_path, ["--nodes=1", "--ntasks=2", "--ntasks-per-node=2",
                                                            "--cpus-per-task=1"], LOFT_NP="4")
    prune, retrain = _followups(slurm_cluster, tmp_path / f"loft-pretrain-{pre}.out", pre)
    info = slurm_cluster.job_info(retrain)
    assert (info["NumNodes"].split("-")[0], info["NumTasks"]) == ("1", "2"), info
    res = slurm_cluster.wait_jobs([pre, prune, retrain], timeout=90, raise_on_timeout=False)
    assert {j: r.state for j, r in res.items()} == dict.fromkeys([pre, prune, retrain], "COMPLETED"), \
        {j: (r.state, r.get("reason")) for j, r in res.items()}
    calls = {c.split()[0]: c for c in _calls(tmp_path)}
    assert " -np 4 " in calls["pretrain"] and " -np 4 " in calls["retrain"] and " -np 1 " in calls["prune"]
    for name in (f"loft-pretrain-{pre}.out", f"loft-prune-{prune}.out", f"loft-retrain-{retrain}.out"):
        assert (tmp_path / name).is_file(), sorted(p.name for p in tmp_path.glob("*.out"))


def test_a_follow_up_that_could_never_start_stops_the_first_job(slurm_cluster, tmp_path):
    """LOFT_NODES=2 on a one-node cluster: the retrain job could never start.  The pretraining job
    says so in one line in its log and exits 2 before it pretrains; nothing is submitted."""
    pre = _pretrain_with_recorder(slurm_cluster, tmp_path, ["--ntasks=2"], LOFT_NODES="2")
    res = slurm_cluster.wait_jobs([pre], timeout=60)[pre]
    log = (tmp_path / f"loft-pretrain-{pre}.out").read_text()
    assert (res.state, res.exit_code) == ("FAILED", 2), log
    errors = [ln for ln in log.splitlines() if "ERROR" in ln or "error" in ln]
    assert len(errors) == 1 and "the retrain job could never start" in errors[0] and "--nodes=2" in errors[0] \
        and "nothing was submitted" in errors[0], log
    assert not (tmp_path / "calls").exists(), "pretraining ran although its chain could not complete"
    assert not (tmp_path / "out" / "slurm_jobs.txt").exists()
    assert "prune=" not in log and "retrain=" not in log, "a follow-up was submitted"


def test_gpu_shaped_template_keeps_one_rank_per_gpu(slurm_cluster, tmp_path):
    """cifar10_loft2.sh as written for GPU nodes (1 node, 2 tasks, --gres=gpu:2), on the test
    cluster's stand-in GPUs: the retrain job gets 2 tasks with 2 GPUs on one node, the prune job
    one task without GPUs, and each stage starts 2 ranks."""
    pre = _pretrain_with_recorder(slurm_cluster, tmp_path, ["--cpus-per-task=1", "--mem=2G"], script="cifar10_loft2.sh")
    prune, retrain = _followups(slurm_cluster, tmp_path / f"loft-c10-loft2-{pre}.out", pre)
    p, r = slurm_cluster.job_info(prune), slurm_cluster.job_info(retrain)
    assert (r["NumNodes"].split("-")[0], r["NumTasks"]) == ("1", "2") and "gpu:2" in r.get("TresPerNode", ""), r
    assert p["NumTasks"] == "1" and "gpu" not in p.get("TresPerNode", "") + p.get("TRES", ""), p
    done = slurm_cluster.wait_jobs([pre, prune, retrain], timeout=90)
    assert {j: d.state for j, d in done.items()} == dict.fromkeys([pre, prune, retrain], "COMPLETED")
    calls = {c.split()[0]: c for c in _calls(tmp_path)}
    assert " -np 2 " in calls["pretrain"] and " -np 2 " in calls["retrain"]


def test_chain_sh_runs_three_stages_and_snapshot_array(slurm_cluster, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("x: 1\n")
    launcher = _script(tmp_path / "launcher.sh", _RECORDING_LAUNCHER)
    out = tmp_path / "out"
    env = slurm_cluster.client_env(dict(
        _venv_env(), DIR=str(tmp_path), LOFT_LAUNCHER=str(launcher), LOFT_CONFIG=str(cfg),
        LOFT_OUT=str(out), LOFT_LOG_DIR=str(tmp_path / "logs"), LOFT_NP="2",
        LOFT_OVERRIDES="train.duration=30it prune.ratios=[0.5]", LOFT_SNAPSHOTS="1ep 2ep",
        LOFT_RETRAIN_OVERRIDES="retrain.duration=20it"))
    res = subprocess.run(["bash", str(SLURM / "chain.sh")], env=env, cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    ids = res.stdout.split()
    assert len(ids) == 4 and all(i.isdigit() for i in ids), res.stdout
    pre, prune, retrain, snaps = ids
    assert f"afterok:{pre}" in (slurm_cluster.job_info(prune) or {}).get("Dependency", "")
    done = slurm_cluster.wait_jobs(ids, timeout=90)
    assert {j: r.state for j, r in done.items()} == dict.fromkeys(ids, "COMPLETED"), \
        slurm_cluster.logs(10)
    assert len(done[snaps]["tasks"]) == 2
    calls = _calls(tmp_path)
    stages = [c.split()[0] for c in calls]
    assert stages[0] == "pretrain"
    assert stages.index("prune") < stages.index("retrain")
    assert sorted(stages) == ["pretrain", "prune", "prune,retrain", "prune,retrain", "retrain"]
    by_stage = {c.split()[0]: c for c in calls}
    assert "prune.ratios=[0.5]" in by_stage["pretrain"] and " -np 2 " in by_stage["pretrain"]
    assert " -np 1 " in by_stage["prune"]
    assert " -np 2 " in by_stage["retrain"] and "retrain.duration=20it" in by_stage["retrain"]
    assert "retrain.duration=20it" not in by_stage["pretrain"]
    masks = sorted(re.search(r"prune\.mask_from=(\S+)", c).group(1)
                   for c in calls if c.startswith("prune,retrain"))
    assert masks == ["1ep", "2ep"]
    _assert_no_shared_files(calls, out)


# ====================================================================== the real pipeline
# The real program (python -m loft_hpc.run) in real jobs, from folders outside the repository (the
# package is installed: scripts/setup_env.sh).  The module fixture `real_jobs` submits every job of
# this section at once -- the two data-set templates as the documented CPU trial, a LoFT-4
# template on 2 tasks, chain.sh on the default config, a failing chain, and a pretraining job that
# SLURM preempts at its time limit -- so that their start-ups and SLURM's waits overlap on the two
# cores; each test then waits for and checks its own jobs.

TINY = ("train.duration=10it train.local_steps=5 retrain.duration=6it prune.ratios=[0.5] data.batch_size=32 "
        "output.snapshot_weights=[] model.width=8 train.bn_recalibration=2 train.train_eval_samples=64")

# A tiny LoFT-2 pretraining (synthetic data) for preemption and SIGTERM: stopped after its first
# checkpoint, it must end exactly as an uninterrupted run of the same overrides.
PREEMPT = ["data.name=synthetic", "data.synthetic_train_size=192", "data.synthetic_test_size=64",
           "data.batch_size=16", "data.eval_batch_size=64", "model.width=4", "model.inner_width_factor=1.5",
           "train.duration=40it", "train.local_steps=4", "train.eval_every=16it", "train.bn_recalibration=2",
           "train.train_eval_samples=32", "output.checkpoint_every=8it", "output.snapshot_weights=[]",
           "train.progress=false"]


def _cpu_trial() -> tuple:
    """(LOFT_OVERRIDES, sbatch options) of the CPU trial in slurm/README.md, as a user copies it."""
    text = (SLURM / "README.md").read_text()
    block = re.search(r"<!-- cpu-trial -->(.*?)<!-- /cpu-trial -->", text, re.S)
    assert block, "slurm/README.md has no <!-- cpu-trial --> block"
    overrides = re.search(r'^export LOFT_OVERRIDES="([^"]*)"', block.group(1), re.M)
    sbatch = re.search(r"^sbatch (.*?) \S*slurm/imagenet_loft4\.sh", block.group(1), re.M)
    assert overrides and sbatch, block.group(1)
    return overrides.group(1), sbatch.group(1).split()


def _wait_file(path: Path, what: str, timeout: float, cluster=None, job: str | None = None,
               contains: str | None = None) -> None:
    """Wait for PATH to exist (and to contain CONTAINS); fail early when JOB has ended."""
    def ready():
        if path.exists() and (contains is None or contains in path.read_text(errors="replace")):
            return True
        if job and cluster and cluster.job_state(job) in TERMINAL:
            pytest.fail(f"job {job} ended ({cluster.job_state(job)}) before {what}\n{_read(path)}")
        return False
    _wait_for(ready, timeout, what)


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else f"<{path} missing>"


def _followups(cluster, log: Path, job: str) -> tuple:
    """The prune and retrain job ids that pretraining job JOB printed in its log."""
    _wait_file(log, f"job {job} to submit its follow-ups", 120, cluster, job, contains="retrain=")
    text = log.read_text()
    return re.search(r"^prune=(\d+)$", text, re.M).group(1), re.search(r"^retrain=(\d+)$", text, re.M).group(1)


def _rank_pids(out: Path) -> list:
    """The python ranks (not mpirun) of the job writing to OUT, found by their command line."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            argv = [a.decode(errors="replace") for a in (d / "cmdline").read_bytes().split(b"\0") if a]
        except OSError:
            continue
        if argv and Path(argv[0]).name.startswith("python") and "loft_hpc.run" in argv \
                and f"output.dir={out}" in argv:
            pids.append(int(d.name))
    return pids


def _scontrol(cluster, *args: str) -> None:
    subprocess.run(["scontrol", *args], env=cluster.client_env(), check=True, timeout=30,
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)


class _Preemption(threading.Thread):
    """What SLURM does at a job's time limit, made to happen while the job trains: once the first
    checkpoint exists, the ranks are paused (SIGSTOP, so that no round passes while SLURM gets to
    its periodic time-limit check, every 30 s) and the time limit is cut to 3 minutes;
    --signal=B:USR1@160 then makes SLURM send USR1 to the batch shell at its next check (SLURM
    signals up to 30 s early, to the check before the due time); when the log shows it
    arrived, the limit goes back to 10 minutes (for the run after the requeue) and the ranks
    continue: they checkpoint at the next round boundary and exit 3, the job requeues itself."""

    def __init__(self, cluster, job: str, out: Path, log: Path):
        super().__init__(daemon=True)
        self.cluster, self.job, self.out, self.log = cluster, job, out, log
        self.error: BaseException | None = None
        self.paused: list = []

    def run(self):
        try:
            _wait_file(self.out / "ckpt" / "pretrain" / "LATEST", "the first checkpoint", 240, self.cluster, self.job)
            self.paused = _rank_pids(self.out)
            assert len(self.paused) == 2, f"ranks of {self.out}: {self.paused}"
            for pid in self.paused:
                os.kill(pid, signal.SIGSTOP)
            _scontrol(self.cluster, "update", f"JobId={self.job}", "TimeLimit=3")
            _wait_file(self.log, "SLURM's USR1 before the time limit", 120, self.cluster, self.job,
                       contains="got SIGUSR1")
            _scontrol(self.cluster, "update", f"JobId={self.job}", "TimeLimit=10")
        except BaseException as e:  # noqa: BLE001 - re-raised by the test
            self.error = e
        finally:
            for pid in self.paused:
                try:
                    os.kill(pid, signal.SIGCONT)
                except OSError:
                    pass

    def result(self, timeout: float = 300) -> None:
        self.join(timeout)
        assert not self.is_alive(), "the preemption did not happen in time"
        if self.error:
            raise self.error


_BACKGROUND: list = []  # jobs of the module fixture: they outlive single tests, not the module


def _start_bg(cmd: list, env: dict, log: Path) -> subprocess.Popen:
    """Start a job in its own session for the module fixture.  Not through tests.mpi_util's
    start_job: the conftest kills those after every test, and these run across tests."""
    full = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LOFT_"))}
    full.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    full.update(env)
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=full, start_new_session=True, stdout=out,
                                stderr=subprocess.STDOUT)
    _BACKGROUND.append(proc)
    return proc


def _stop_background() -> None:
    for proc in _BACKGROUND:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
            proc.wait(timeout=30)
    _BACKGROUND.clear()


class _Sigterm(threading.Thread):
    """Outside SLURM: `bash slurm/pretrain.sh` (mpirun as launcher) gets SIGTERM once its first
    checkpoint exists; then the same command runs again.  Keeps both exit codes and logs."""

    def __init__(self, d: Path, env: dict):
        super().__init__(daemon=True)
        self.d, self.env = d, env
        self.error: BaseException | None = None
        self.codes: list = []

    def _start(self, n: int):
        return _start_bg(["bash", str(SLURM / "pretrain.sh")], self.env, self.d / f"run{n}.log")

    def run(self):
        try:
            proc = self._start(1)
            _wait_for(lambda: (self.d / "out" / "ckpt" / "pretrain" / "LATEST").exists() or proc.poll() is not None,
                      240, "the first checkpoint")
            proc.send_signal(signal.SIGTERM)
            self.codes.append(proc.wait(timeout=240))
            proc = self._start(2)
            self.codes.append(proc.wait(timeout=240))
        except BaseException as e:  # noqa: BLE001 - re-raised by the test
            self.error = e

    def result(self, timeout: float = 480) -> tuple:
        self.join(timeout)
        assert not self.is_alive(), "the SIGTERM runs did not end in time"
        if self.error:
            raise self.error
        return self.codes, (self.d / "run1.log").read_text(), (self.d / "run2.log").read_text()


@pytest.fixture(scope="module")
def real_jobs(slurm_cluster, tmp_path_factory):
    """Submit every real job of this section at once; returns {name: {...}}."""
    root = tmp_path_factory.mktemp("real")
    overrides, trial_sbatch = _cpu_trial()
    jobs = {}
    old_umask = os.umask(0o022)  # the jobs inherit the submitter's umask: files must be 0644
    try:
        # the documented CPU trial of the two data-set templates, each from its own folder
        for name, script, data in (("imagenet", "imagenet_loft4.sh", "in1k"), ("cifar10", "cifar10_loft4.sh", "cifar")):
            d = root / name
            d.mkdir()
            if data == "in1k":
                write_imagefolder(root / data, classes=4, per_class=16, size=40, val_per_class=4)
                extra = ""
            else:
                write_cifar(root / data, n_train=128, n_test=32)
                extra = " data.verify_checksums=false"  # test-written files (README: CIFAR)
            env = dict(_venv_env(), LOFT_DATA=str(root / data), LOFT_NP="4", LOFT_OVERRIDES=overrides + extra)
            jid = slurm_cluster.submit(SLURM / script, env=env, cwd=d, sbatch_args=trial_sbatch)
            jobs[name] = {"dir": d, "job": jid, "script": script}
        # a LoFT-4 template on 2 tasks: train.workers refuses it
        d = root / "two_tasks"
        d.mkdir()
        env = dict(_venv_env(), LOFT_DATA=str(root / "in1k"), LOFT_OVERRIDES=overrides)
        jobs["two_tasks"] = {"dir": d, "job": slurm_cluster.submit(
            SLURM / "imagenet_loft4.sh", env=env, cwd=d, sbatch_args=trial_sbatch)}
        # chain.sh with the default config, and a chain whose pretraining fails
        for name, extra in (("chain", ""), ("failing", " train.lr=-1")):
            d = root / name
            d.mkdir()
            env = slurm_cluster.client_env(dict(
                _venv_env(), LOFT_CONFIG="configs/default.yaml", LOFT_OUT=str(d / "out"), LOFT_NP="2",
                LOFT_OVERRIDES=TINY + extra, LOFT_LOG_DIR=str(d / "logs")))
            res = subprocess.run(["bash", str(SLURM / "chain.sh")], cwd=d, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, timeout=60)
            assert res.returncode == 0, res.stderr
            assert len(res.stdout.split()) == 3, res.stdout
            jobs[name] = {"dir": d, "ids": res.stdout.split()}
        # a pretraining job preempted at its (shortened) time limit, and the uninterrupted reference
        d = root / "preempt"
        d.mkdir()
        env = dict(_venv_env(), LOFT_CONFIG="configs/default.yaml", LOFT_OUT=str(d / "out"), LOFT_NP="2",
                   LOFT_SUBMIT_FOLLOWUPS="0", LOFT_OVERRIDES=" ".join(PREEMPT))
        jid = slurm_cluster.submit(SLURM / "pretrain.sh", env=env, cwd=d, sbatch_args=[
            "--ntasks=2", "--time=10", "--signal=B:USR1@160", f"--output={d}/job.out"])
        pre = _Preemption(slurm_cluster, jid, d / "out", d / "job.out")
        pre.start()
        jobs["preempt"] = {"dir": d, "job": jid, "thread": pre}
    finally:
        os.umask(old_umask)
    d = root / "sigterm"
    d.mkdir()
    env = dict(_venv_env(), LOFT_CONFIG="configs/default.yaml", LOFT_OUT=str(d / "out"), LOFT_NP="2",
               LOFT_OVERRIDES=" ".join(PREEMPT), LOFT_LAUNCHER="mpirun")
    jobs["sigterm"] = {"dir": d, "thread": _Sigterm(d, env)}
    jobs["sigterm"]["thread"].start()
    ref = root / "reference"
    jobs["reference"] = {"dir": ref, "proc": _start_bg(
        [str(REPO / "scripts" / "mpirun.sh"), "-np", "2", sys.executable, "-m", "loft_hpc.run", "--config",
         str(REPO / "configs" / "default.yaml"), "--stage", "pretrain", *PREEMPT, f"output.dir={ref}"],
        {}, root / "reference.log")}
    try:
        yield jobs
    finally:
        _stop_background()


@pytest.fixture(scope="module")
def reference_pretrain(real_jobs):
    """pretrain.h5 of the uninterrupted run of PREEMPT on 2 ranks (started by real_jobs)."""
    ref = real_jobs["reference"]
    if "file" not in ref:
        ref["proc"].wait(timeout=600)
        assert ref["proc"].returncode == 0, _read(ref["dir"].parent / "reference.log")[-4000:]
        ref["file"] = ref["dir"] / "pretrain.h5"
    return ref["file"]


def _same_pretraining(a: Path, b: Path) -> None:
    from loft_hpc.checkpoint.h5file import read_run_file
    from tests.mpi_util import assert_same_run

    assert_same_run(read_run_file(a), read_run_file(b))


@pytest.mark.parametrize("name", ["imagenet", "cifar10"])
def test_cpu_trial_of_a_dataset_template_runs_its_chain(slurm_cluster, real_jobs, name):
    """`sbatch <CPU options> slurm/<data set>_loft4.sh` as slurm/README.md's CPU trial types it,
    from a folder outside the repository, on data in the real format (ImageNet JPEG folders,
    CIFAR pickles), shrunk by LOFT_OVERRIDES only: 4 ranks on a 2-core node without GPUs.
    Pretrain -> prune -> retrain complete in order; the retrain job's log ends with the summary
    table, which is summary.txt in the output folder; logs are <job name>-<id>.out in the
    submission folder; every file honours the submitter's umask (022: 0644)."""
    import h5py
    info = real_jobs[name]
    d, pre = info["dir"], info["job"]
    job_name = _headers(SLURM / info["script"])["--job-name"]
    log = d / f"{job_name}-{pre}.out"
    prune, retrain = _followups(slurm_cluster, log, pre)
    res = slurm_cluster.wait_jobs([pre, prune, retrain], timeout=420)
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2500:]}" for p in sorted(d.glob("*.out")))
    assert {j: (r.state, r.exit_code) for j, r in res.items()} == \
        dict.fromkeys([pre, prune, retrain], ("COMPLETED", 0)), logs
    assert sorted(p.name for p in d.glob("*.out")) == sorted(
        [f"{job_name}-{pre}.out", f"loft-prune-{prune}.out", f"loft-retrain-{retrain}.out"])
    assert not list(REPO.glob(f"*-{pre}.out")), "a log landed in the repository"
    out = d / "runs" / Path(_config_of(info["script"])).stem
    summary = out / "summary.txt"
    assert summary.is_file(), sorted(p.name for p in out.iterdir())
    table = summary.read_text().strip().splitlines()
    assert table[2].startswith("pretrained LoFT-4 (unpruned)") and table[3].startswith("ticket 50% retrained"), table
    retrain_log = (d / f"loft-retrain-{retrain}.out").read_text()
    assert "\n".join(table) in retrain_log and f"summary: {summary}" in retrain_log
    assert f"ranks on the job's 2 task slots" in (d / f"{job_name}-{pre}.out").read_text()
    with h5py.File(out / "retrain_p50.h5", "r") as f:
        assert f.attrs["world_size"] == 4 and isinstance(f.get("masks"), h5py.Group)
    for p in out.rglob("*"):
        if p.is_file():
            assert p.stat().st_mode & 0o777 == 0o644, f"{p.relative_to(out)}: {oct(p.stat().st_mode & 0o777)}"
    info_retrain = slurm_cluster.job_info(retrain)
    assert (info_retrain["NumNodes"].split("-")[0], info_retrain["NumTasks"]) == ("1", "2"), info_retrain


def _config_of(script: str) -> str:
    return DATASET_SCRIPTS[script][0]


def test_loft4_template_on_two_tasks_is_refused(slurm_cluster, real_jobs):
    """imagenet_loft4.sh on 2 tasks (LOFT_NP not set) would train LoFT-2: its config's
    train.workers=4 refuses it with one line, exit 2, and the chain's other jobs are cancelled."""
    info = real_jobs["two_tasks"]
    log = info["dir"] / f"loft-in1k-loft4-{info['job']}.out"
    prune, retrain = _followups(slurm_cluster, log, info["job"])
    res = slurm_cluster.wait_jobs([info["job"], prune, retrain], timeout=240)
    text = log.read_text()
    assert (res[info["job"]].state, res[info["job"]].exit_code) == ("FAILED", 2), text
    assert res[prune].state == res[retrain].state == "CANCELLED"
    errors = [ln for ln in text.splitlines() if "error" in ln.lower()]
    assert errors == ["loft_hpc: error: train.workers=4: this config pretrains on 4 ranks, the job has 2 "
                      "(start 4 ranks, or set train.workers=2 or 0 to pretrain LoFT-2)"], text
    assert "Traceback" not in text and "Primary job" not in text


def test_real_chain_pretrain_prune_retrain(slurm_cluster, real_jobs):
    import h5py
    d = real_jobs["chain"]["dir"]
    pre, prune, retrain = real_jobs["chain"]["ids"]
    res = slurm_cluster.wait_jobs([pre, prune, retrain], timeout=420)
    states = {j: (r.state, r.exit_code) for j, r in res.items()}
    assert states == dict.fromkeys([pre, prune, retrain], ("COMPLETED", 0)), f"{states}\n{_job_logs(d)}"
    assert _ts(res[pre]["start_time"]) <= _ts(res[pre]["end_time"]) <= _ts(res[prune]["start_time"])
    assert _ts(res[prune]["end_time"]) <= _ts(res[retrain]["start_time"])
    out = d / "out"
    for name in ("pretrain.h5", "retrain_p50.h5", "summary.txt"):
        assert (out / name).is_file(), f"{name} missing in {sorted(p.name for p in out.iterdir())}"
    with h5py.File(out / "retrain_p50.h5", "r") as f:
        assert isinstance(f.get("masks"), h5py.Group), list(f)
        assert isinstance(f.get("metrics"), h5py.Dataset) and f["metrics"].size > 0, list(f)


def test_real_chain_failing_pretrain_stops_the_chain(slurm_cluster, real_jobs):
    d = real_jobs["failing"]["dir"]
    pre, prune, retrain = real_jobs["failing"]["ids"]
    res = slurm_cluster.wait_jobs([pre, prune, retrain], timeout=300)
    assert (res[pre].state, res[pre].exit_code) == ("FAILED", 2), _job_logs(d)
    assert res[prune].state == "CANCELLED" and res[retrain].state == "CANCELLED"
    logs = sorted(p.name for p in (d / "logs").glob("*.out"))
    assert not [n for n in logs if n.startswith(("loft-prune", "loft-retrain"))], logs
    out = d / "out"
    assert not list(out.glob("tickets*.h5")) and not list(out.glob("retrain*.h5"))


def test_time_limit_preemption_requeues_and_resumes_exactly(slurm_cluster, real_jobs, reference_pretrain):
    """A job with a time limit and --signal=B:USR1@160 gets USR1 from SLURM before its limit
    while it trains: it checkpoints at the next round boundary, exits 3, requeues itself (its log's
    last line of that run says so, with no mpirun banner), resumes as run 2 and completes with
    exactly the files of an uninterrupted run (weights, BN statistics, momentum, RNG states,
    metrics, comm rows)."""
    info = real_jobs["preempt"]
    info["thread"].result()
    res = slurm_cluster.wait_jobs([info["job"]], timeout=300)[info["job"]]
    log = (info["dir"] / "job.out").read_text()
    assert (res.state, res.exit_code, res["restarts"]) == ("COMPLETED", 0, 1), log
    lines = log.splitlines()
    run1 = lines[:next(i for i, ln in enumerate(lines) if "(loft-pretrain) run 2 on" in ln)]
    stop = re.search(r"checkpoint written at step (\d+); exiting for requeue", log)
    assert stop, log
    assert re.fullmatch(rf"\[loft [^]]+\] job {info['job']} run 1: pretrain checkpointed at step {stop.group(1)} "
                        rf"\(\S+/ckpt/pretrain/ckpt-0*{stop.group(1)}\.h5\) \(exit code 3\); requeued, run 2 "
                        r"resumes from there", run1[-1]), run1[-3:]
    for banner in ("Primary job", "mpirun detected", "non-zero exit", "Traceback"):
        assert banner not in log, log
    # SLURM's own "*** JOB <id> ON <node> CANCELLED AT ... DUE TO JOB REQUEUE ***" may precede it
    assert all("DUE TO JOB REQUEUE" in ln for ln in run1 if "CANCELLED" in ln), run1
    assert f"resumed from {info['dir'] / 'out'}/ckpt/pretrain/ckpt-" in log
    _same_pretraining(info["dir"] / "out" / "pretrain.h5", reference_pretrain)


def test_sigterm_to_the_launch_wrapper_checkpoints_and_resumes(real_jobs, reference_pretrain):
    """Outside SLURM: SIGTERM to a stage started through the job wrapper (slurm/pretrain.sh run
    with bash, mpirun as launcher) becomes USR1 to mpirun, which passes it to every rank: the
    ranks checkpoint at the next round boundary and exit 3 (a bare mpirun would kill the ranks on
    TERM); running the same command again resumes and ends exactly as an uninterrupted run."""
    info = real_jobs["sigterm"]
    codes, first, second = info["thread"].result()
    assert codes == [3, 0], f"{codes}\n--- run 1\n{first[-3000:]}\n--- run 2\n{second[-3000:]}"
    assert "got SIGTERM: sending SIGUSR1 to the launcher" in first
    stop = re.search(r"stop requested \(SIGUSR1\), checkpoint written at step (\d+)", first)
    assert stop and int(stop.group(1)) < 40, first
    assert "Primary job" not in first and "Traceback" not in first
    assert f"at step {stop.group(1)}/40" in second, second
    _same_pretraining(info["dir"] / "out" / "pretrain.h5", reference_pretrain)


def _job_logs(d: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted((d / "logs").glob("*.out")))


def _ts(value: str) -> float:
    return time.mktime(time.strptime(value, "%Y-%m-%dT%H:%M:%S"))
