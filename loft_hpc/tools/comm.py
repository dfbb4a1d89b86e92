"""``loft-tools comm``: communication tables: bytes measured in runs (``/comm``), and the paper's
table reconstructed, in both counting conventions.

    loft-tools comm RUN.h5 [RUN2.h5 ...] [--per-round]
    loft-tools comm --paper

Runs. ``/comm`` holds one row per rank and round with the payload the collectives moved
(allgather of filter shards, allreduce of shared tensors or gradients, and GPipe's point-to-point
activations and gradients, ``p2p_*``; files written before the p2p columns existed read them as
0). For each file: payload sent, received and both per rank and over all ranks, the bytes over
all links (the fair convention: :func:`loft_hpc.exchange.accounting.comm_link_bytes`), the
number of rounds with traffic (round 0 = before the first step; kept out of the per-sync
averages), the average per sync, and a check of every row against the
analytic bytes of :mod:`loft_hpc.exchange.accounting` (LoFT: ``loft_sync_bytes`` per round;
dense: ``dense_step_bytes`` per step; GPipe: ``gpipe_rank_step_bytes`` per step, when the file's
pipeline can be rebuilt; the lean exchange: ``loft_alltoall_bytes`` from the two rounds' deals;
where the model was assembled for a boundary, the assembly too) and of the totals against the ``/metrics`` byte counters. With several
files a comparison table follows. ``--per-round``: one line per round. Every file is read (and
checked) before anything is printed.

Paper (``--paper``), both columns of the LoFT paper's communication table (LOFT_SPEC 6, 6a):
- GPipe: the spec's reconstruction, :func:`loft_hpc.exchange.accounting.gpipe_bytes`: epochs (20)
  x training samples x 2 (activation forward, gradient backward) x 4 bytes x the sum of the
  activation sizes at the S - 1 stage boundaries, for several choices of boundaries. "G" is taken
  as 10^9 bytes; the same bytes in GiB (2^30) are printed too, with both relative errors.
- LoFT: syncs x :func:`~loft_hpc.exchange.accounting.loft_paper_sync` = 4 (P + S Sh), P and Sh
  the partitioned and shared parameters of the paper's models (built here on the meta device at
  width 64 with the release's 2x inner width). The syncs each figure implies are printed; per
  data set they are fitted (the implied mean rounded to a multiple of 100: CIFAR 500, ImageNet
  6000) and every figure is compared with the fitted count, with the BN statistics counted too,
  and with the release's own schedule.
- The table in both conventions: the paper's (one direction) and the fair one (total over all
  links, both directions, each byte once per link crossed, collectives as ring algorithms:
  GPipe exactly the paper's figure, LoFT syncs x 4 (S-1) (P + 2 Sh)), with the improvement
  factor in each.
"""
from __future__ import annotations

from collections import defaultdict

from loft_hpc.exchange.accounting import comm_link_bytes
from loft_hpc.tools.reading import ToolError, build_model, load_run
from loft_hpc.train.ledger import COLUMNS as KEYS  # every payload column of /comm


def add_arguments(ap) -> None:
    ap.add_argument("runs", nargs="*", help="loft_hpc run files (pretrain.h5, retrain_*.h5, checkpoints)")
    ap.add_argument("--per-round", action="store_true", help="also one line per round")
    ap.add_argument("--paper", action="store_true", help="the paper's table with the GPipe reconstruction")


SENT = tuple(k for k in KEYS if k.endswith("_sent"))
RECEIVED = tuple(k for k in KEYS if k.endswith("_received"))


def row_bytes(r, keys=KEYS) -> int:
    """Sum of ``keys`` of one /comm row; a column the file lacks (p2p before GPipe) is 0."""
    return sum(int(r.get(k, 0)) for k in keys)
G = 10**9
GIB = 2**30

# ----------------------------------------------------------------------------------- paper table
EPOCHS = 20
SAMPLES = {"cifar": 50_000, "imagenet": 1_281_167}
# Activation sizes (C, H, W) at candidate stage boundaries.
# CIFAR ResNet-34 / PreResNet-34 (32x32 input): stage outputs 64x32x32, 128x16x16, 256x8x8, 512x4x4.
# ImageNet PreResNet-18 (224x224 input): stage outputs 64x56x56, 128x28x28, 256x14x14, 512x7x7.
# "FLOPs-balanced": loft_hpc.models.pipeline.balanced_cuts over the forward multiply-accumulates of
# every pipeline block (stem, residual blocks, head) of the paper's models: for S = 2 it is the
# spec's middle cut; for S = 4 CIFAR the stages begin at layer2.1, layer3.1, layer3.5 and ImageNet
# at layer2.0, layer3.0, layer4.0 (= the ends of stages 1, 2, 3).
BOUNDARIES = {
    "cifar": {
        2: [("spec: middle (stage 3)", [(256, 8, 8)])],
        4: [("after stages 1,2,3", [(64, 32, 32), (128, 16, 16), (256, 8, 8)]),
            ("after stages 2,3,4", [(128, 16, 16), (256, 8, 8), (512, 4, 4)]),
            ("FLOPs-balanced", [(128, 16, 16), (256, 8, 8), (256, 8, 8)])],
    },
    "imagenet": {
        2: [("spec: middle (stage 2)", [(128, 28, 28)])],
        4: [("stages 1,2,3 = FLOPs", [(64, 56, 56), (128, 28, 28), (256, 14, 14)]),
            ("after stages 2,3,4", [(128, 28, 28), (256, 14, 14), (512, 7, 7)]),
            ("fitted: blocks 3,4,6", [(128, 28, 28), (128, 28, 28), (256, 14, 14)])],
    },
}
# setting, data set family, GPipe-2, LoFT-2, GPipe-4, LoFT-4 (G), improvement 2 / 4 as printed
PAPER = [
    ("PreResNet-34 CIFAR-10", "cifar", 131.88, 104.59, 461.60, 144.27, "1.26x", "3.20x"),
    ("ResNet-34 CIFAR-10", "cifar", 131.88, 104.60, 461.60, 144.29, "1.26x", "3.20x"),
    ("PreResNet-34 CIFAR-100", "cifar", 131.88, 104.77, 461.60, 144.64, "1.26x", "3.19x"),
    ("ResNet-34 CIFAR-100", "cifar", 131.88, 104.78, 461.60, 144.66, "1.26x", "3.19x"),
    ("PreResNet-18 ImageNet", "imagenet", 20954.24, 791.09, 52385.59, 1284.84, "21.60x", "40.77x"),
]
# The paper's models (LOFT_SPEC 1): arch, classes, stem; width 64 with the release's 2x inner width.
MODELS = {
    "PreResNet-34 CIFAR-10": ("preresnet34", 10, "cifar"), "ResNet-34 CIFAR-10": ("resnet34", 10, "cifar"),
    "PreResNet-34 CIFAR-100": ("preresnet34", 100, "cifar"), "ResNet-34 CIFAR-100": ("resnet34", 100, "cifar"),
    "PreResNet-18 ImageNet": ("preresnet18", 1000, "imagenet"),
}
# The release's schedule (LOFT_SPEC 3): every worker iterates the whole set, batch 128 (CIFAR) /
# 512 (ImageNet), a sync every K = 15 local steps, 20 epochs.
RELEASE_BATCH = {"cifar": 128, "imagenet": 512}
RELEASE_K = 15


def paper_rows() -> list[dict]:
    """One dict per (setting, S, boundary choice): reconstruction vs the paper's GPipe figure."""
    from loft_hpc.exchange.accounting import gpipe_bytes  # imports torch: only when used

    out = []
    for name, fam, g2, l2, g4, l4, imp2, imp4 in PAPER:
        for s, paper_g, paper_l, imp in ((2, g2, l2, imp2), (4, g4, l4, imp4)):
            for label, shapes in BOUNDARIES[fam][s]:
                numels = [c * h * w for c, h, w in shapes]
                b = gpipe_bytes(EPOCHS, SAMPLES[fam], numels)
                out.append({
                    "setting": name, "S": s, "boundaries": label,
                    "shapes": " + ".join(f"{c}x{h}x{w}" for c, h, w in shapes), "boundary_numel": sum(numels),
                    "bytes": b, "G": b / G, "GiB": b / GIB, "paper_gpipe_G": paper_g,
                    "err_G": b / G / paper_g - 1.0, "err_GiB": b / GIB / paper_g - 1.0,
                    "paper_loft_G": paper_l, "paper_improvement": imp,
                    "improvement_recon": (b / G) / paper_l,
                })
    return out


def paper_model_floats() -> dict:
    """:class:`~loft_hpc.exchange.accounting.ModelFloats` of the paper's five models, built on the
    meta device (shapes only: no memory, no initialisation cost)."""
    import torch

    from loft_hpc.config.schema import ModelConfig
    from loft_hpc.exchange.accounting import model_floats
    from loft_hpc.models import build_model as _build

    out = {}
    for name, (arch, classes, stem) in MODELS.items():
        cfg = ModelConfig(arch=arch, width=64, inner_width_factor=2, stem=stem, partition_rule="loft")
        size = 224 if stem == "imagenet" else 32
        with torch.device("meta"):
            m = _build(cfg, num_classes=classes, in_channels=3, image_size=size, dataset=stem)
        out[name] = model_floats(m, m.filter_groups())
    return out


def release_syncs(fam: str) -> int:
    """Syncs of the release's schedule: 20 epochs x floor(samples / batch) steps / K (whole)."""
    return EPOCHS * (SAMPLES[fam] // RELEASE_BATCH[fam]) // RELEASE_K


def loft_paper_rows(floats: dict | None = None) -> list[dict]:
    """The paper's LoFT column reconstructed: syncs x 4 (P_par + S Sh_par). The syncs the paper
    must have counted are implied by each figure; per data set family they are fitted as the
    implied mean rounded to a multiple of 100 (CIFAR 500, ImageNet 6000)."""
    from loft_hpc.exchange.accounting import loft_fair_sync, loft_paper_sync

    floats = floats or paper_model_floats()
    rows = []
    for name, fam, _g2, l2, _g4, l4, _i2, _i4 in PAPER:
        f = floats[name]
        for s, paper in ((2, l2), (4, l4)):
            per = loft_paper_sync(f.partitioned_params, f.shared_params, s)
            per_bn = loft_paper_sync(f.partitioned, f.shared, s)
            rows.append({"setting": name, "family": fam, "S": s, "P": f.partitioned_params, "Sh": f.shared_params,
                         "per_sync": per, "paper_G": paper, "implied_syncs": paper * G / per,
                         "per_sync_with_bn": per_bn, "implied_syncs_with_bn": paper * G / per_bn,
                         "fair_per_sync": loft_fair_sync(f.partitioned, f.shared, s),
                         "fair_per_sync_carry": loft_fair_sync(*f.loft_floats(True), s)})
    for fam in SAMPLES:
        sel = [r for r in rows if r["family"] == fam]
        n = round(sum(r["implied_syncs"] for r in sel) / len(sel), -2)
        for r in sel:
            r["syncs"] = int(n)
            r["G"] = n * r["per_sync"] / G
            r["err_G"] = r["G"] / r["paper_G"] - 1.0
            r["err_with_bn"] = n * r["per_sync_with_bn"] / G / r["paper_G"] - 1.0
            r["release_syncs"] = release_syncs(fam)
            r["release_G"] = r["release_syncs"] * r["per_sync"] / G
            r["err_release"] = r["release_G"] / r["paper_G"] - 1.0
    return rows


def fair_rows(loft: list[dict]) -> list[dict]:
    """The paper's table in both conventions. Paper: its own figures. Fair (over all links, each
    byte once per link it crosses): GPipe = the paper's figure exactly (each activation and
    gradient crosses its boundary once); LoFT = the fitted syncs x 4 (S-1) (P + 2 Sh) with P, Sh
    the floats LoFT's exchange moves (parameters and BN statistics; momentum reset, as the
    paper's release, and carried)."""
    out = []
    paper = {p[0]: p for p in PAPER}
    for r in loft:
        _n, _f, g2, _l2, g4, _l4, imp2, imp4 = paper[r["setting"]]
        gp = g2 if r["S"] == 2 else g4
        lf = r["syncs"] * r["fair_per_sync"] / G
        lfc = r["syncs"] * r["fair_per_sync_carry"] / G
        out.append({"setting": r["setting"], "S": r["S"], "gpipe_paper_G": gp, "loft_paper_G": r["paper_G"],
                    "improvement_paper": gp / r["paper_G"], "printed": imp2 if r["S"] == 2 else imp4,
                    "gpipe_fair_G": gp, "loft_fair_G": lf, "improvement_fair": gp / lf,
                    "loft_fair_carry_G": lfc, "improvement_fair_carry": gp / lfc})
    return out


def _print_by_setting(head: str, rows: list[dict], line) -> None:
    """A table: the header, a rule, then ``line(row)`` for every row, a blank line between settings."""
    print(head)
    print("-" * len(head))
    last = None
    for r in rows:
        if last is not None and r["setting"] != last:
            print()
        last = r["setting"]
        print(line(r))


def print_paper() -> None:
    print(f"GPipe reconstruction (LOFT_SPEC section 6): {EPOCHS} epochs x samples (CIFAR {SAMPLES['cifar']:,}, "
          f"ImageNet {SAMPLES['imagenet']:,}) x 2 x 4 bytes x sum of boundary activations;")
    print("G = 10^9 bytes (err G); the same bytes in GiB = 2^30 (err GiB). Paper LoFT figures for comparison.")
    head = (f"{'setting':<23} {'S':>1} {'boundary activations':<34} {'cut':<20} {'floats':>7} {'recon G':>9} "
            f"{'paper G':>9} {'err G':>7} {'recon GiB':>9} {'err GiB':>7}  {'LoFT G':>7} {'paper x':>7} {'recon x':>7}")
    rows = paper_rows()
    _print_by_setting(head, rows, lambda r: (
        f"{r['setting']:<23} {r['S']:>1} {r['shapes']:<34} {r['boundaries']:<20} {r['boundary_numel']:>7} "
        f"{r['G']:>9.2f} {r['paper_gpipe_G']:>9.2f} {100 * r['err_G']:>+6.2f}% {r['GiB']:>9.2f} "
        f"{100 * r['err_GiB']:>+6.2f}%  {r['paper_loft_G']:>7.2f} {r['paper_improvement']:>7} "
        f"{r['improvement_recon']:>6.2f}x"))
    print("\nerr = recon / paper - 1; recon x = reconstructed GPipe / the paper's LoFT bytes; "
          "paper x = the paper's improvement column.")
    s2 = [r for r in rows if r["S"] == 2]
    print(f"S = 2: |err G| <= {100 * max(abs(r['err_G']) for r in s2):.2f}% for every setting; in GiB "
          f"{100 * min(abs(r['err_GiB']) for r in s2):.1f}% to {100 * max(abs(r['err_GiB']) for r in s2):.1f}% off: "
          "G = 10^9 bytes fits.")
    for fam in ("cifar", "imagenet"):
        s4 = [r for r in rows if r["S"] == 4 and dict((p[0], p[1]) for p in PAPER)[r["setting"]] == fam]
        best = min(s4, key=lambda r: abs(r["err_G"]))
        errs = ", ".join(f"{r['boundaries']}: {100 * r['err_G']:+.2f}%"
                         for r in s4 if r["setting"] == best["setting"])
        print(f"S = 4 {fam}: {errs}; closest {best['shapes']} = "
              f"{best['boundary_numel'] / [r for r in s2 if r['setting'] == best['setting']][0]['boundary_numel']:g}x "
              f"the S = 2 boundary.")
    r4 = {p[1]: p[4] / p[2] for p in PAPER}
    first = {fam: next(p[0] for p in PAPER if p[1] == fam) for fam in SAMPLES}

    def err(fam: str, label: str) -> float:
        return next(r["err_G"] for r in rows if r["setting"] == first[fam] and r["S"] == 4 and r["boundaries"] == label)

    def units(fam: str, label: str) -> float:
        num = next(r["boundary_numel"] for r in rows if r["setting"] == first[fam] and r["S"] == 4 and r["boundaries"] == label)
        return num / next(r["boundary_numel"] for r in s2 if r["setting"] == first[fam])

    flops = {"cifar": "FLOPs-balanced", "imagenet": "stages 1,2,3 = FLOPs"}
    print(f"The gap at S = 4: the paper's GPipe-4 figures are exactly {r4['cifar']:.4f}x (CIFAR) and "
          f"{r4['imagenet']:.4f}x (ImageNet) its GPipe-2 figures: its four-stage cuts carry that many times the "
          f"activation of its two-stage cut. Stage ends 2,3,4 give {units('cifar', 'after stages 2,3,4'):g}x on CIFAR "
          f"but {units('imagenet', 'after stages 2,3,4'):g}x on ImageNet; balancing the stages by FLOPs gives "
          f"{units('cifar', flops['cifar']):g}x and {units('imagenet', flops['imagenet']):g}x (by parameters or by "
          "block count neither fits either), and every cut set with 2.5x on ImageNet is unbalanced (e.g. stages "
          "beginning at layer2.1, layer3.0, layer4.0). The paper's S = 4 cuts are not recoverable; a FLOPs-balanced "
          f"GPipe-4 moves {100 * err('cifar', flops['cifar']):+.1f}% (CIFAR) and "
          f"{100 * err('imagenet', flops['imagenet']):+.1f}% (ImageNet) against the paper's column.")
    for name, _fam, g2, l2, g4, l4, imp2, imp4 in PAPER:
        for s, g, lo, imp in ((2, g2, l2, imp2), (4, g4, l4, imp4)):
            if abs(g / lo - float(imp.rstrip("x"))) > 0.011:
                print(f"Note: the paper prints {imp} for {name} S = {s}, but its own figures give "
                      f"{g:.2f} / {lo:.2f} = {g / lo:.2f}x.")
    print()
    print_loft_paper()


def print_loft_paper() -> None:
    floats = paper_model_floats()
    rows = loft_paper_rows(floats)
    print(f"LoFT reconstruction (LOFT_SPEC 6a): syncs x 4 bytes x (P + S x Sh), P / Sh = the partitioned / shared "
          f"parameters of the paper's models (width 64, the release's 2x inner width), built here; a parameter server "
          f"hands each worker its sub-network (P/S + Sh), one direction.")
    head = (f"{'setting':<23} {'method':<6} {'P':>11} {'Sh':>10} {'per sync MB':>11} {'paper G':>9} {'implied syncs':>13} "
            f"{'syncs':>5} {'recon G':>9} {'err G':>7} {'+BN err':>7} | {'release syncs':>13} {'recon G':>9} {'err':>7}")
    _print_by_setting(head, rows, lambda r: (
        f"{r['setting']:<23} LoFT-{r['S']:<1} {r['P']:>11,} {r['Sh']:>10,} {r['per_sync'] / 1e6:>11.3f} "
        f"{r['paper_G']:>9.2f} {r['implied_syncs']:>13.3f} {r['syncs']:>5} {r['G']:>9.2f} "
        f"{100 * r['err_G']:>+6.3f}% {100 * r['err_with_bn']:>+6.2f}% | {r['release_syncs']:>13} "
        f"{r['release_G']:>9.2f} {100 * r['err_release']:>+6.1f}%"))
    for fam in SAMPLES:
        sel = [r for r in rows if r["family"] == fam]
        lo, hi = min(r["implied_syncs"] for r in sel), max(r["implied_syncs"] for r in sel)
        bl, bh = min(r["implied_syncs_with_bn"] for r in sel), max(r["implied_syncs_with_bn"] for r in sel)
        print(f"{fam}: the figures imply {lo:.2f} to {hi:.2f} syncs (parameters; with the BN statistics added "
              f"{bl:.2f} to {bh:.2f}): the paper counted {sel[0]['syncs']} syncs and parameters only; "
              f"max |err| {100 * max(abs(r['err_G']) for r in sel):.3f}%. The release's schedule ({EPOCHS} epochs x "
              f"{SAMPLES[fam] // RELEASE_BATCH[fam]} steps of batch {RELEASE_BATCH[fam]} / K = {RELEASE_K}) "
              f"would give {sel[0]['release_syncs']} syncs.")
    print("err G: the fitted syncs; +BN err: the same syncs with the BN running statistics counted too; release: the "
          "release's schedule instead of the fitted syncs.")
    print()
    print("The paper's table in both conventions (G = 10^9 bytes). paper: one direction (its own figures); fair: "
          "total over all links, both directions, each byte once per link it crosses, collectives as ring algorithms "
          "(GPipe: exactly the paper's figure; LoFT's allgather + allreduce: the fitted syncs x 4 (S-1) (P + 2 Sh), P "
          "and Sh with the BN statistics, which the exchange moves; carry: with momentum_mode=carry's momentum as "
          "well).")
    head = (f"{'setting':<23} {'S':<3} {'GPipe paper':>11} {'LoFT paper':>10} {'improv.':>7} {'printed':>7} | "
            f"{'GPipe fair':>10} {'LoFT fair':>9} {'improv.':>7} | {'LoFT carry':>10} {'improv.':>7}")
    print(head)
    print("-" * len(head))
    for r in fair_rows(rows):
        print(f"{r['setting']:<23} S={r['S']:<1} {r['gpipe_paper_G']:>11.2f} {r['loft_paper_G']:>10.2f} "
              f"{r['improvement_paper']:>6.2f}x {r['printed']:>7} | {r['gpipe_fair_G']:>10.2f} {r['loft_fair_G']:>9.2f} "
              f"{r['improvement_fair']:>6.2f}x | {r['loft_fair_carry_G']:>10.2f} {r['improvement_fair_carry']:>6.2f}x")
    print("Fair LoFT-S / paper LoFT-S = (S-1) (P + 2 Sh) / (P + S Sh): 1 at S = 2 (the fair column differs there "
          "only by the BN statistics the exchange also moves), above 1 at S > 2 (every rank's shard reaches S-1 "
          "others, and the shared tensors cross 2 (S-1) links) while GPipe's ratio is 1: the improvement shrinks "
          "by that factor.")


# ----------------------------------------------------------------------------------- run files
def fmt_bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def comm_summary(rf) -> dict:
    """Totals from ``/comm`` rows: per rank and over all ranks (sent, received, total), rounds."""
    per_rank: dict[int, dict[str, int]] = defaultdict(lambda: dict.fromkeys(("sent", "received", "sync_total", "round0"), 0))
    rounds = set()
    for r in rf.comm:
        sent = row_bytes(r, SENT)
        recv = row_bytes(r, RECEIVED)
        d = per_rank[int(r["rank"])]
        d["sent"] += sent
        d["received"] += recv
        if int(r["round"]) == 0:
            d["round0"] += sent + recv
        else:
            d["sync_total"] += sent + recv
            rounds.add(int(r["round"]))
    ranks = sorted(per_rank)
    tot = {k: sum(per_rank[q][k] for q in ranks) for k in ("sent", "received", "sync_total", "round0")}
    links = comm_link_bytes(rf.comm, rf.world_size)
    links_sync = comm_link_bytes([r for r in rf.comm if int(r["round"]) > 0], rf.world_size)
    return {"ranks": ranks, "per_rank": dict(per_rank), "all": tot, "sync_rounds": sorted(rounds),
            "rows": len(rf.comm), "links": links, "links_sync": links_sync}


def weight_snapshot_steps(rf) -> set[int]:
    """Steps of the run's weight snapshots (``weights@<step>it.h5``)."""
    import re

    steps = set()
    for p in rf.weight_snapshots.values():
        m = re.search(r"weights@(\d+)it\.h5$", str(p))
        if m:
            steps.add(int(m.group(1)))
    return steps


def dense_boundary_steps(rf) -> set[int]:
    """Steps where a dense run averaged its BN statistics: its evaluations (/metrics) and weight
    snapshots."""
    return {int(m["step"]) for m in rf.metrics} | weight_snapshot_steps(rf)


def assembly_due(rf, cfg, steps_per_round: int):
    """For a /comm row of a round >= 1: whether the model's weights and its momentum were
    assembled at the row's step, by the engine's own event rule (:class:`EventPolicy`: a
    filter-score snapshot, an evaluation, a periodic checkpoint, a weight snapshot or the file;
    the momentum for a checkpoint and the file). A checkpoint written for a stop signal is not in
    the config: its row shows as different."""
    from loft_hpc.train.events import EventPolicy

    bpe, total = int(rf.progress["batches_per_epoch"]), int(rf.progress["total_steps"])
    final = int(rf.progress["step"])
    events = EventPolicy(cfg, bpe, total)
    weight_steps = weight_snapshot_steps(rf)

    def due(row) -> tuple[bool, bool]:
        step = int(row["step"])
        prev = min((int(row["round"]) - 1) * steps_per_round, step)
        d = events.due(prev, step)
        saved = step == final  # the file itself (or, for a checkpoint file, that checkpoint)
        weights = d.snapshot or d.evaluate or d.checkpoint or saved or any(prev < s <= step for s in weight_steps)
        return weights, (d.checkpoint and step < total) or saved

    return due


def analytic(rf):
    """A description of the analytic count and a function giving, for a /comm row of a round >= 1,
    the payloads (sent + received) it may have, from the model rebuilt out of the config; None
    when the model cannot be rebuilt. Where a row may include an assembly of the full model (the
    lean exchange, GPipe) or dense's BN averaging, the set holds the row with and without it."""
    from loft_hpc.exchange.accounting import dense_eval_rank_bytes, dense_step_bytes, loft_sync_bytes

    built = build_model(rf)
    if built is None:
        return "model could not be rebuilt from the file's config", None
    model, cfg = built
    world = rf.world_size
    method = cfg.train.method if rf.stage.startswith("pretrain") else "dense"
    if method == "loft":
        carry = cfg.train.momentum_mode == "carry" and cfg.train.momentum > 0
        if getattr(cfg.train, "exchange", "allgather") == "alltoall":
            return lean_analytic(rf, model, cfg, world, carry)
        exp = {q: sum(loft_sync_bytes(model, model.filter_groups(), world, q, carry).values()) for q in range(world)}
        return (f"LoFT, loft_sync_bytes(world={world}, carry_momentum={carry}) per round",
                lambda row: {exp[int(row["rank"])]})
    if method == "gpipe":
        return gpipe_analytic(rf, model, cfg)
    if world == 1:
        return "dense on 1 rank: no traffic expected", lambda row: {0}
    b = sum(dense_step_bytes(model).values())
    ev = sum(dense_eval_rank_bytes(model).values())
    steps = dense_boundary_steps(rf)
    return (f"dense, dense_step_bytes {b:,} B per step (K = 1) on {world} ranks, + dense_eval_rank_bytes {ev:,} B "
            f"at an evaluation or weight snapshot", lambda row: {b + (ev if int(row["step"]) in steps else 0)})


def lean_analytic(rf, model, cfg, world: int, carry: bool):
    """LoFT's lean exchange: round r's row moves the slices from round r-1's deal to round r's
    (:func:`~loft_hpc.exchange.accounting.loft_alltoall_bytes`) and averages the shared tensors;
    where the model was assembled at the row's step, the home slices of round r's deal
    (:func:`~loft_hpc.exchange.accounting.assemble_bytes`: weights, momentum)."""
    from functools import lru_cache

    from loft_hpc.exchange.accounting import assemble_bytes, loft_alltoall_bytes
    from loft_hpc.partition.plan import PartitionPlan

    groups = model.filter_groups()
    part = [g for g in groups if g.partitioned]

    @lru_cache(maxsize=4)
    def keeps(r: int) -> tuple:
        plan = PartitionPlan.draw(cfg.train.seed, r, part, world)
        return tuple(plan.keep(q) for q in range(world))

    due = assembly_due(rf, cfg, cfg.train.local_steps)

    def expect(row) -> set[int]:
        r, q = int(row["round"]), int(row["rank"])
        base = sum(loft_alltoall_bytes(model, groups, list(keeps(r - 1)), list(keeps(r)), q, carry).values())
        w, m = due(row)
        for mom, wanted in ((False, w), (True, m and carry)):
            if wanted:
                base += sum(assemble_bytes(model, groups, list(keeps(r)), q, mom).values())
        return {base}

    return (f"LoFT lean exchange, loft_alltoall_bytes from the two rounds' deals (world={world}, carry_momentum="
            f"{carry}) per round, + assemble_bytes of the weights at every snapshot, evaluation, checkpoint and the file, "
            f"and of the momentum at every checkpoint and the file", expect)


def gpipe_analytic(rf, model, cfg):
    """GPipe: every step moves each stage's boundary activations and their gradients
    (:func:`~loft_hpc.exchange.accounting.gpipe_rank_step_bytes`), at the cuts the trainer
    resolves from the file's config; where the model was assembled at the row's step, the
    stage's weights and/or momentum (:func:`~loft_hpc.exchange.accounting.gpipe_assemble_bytes`)."""
    import math

    from loft_hpc.exchange.accounting import gpipe_assemble_bytes, gpipe_rank_step_bytes

    world = rf.world_size
    try:
        import torch

        from loft_hpc.models.pipeline import boundary_shapes, pipeline_blocks, stage_state_names
        from loft_hpc.train.gpipe import resolve_cuts

        blocks = pipeline_blocks(model)
        import importlib

        from loft_hpc.data.datasets import REGISTRY

        native = getattr(importlib.import_module(REGISTRY[cfg.data.name]), "NATIVE_SIZE", 32)
        size = int(cfg.data.image_size or native)
        sample = torch.zeros(1, model.conv1.in_channels, size, size)
        cuts = resolve_cuts(cfg, blocks, world, sample)
        shapes = boundary_shapes(blocks, cuts, sample)
        names = stage_state_names(model, blocks, cuts)
    except Exception as e:  # noqa: BLE001 - a pipeline this version cannot rebuild: no check
        return f"GPipe: the pipeline could not be rebuilt ({type(e).__name__}: {e})", None
    numels = [math.prod(s) for s in shapes]
    batch = cfg.data.batch_size
    step = {q: sum(gpipe_rank_step_bytes(batch, numels, q).values()) for q in range(world)}
    asm = {q: [sum(gpipe_assemble_bytes(model, names, q, mom).values()) for mom in (False, True)] for q in range(world)}
    due = assembly_due(rf, cfg, 1)

    def expect(row) -> set[int]:
        q = int(row["rank"])
        w, m = due(row)
        return {step[q] + (asm[q][0] if w else 0) + (asm[q][1] if m else 0)}

    cut_names = ", ".join(blocks[c][0] for c in cuts) or "none"
    return (f"GPipe, gpipe_rank_step_bytes(batch={batch}, activations {' + '.join('x'.join(map(str, s)) for s in shapes) or '-'}"
            f" per sample at the cuts before {cut_names}) per step, + gpipe_assemble_bytes of the weights at every "
            f"snapshot, evaluation, checkpoint and the file, and of the momentum at every checkpoint and the file",
            expect)


def describe(rf) -> str:
    built = build_model(rf)
    head = f"{rf.stage}, {rf.arch}"
    if built is not None and rf.stage.startswith("pretrain"):
        t = built[1].train
        head += {"loft": f", LoFT K={t.local_steps}, momentum {t.momentum_mode}",
                 "gpipe": f", GPipe, {getattr(t, 'microbatches', '?')} micro-batches"}.get(t.method, ", dense")
    elif rf.stage.startswith("retrain"):
        head += ", dense (masked)"
    return f"{head}, {rf.world_size} rank(s), step {rf.progress.get('step', '?')}"


def print_run(path: str, rf, per_round: bool) -> dict:
    s = comm_summary(rf)
    print(f"== {path}: {describe(rf)}")
    if not rf.comm:
        print("   no /comm rows (an empty table: nothing was exchanged)")
        return s
    nsync = len(s["sync_rounds"])
    rr = s["sync_rounds"]
    print(f"   rows {s['rows']}, ranks {len(s['ranks'])}, rounds with traffic {nsync}"
          + (f" (rounds {rr[0]}..{rr[-1]})" if rr else ""))
    head = f"   {'rank':>5} {'sent':>16} {'received':>16} {'total':>16} {'total G':>9} {'round 0':>12} {'per sync':>14}"
    print(head)
    for q in s["ranks"]:
        d = s["per_rank"][q]
        ps = d["sync_total"] / nsync if nsync else 0
        print(f"   {q:>5} {d['sent']:>16,} {d['received']:>16,} {d['sent'] + d['received']:>16,} "
              f"{(d['sent'] + d['received']) / G:>9.4f} {d['round0']:>12,} {ps:>14,.0f}")
    a = s["all"]
    ps = a["sync_total"] / nsync if nsync else 0
    print(f"   {'all':>5} {a['sent']:>16,} {a['received']:>16,} {a['sent'] + a['received']:>16,} "
          f"{(a['sent'] + a['received']) / G:>9.4f} {a['round0']:>12,} {ps:>14,.0f}")
    print(f"   payload over all ranks: {fmt_bytes(a['sent'] + a['received'])} sent+received "
          f"({(a['sent'] + a['received']) / GIB:.4f} GiB); per sync {fmt_bytes(ps)} over all ranks")
    lps = s["links_sync"] / nsync if nsync else 0
    print(f"   over all links (fair convention: allgather and assemble (S-1) x sent, allreduce 2 (S-1)/S x sent, p2p and "
          f"alltoall sent): "
          f"{s['links']:,} B = {fmt_bytes(s['links'])}; per sync {fmt_bytes(lps)}")
    text, expect = analytic(rf)
    if expect is not None:
        rows = [r for r in rf.comm if int(r["round"]) > 0]
        bad = sorted({int(r["step"]) for r in rows if row_bytes(r) not in expect(r)})
        print(f"   analytic ({text}): {len(rows) - sum(row_bytes(r) not in expect(r) for r in rows)}/{len(rows)} rows "
              "equal it" + (f"; rows at step(s) {', '.join(map(str, bad[:8]))}{' ...' if len(bad) > 8 else ''} differ "
                            "(a checkpoint for a stop signal, or a run resumed under another exchange, moves what "
                            "the config does not say)" if bad else ""))
    else:
        print(f"   analytic: {text}")
    if rf.metrics:
        m = rf.metrics[-1]
        ms, mr = int(m.get("bytes_sent", 0)), int(m.get("bytes_received", 0))
        rows_upto = [r for r in rf.comm if int(r["step"]) <= int(m["step"])]
        cs = sum(row_bytes(r, SENT) for r in rows_upto)
        cr = sum(row_bytes(r, RECEIVED) for r in rows_upto)
        at = [r for r in rows_upto if int(r["step"]) == int(m["step"])]
        asm_s, asm_r = (sum(int(r.get(f"assemble_{d}", 0)) for r in at) for d in ("sent", "received"))
        if (cs, cr) == (ms, mr):
            same = "equal"
        elif 0 < cs - ms <= asm_s and 0 < cr - mr <= asm_r:  # the same row also holds what was gathered for the file
            same = (f"equal but for {cs - ms:,} / {cr - mr:,} B of assembly at step {m['step']} after the evaluation "
                    "(the momentum gathered for the file)")
        else:
            same = "DIFFERENT"
        print(f"   /metrics at step {m['step']}: sent {ms:,} received {mr:,} (all ranks); /comm up to that step: "
              f"sent {cs:,} received {cr:,}: {same}")
    if per_round:
        by_round: dict[int, dict[int, int]] = defaultdict(dict)
        steps = {}
        for r in rf.comm:
            by_round[int(r["round"])][int(r["rank"])] = row_bytes(r)
            steps[int(r["round"])] = int(r["step"])
        cols = " ".join(f"{'rank ' + str(q):>13}" for q in s["ranks"])
        print(f"   {'round':>6} {'step':>8} {cols} {'all ranks':>14} {'cumulative':>16}")
        cum = 0
        for rd in sorted(by_round):
            tot = sum(by_round[rd].values())
            cum += tot
            vals = " ".join(f"{by_round[rd].get(q, 0):>13,}" for q in s["ranks"])
            print(f"   {rd:>6} {steps[rd]:>8} {vals} {tot:>14,} {cum:>16,}")
    return s


def run(a) -> int:
    if not a.runs and not a.paper:
        raise ToolError("give run files, --paper, or both")
    loaded = []
    for p in a.runs:  # every file checked before anything is printed
        rf = load_run(p, needs=("comm",))
        try:
            comm_link_bytes(rf.comm, rf.world_size)
        except ValueError as e:
            raise ToolError(f"{p}: /comm is malformed: {e}") from None
        loaded.append((p, rf))
    if a.paper:
        print_paper()
        if a.runs:
            print()
    summaries = []
    for p, rf in loaded:
        summaries.append((p, rf, print_run(p, rf, a.per_round)))
        print()
    if len(summaries) > 1:
        print(f"{'file':<40} {'ranks':>5} {'syncs':>6} {'payload bytes':>16} {'link bytes':>16} {'links G':>9} "
              f"{'links per sync':>14}")
        for p, rf, s in summaries:
            t = s["all"]["sent"] + s["all"]["received"]
            n = len(s["sync_rounds"])
            print(f"{p[-40:]:<40} {len(s['ranks']):>5} {n:>6} {t:>16,} {s['links']:>16,} {s['links'] / G:>9.4f} "
                  f"{(s['links_sync'] / n if n else 0):>14,.0f}")
        print("payload: sent + received by all ranks, as /comm records it; link bytes: the fair convention (each byte "
              "once on every link it crosses), the one to compare methods by")
    return 0
