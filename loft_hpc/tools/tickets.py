"""``loft-tools tickets RUN_DIR``: what the ticket found at each pretraining snapshot is worth.

Collects every retrained ticket of a run folder (``retrain_pNN.h5``: the ticket of the end of
pretraining; ``retrain@<S>_pNN.h5``: the ticket found at snapshot S, written by ``--stage
snapshots`` or the array template ``slurm/retrain_snapshots_array.sh``), and tabulates its
retrained test accuracy (last evaluation and best) against the step and epoch of pretraining the
mask was drawn from. The point where ``pretrain.h5``'s ticket detection declared the ticket
(``/ticket``) is marked. ``--plot`` draws accuracy against the snapshot's epoch, one line per
pruning ratio, the unpruned model's accuracy as a dashed line and the detections as vertical
lines; ``--csv`` writes the table. Control branches (files whose ``/masks`` say ``control``) are
listed and drawn dashed (random_prune) and dotted (random_reinit) beside their ticket.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path

from loft_hpc.tools.reading import ToolError, load_run, output_path, pyplot, save_figure

COLUMNS = ["ratio", "mask_from", "mask_from_step", "epoch", "fraction", "rewind", "control", "retrained_steps",
           "final_test_acc", "best_test_acc", "file"]


def add_arguments(p) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="run folder (output.dir) holding pretrain.h5 and retrain*.h5")
    p.add_argument("--csv", metavar="OUT.csv", help="write the table as CSV")
    p.add_argument("--plot", metavar="OUT.png", help="plot retrained accuracy against the snapshot's epoch")
    p.add_argument("--dpi", type=int, default=100, help="resolution of --plot (default 100)")
    p.add_argument("--metric", choices=("final", "best"), default="final",
                   help="accuracy plotted: the last evaluation of retraining (default) or its best")


def collect(run_dir: Path) -> tuple[dict, list[dict]]:
    """(pretraining facts, one row per retrained ticket sorted by ratio, control, step)."""
    if not run_dir.is_dir():
        raise ToolError(f"{run_dir}: no such folder" if not run_dir.exists() else f"{run_dir}: not a folder")
    pre_path = run_dir / "pretrain.h5"
    if not pre_path.is_file():
        raise ToolError(f"{pre_path}: missing (the run folder of a finished pretraining is needed)")
    pre = load_run(pre_path)
    if not pre.stage.startswith("pretrain"):
        raise ToolError(f"{pre_path}: a {pre.stage} file, not a pretraining file")
    bpe = int(pre.progress.get("batches_per_epoch") or 0)
    total = int(pre.progress.get("total_steps") or pre.progress.get("step") or 0)
    end_step = int(pre.progress.get("step", 0))
    last = pre.metrics[-1] if pre.metrics else {}
    facts = {"file": str(pre_path), "bpe": bpe, "total": total, "end_step": end_step,
             "unpruned_acc": float(last.get("test_acc", math.nan)), "ticket": pre.ticket}
    rows = []
    for p in sorted(run_dir.glob("retrain*.h5")):
        rf = load_run(p)
        if not rf.complete:
            continue  # still retraining (an array task in flight)
        a = rf.mask_attrs
        if "ratio" not in a:
            raise ToolError(f"{p}: holds no ticket masks (/masks attrs ratio, mask_from)")
        step = int(a.get("mask_from_step", end_step if a.get("mask_from", "end") == "end" else -1))
        accs = [m["test_acc"] for m in rf.metrics if not math.isnan(m["test_acc"])]
        rows.append({"ratio": float(a["ratio"]), "mask_from": str(a.get("mask_from", "end")), "mask_from_step": step,
                     "epoch": step / bpe if bpe else math.nan, "fraction": step / total if total else math.nan,
                     "rewind": str(a.get("rewind", "")), "control": str(a.get("control", "")),
                     "retrained_steps": int(rf.progress.get("step", 0)),
                     "final_test_acc": accs[-1] if accs else math.nan, "best_test_acc": max(accs) if accs else math.nan,
                     "file": p.name})
    if not rows:
        raise ToolError(f"{run_dir}: no retrained ticket (retrain_pNN.h5, retrain@<step>_pNN.h5): run --stage "
                        f"retrain or --stage snapshots first")
    rows.sort(key=lambda r: (r["ratio"], r["control"], r["mask_from_step"]))
    return facts, rows


def detection_lines(ticket: dict, bpe: int, total: int) -> list[str]:
    if not ticket:
        return ["ticket detection: none stored in pretrain.h5 (a file of an older loft_hpc)"]
    out = []
    for name, c in ticket.get("criteria", {}).items():
        step = int(c.get("emerged_step", -1))
        mark = " (deciding)" if name == ticket.get("criterion") else ""
        if step < 0:
            out.append(f"ticket detection {name}{mark}: not detected (W={c.get('window')}, eps={c.get('threshold'):g})")
        else:
            out.append(f"ticket detection {name}{mark}: step {step}, epoch {step / bpe if bpe else math.nan:.2f}, "
                       f"{step / total if total else math.nan:.0%} of pretraining (W={c.get('window')}, eps={c.get('threshold'):g})")
    if int(ticket.get("stopped_early", 0)):
        out.append(f"pretraining stopped early at step {int(ticket.get('emerged_step', -1))} (train.stop_at_ticket)")
    return out


def table_text(facts: dict, rows: list[dict]) -> str:
    head = f"{'ratio':>5} {'mask from':>10} {'step':>7} {'epoch':>7} {'of pretr.':>9} {'rewind':>9} {'control':>14} " \
           f"{'final acc':>9} {'best acc':>9}"
    lines = [f"run: {facts['file']} (unpruned test acc {facts['unpruned_acc']:.4f}, {facts['total']} steps, "
             f"{facts['bpe']} batches/epoch)", head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['ratio']:>5.0%} {r['mask_from']:>10} {r['mask_from_step']:>7} {r['epoch']:>7.2f} "
                     f"{r['fraction']:>9.0%} {r['rewind']:>9} {r['control'] or '-':>14} "
                     f"{r['final_test_acc']:>9.4f} {r['best_test_acc']:>9.4f}")
    return "\n".join(lines + detection_lines(facts["ticket"], facts["bpe"], facts["total"]))


def plot(facts: dict, rows: list[dict], out: str, metric: str, dpi: int, title: str) -> None:
    plt = pyplot()
    key = f"{metric}_test_acc"
    fig, ax = plt.subplots(figsize=(7, 4.2))
    styles = {"": ("-", "o", "ticket"), "random_prune": ("--", "s", "control random_prune"),
              "random_reinit": (":", "^", "control random_reinit")}
    for ci, ratio in enumerate(sorted({r["ratio"] for r in rows})):
        for control, (ls, marker, name) in styles.items():
            pts = sorted((r["epoch"], r[key]) for r in rows if r["ratio"] == ratio and r["control"] == control)
            if pts:
                ax.plot([e for e, _ in pts], [a for _, a in pts], ls=ls, marker=marker, color=f"C{ci}",
                        label=f"{name}, pruned {ratio:.0%}")
    if not math.isnan(facts["unpruned_acc"]):
        ax.axhline(facts["unpruned_acc"], color="gray", ls="--", lw=1, label="unpruned (end of pretraining)")
    styles = {"filter_distance": "-", "early_bird": ":"}
    bpe = facts["bpe"]
    for name, c in facts["ticket"].get("criteria", {}).items():
        step = int(c.get("emerged_step", -1))
        if step >= 0 and bpe:
            ax.axvline(step / bpe, color="black", ls=styles.get(name, "--"), lw=1.2,
                       label=f"ticket detected ({name}): epoch {step / bpe:.2f}")
    ax.set_xlabel("pretraining epoch the ticket's mask was drawn from")
    ax.set_ylabel(f"test accuracy after retraining ({metric}, fraction)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7.5, loc="best")
    fig.tight_layout()
    save_figure(fig, out, "--plot", dpi)


def run(args) -> int:
    run_dir = Path(args.run_dir)
    facts, rows = collect(run_dir)
    print(table_text(facts, rows))
    if args.csv:
        try:
            with open(output_path(args.csv, "--csv"), "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=COLUMNS)
                w.writeheader()
                w.writerows(rows)
        except OSError as e:
            raise ToolError(f"{args.csv}: cannot write ({e.strerror or e})") from None
        print(f"csv: {args.csv}")
    if args.plot:
        plot(facts, rows, args.plot, args.metric, args.dpi,
             f"{run_dir.resolve().name}: snapshot tickets retrained ({rows[0]['rewind'] or 'rewind ?'} rewind)")
        print(f"plot: {args.plot}")
    return 0
