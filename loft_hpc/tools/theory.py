"""``loft-tools theory``: a numerical check of the LoFT poster's Theorem 1 (LOFT_SPEC section 7).

Theorem 1 bounds the expected squared distance between the first-layer weights that LoFT and
full-batch gradient descent reach on a one-hidden-layer CNN by
``O(n^2 sqrt(d) / (lambda_0^2 kappa m^(1/4) sqrt(delta))) + 2 eta^2 T theta^2 (1 - xi) lambda_0 / S``:
a term that shrinks as the width m grows, plus one that does not depend on m. This command trains
both on a small synthetic regression task for several widths and fits the slope of the distance
against m on a log-log scale.

Model (the setting of the NTK-style analyses):
  f(W, x) = (1 / sqrt(m)) * sum_r a_r * (1/P) sum_p relu(<w_r, x_p>)
  - input: a 6x6 single-channel image cut into P = 4 non-overlapping 3x3 patches (stride 3), each
    patch scaled to unit L2 norm, so d = 9; the patches' responses are *averaged*;
  - m filters w_r in R^d, the only trained weights, drawn N(0, kappa^2 I) (``--init-scale``);
  - second layer fixed, signs a_r = +-1 (``--init``):
      paired (default)  filters come in pairs (w, a = +1), (w, a = -1) that start equal, the
                        symmetric initialisation of the lazy-training analyses: the network's
                        output at initialisation is exactly 0; LoFT's partition deals whole pairs
                        (a random partition of the m/2 pairs), so every sub-network's is 0 too;
      gaussian          m independent filters and independent random signs; the partition deals
                        single filters;
  - objective 1/2 * sum_i (f(W, x_i) - y_i)^2 over n samples (``--samples``); the targets come
    from a random teacher of the same form (8 filters, signs balanced), scaled to unit RMS.
The data depend on the seed only; the initialisation and the partitions on the seed and the width.

Gradient descent: T (``--steps``) full-batch steps of size eta (``--lr``).

LoFT over S workers (``--workers``): T / K rounds (``--local-steps`` K); every round a fresh random
permutation of the m filters (of the m/2 pairs with ``--init paired``) dealt round-robin to the S
workers (disjoint, sizes differ by at most one); worker s then takes K full-batch steps of size
eta on its sub-network alone, and the filters are put back from their owners. A worker's steps touch only its filters and its output depends
only on them, so the S workers are simulated together, exactly, in one vectorised update.
The sub-network's output (``--scaling``):
  unbiased (default)  f_s = S / sqrt(m) * sum_{r in worker s} a_r phi_r: for a random partition an
                      unbiased estimate of the full output (the 1/xi rescaling of the masked-neuron
                      analyses, Liao & Kyrillidis 2022, with xi = 1/S); the worker minimises
                      1/2 ||f_s - y||^2 / S, so a filter's step is gradient descent's formula with
                      the sub-network's residual f_s - y in place of the full network's f - y.
                      Without the 1/S the sub-network's tangent kernel is S times the full
                      network's: a worker would move like gradient descent with step S * eta.
  raw                 the same output, plain gradient of 1/2 ||f_s - y||^2 (step S times larger).
  none                no rescaling (as the paper's experiments, where BN follows): each worker fits
                      y with 1/S of the filters, and the reassembled network overshoots.
With S = 1 every choice is gradient descent, computed by the same code: the distance is exactly 0.

Distance: for one seed, the mean over the T/K rounds of ||W_LoFT(kK) - W_GD(kK)||_F^2 measured
after each round's reassembly (k = 1..T/K), W the m x d matrix of all first-layer filters (summed
over filters, not normalised); the CSV gives its mean and sample standard deviation over the
seeds 0..N-1 (``--seeds N``). The slope is the least-squares fit of log(distance) on log(m)
over the widths with a positive distance.

CSV (PREFIX.csv, one row per width, means over the seeds): ``m``; ``sq_distance_mean`` and
``sq_distance_std`` (the distance above); ``sq_distance_final`` (||W_LoFT(T) - W_GD(T)||_F^2);
``gd_movement_sq`` (||W_GD(T) - W(0)||_F^2, the scale to compare the distance with);
``gd_relative_movement`` (||W_GD(T) - W(0)||_F / ||W(0)||_F: well below 1 in the lazy regime the
theorem assumes); ``subnet_gap`` (mean over rounds, workers and samples of (f_s(x) - f(x))^2 at the
start of a round: how far a worker's sub-network output is from the full network's);
``gd_final_mse`` and ``loft_final_mse`` (mean over samples of (f(x) - y)^2 after T steps).
PREFIX.png: the distance against m on log-log axes with the fitted line and, for reference, the
m^(-1/4) rate of the theorem's first term drawn through the first point.

What comes out (the other settings at their defaults). With ``--init gaussian`` (kappa = 1) the
distance does not shrink with m (about 330 from m = 128 to 16384): at the start of each round a
sub-network's rescaled output differs from the full network's by O(kappa) whatever m is (the
``subnet_gap`` column), and these errors, drawn anew every round, make LoFT's weights random-walk
away from gradient descent's by an amount proportional to T * kappa^2 (checked: T = 100, 200, 400
and kappa = 1, 0.3) and 0 at S = 1 -- the shape of the theorem's m-independent second term. A
smaller kappa lowers that floor (kappa = 0.1: the curve falls, then flattens near 3.5, kappa^2
times the kappa = 1 level; kappa = 0.01: slope -0.67 over 16..4096) but leaves the lazy regime
at these widths: the filters end far from where they started (``gd_relative_movement`` 0.6 at
m = 4096 for kappa = 0.1, 7 for kappa = 0.01). The paired initialisation (default) removes the
floor at kappa = 1, inside the lazy regime (relative movement 0.06 at m = 4096), and the
width-dependent term shows: slope -0.73 over 16..4096, close to -1 (1/m) at the largest widths,
steeper than the bound's m^(-1/4) (an upper bound). ``--scaling raw`` also shrinks (slope -0.72)
but stays 2-4 times farther; ``--scaling none`` does not (LoFT's network then misfits the data).

Runs on one CPU thread in float64; the same arguments give the same CSV (on the same device).
"""
from __future__ import annotations

import argparse
import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loft_hpc.tools.reading import ToolError

IMAGE, FILTER = 6, 3                      # 6x6 images, 3x3 filters at stride 3: 4 patches, d = 9
TEACHER_FILTERS = 8
SCALINGS = ("unbiased", "raw", "none")
DEFAULT_WIDTHS = "16,32,64,128,256,512,1024,2048,4096"
INITS = ("paired", "gaussian")
COLUMNS = ("m", "sq_distance_mean", "sq_distance_std", "sq_distance_final", "gd_movement_sq",
           "gd_relative_movement", "subnet_gap", "gd_final_mse", "loft_final_mse")


@dataclass(frozen=True)
class Setting:
    samples: int
    workers: int
    local_steps: int
    steps: int
    lr: float
    init_scale: float
    init: str
    scaling: str
    seeds: int


# ----------------------------------------------------------------------------------- the model
def _generator(*key: int):
    """A CPU torch generator seeded from the tuple ``key`` (seed, width, purpose)."""
    import torch

    state = np.random.SeedSequence(list(key)).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def make_data(n: int, seed: int, device):
    """(X, y): X (n, P, d) unit-norm patches of random images, y (n,) a teacher's outputs."""
    import torch

    g = _generator(seed, 0, 0)
    images = torch.randn(n, 1, IMAGE, IMAGE, generator=g, dtype=torch.float64)
    X = torch.nn.functional.unfold(images, FILTER, stride=FILTER).transpose(1, 2)  # (n, P, d)
    X = X / X.norm(dim=2, keepdim=True)
    teacher = torch.randn(TEACHER_FILTERS, X.shape[2], generator=g, dtype=torch.float64)
    signs = torch.tensor([1.0, -1.0], dtype=torch.float64).repeat(TEACHER_FILTERS // 2)
    y = torch.relu(torch.einsum("npd,md->npm", X, teacher)).mean(1) @ signs
    y = y / y.pow(2).mean().sqrt()
    return X.to(device), y.to(device)


def gd_step(W, X, y, a, owner, S: int, out_scale: float, grad_scale: float, lr: float):
    """One full-batch step of every worker at once: filter r belongs to worker ``owner[r]``, whose
    output is ``out_scale / sqrt(m) * sum_{r in s} a_r phi_r`` and whose residual drives the
    filter's gradient, multiplied by ``grad_scale``. Gradient descent: one worker, both scales 1."""
    import torch

    m, P = W.shape[0], X.shape[1]
    pre = torch.einsum("npd,md->npm", X, W)
    phi = torch.relu(pre).mean(1)                                            # (n, m)
    out = ((phi * a) @ torch.nn.functional.one_hot(owner, S).to(W.dtype)) * (out_scale / math.sqrt(m))
    res = (out - y[:, None]).index_select(1, owner)                          # (n, m): its worker's
    weighted = (pre > 0).to(W.dtype) * res[:, None, :]                       # (n, P, m)
    grad = torch.einsum("npm,npd->md", weighted, X) * (a * (grad_scale / (P * math.sqrt(m))))[:, None]
    return W - lr * grad


def output(W, X, a):
    """The full network's output f(W, x_i), (n,)."""
    import torch

    return torch.relu(torch.einsum("npd,md->npm", X, W)).mean(1) @ a / math.sqrt(W.shape[0])


def subnet_gap(W, X, a, owner, S: int, out_scale: float) -> float:
    """Mean over workers and samples of (f_s(x) - f(x))^2 for the partition ``owner``."""
    import torch

    phi = torch.relu(torch.einsum("npd,md->npm", X, W)).mean(1) * a / math.sqrt(W.shape[0])
    sub = (phi @ torch.nn.functional.one_hot(owner, S).to(W.dtype)) * out_scale   # (n, S)
    full = sub.sum(1, keepdim=True) / out_scale   # sum of the partial sums: f itself
    return float((sub - full).pow(2).mean())


def deal(m: int, S: int, g, device):
    """A fresh random partition: a permutation of the m filters dealt round-robin to S workers."""
    import torch

    owner = torch.empty(m, dtype=torch.long)
    owner[torch.randperm(m, generator=g)] = torch.arange(m) % S
    return owner.to(device)


def compare(m: int, st: Setting, seed: int, device) -> dict:
    """Train gradient descent and LoFT from one initialisation; the distances and losses."""
    import torch

    X, y = make_data(st.samples, seed, device)
    g = _generator(seed, m, 1)
    paired = st.init == "paired"
    if paired:  # filter r and r + m/2 start equal with opposite signs
        half = st.init_scale * torch.randn(m // 2, X.shape[2], generator=g, dtype=torch.float64)
        W0 = torch.cat([half, half])
        a = torch.cat([torch.ones(m // 2), -torch.ones(m // 2)]).to(torch.float64)
    else:
        W0 = st.init_scale * torch.randn(m, X.shape[2], generator=g, dtype=torch.float64)
        a = (torch.randint(0, 2, (m,), generator=g) * 2 - 1).to(torch.float64)
    W0, a = W0.to(device), a.to(device)
    parts = _generator(seed, m, 2)
    S = st.workers
    out_scale = float(S) if st.scaling in ("unbiased", "raw") else 1.0
    grad_scale = out_scale / S if st.scaling == "unbiased" else out_scale
    single = torch.zeros(m, dtype=torch.long, device=device)
    w_gd, w_loft = W0.clone(), W0.clone()
    dists, gaps = [], []
    for _ in range(st.steps // st.local_steps):
        owner = torch.cat([deal(m // 2, S, parts, device)] * 2) if paired else deal(m, S, parts, device)
        gaps.append(subnet_gap(w_loft, X, a, owner, S, out_scale))
        for _ in range(st.local_steps):
            w_gd = gd_step(w_gd, X, y, a, single, 1, 1.0, 1.0, st.lr)
            w_loft = gd_step(w_loft, X, y, a, owner, S, out_scale, grad_scale, st.lr)
        dists.append(float((w_loft - w_gd).pow(2).sum()))
    return {"dist": float(np.mean(dists)), "final": dists[-1], "gap": float(np.mean(gaps)),
            "move": float((w_gd - W0).pow(2).sum()),
            "rel_move": float((w_gd - W0).norm() / W0.norm()),
            "gd_mse": float((output(w_gd, X, a) - y).pow(2).mean()),
            "loft_mse": float((output(w_loft, X, a) - y).pow(2).mean())}


def sweep(widths: list[int], st: Setting, device) -> list[dict]:
    """One CSV row per width: the seeds' mean (and the distance's sample std)."""
    rows = []
    for m in widths:
        runs = [compare(m, st, seed, device) for seed in range(st.seeds)]
        d = np.array([r["dist"] for r in runs])
        rows.append({"m": m, "sq_distance_mean": float(d.mean()),
                     "sq_distance_std": float(d.std(ddof=1)) if d.size > 1 else 0.0,
                     "sq_distance_final": float(np.mean([r["final"] for r in runs])),
                     "gd_movement_sq": float(np.mean([r["move"] for r in runs])),
                     "gd_relative_movement": float(np.mean([r["rel_move"] for r in runs])),
                     "subnet_gap": float(np.mean([r["gap"] for r in runs])),
                     "gd_final_mse": float(np.mean([r["gd_mse"] for r in runs])),
                     "loft_final_mse": float(np.mean([r["loft_mse"] for r in runs]))})
    return rows


def fit_slope(rows: list[dict]) -> tuple[float, float] | None:
    """(slope, intercept) of log(distance) against log(m) over the rows with a positive finite
    distance; None when fewer than two such widths."""
    pts = [(r["m"], r["sq_distance_mean"]) for r in rows
           if math.isfinite(r["sq_distance_mean"]) and r["sq_distance_mean"] > 0]
    if len(pts) < 2:
        return None
    slope, intercept = np.polyfit(np.log([p[0] for p in pts]), np.log([p[1] for p in pts]), 1)
    return float(slope), float(intercept)


# ----------------------------------------------------------------------------------- output
def describe(st: Setting, sep: str = ", ") -> str:
    d, P = FILTER * FILTER, (IMAGE // FILTER) ** 2
    return (f"n={st.samples}, d={d} ({P} patches), S={st.workers}, K={st.local_steps}, "
            f"eta={st.lr:g}, steps={st.steps}{sep}init={st.init}, kappa={st.init_scale:g}, "
            f"scaling={st.scaling}, seeds={st.seeds}")


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(COLUMNS)
        for r in rows:
            w.writerow([r["m"]] + [f"{r[c]:.12g}" for c in COLUMNS[1:]])


def plot(path: Path, rows: list[dict], fit, st: Setting) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    try:
        pts = [r for r in rows if math.isfinite(r["sq_distance_mean"]) and r["sq_distance_mean"] > 0]
        if pts:
            ms = np.array([r["m"] for r in pts], dtype=float)
            ax.errorbar(ms, [r["sq_distance_mean"] for r in pts], yerr=[r["sq_distance_std"] for r in pts],
                        fmt="o", capsize=3, label=f"LoFT vs GD, mean $\\pm$ std over {st.seeds} seed(s)")
            if fit is not None:
                slope, icpt = fit
                grid = np.geomspace(ms.min(), ms.max(), 50)
                ax.plot(grid, np.exp(icpt) * grid ** slope, "-", label=f"fit: slope {slope:.3f}")
                ax.plot(grid, pts[0]["sq_distance_mean"] * (grid / ms[0]) ** -0.25, ":", color="gray",
                        label="$m^{-1/4}$ (Theorem 1's first term)")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter
            ax.xaxis.set_major_locator(FixedLocator(ms))  # one label per width, no crowded minor labels
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "distance 0 at every width", ha="center", va="center", transform=ax.transAxes)
        slope_text = f"slope {fit[0]:.3f}" if fit is not None else "no slope"
        ax.set_title(f"Theorem 1 check, one-hidden-layer CNN: LoFT vs gradient descent ({slope_text})\n"
                     f"{describe(st, sep=chr(10))}", fontsize=8)
        ax.set_xlabel("width m (number of hidden filters)")
        ax.set_ylabel("mean over rounds of $\\|W_{LoFT} - W_{GD}\\|_F^2$ (weight units$^2$)")
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)


# ----------------------------------------------------------------------------------- command
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--widths", default=DEFAULT_WIDTHS, metavar="M,M,...",
                   help=f"hidden widths m, comma-separated (default {DEFAULT_WIDTHS})")
    p.add_argument("--workers", "-S", type=int, default=4, metavar="S", help="LoFT workers S (default 4)")
    p.add_argument("--local-steps", "-K", type=int, default=10, metavar="K",
                   help="local gradient steps per round K (default 10)")
    p.add_argument("--steps", type=int, default=200, metavar="T",
                   help="total gradient steps T of both methods, a multiple of K (default 200)")
    p.add_argument("--lr", type=float, default=1.0, metavar="ETA",
                   help="step size eta of both methods, on 1/2 sum of squared errors (default 1.0)")
    p.add_argument("--samples", "-n", type=int, default=16, metavar="N", help="training samples n (default 16)")
    p.add_argument("--seeds", type=int, default=3, metavar="N",
                   help="average over seeds 0..N-1 (data, initialisation, partitions; default 3)")
    p.add_argument("--init", choices=INITS, default="paired",
                   help="paired: equal filter pairs with opposite signs, output 0 at the start, the "
                        "partition deals pairs (default); gaussian: independent filters and signs")
    p.add_argument("--init-scale", type=float, default=1.0, metavar="KAPPA",
                   help="filters drawn N(0, KAPPA^2 I) (default 1)")
    p.add_argument("--scaling", choices=SCALINGS, default="unbiased",
                   help="sub-network output: unbiased (x S, loss / S; default), raw (x S), none")
    p.add_argument("--out", default="theory", metavar="PREFIX",
                   help="writes PREFIX.csv and PREFIX.png (default theory: in the current folder)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")


def parse_widths(text: str) -> list[int]:
    try:
        widths = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ToolError(f"--widths {text!r}: give positive integers separated by commas") from None
    if not widths or min(widths) < 1:
        raise ToolError(f"--widths {text!r}: give positive integers separated by commas")
    return sorted(set(widths))


def check_args(args) -> tuple[list[int], Setting]:
    widths = parse_widths(args.widths)
    for flag, v in (("--workers", args.workers), ("--local-steps", args.local_steps),
                    ("--steps", args.steps), ("--samples", args.samples), ("--seeds", args.seeds)):
        if v < 1:
            raise ToolError(f"{flag} {v}: must be at least 1")
    if args.steps % args.local_steps:
        raise ToolError(f"--steps {args.steps}: must be a multiple of --local-steps {args.local_steps}")
    if args.init == "paired":
        odd = [m for m in widths if m % 2]
        if odd:
            raise ToolError(f"--widths: width {odd[0]} is odd; --init paired needs even widths")
        if widths[0] // 2 < args.workers:
            raise ToolError(f"--widths: width {widths[0]} has fewer filter pairs than --workers "
                            f"{args.workers} (every worker needs a pair)")
    elif widths[0] < args.workers:
        raise ToolError(f"--widths: width {widths[0]} is smaller than --workers {args.workers} "
                        "(every worker needs a filter)")
    for flag, v in (("--lr", args.lr), ("--init-scale", args.init_scale)):
        if not (math.isfinite(v) and v > 0):
            raise ToolError(f"{flag} {v}: must be a positive number")
    return widths, Setting(samples=args.samples, workers=args.workers, local_steps=args.local_steps,
                           steps=args.steps, lr=args.lr, init_scale=args.init_scale, init=args.init,
                           scaling=args.scaling, seeds=args.seeds)


def output_paths(prefix: str) -> tuple[Path, Path]:
    """PREFIX.csv and PREFIX.png (a .csv or .png suffix on PREFIX is dropped); the folder must
    exist and be writable."""
    p = Path(prefix)
    if p.suffix.lower() in (".csv", ".png"):
        p = p.with_suffix("")
    if not p.name or p.name in (".", ".."):
        raise ToolError(f"--out {prefix!r}: give a file name prefix, e.g. results/theory")
    folder = p.parent
    if not folder.is_dir():
        raise ToolError(f"--out {prefix}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ToolError(f"--out {prefix}: folder {folder} is not writable")
    csv_path, png_path = p.with_name(p.name + ".csv"), p.with_name(p.name + ".png")
    for q in (csv_path, png_path):
        if q.is_dir():
            raise ToolError(f"--out {prefix}: {q} is a folder")
    return csv_path, png_path


def resolve_device(name: str):
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ToolError(f"--device {name!r}: not a torch device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ToolError(f"--device {name}: CUDA is not available here")
    if device.type not in ("cpu", "cuda"):
        raise ToolError(f"--device {name}: use cpu or cuda")
    return device


def run(args) -> int:
    widths, st = check_args(args)
    csv_path, png_path = output_paths(args.out)
    device = resolve_device(args.device)  # the first import of torch: bad arguments fail fast
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic reductions, and polite on a shared machine
    try:
        rows = sweep(widths, st, device)
    finally:
        torch.set_num_threads(threads)
    fit = fit_slope(rows)
    print(f"setting: {describe(st)}")
    print(f"{'m':>6}  {'mean sq dist':>12}  {'std':>10}  {'final':>10}  {'GD move':>10}  {'GD rel':>7}  "
          f"{'subnet gap':>10}  {'GD mse':>9}  {'LoFT mse':>9}")
    for r in rows:
        print(f"{r['m']:>6}  {r['sq_distance_mean']:>12.5g}  {r['sq_distance_std']:>10.4g}  "
              f"{r['sq_distance_final']:>10.4g}  {r['gd_movement_sq']:>10.4g}  {r['gd_relative_movement']:>7.3g}  "
              f"{r['subnet_gap']:>10.4g}  {r['gd_final_mse']:>9.3g}  {r['loft_final_mse']:>9.3g}")
    bad = [r["m"] for r in rows if not math.isfinite(r["sq_distance_mean"])]
    if bad:
        print(f"warning: training diverged at width(s) {', '.join(map(str, bad))}; lower --lr")
    try:
        write_csv(csv_path, rows)
        plot(png_path, rows, fit, st)
    except OSError as e:
        raise ToolError(f"--out {args.out}: cannot write ({e.strerror or e.__class__.__name__})") from None
    if fit is None:
        print("fitted slope: n/a (needs two widths with a positive distance)")
    else:
        print(f"fitted slope of log(distance) on log(m): {fit[0]:.4f}")
    print(f"wrote {csv_path} and {png_path}")
    return 0
