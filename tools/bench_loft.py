#!/usr/bin/env python
"""Benchmark LoFT side by side in one run: S = 1, 2, 4 ranks (and the dense baseline).

For each model: images/s per rank, bytes per sync (measured from the /comm log and analytic),
the share of wall time spent inside the exchange collectives, and, on one core, the local-step
time of a rank's sub-network against the full network as a ratio, next to their FLOPs ratio.

    python tools/bench_loft.py [--steps 60] [--ranks 1 2 4] [--out bench_out]

Everything runs on this machine under real mpirun; figures are ratios measured in the same
run, so they compare fairly even on a loaded or oversubscribed machine (which it says).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from loft_hpc.checkpoint.h5file import read_run_file  # noqa: E402
from loft_hpc.config import load_config  # noqa: E402
from loft_hpc.data import build_datasets  # noqa: E402
from loft_hpc.exchange.accounting import dense_step_bytes, loft_sync_bytes  # noqa: E402
from loft_hpc.partition.plan import PartitionPlan  # noqa: E402
from loft_hpc.partition.slicing import TensorSlicer, subnetwork  # noqa: E402
from loft_hpc.stages.common import make_model  # noqa: E402

MODELS = {
    "default (digits, PreResNet-18 w16 x2, 16px)": [],
    "CIFAR-shaped PreResNet-34 w16 x2 (32px, 10 classes)": [
        "data.name=synthetic", "data.image_size=32", "data.synthetic_classes=10", "data.synthetic_train_size=2048",
        "data.synthetic_test_size=256", "model.arch=preresnet34", "model.width=16", "model.inner_width_factor=2"],
}
COMMON = ["train.bn_recalibration=0", "train.progress=false", "train.log_every=100000", "output.snapshot_weights=[]",
          "output.snapshot_every=100000it", "output.checkpoint_every=100000it"]


def run(np_: int, args: list[str], out: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    cmd = [sys.executable, "-m", "loft_hpc.run", "--stage", "pretrain", *args, f"output.dir={out}"]
    if np_ > 1:
        cmd = [str(REPO / "scripts" / "mpirun.sh"), "-np", str(np_), *cmd]
    t0 = time.time()
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"benchmark run failed ({' '.join(cmd)}):\n{p.stderr[-3000:]}")
    rf = read_run_file(out / "pretrain.h5")
    rows = [r for r in rf.comm if r["round"] >= 1]
    steps = rf.progress["step"]
    wall = rf.progress["wall_time"]
    comm_s = {}
    for r in rows:
        comm_s[r["rank"]] = comm_s.get(r["rank"], 0.0) + r["seconds"]
    rounds = max((r["round"] for r in rows), default=0)
    by_rank = {}
    for r in rows:
        by_rank.setdefault(r["rank"], []).append(r["allgather_sent"] + r["allgather_received"] + r["allreduce_sent"] + r["allreduce_received"])
    rank0 = sorted(by_rank.get(0, [0]))
    return {"ranks": np_, "steps": steps, "wall": wall, "job_seconds": time.time() - t0, "rounds": rounds,
            "exchange_share": (sum(comm_s.values()) / len(comm_s) / wall) if comm_s else 0.0,
            # the median sync: dense steps at evaluation points also average BN statistics
            "bytes_per_sync_rank0": rank0[len(rank0) // 2],
            "test_acc": rf.metrics[-1]["test_acc"] if rf.metrics else float("nan")}


def flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of conv and linear layers in one forward pass."""
    total = [0]

    def hook(m, inp, out):
        if isinstance(m, torch.nn.Conv2d):
            total[0] += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        elif isinstance(m, torch.nn.Linear):
            total[0] += out.numel() * m.in_features

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        model(x)
    for h in hs:
        h.remove()
    return total[0]


def _train_steps(model, opt, x, y, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        opt.zero_grad(); F.cross_entropy(model(x), y).backward(); opt.step()
    return (time.perf_counter() - t0) / n


def step_times(full: torch.nn.Module, sub: torch.nn.Module, x, y, reps: int, blocks: int = 5) -> tuple[float, float]:
    """Seconds per training step of both networks: alternating blocks of ``reps`` steps, the
    fastest block of each (robust against other load on the machine)."""
    opts = [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for m in (full, sub)]
    for m, o in zip((full, sub), opts):
        m.train()
        _train_steps(m, o, x, y, 3)  # warm-up
    best = [float("inf"), float("inf")]
    for _ in range(blocks):
        for i, (m, o) in enumerate(zip((full, sub), opts)):
            best[i] = min(best[i], _train_steps(m, o, x, y, reps))
    return best[0], best[1]


def local_step_ratio(cfg, world: int, reps: int) -> dict:
    torch.set_num_threads(1)
    bundle = build_datasets(cfg.data)
    model = make_model(cfg, bundle)
    groups = [g for g in model.filter_groups() if g.partitioned]
    plan = PartitionPlan.draw(cfg.train.seed, 0, groups, world)
    sub = subnetwork(model, TensorSlicer(groups), plan.keep(0))
    b = cfg.data.batch_size
    x = torch.stack([bundle.train[i][0] for i in range(b)])
    y = torch.tensor([bundle.train[i][1] for i in range(b)])
    t_full, t_sub = step_times(model, sub, x, y, reps)
    f_full, f_sub = flops(model, x[:1]), flops(sub, x[:1])
    p_full = sum(p.numel() for p in model.parameters())
    p_sub = sum(p.numel() for p in sub.parameters())
    return {"time_ratio": t_sub / t_full, "flops_ratio": f_sub / f_full, "params_ratio": p_sub / p_full,
            "full_step_ms": 1e3 * t_full}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60, help="local steps per rank in each run")
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--local-steps", type=int, default=5, help="K")
    ap.add_argument("--reps", type=int, default=10, help="timed steps for the one-core step-time ratio")
    ap.add_argument("--out", default="bench_out", help="folder for results.json and results.md")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    lines = [f"# LoFT benchmark ({time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores; "
             f"{args.steps} local steps per rank, K={args.local_steps})", ""]
    for name, extra in MODELS.items():
        base = ["--config", "configs/default.yaml", *COMMON, *extra, f"train.duration={args.steps}it",
                f"train.local_steps={args.local_steps}", f"train.eval_every={args.steps}it"]
        cfg = load_config(REPO / "configs/default.yaml", [*COMMON, *extra])
        model = make_model(cfg, build_datasets(cfg.data))
        groups = model.filter_groups()
        lines += [f"## {name}", "",
                  "| method | S | images/s per rank | bytes per sync, rank 0 (measured) | analytic | exchange share of wall | "
                  "sub/full step time (1 core) | sub/full FLOPs | sub/full params |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for S in args.ranks:
            for method in ("loft", "dense"):
                if method == "dense" and S == 1:
                    continue
                with tempfile.TemporaryDirectory() as tmp:
                    r = run(S, [*base, f"train.method={method}"], Path(tmp))
                r.update(model=name, method=method)
                ips = r["steps"] * cfg.data.batch_size / r["wall"]
                if method == "loft":
                    analytic = loft_sync_bytes(model, groups, S, 0, carry_momentum=cfg.train.momentum_mode == "carry")
                    loc = local_step_ratio(cfg, S, args.reps)
                else:
                    analytic = dense_step_bytes(model)
                    loc = {}
                a = sum(analytic.values())
                r.update(images_per_s_per_rank=ips, analytic_bytes_per_sync=a, **loc)
                results.append(r)
                lines.append(f"| {method} | {S} | {ips:,.1f} | {r['bytes_per_sync_rank0']:,.0f} | {a:,} | "
                             f"{r['exchange_share']:.1%} | {loc.get('time_ratio', float('nan')):.3f} | "
                             f"{loc.get('flops_ratio', float('nan')):.3f} | {loc.get('params_ratio', float('nan')):.3f} |")
                print(lines[-1], flush=True)
        lines.append("")
    lines += ["bytes per sync: payload sent + received by rank 0 in the median exchange (LoFT: every K steps, "
              "weights + momentum with momentum_mode=carry; dense: gradients every step). One rank sends nothing.",
              f"On a {os.cpu_count()}-core machine S > {os.cpu_count()} ranks are oversubscribed: images/s per rank and "
              "the exchange share (which then includes waiting for descheduled ranks) reflect that."]
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
