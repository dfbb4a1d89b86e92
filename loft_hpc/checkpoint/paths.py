"""Every file name of a run folder comes from here.

    <dir>/config.yaml                       resolved config of the last job started here
    <dir>/ckpt/<stage>/ckpt-<step>.h5       periodic checkpoints (newest ``keep_checkpoints`` kept)
    <dir>/ckpt/<stage>/LATEST               name of the newest complete checkpoint (moved after the write)
    <dir>/pretrain.h5                       final pretraining file
    <dir>/snapshots/weights@<step>.h5       full-weight snapshots (output.snapshot_weights, rewind step)
    <dir>/tickets_p<NN>.h5, tickets@<S>_p<NN>.h5   ticket (masks + rewound weights) per ratio, from the end / snapshot S
    <dir>/imp/<ticket>_level<k>.h5          IMP: retrained weights of level k < n
    <dir>/retrain_p<NN>.h5, retrain@<S>_p<NN>.h5   retrained ticket per pruning ratio
    <dir>/summary.txt                       the summary table of stage ``all``
"""
from __future__ import annotations

import os
from pathlib import Path


class RunPaths:
    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def ckpt_dir(self, stage: str) -> Path:
        return self.root / "ckpt" / stage

    def ckpt(self, stage: str, step: int) -> Path:
        return self.ckpt_dir(stage) / f"ckpt-{step:010d}.h5"

    def latest_pointer(self, stage: str) -> Path:
        return self.ckpt_dir(stage) / "LATEST"

    def latest(self, stage: str) -> Path | None:
        p = self.latest_pointer(stage)
        if not p.is_file():
            return None
        f = self.ckpt_dir(stage) / p.read_text().strip()
        return f if f.is_file() else None

    def set_latest(self, stage: str, ckpt: Path, keep: int) -> None:
        """Point LATEST at ``ckpt`` (atomically) and delete all but the newest ``keep`` checkpoints."""
        ptr = self.latest_pointer(stage)
        tmp = ptr.with_name(".LATEST.tmp")
        tmp.write_text(ckpt.name + "\n")
        os.replace(tmp, ptr)
        files = sorted(self.ckpt_dir(stage).glob("ckpt-*.h5"))
        for old in files[:-keep] if keep > 0 else []:
            if old != ckpt:
                old.unlink(missing_ok=True)

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def pretrain(self) -> Path:
        return self.root / "pretrain.h5"

    def weights_snapshot(self, label: str) -> Path:
        return self.root / "snapshots" / f"weights@{label}.h5"

    @staticmethod
    def _tag(mask_from: str, ratio: float) -> str:
        p = f"p{round(ratio * 100):02d}"
        return p if mask_from == "end" else f"@{mask_from}_{p}"

    def ticket(self, mask_from: str, ratio: float) -> Path:
        t = self._tag(mask_from, ratio)
        return self.root / (f"tickets_{t}.h5" if mask_from == "end" else f"tickets{t}.h5")

    def imp_level(self, mask_from: str, ratio: float, level: int) -> Path:
        return self.root / "imp" / f"{self.ticket(mask_from, ratio).stem}_level{level}.h5"

    def retrain(self, mask_from: str, ratio: float) -> Path:
        t = self._tag(mask_from, ratio)
        return self.root / (f"retrain_{t}.h5" if mask_from == "end" else f"retrain{t}.h5")

    def retrain_stage(self, mask_from: str, ratio: float) -> str:
        """Checkpoint sub-folder name of one ticket's retraining."""
        return self.retrain(mask_from, ratio).stem

    @property
    def summary(self) -> Path:
        return self.root / "summary.txt"
