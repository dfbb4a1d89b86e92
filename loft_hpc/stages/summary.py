"""The summary table of a run folder: dense pretrained accuracy, each ticket, bytes exchanged.

The job that retrains the tickets (``--stage all``, ``--stage retrain`` as the last job of a SLURM
chain, or a snapshot-array task) ends with :func:`finish_summary`: once every configured ticket is
retrained it writes ``summary.txt`` (tickets of the end of pretraining) or ``summary@<step>.txt``
(tickets found at a pretraining snapshot, ``prune.mask_from``) and prints the table.
"""
from __future__ import annotations

from pathlib import Path

from loft_hpc.checkpoint.h5file import read_run_file
from loft_hpc.checkpoint.paths import RunPaths, write_text_atomic


def _gb(n: float) -> str:
    return f"{n / 1e9:.4f} GB" if n >= 1e7 else f"{n / 1e6:.3f} MB"


def summary_table(paths: RunPaths, ratios: list[float], mask_from: str = "end") -> str:
    lines = []
    pre = read_run_file(paths.pretrain) if paths.pretrain.is_file() else None
    head = f"{'model':<28} {'test acc':>9} {'pruned':>8} {'bytes exchanged (all ranks)':>28}"
    lines += [head, "-" * len(head)]
    if pre is not None:
        m = pre.metrics[-1] if pre.metrics else {}
        nbytes = m.get("bytes_sent", 0) + m.get("bytes_received", 0)
        import yaml

        cfg = yaml.safe_load(pre.config_yaml)
        method = "LoFT" if cfg["train"]["method"] == "loft" else "dense"
        name = f"pretrained {method}-{pre.world_size} (unpruned)"
        lines.append(f"{name:<28} {m.get('test_acc', float('nan')):>9.4f} {0:>8.1%} {_gb(nbytes):>28}")
    for ratio in ratios:
        p = paths.retrain(mask_from, ratio)
        if not p.is_file():
            lines.append(f"{'ticket ' + f'{ratio:.0%}':<28} {'(not retrained)':>9}")
            continue
        rf = read_run_file(p)
        m = rf.metrics[-1] if rf.metrics else {}
        kept = sum(r["kept"] for r in rf.sparsity)
        total = sum(r["total"] for r in rf.sparsity)
        nbytes = m.get("bytes_sent", 0) + m.get("bytes_received", 0)
        lines.append(f"{'ticket ' + f'{ratio:.0%}' + ' retrained':<28} {m.get('test_acc', float('nan')):>9.4f} "
                     f"{1 - kept / max(total, 1):>8.1%} {_gb(nbytes):>28}")
    lines.append("pruned = fraction of the masked tensors' entries set to zero; bytes = payload sent + received by all ranks")
    return "\n".join(lines)


def summary_path(paths: RunPaths, mask_from: str = "end") -> Path:
    """``summary.txt`` for the tickets of the end of pretraining, ``summary@<step>.txt`` for those
    found at a snapshot (each snapshot-array task writes only its own file)."""
    return paths.summary if mask_from == "end" else paths.root / f"summary@{mask_from}.txt"


def finish_summary(paths: RunPaths, ratios: list[float], mask_from: str = "end") -> Path | None:
    """When every ticket of ``ratios`` has its retrained file: write the summary file (through a
    temporary name, so a reader never sees half a table; mode from the umask) and print the table
    with the file's name. Returns the file, or None (nothing written) while a ticket is missing."""
    missing = [paths.retrain(mask_from, r).name for r in ratios if not paths.retrain(mask_from, r).is_file()]
    if missing:
        print(f"[loft] summary: not yet written ({', '.join(missing)} missing)", flush=True)
        return None
    table = summary_table(paths, ratios, mask_from)
    out = summary_path(paths, mask_from)
    write_text_atomic(out, table + "\n")
    print(f"\n{table}\n\nsummary: {out}", flush=True)
    return out
