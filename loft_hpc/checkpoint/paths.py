"""Every file name of a run folder comes from here.

    <dir>/config.yaml, config.<n>.yaml      resolved config of the first job here, and of later jobs with other configs
    <dir>/ckpt/<stage>/ckpt-<step>.h5       periodic checkpoints (newest ``keep_checkpoints`` kept)
    <dir>/ckpt/<stage>/LATEST               name of the newest complete checkpoint (moved after the write)
    <dir>/pretrain.h5                       final pretraining file
    <dir>/snapshots/weights@<N>it.h5        full-weight snapshot taken at step N (output.snapshot_weights, rewind step)
    <dir>/tickets_p<NN>.h5, tickets@<S>_p<NN>.h5   ticket (masks + rewound weights) per ratio, from the end / snapshot S
    <dir>/imp/<ticket>_level<k>.h5          IMP: retrained weights of level k < n
    <dir>/retrain_p<NN>.h5, retrain@<S>_p<NN>.h5   retrained ticket per pruning ratio
    <dir>/retrain_p<NN>_<control>.h5, retrain@<S>_p<NN>_<control>.h5
                                            a control of that ticket, retrained (retrain.controls:
                                            random_reinit, random_prune)
    <dir>/summary.txt                       the summary table (written by the job that retrains the last ticket)
"""
from __future__ import annotations

import os
import socket
from pathlib import Path


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically and durably: a temporary name unique to this writer
    (host and pid), fsync, rename, fsync of the folder."""
    from loft_hpc.checkpoint.h5file import fsync_dir

    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


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
        """The checkpoint LATEST names, or None when the stage has no LATEST. A LATEST that names
        a file that does not exist is an error (never a silent restart from step 0)."""
        p = self.latest_pointer(stage)
        if not p.is_file():
            return None
        f = self.ckpt_dir(stage) / p.read_text().strip()
        if not f.is_file():
            from loft_hpc.checkpoint.h5file import CheckpointError

            raise CheckpointError(f"{p} names {f.name}, which does not exist (deleted by hand or by another job "
                                  f"on this folder?): restore it, or delete {self.ckpt_dir(stage)} to start this stage over")
        return f

    def checkpoints(self, stage: str) -> list[Path]:
        """The stage's checkpoint files, oldest first."""
        return sorted(self.ckpt_dir(stage).glob("ckpt-*.h5"))

    def set_latest(self, stage: str, ckpt: Path, keep: int) -> None:
        """Point LATEST at ``ckpt`` (atomically and durably) and delete all but the newest ``keep``
        checkpoints. The temporary pointer's name is unique per writer (host and pid)."""
        write_text_atomic(self.latest_pointer(stage), ckpt.name + "\n")
        files = self.checkpoints(stage)
        for old in files[:-keep] if keep > 0 else []:
            if old != ckpt:
                old.unlink(missing_ok=True)

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    def save_config(self, text: str) -> Path:
        """Write a job's resolved config: ``config.yaml``, or when that holds another config,
        the first free ``config.<n>.yaml`` (never overwriting a config of an earlier job).
        Returns the file that holds ``text``."""
        self.root.mkdir(parents=True, exist_ok=True)
        n = 1
        while True:
            p = self.config if n == 1 else self.root / f"config.{n}.yaml"
            if p.is_file() and p.read_text() == text:
                return p
            tmp = p.with_name(f".{p.name}.{socket.gethostname()}.{os.getpid()}")
            tmp.write_text(text)
            try:
                os.link(tmp, p)  # atomic create-if-absent: concurrent jobs never overwrite each other
                return p
            except FileExistsError:
                n += 1
            finally:
                tmp.unlink()

    @property
    def pretrain(self) -> Path:
        return self.root / "pretrain.h5"

    def weights_snapshot(self, step: int) -> Path:
        """Full-weight snapshot taken at ``step`` (named by the step actually taken)."""
        return self.root / "snapshots" / f"weights@{step}it.h5"

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

    def control(self, kind: str, mask_from: str, ratio: float) -> Path:
        """The retrained control ``kind`` (random_reinit, random_prune) of one ticket:
        ``retrain_p50_random_reinit.h5``, ``retrain@2ep_p50_random_prune.h5``; its checkpoint
        sub-folder is the file's stem."""
        r = self.retrain(mask_from, ratio)
        return r.with_name(f"{r.stem}_{kind}.h5")

    def retrain_stage(self, mask_from: str, ratio: float) -> str:
        """Checkpoint sub-folder name of one ticket's retraining."""
        return self.retrain(mask_from, ratio).stem

    @property
    def summary(self) -> Path:
        return self.root / "summary.txt"
