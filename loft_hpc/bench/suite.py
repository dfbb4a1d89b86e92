"""The benchmark suite: LoFT (both exchanges), dense and GPipe pretraining on the same config, side by side.

    python tools/bench.py [--ranks 2 4] [--methods loft loft-alltoall dense gpipe] [--epochs 1]
                          [--local-steps 4] [--share-k 5 15] [--microbatches 4] [--reps 5] [--tiny]
                          [--[no-]memory] [--config FILE] [--set KEY=VALUE ...] [--out build/bench]

One invocation, one run of every job, each under real ``scripts/mpirun.sh -np S`` (GPipe: the
pipeline's S stages, one per rank; loft-alltoall: LoFT with ``train.exchange=alltoall``, the lean
exchange). For each (method, S):

- bytes per epoch, fair convention (total over all links, both directions, each byte once on
  every link it crosses, collectives counted as their bandwidth-optimal ring algorithms:
  :func:`loft_hpc.exchange.accounting.link_bytes`): *measured* = that rule applied to every
  ``/comm`` row of the run (allgather (S-1) x sent, allreduce 2 (S-1)/S x sent, p2p sent), divided
  by the epochs run; *analytic* = :mod:`loft_hpc.exchange.accounting` for the same steps (LoFT: ceil(steps / K)
  syncs; dense and GPipe: one per step; the lean exchange: from every round's deal) plus what the
  evaluation and the file need (dense averages the BN statistics at each evaluation:
  ``dense_eval_bytes``; the lean exchange and GPipe assemble the whole model, weights for each
  evaluation and momentum for the file: ``assemble_bytes``, ``gpipe_assemble_bytes``; LoFT with
  allgather holds the whole model and moves nothing there); and their
  difference, which is 0 when every byte is accounted for. Each rank's ``/comm`` payload (sent +
  received) is also checked against the accounting's per-rank prediction (``per_rank_equal``);
- bytes per epoch, the paper's convention (analytic: the paper's rule has no log to measure);
- images per second per rank: training images the whole job processed / training wall time / S
  (LoFT and dense: each rank its own batches; GPipe: every global batch passes all S stages, so
  the pipeline's throughput is shared by S ranks);
- wall time per epoch: the run's training wall time (``/progress`` wall_time: the loop, stopped
  before the final evaluation and file) / epochs;
- share of time in communication: the ranks' mean of (seconds inside counted collectives, ``/comm``
  ``seconds``) / training wall time. Every such time includes waiting for the other ranks: the
  slowest rank of an allreduce, GPipe's neighbouring stage (its waits on point-to-point
  transfers, so the pipeline's fill and drain bubbles count as communication). The seconds also
  hold what the final evaluation and file moved (dense's BN averaging, the lean exchange's and
  GPipe's assembly), which runs after the loop's clock stops: one boundary per job. A run whose
  ``seconds`` are all 0 while it moved bytes (a torch whose schedule could not be timed) says
  "not timed";
- peak memory per rank: the kernel's high-water mark of each rank process's resident set
  (``getrusage`` ru_maxrss, recorded in the rank itself by :mod:`loft_hpc.bench.probe`); the
  table shows the largest rank, the JSON every rank; on CUDA also ``torch.cuda.max_memory_allocated``;
- LoFT only: the local step of one rank's sub-network against the full network (one core, in this
  process, after the MPI jobs), as a speed-up next to the FLOPs ratio (the former bench_loft.py).

The headline table puts LoFT-S (each exchange) against GPipe-S (bytes per epoch, both
conventions) beside the paper's 1.26x and 3.20x (PreResNet-34, CIFAR-10). Then: LoFT at each
``--share-k`` K under both exchanges (the exchange's share of wall time), and, with ``--memory``,
LoFT's memory per rank under both exchanges on the full-width model at S = 1 and each S. Results go to ``OUT/results.md`` and
``OUT/results.json`` (the same figures) and the run files stay in ``OUT/runs/<method>-<S>/``
(``loft-tools comm`` reads them).

Default setting: the CIFAR-shaped PreResNet-34 at reduced width (w16, the release's 2x inner
width) on synthetic 32 px data (2048 training images, batch 64 per rank; GPipe: global batch 64 in
4 micro-batches), K = 4 (so that an epoch of 32 steps is 8 whole rounds), one epoch per job,
GPipe's stages balanced by FLOPs (``train.pipeline_balance=flops``: for S = 2 that is the paper's
middle cut, ``loft-tools comm --paper``). ``--tiny``: a tiny PreResNet-18 on 192 synthetic 16 px
images (the tests' setting).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

from loft_hpc.utils.procs import kill_session

REPO = Path(__file__).resolve().parents[2]
MPIRUN = REPO / "scripts" / "mpirun.sh"
DEFAULT_OUT = REPO / "build" / "bench"

CIFAR_SHAPED = ["data.name=synthetic", "data.image_size=32", "data.synthetic_classes=10",
                "data.synthetic_train_size=2048", "data.synthetic_test_size=256", "data.batch_size=64",
                "model.arch=preresnet34", "model.width=16", "model.inner_width_factor=2"]
TINY = ["data.name=synthetic", "data.synthetic_train_size=192", "data.synthetic_test_size=64", "data.batch_size=16",
        "data.eval_batch_size=64", "model.arch=preresnet18", "model.width=4", "model.inner_width_factor=1.5"]
# every job: no recalibration, no logs, no snapshots or checkpoints in between, no training-sample evaluation
COMMON = ["train.bn_recalibration=0", "train.progress=false", "train.log_every=100000", "train.train_eval_samples=0",
          "output.snapshot_weights=[]", "output.snapshot_every=100000it", "output.checkpoint_every=100000it"]
# the memory comparison (allgather against alltoall): the full-width CIFAR PreResNet-34 (width 64,
# the release's 2x inner width) on a small batch, 3 rounds of K = 2
MEMORY_MODEL = ["data.name=synthetic", "data.image_size=32", "data.synthetic_classes=10",
                "data.synthetic_train_size=256", "data.synthetic_test_size=64", "data.batch_size=8",
                "model.arch=preresnet34", "model.width=64", "model.inner_width_factor=2"]
MEMORY_TINY = TINY
MEMORY_RUN = ["train.method=loft", "train.local_steps=2", "train.duration=6it", "train.eval_every=6it"]
METHODS = ("loft", "loft-alltoall", "dense", "gpipe")  # loft-alltoall: LoFT with the lean exchange (train.exchange)
SHARE_K = (5, 15)
PAPER_IMPROVEMENT = {2: 1.26, 4: 3.20}  # LOFT_SPEC 6: PreResNet-34 CIFAR-10, GPipe-S / LoFT-S


class BenchError(RuntimeError):
    pass


def base_method(method: str) -> str:
    """``train.method`` of a bench method (loft-alltoall is LoFT)."""
    return method.split("-", 1)[0]


def exchange(method: str) -> str:
    return "alltoall" if method == "loft-alltoall" else "allgather"


# ----------------------------------------------------------------------------------- jobs
def run_job(cmd: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    """``cmd`` as the leader of a new session; on a timeout, an interrupt or an error the whole
    session is killed (no rank is left behind)."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_session(proc)
        raise BenchError(f"{' '.join(cmd)}: still running after {timeout:.0f} s: killed") from None
    except BaseException:
        kill_session(proc)
        raise
    kill_session(proc)  # whatever outlived mpirun
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def job_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return env


# ----------------------------------------------------------------------------------- settings
class Setting:
    """The config every job shares, its model, and the per-method overrides."""

    def __init__(self, config: str, overrides: list[str], epochs: int, local_steps: int, microbatches: int,
                 balance: str) -> None:
        from loft_hpc.config import load_config
        from loft_hpc.data import build_datasets
        from loft_hpc.stages.common import make_model

        self.config, self.epochs = config, epochs
        self.local_steps, self.microbatches, self.balance = local_steps, microbatches, balance
        self.overrides = [*COMMON, *overrides, f"train.duration={epochs}ep", f"train.eval_every={epochs}ep"]
        self.cfg = load_config(config, self.overrides)
        self.bundle = build_datasets(self.cfg.data)
        self.model = make_model(self.cfg, self.bundle)
        self.groups = self.model.filter_groups()
        self.n_train = len(self.bundle.train)
        self.batch = self.cfg.data.batch_size

    def method_args(self, method: str, local_steps: int | None = None) -> list[str]:
        """The overrides of one job: ``method`` one of METHODS, LoFT's K (default ``--local-steps``)."""
        args = [f"train.method={base_method(method)}"]
        if base_method(method) == "loft":
            args += [f"train.local_steps={local_steps or self.local_steps}", f"train.exchange={exchange(method)}"]
        if method == "gpipe":
            args += [f"train.microbatches={self.microbatches}", f"train.pipeline_balance={self.balance}"]
        return args

    def job_config(self, method: str, local_steps: int | None = None):
        from loft_hpc.config import load_config

        return load_config(self.config, [*self.overrides, *self.method_args(method, local_steps)])

    def boundaries(self, method: str, world: int) -> tuple[list[str], list[tuple[int, ...]]] | tuple[None, None]:
        """GPipe: the block names where stages 2..S begin and the per-sample activation shape at
        each cut, resolved as the trainer resolves them (the config's cuts or the balance)."""
        if method != "gpipe":
            return None, None
        import torch

        from loft_hpc.models.pipeline import boundary_shapes, pipeline_blocks
        from loft_hpc.train.gpipe import resolve_cuts

        cfg = self.job_config(method)
        blocks = pipeline_blocks(self.model)
        sample = torch.zeros(1, self.bundle.in_channels, self.bundle.image_size, self.bundle.image_size)
        cuts = resolve_cuts(cfg, blocks, world, sample)
        return [blocks[c][0] for c in cuts], [tuple(s) for s in boundary_shapes(blocks, cuts, sample)]

    def describe(self) -> str:
        c = self.cfg
        n_params = sum(p.numel() for p in self.model.parameters())
        return (f"{c.model.arch} width {c.model.width} x{c.model.inner_width_factor:g} inner ({n_params:,} parameters), "
                f"{c.data.name} {self.bundle.image_size} px, {self.n_train:,} training images, batch {self.batch} "
                f"(LoFT, dense: per rank; GPipe: global, {self.microbatches} micro-batches), "
                f"LoFT K = {self.local_steps}, momentum {c.train.momentum_mode}, {self.epochs} epoch(s) per job")


# ----------------------------------------------------------------------------------- one job
def row_bytes(r: dict) -> int:
    from loft_hpc.tools.comm import row_bytes as rb

    return rb(r)


def exact(x: Fraction) -> int | float:
    return int(x) if x.denominator == 1 else float(x)


def analytic(setting: Setting, method: str, world: int, steps: int, eval_steps: list[int],
             numels: list[int] | None, cuts: list[int] | None, local_steps: int) -> dict:
    """The analytic figures of one job: run totals (fair, over all links; paper), the payload each
    rank's ``/comm`` rows must add up to, the bytes at evaluation and files (dense: the BN
    averaging of each evaluation; LoFT's lean exchange and GPipe: the model assembled for each
    evaluation, ``eval_steps``, and its momentum for the file at the end), and the per-epoch and
    per-sync figures of :class:`~loft_hpc.exchange.accounting.MethodBytes`."""
    from loft_hpc.exchange.accounting import (assemble_bytes, dense_eval_bytes, dense_eval_rank_bytes,
                                              dense_step_bytes, gpipe_assemble_bytes, gpipe_rank_step_bytes,
                                              link_bytes, loft_alltoall_bytes, loft_sync_bytes, method_bytes,
                                              model_floats)

    base = base_method(method)
    cfg = setting.job_config(method, local_steps)
    carry = cfg.train.momentum_mode == "carry" and cfg.train.momentum > 0
    model, groups = setting.model, setting.groups
    K = local_steps if base == "loft" else 1
    mb = method_bytes(base, model, groups, world=world, batch=setting.batch, n_train=setting.n_train,
                      local_steps=K, carry_momentum=carry, shard=cfg.data.shard, boundary_numels=numels)
    syncs = -(-steps // K)
    f = model_floats(model, groups)
    asm = {"sent": [0] * world, "received": [0] * world}  # payload per rank of the assembly
    evals = 0
    if world == 1:
        payload = [0]
        fair = 0
    elif base == "loft" and exchange(method) == "alltoall":
        from loft_hpc.partition.plan import PartitionPlan

        part = [g for g in groups if g.partitioned]
        keeps = [[PartitionPlan.draw(cfg.train.seed, r, part, world).keep(q) for q in range(world)]
                 for r in range(syncs + 1)]
        per = [[loft_alltoall_bytes(model, groups, keeps[r - 1], keeps[r], q, carry) for q in range(world)]
               for r in range(1, syncs + 1)]
        # the weights at every evaluation (the round then: ceil(step / K)), the momentum once for the file
        asms = [assemble_bytes(model, groups, keeps[-(-e // K)], q, False) for e in eval_steps for q in range(world)]
        asms += [assemble_bytes(model, groups, keeps[syncs], q, True) for q in range(world)]
        asm = {d: [sum(x[f"assemble_{d}"] for i, x in enumerate(asms) if i % world == q) for q in range(world)]
               for d in ("sent", "received")}
        tot = {k: sum(row[q][k] for row in per for q in range(world)) for k in per[0][0]}
        payload = [sum(sum(row[q].values()) for row in per) + asm["sent"][q] + asm["received"][q] for q in range(world)]
        evals = link_bytes(world, assemble=sum(asm["sent"]))
        fair = link_bytes(world, alltoall=tot["alltoall_sent"], allreduce=tot["allreduce_sent"]) + evals
    elif base == "loft":
        payload = [syncs * sum(loft_sync_bytes(model, groups, world, q, carry).values()) for q in range(world)]
        fair = mb.fair_for_steps(steps)
    elif base == "dense":
        evals = dense_eval_bytes(f.buffers, world) * len(eval_steps)
        payload = [syncs * sum(dense_step_bytes(model).values())
                   + len(eval_steps) * sum(dense_eval_rank_bytes(model).values())] * world
        fair = mb.fair_for_steps(steps) + evals
    else:
        from loft_hpc.models.pipeline import pipeline_blocks, stage_state_names

        names = stage_state_names(model, pipeline_blocks(model), cuts)
        one = [[gpipe_assemble_bytes(model, names, q, mom) for q in range(world)] for mom in (False, True)]
        # the weights at every evaluation, the momentum once for the file
        asm = {d: [len(eval_steps) * one[0][q][f"assemble_{d}"] + one[1][q][f"assemble_{d}"] for q in range(world)]
               for d in ("sent", "received")}
        evals = link_bytes(world, assemble=sum(asm["sent"]))
        payload = [syncs * sum(gpipe_rank_step_bytes(setting.batch, numels, q).values()) + asm["sent"][q]
                   + asm["received"][q] for q in range(world)]
        fair = mb.fair_for_steps(steps) + evals
    return {"mb": mb, "syncs": syncs, "fair_run": fair, "payload_per_rank": payload, "eval_bytes": evals,
            "fair_per_sync": Fraction(fair - evals, syncs) if syncs else Fraction(0),
            "paper_run": mb.paper_per_sync * syncs, "carry_momentum": carry, "assemble_payload": asm}


def run_one(setting: Setting, method: str, world: int, out: Path, timeout: float, local_steps: int | None = None) -> dict:
    """One job under ``scripts/mpirun.sh -np world``: its figures, each byte figure beside its
    analytic count (``local_steps``: LoFT's K, default ``--local-steps``)."""
    from loft_hpc.checkpoint.h5file import read_run_file
    from loft_hpc.exchange.accounting import comm_link_bytes
    from loft_hpc.models.pipeline import pipeline_blocks

    K = local_steps or setting.local_steps
    run_dir = out / "runs" / (f"{method}-{world}" if local_steps is None else f"{method}-{world}-K{K}")
    shutil.rmtree(run_dir, ignore_errors=True)  # never resume an older job's checkpoint
    probe_dir = run_dir / "probe"
    cmd = [sys.executable, "-m", "loft_hpc.bench.probe", str(probe_dir), "loft_hpc.run", "--config", setting.config,
           "--stage", "pretrain", *setting.overrides, *setting.method_args(method, K), f"output.dir={run_dir}"]
    cmd = [str(MPIRUN), "-np", str(world), *cmd]
    t0 = time.time()
    p = run_job(cmd, job_env(), timeout)
    job_seconds = time.time() - t0
    (run_dir / "job.log").write_text(f"$ {' '.join(cmd)}\n--- stdout\n{p.stdout}\n--- stderr\n{p.stderr}")
    if p.returncode != 0:
        raise BenchError(f"{method}-{world} failed (exit {p.returncode}); the last lines:\n{p.stderr[-3000:]}")
    rf = read_run_file(run_dir / "pretrain.h5")
    probes = sorted((json.loads(f.read_text()) for f in probe_dir.glob("rank*.json")), key=lambda r: r["rank"])
    if len(probes) != world:
        raise BenchError(f"{method}-{world}: {len(probes)} of {world} ranks recorded their memory")
    steps, wall, bpe = int(rf.progress["step"]), float(rf.progress["wall_time"]), int(rf.progress["batches_per_epoch"])
    cuts, shapes = setting.boundaries(method, world)
    numels = None if shapes is None else [math.prod(s) for s in shapes]
    cut_idx = None if cuts is None else [[n for n, _ in pipeline_blocks(setting.model)].index(c) for c in cuts]
    an = analytic(setting, method, world, steps, [int(m["step"]) for m in rf.metrics], numels, cut_idx, K)
    mb = an["mb"]
    if bpe != mb.steps_per_epoch:
        raise BenchError(f"{method}-{world}: the run had {bpe} steps per epoch, the accounting says {mb.steps_per_epoch}")
    epochs = Fraction(steps, bpe)
    payload_rank = [sum(row_bytes(r) for r in rf.comm if int(r["rank"]) == q) for q in range(world)]
    measured = comm_link_bytes(rf.comm, world)
    seconds = [sum(float(r["seconds"]) for r in rf.comm if int(r["rank"]) == q) for q in range(world)]
    timed = any(s > 0 for s in seconds) or measured == 0
    images = steps * setting.batch * (1 if method == "gpipe" else world)
    at_boundaries = comm_link_bytes(rf.comm, world, ("assemble",))
    cuda = [p["cuda_max_allocated_bytes"] for p in probes]
    return {
        "method": method, "S": world, "steps": steps, "epochs": exact(epochs), "steps_per_epoch": bpe,
        "syncs": an["syncs"], "steps_per_sync": mb.steps_per_sync, "evaluations": len(rf.metrics),
        "images_per_epoch": mb.samples_per_epoch, "carry_momentum": an["carry_momentum"],
        "pipeline_cuts": cuts, "boundary_shapes": shapes,
        "fair_run_measured": measured, "fair_run_analytic": an["fair_run"], "fair_run_difference": measured - an["fair_run"],
        "payload_per_rank_measured": payload_rank, "payload_per_rank_analytic": an["payload_per_rank"],
        "per_rank_equal": payload_rank == an["payload_per_rank"],
        "eval_bytes_analytic": an["eval_bytes"], "assemble_link_measured": at_boundaries,
        "exchange": exchange(method) if base_method(method) == "loft" else None, "local_steps": an["mb"].steps_per_sync,
        "fair_per_epoch_measured": exact(measured / epochs), "fair_per_epoch_analytic": exact(an["fair_run"] / epochs),
        "fair_per_epoch_difference": exact((measured - an["fair_run"]) / epochs),
        "fair_per_sync_analytic": exact(an["fair_per_sync"]),
        "fair_per_epoch_steady_analytic": exact(an["fair_per_sync"] * mb.syncs_per_epoch),
        "paper_run_analytic": an["paper_run"], "paper_per_epoch_analytic": exact(an["paper_run"] / epochs),
        "paper_per_sync_analytic": mb.paper_per_sync, "paper_per_epoch_steady_analytic": exact(mb.paper_per_epoch),
        "wall_seconds": wall, "wall_per_epoch": wall / float(epochs), "job_seconds": job_seconds,
        "images_per_second_per_rank": images / wall / world if wall > 0 else None,
        "comm_seconds_per_rank": seconds, "comm_timed": timed,
        "comm_share": (sum(seconds) / world / wall) if timed and wall > 0 else None,
        "peak_rss_bytes_per_rank": [p["maxrss_bytes"] for p in probes],
        "peak_rss_bytes_max": max(p["maxrss_bytes"] for p in probes),
        "cuda_max_allocated_bytes_per_rank": cuda if any(c is not None for c in cuda) else None,
        "test_acc": rf.metrics[-1]["test_acc"] if rf.metrics else None,
        "run_dir": str(run_dir),
    }


# ----------------------------------------------------------------------------------- LoFT's sub-network
def subnetwork_step(setting: Setting, world: int, reps: int, blocks: int = 3) -> dict:
    """One rank's LoFT sub-network (round 0's partition) against the full network on one core:
    seconds per training step (alternating blocks of ``reps`` steps, the fastest block of each),
    FLOPs and parameters."""
    import copy

    import torch

    from loft_hpc.bench.subnet import compare_steps
    from loft_hpc.partition.plan import PartitionPlan
    from loft_hpc.partition.slicing import TensorSlicer, subnetwork

    model = copy.deepcopy(setting.model)
    part = [g for g in setting.groups if g.partitioned]
    plan = PartitionPlan.draw(setting.cfg.train.seed, 0, part, world)
    sub = subnetwork(model, TensorSlicer(part), plan.keep(0))
    b = setting.batch
    x = torch.stack([setting.bundle.train[i][0] for i in range(b)])
    y = torch.tensor([int(setting.bundle.train[i][1]) for i in range(b)])
    out = compare_steps(model, sub, x, y, reps, blocks)
    p_full = sum(p.numel() for p in model.parameters())
    p_sub = sum(p.numel() for p in sub.parameters())
    return {"S": world, **out, "params_ratio": p_sub / p_full}


# ----------------------------------------------------------------------------------- tables
def fmt_bytes(v: int | float) -> str:
    return f"{v:,}" if isinstance(v, int) else f"{v:,.1f}"


def fmt_mib(b: int | None) -> str:
    return "-" if b is None else f"{b / 2**20:,.0f}"


def headline(runs: list[dict]) -> list[dict]:
    """LoFT-S (each exchange) against GPipe-S, bytes per epoch, for every S with both runs: fair
    (measured), and the paper's convention, which does not depend on the exchange (one row)."""
    out = []
    by = {(r["method"], r["S"]): r for r in runs}
    for s in sorted({r["S"] for r in runs}):
        gp = by.get(("gpipe", s))
        lofts = [by[(lm, s)] for lm in ("loft", "loft-alltoall") if (lm, s) in by]
        if gp is None or not lofts:
            continue
        rows = [(lo, "fair (measured)", "fair_per_epoch_measured") for lo in lofts]
        rows.append((lofts[0], "paper (analytic)", "paper_per_epoch_analytic"))
        for lo, conv, key in rows:
            ratio = gp[key] / lo[key] if lo[key] else None
            out.append({"S": s, "loft_method": lo["method"], "exchange": lo["exchange"], "convention": conv,
                        "gpipe": gp[key], "loft": lo[key], "gpipe_over_loft": ratio, "paper": PAPER_IMPROVEMENT.get(s)})
    return out


def markdown(res: dict) -> str:
    from loft_hpc.bench.machine import one_line

    L = [f"# LoFT, dense and GPipe pretraining side by side ({res['machine']['date']})", "",
         f"Machine: {one_line(res['machine'])}. Load average after the jobs: "
         f"{' '.join(f'{x:.2f}' for x in res['load_average_after']) if res['load_average_after'] else '-'}.", "",
         f"Setting: {res['setting']}.", f"Config: {res['config']} with {' '.join(res['overrides'])}.", ""]
    L += ["| method | S | epochs | images per epoch | fair bytes/epoch, measured | fair, analytic | measured - analytic "
          "| of which at evaluation and files | paper-convention bytes/epoch | images/s per rank | wall s/epoch "
          "| comm share | peak RSS per rank, MiB (max) | CUDA peak per rank, MiB (max) |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        share = f"{r['comm_share']:.1%}" if r["comm_share"] is not None else "not timed"
        cuda = max(r["cuda_max_allocated_bytes_per_rank"]) if r["cuda_max_allocated_bytes_per_rank"] else None
        ips = r["images_per_second_per_rank"]
        L.append(f"| {r['method']} | {r['S']} | {r['epochs']} | {r['images_per_epoch']:,} | "
                 f"{fmt_bytes(r['fair_per_epoch_measured'])} | {fmt_bytes(r['fair_per_epoch_analytic'])} | "
                 f"{fmt_bytes(r['fair_per_epoch_difference'])} | "
                 f"{fmt_bytes(exact(Fraction(r['eval_bytes_analytic']) / Fraction(r['epochs'])))} | "
                 f"{fmt_bytes(r['paper_per_epoch_analytic'])} | "
                 f"{'-' if ips is None else f'{ips:,.1f}'} | {r['wall_per_epoch']:,.2f} | {share} | "
                 f"{fmt_mib(r['peak_rss_bytes_max'])} | {fmt_mib(cuda)} |")
    unequal = [f"{r['method']}-{r['S']}" for r in res["runs"] if not r["per_rank_equal"]]
    payload_check = "DIFFERENT for " + ", ".join(unequal) if unequal else "equal for every run"
    L += ["", "Bytes: fair = total over all links, both directions, each byte once on every link it crosses, "
          "collectives as their bandwidth-optimal ring algorithms (allgather and assembly: (S-1) x the inputs; "
          "allreduce of n floats: 2 (S-1) x 4 n bytes; point-to-point and alltoall: the bytes sent to other ranks). "
          "Measured: "
          "that rule applied to every /comm row of the job (what each rank handed to its collectives; every rank's "
          f"payload is checked against its analytic count: {payload_check}); analytic: "
          "loft_hpc/exchange/accounting.py for the same steps (loft-alltoall: from every round's deal), plus what "
          "the evaluation and the file needed: dense's BN averaging, the lean exchange's and GPipe's assembly of the "
          "whole model (weights for the evaluation, momentum for the file; LoFT with allgather holds the whole "
          "model: nothing); "
          "paper = the paper's convention (LoFT: a parameter server hands each worker its sub-network "
          "of parameters, one direction; GPipe: activations forward + gradients backward at the S-1 cuts, once each; "
          "dense: each worker handed the averaged gradient; the same for both LoFT exchanges). loft-alltoall = LoFT "
          "with train.exchange=alltoall (the lean exchange). Each method's own epoch: LoFT = every worker one pass over "
          "the training set (S passes in total; K local steps between syncs), dense = one pass in total, GPipe = one "
          "pass of the global batches through the pipeline.",
          "Images/s per rank = training images processed by the whole job / training wall time / S. Wall time: the "
          "training loop (/progress wall_time), without the final evaluation and file. Comm share: the ranks' mean "
          "time inside counted collectives (GPipe: waiting on its point-to-point transfers) / wall, waiting for other "
          "ranks included (GPipe: the pipeline's fill and drain bubbles). Peak RSS: each rank process's kernel high-water mark of resident memory (getrusage ru_maxrss, "
          "recorded inside the rank), the largest rank; every rank in results.json.", ""]
    gp = [r for r in res["runs"] if r["method"] == "gpipe"]
    for r in gp:
        L.append(f"GPipe-{r['S']}: stages begin at {', '.join(r['pipeline_cuts'])}; activation per sample at the cuts "
                 f"{', '.join('x'.join(map(str, s)) for s in r['boundary_shapes'])}.")
    if gp:
        L.append("")
    if res["headline"]:
        L += ["## Headline: LoFT-S against GPipe-S, bytes per epoch", "",
              "| S | LoFT exchange | convention | GPipe-S | LoFT-S | GPipe / LoFT | paper (PreResNet-34 CIFAR-10, paper "
              "convention) |", "|---|---|---|---|---|---|---|"]
        for h in res["headline"]:
            ratio = "-" if h["gpipe_over_loft"] is None else f"{h['gpipe_over_loft']:.2f}x"
            paper = "-" if h["paper"] is None else f"{h['paper']:.2f}x"
            ex = "either" if h["convention"].startswith("paper") else h["exchange"]
            L.append(f"| {h['S']} | {ex} | {h['convention']} | {fmt_bytes(h['gpipe'])} | {fmt_bytes(h['loft'])} | "
                     f"{ratio} | {paper} |")
        bk = res["batch"] * res["local_steps"]
        L += ["", "Reading it: per epoch GPipe moves 2 x 4 B sum_c n_c per step (n/B steps) and LoFT 4 (P + S Sh) per sync "
              "(n/(B K) syncs) in the paper's convention, 4 (S-1) (P' + 2 Sh') in the fair one (P', Sh': the floats the "
              "exchange moves, BN statistics included, and momentum with momentum_mode carry), so GPipe / LoFT = "
              "2 B K sum_c n_c / (P + S Sh) (paper) and 2 B K sum_c n_c / ((S-1) (P' + 2 Sh')) (fair): independent of "
              "the data set's size and the epochs, proportional to B K and, at a fixed depth, to 1 / width (activations "
              f"grow with the width, parameters with its square). Here B K = {res['batch']} x {res['local_steps']} = "
              f"{bk}; the paper's table implies B K = 128 x 15.6 = 2000 (500 syncs for 20 epochs of 390 batches) at "
              "width 64. The lean exchange (loft-alltoall) sends each slice only to the rank that trains it next: over "
              "the links about 4 ((S-1)/S P' + 2 (S-1) Sh') per sync (exactly: from the two rounds' deals) instead of "
              "4 (S-1) (P' + 2 Sh'), plus the assembly of the whole model at each evaluation and for the file.", ""]
    if res["subnetwork"]:
        L += ["## LoFT: one rank's sub-network step against the full network (one core)", "",
              "| S | full step, ms | sub-network step, ms | speed-up (full / sub) | FLOPs ratio (full / sub) "
              "| params (sub / full) |", "|---|---|---|---|---|---|"]
        for s in res["subnetwork"]:
            L.append(f"| {s['S']} | {s['full_step_ms']:.1f} | {s['sub_step_ms']:.1f} | {s['speedup']:.3f} | "
                     f"{s['flops_ratio']:.3f} | {s['params_ratio']:.3f} |")
        L.append("")
    if res.get("memory"):
        L += ["## LoFT's memory per rank: allgather against alltoall (the lean exchange)", "",
              "| S | exchange | tensors while training, MiB: rank 0 / others (max) | RSS while training, MiB: rank 0 "
              "/ others (max) | peak RSS, MiB (max rank) | exchange bytes per sync, over all links | assembly bytes, run |",
              "|---|---|---|---|---|---|---|"]

        def split(v: list) -> str:  # rank 0 also keeps theta_0 for the files
            return fmt_mib(v[0]) + ("" if len(v) == 1 else f" / {fmt_mib(max(v[1:]))}")

        for m in res["memory"]:
            L.append(f"| {m['S']} | {m['exchange']} | {split(m['train_tensor_bytes_per_rank'])} | "
                     f"{split(m['train_rss_bytes_per_rank'])} | {fmt_mib(max(m['peak_rss_bytes_per_rank']))} | "
                     f"{fmt_bytes(exact(Fraction(m['exchange_link_bytes_per_sync']).limit_denominator(1)))} | "
                     f"{fmt_bytes(m['assemble_link_bytes'])} |")
        L += ["", "Tensors: every distinct tensor storage alive in the rank at the start of the second round's second "
              "step (the garbage collector's view: parameters, buffers, momentum, home slices, data). RSS while "
              "training: the largest resident set at the start of a step from the second round on (large blocks "
              "mmapped, MALLOC_MMAP_THRESHOLD_=65536, so freed memory leaves it). Peak RSS includes start-up and the "
              "final file, where both exchanges hold the full model. Rank 0 also keeps theta_0 for the files' /init. "
              "The model: "
              f"{res['memory'][0]['params']:,} floats.", ""]
    if res.get("share"):
        L += ["## LoFT: the exchange's share of wall time at K = " + " and ".join(str(k) for k in res["share_k"]), "",
              "| S | K | exchange | syncs | fair bytes/epoch, measured | measured - analytic | exchange s per sync "
              "(rank mean; alltoall: with the final assembly) | wall s/epoch | comm share |", "|---|---|---|---|---|---|---|---|---|"]
        for r in res["share"]:
            share = f"{r['comm_share']:.1%}" if r["comm_share"] is not None else "not timed"
            per_sync = sum(r["comm_seconds_per_rank"]) / r["S"] / r["syncs"] if r["syncs"] else 0.0
            L.append(f"| {r['S']} | {r['local_steps']} | {r['exchange']} | {r['syncs']} | "
                     f"{fmt_bytes(r['fair_per_epoch_measured'])} | {fmt_bytes(r['fair_per_epoch_difference'])} | "
                     f"{per_sync:.3f} | {r['wall_per_epoch']:,.2f} | {share} |")
        L += ["", "The same setting as the first table, one epoch per job, LoFT with K local steps between syncs. Comm "
              "share: the ranks' mean time inside the exchange's collectives (allgather or alltoall, the allreduce of "
              "the shared tensors, and for alltoall the assembly for the final evaluation and file, which runs after "
              "the loop's clock stops) / the training wall time, waiting for the slowest rank included.", ""]
    cores = res["machine"]["cores"] or 1
    if any(r["S"] > cores for r in res["runs"]):
        L += [f"On this {cores}-core machine jobs with more than {cores} ranks are oversubscribed: their images/s per "
              "rank, wall times and comm shares (which then include waiting for descheduled ranks) reflect that.", ""]
    return "\n".join(L)


# ----------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None):
    ap = argparse.ArgumentParser(prog="tools/bench.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="base config (default: the package's default.yaml)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="an extra config override for every job (repeatable)")
    ap.add_argument("--tiny", action="store_true", help="the tiny setting of the tests instead of the CIFAR-shaped one")
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--epochs", type=int, default=1, help="epochs per job (each method's own epoch)")
    ap.add_argument("--local-steps", type=int, default=4, help="LoFT's K")
    ap.add_argument("--microbatches", type=int, default=4, help="GPipe's micro-batches per global batch")
    ap.add_argument("--balance", default="flops", choices=("flops", "params"), help="GPipe's stage balance")
    ap.add_argument("--share-k", type=int, nargs="*", default=list(SHARE_K),
                    help="LoFT's K for the exchange-share table (both exchanges at every --ranks; none: skip)")
    ap.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                    help="also LoFT's memory, allgather against alltoall, at S = 1 and every --ranks (full-width "
                         "CIFAR PreResNet-34; --tiny: the tiny model)")
    ap.add_argument("--reps", type=int, default=5, help="timed steps per block for the sub-network step (0: skip)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds before a job is killed")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="folder for results.md, results.json and the run files")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BenchError as e:  # a job that failed: one line, its log's tail, exit 1
        print(f"bench: error: {e}", file=sys.stderr, flush=True)
        return 1


def memory_one(config: str, overrides: list[str], world: int, exchange: str, out: Path, timeout: float) -> dict:
    """One LoFT job for the memory table: each rank's memory while it trains (the probe's
    sampler), its peak, and the bytes the exchange moved."""
    from loft_hpc.checkpoint.h5file import read_run_file
    from loft_hpc.exchange.accounting import comm_link_bytes

    run_dir = out / "memory" / f"loft-{world}-{exchange}"
    shutil.rmtree(run_dir, ignore_errors=True)
    probe_dir = run_dir / "probe"
    cmd = [str(MPIRUN), "-np", str(world), sys.executable, "-m", "loft_hpc.bench.probe", str(probe_dir), "loft_hpc.run",
           "--config", config, "--stage", "pretrain", *COMMON, *overrides, *MEMORY_RUN, f"train.exchange={exchange}",
           f"output.dir={run_dir}"]
    env = job_env()
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"  # large blocks mmapped: freed memory leaves the resident set
    p = run_job(cmd, env, timeout)
    (run_dir / "job.log").write_text(f"$ {' '.join(cmd)}\n--- stdout\n{p.stdout}\n--- stderr\n{p.stderr}")
    if p.returncode != 0:
        raise BenchError(f"memory loft-{world} {exchange} failed (exit {p.returncode}); the last lines:\n{p.stderr[-3000:]}")
    probes = sorted((json.loads(f.read_text()) for f in probe_dir.glob("rank*.json")), key=lambda r: r["rank"])
    rf = read_run_file(run_dir / "pretrain.h5")
    syncs = len({int(r["round"]) for r in rf.comm if int(r["round"]) > 0})
    kinds = {k: sum(int(r.get(f"{k}_sent", 0)) + int(r.get(f"{k}_received", 0)) for r in rf.comm)
             for k in ("allgather", "alltoall", "allreduce", "assemble")}
    return {"S": world, "exchange": exchange, "syncs": syncs,
            "train_tensor_bytes_per_rank": [r["train_tensor_bytes"] for r in probes],
            "train_rss_bytes_per_rank": [r["train_rss_max_bytes"] for r in probes],
            "peak_rss_bytes_per_rank": [r["maxrss_bytes"] for r in probes],
            "payload_bytes": kinds,
            "exchange_link_bytes_per_sync": comm_link_bytes(rf.comm, world, ("allgather", "alltoall", "allreduce")) / max(syncs, 1),
            "assemble_link_bytes": comm_link_bytes(rf.comm, world, ("assemble",)),
            "params": sum(t.numel() for t in rf.model.values() if t.is_floating_point())}


def _main(argv: list[str] | None) -> int:
    a = parse_args(argv)
    from loft_hpc.bench.machine import describe, load_average
    from loft_hpc.run import default_config_path

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = describe()
    config = a.config or default_config_path()
    setting = Setting(config, [*(TINY if a.tiny else CIFAR_SHAPED), *a.sets], a.epochs, a.local_steps,
                      a.microbatches, a.balance)
    methods = list(a.methods)
    if "gpipe" in methods and min(a.ranks) < 2:
        raise BenchError(f"--ranks {min(a.ranks)}: GPipe needs at least 2 ranks (one pipeline stage each); "
                         f"leave gpipe out of --methods or use --ranks 2 4")
    if "gpipe" in methods and setting.batch % setting.microbatches:
        raise BenchError(f"--microbatches {setting.microbatches}: the batch {setting.batch} is not a multiple of it")
    print(f"bench: {setting.describe()}", flush=True)
    runs = []
    for s in a.ranks:
        for m in methods:
            print(f"bench: {m}-{s} ...", end=" ", flush=True)
            r = run_one(setting, m, s, out, a.timeout)
            runs.append(r)
            print(f"{r['job_seconds']:.0f} s; fair bytes/epoch measured {fmt_bytes(r['fair_per_epoch_measured'])}, "
                  f"analytic {fmt_bytes(r['fair_per_epoch_analytic'])}", flush=True)
    share = []
    if "loft" in methods and a.share_k:  # the exchange's share of wall time at other K, both exchanges
        for s in (s for s in a.ranks if s > 1):
            for k in a.share_k:
                for m in ("loft", "loft-alltoall"):
                    print(f"bench: exchange share, {m}-{s} K = {k} ...", end=" ", flush=True)
                    r = run_one(setting, m, s, out, a.timeout, local_steps=k)
                    share.append(r)
                    print(f"{r['job_seconds']:.0f} s; comm share "
                          f"{'not timed' if r['comm_share'] is None else format(r['comm_share'], '.1%')}", flush=True)
    memory = []
    if a.memory:
        mem_over = [*(MEMORY_TINY if a.tiny else MEMORY_MODEL), *a.sets]
        for s in sorted({1, *a.ranks}):
            for ex in ("allgather", "alltoall"):
                print(f"bench: memory, LoFT-{s} {ex} ...", end=" ", flush=True)
                m = memory_one(config, mem_over, s, ex, out, a.timeout)
                memory.append(m)
                print(f"tensors {max(m['train_tensor_bytes_per_rank']) / 2**20:,.0f} MiB per rank", flush=True)
    after = load_average()
    sub = []
    if "loft" in methods and a.reps > 0:
        for s in a.ranks:
            if s > 1:
                print(f"bench: LoFT-{s} sub-network step on one core ...", flush=True)
                sub.append(subnetwork_step(setting, s, a.reps))
    res = {"machine": machine, "load_average_after": after, "setting": setting.describe(), "config": config,
           "overrides": setting.overrides, "batch": setting.batch,
           "local_steps": setting.local_steps, "microbatches": setting.microbatches,
           "runs": runs, "headline": headline(runs), "subnetwork": sub, "memory": memory,
           "share_k": list(a.share_k), "share": share}
    md = markdown(res)
    (out / "results.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / "results.md").write_text(md + "\n")
    print()
    print(md)
    print(f"bench: wrote {out / 'results.md'} and {out / 'results.json'}")
    return 0
