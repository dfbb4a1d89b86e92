"""The summary table of a run folder: dense pretrained accuracy, each ticket followed by its
controls (``retrain.controls``), bytes exchanged, and a line on when pretraining detected the ticket.

The job that retrains the tickets (``--stage all``, ``--stage retrain`` as the last job of a SLURM
chain, or a snapshot-array task) ends with :func:`finish_summary`: once every configured ticket and
control is retrained it writes ``summary.txt`` (tickets of the end of pretraining) or
``summary@<step>.txt`` (tickets found at a pretraining snapshot, ``prune.mask_from``) and prints
the table.
"""
from __future__ import annotations

import math
from pathlib import Path

import yaml

from loft_hpc.checkpoint.h5file import read_run_file
from loft_hpc.checkpoint.paths import RunPaths, write_text_atomic
from loft_hpc.exchange.accounting import comm_link_bytes


def _gb(n: float) -> str:
    return f"{n / 1e9:.4f} GB" if n >= 1e7 else f"{n / 1e6:.3f} MB"


def _retrained_row(name: str, path: Path) -> str:
    """One row of a retrained file: its last test accuracy, pruned fraction and bytes."""
    if not path.is_file():
        return f"{name:<30} {'(not retrained)':>9}"
    rf = read_run_file(path)
    m = rf.metrics[-1] if rf.metrics else {}
    kept = sum(r["kept"] for r in rf.sparsity)
    total = sum(r["total"] for r in rf.sparsity)
    nbytes = comm_link_bytes(rf.comm, rf.world_size)
    return (f"{name:<30} {m.get('test_acc', float('nan')):>9.4f} "
            f"{1 - kept / max(total, 1):>8.1%} {_gb(nbytes):>28}")


def _at(step: int, epoch: float) -> str:
    return f"step {step} (epoch {epoch:.1f})"


def ticket_line(ticket: dict, progress: dict) -> str | None:
    """One line on the ticket detection of pretraining (pretrain.h5 ``/ticket``), or None for a
    file without one: the deciding criterion's verdict, the other criteria's, and whether
    pretraining stopped there (train.stop_at_ticket). It starts with ``pretraining:`` (the rows of
    the table start with ``ticket``)."""
    if not ticket or "criterion" not in ticket:
        return None
    name = str(ticket["criterion"])
    how = f"{name} (W={int(ticket.get('window', 0))}, eps={float(ticket.get('threshold', math.nan)):g})"
    step = int(ticket.get("emerged_step", -1))
    if step >= 0:
        total = int(progress.get("total_steps", 0) or progress.get("step", 0))
        share = f", {step / total:.0%} of pretraining" if total > 0 else ""
        text = f"pretraining: ticket detected at step {step} (epoch {float(ticket.get('emerged_epoch', math.nan)):.1f}{share}) by {how}"
    else:
        text = f"pretraining: ticket not detected by {how} in {int(progress.get('step', 0))} steps of pretraining"
    for other, c in sorted(ticket.get("criteria", {}).items()):
        if other == name:
            continue
        s = int(c.get("emerged_step", -1))
        text += f"; {other}: " + (_at(s, float(c.get("emerged_epoch", math.nan))) if s >= 0 else "not detected")
    if step >= 0 and int(ticket.get("stopped_early", 0)):
        text += "; pretraining stopped there"
    return text


def summary_table(paths: RunPaths, ratios: list[float], mask_from: str = "end", controls: list[str] = ()) -> str:
    """The table: the pretrained model, then per ratio the retrained ticket followed by one row per
    control of ``controls`` (``(not retrained)`` for a missing file), then the ticket-detection line."""
    lines = []
    pre = read_run_file(paths.pretrain) if paths.pretrain.is_file() else None
    if mask_from != "end":  # a snapshot's tickets: say which (the pretrained row is still the end's model)
        lines.append(f"tickets found at pretraining snapshot {mask_from}; 'pretrained' is the model at the end of pretraining")
    head = f"{'model':<30} {'test acc':>9} {'pruned':>8} {'bytes over all links':>28}"
    lines += [head, "-" * len(head)]
    if pre is not None:
        m = pre.metrics[-1] if pre.metrics else {}
        nbytes = comm_link_bytes(pre.comm, pre.world_size)
        cfg = yaml.safe_load(pre.config_yaml)
        method = {"loft": "LoFT", "gpipe": "GPipe"}.get(cfg["train"]["method"], "dense")
        name = f"pretrained {method}-{pre.world_size} (unpruned)"
        lines.append(f"{name:<30} {m.get('test_acc', float('nan')):>9.4f} {0:>8.1%} {_gb(nbytes):>28}")
    for ratio in ratios:
        p = paths.retrain(mask_from, ratio)
        lines.append(_retrained_row(f"ticket {ratio:.0%}" + (" retrained" if p.is_file() else ""), p))
        for kind in controls:
            lines.append(_retrained_row(f"  control {kind}", paths.control(kind, mask_from, ratio)))
    if controls:
        lines.append("controls: the ticket's mask on fresh random weights (random_reinit), a random mask of the "
                     "ticket's per-layer sparsity on its weights (random_prune); same retraining budget")
    line = ticket_line(pre.ticket, pre.progress) if pre is not None else None
    if line:
        lines.append(line)
    lines.append("pruned = fraction of the masked tensors' entries set to zero; bytes = total over all links, each byte "
                 "once per link it crosses (collectives as ring algorithms; README, Counting bytes)")
    return "\n".join(lines)


def summary_path(paths: RunPaths, mask_from: str = "end") -> Path:
    """``summary.txt`` for the tickets of the end of pretraining, ``summary@<step>.txt`` for those
    found at a snapshot (each snapshot-array task writes only its own file)."""
    return paths.summary if mask_from == "end" else paths.root / f"summary@{mask_from}.txt"


def finish_summary(paths: RunPaths, ratios: list[float], mask_from: str = "end",
                   controls: list[str] = ()) -> Path | None:
    """When every ticket of ``ratios`` and each of its ``controls`` (``retrain.controls``) has its
    retrained file: write the summary file (through a temporary name, so a reader never sees
    half a table; mode from the umask) and print the table with the file's name. Returns the file,
    or None (nothing written) while a ticket or a control is missing."""
    wanted = [p for r in ratios for p in [paths.retrain(mask_from, r)] + [paths.control(k, mask_from, r) for k in controls]]
    missing = [p.name for p in wanted if not p.is_file()]
    if missing:
        print(f"[loft] summary: not yet written ({', '.join(missing)} missing)", flush=True)
        return None
    table = summary_table(paths, ratios, mask_from, controls)
    out = summary_path(paths, mask_from)
    write_text_atomic(out, table + "\n")
    print(f"\n{table}\n\nsummary: {out}", flush=True)
    return out
