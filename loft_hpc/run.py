"""``python -m loft_hpc.run --config FILE [--stage STAGE] [section.key=value ...]``

Runs the lottery-ticket pipeline on every MPI rank of the job (``mpirun -np S``, ``srun``,
``horovodrun`` or a plain single process). Everything is validated on every rank, and the ranks
agree on the result, before the first Horovod collective: a bad value ends the job with one line
and exit code 2 on every rank. Exit code 3 means "stopped on SIGUSR1/SIGTERM after writing a
checkpoint: run the same command again (requeue) to continue".
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import traceback

STAGES = {
    "pretrain": "LoFT (or dense) pretraining from theta_0 -> pretrain.h5",
    "prune": "find the tickets: structured/unstructured masks, one-shot or IMP -> tickets_pNN.h5",
    "retrain": "retrain each ticket data-parallel with its mask enforced -> retrain_pNN.h5",
    "snapshots": "the ticket at every output.snapshot_weights step and at the end, retrained -> tickets@<S>_pNN.h5, retrain@<S>_pNN.h5",
    "all": "pretrain, prune, retrain, then print the summary table",
}
ORDER = ("pretrain", "prune", "retrain", "snapshots")
EXIT_CONFIG = 2


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    from loft_hpc.config import SECTIONS

    stages = "\n".join(f"  {k:<9} {v}" for k, v in STAGES.items())
    sections = []
    for name, (cls, desc) in SECTIONS.items():
        sections.append(f"  {name:<8} {desc}")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            sections.append(f"      {name}.{f.name} = {default!s:<12} {f.metadata.get('help', '')}")
    p = argparse.ArgumentParser(
        prog="python -m loft_hpc.run", add_help=add_help, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="LoFT: lottery tickets through filter-wise training, on MPI ranks (collectives over Horovod or torch.distributed: train.backend).",
        epilog=f"stages:\n{stages}\n\nconfig sections and keys (override any with section.key=value):\n" + "\n".join(sections)
        + "\n\nexit codes: 0 done, 2 bad config/input, 3 stopped on signal after a checkpoint (run again to resume)")
    p.add_argument("--config", default=None, help="YAML config file (default: the embedded default, configs/default.yaml)")
    p.add_argument("--stage", default="all", help="pretrain, prune, retrain, snapshots, all, or a comma list (default: all)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    return p


def parse_stages(text: str) -> list[str]:
    from loft_hpc.config import ConfigError

    parts = [s.strip() for s in text.split(",") if s.strip()]
    for s in parts:
        if s not in STAGES:
            raise ConfigError(f"--stage: {s!r} is not one of {', '.join(STAGES)}")
    if "all" in parts:
        parts += ["pretrain", "prune", "retrain"]
    return [s for s in ORDER if s in parts]


def default_config_path() -> str:
    from importlib import resources
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"
    if repo.is_file():
        return str(repo)
    return str(resources.files("loft_hpc") / "configs" / "default.yaml")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from loft_hpc.config import ConfigError, config_to_yaml, load_config
    from loft_hpc.utils.dist import init_mpi, set_deterministic
    from loft_hpc.utils.log import error_line

    # Before the first collective every failure, expected (ConfigError) or not, is caught on the
    # rank where it happens and agreed over MPI: every rank ends with one line and exit 2 (bad
    # input) or 1 (an unexpected error, named with its type), never a hang or a traceback wall.
    err, code, cfg, stages = None, EXIT_CONFIG, None, []
    try:
        cfg = load_config(args.config or default_config_path(), args.overrides)
        stages = parse_stages(args.stage)
    except ConfigError as e:
        err = str(e)
    except Exception as e:  # noqa: BLE001 - reported as one line below
        err, code = _one_line(e), 1
    if cfg is not None:
        set_deterministic(cfg.train.deterministic)
    dist, device_err = init_mpi(cfg.train.device if cfg else "cpu", cfg.train.threads if cfg else 1)
    err = err or device_err
    bundle = None
    if err is None:
        from loft_hpc.validate import validate_job

        try:
            bundle = validate_job(cfg, dist.size, stages)
        except ConfigError as e:
            err = str(e)
        except Exception as e:  # noqa: BLE001
            err, code = _one_line(e), 1
    errors = dist.agree_errors(None if err is None else f"{code}:{err}")  # collective (mpi4py), before any Horovod collective
    if errors:
        codes = {int(m.split(":", 1)[0]) for _, m in errors}
        if dist.is_root:
            seen = set()
            for r, m in errors:
                m = m.split(":", 1)[1]
                if m not in seen:
                    seen.add(m)
                    error_line(m if len(errors) == dist.size else f"rank {r}: {m}")
        return EXIT_CONFIG if codes == {EXIT_CONFIG} else 1
    if dist.is_root:
        _note_external_model(cfg)
    if args.print_config:
        if dist.is_root:
            print(config_to_yaml(cfg), end="")
        return 0
    return run_stages(cfg, dist, stages, bundle)


def _note_external_model(cfg) -> None:
    """One line when the ResNet-only model keys were set for a model the package did not write."""
    from loft_hpc.config.schema import ModelConfig
    from loft_hpc.models.external import is_external
    from loft_hpc.utils.log import log

    if not is_external(cfg.model.arch):
        return
    default = ModelConfig()
    ignored = [f"model.{k}={getattr(cfg.model, k)}" for k in ("width", "inner_width_factor", "stem")
               if getattr(cfg.model, k) != getattr(default, k)]
    if ignored:
        log(f"note: {', '.join(ignored)} do(es) not apply to {cfg.model.arch} (built as its author wrote it): "
            "ignored", rank=0)


def _one_line(e: BaseException) -> str:
    """An unexpected exception as one line: its type and the first line of its message."""
    if isinstance(e, UnicodeDecodeError):
        return f"a file is not UTF-8 text ({e.reason} at byte {e.start})"
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def run_stages(cfg, dist, stages, bundle) -> int:
    from pathlib import Path

    from loft_hpc.checkpoint.lock import LockError, RunLock, job_scopes
    from loft_hpc.checkpoint.paths import RunPaths
    from loft_hpc.train.signals import StopRequest
    from loft_hpc.utils.log import error_line, log

    stop = StopRequest().install()
    paths = RunPaths(Path(cfg.output.dir))
    # One writer per output: rank 0 locks the scopes this job writes before anything is written
    # (mpi4py control message, before Horovod starts); every rank learns the verdict.
    lock, err = None, None
    if dist.is_root:
        try:
            from loft_hpc.stages.snapshot_tickets import snapshot_points

            points = snapshot_points(cfg) if "snapshots" in stages else []
            lock = RunLock(paths.root, job_scopes(stages, cfg.prune.mask_from, points)).acquire()
            for note in lock.notes:
                log(f"lock: {note}", rank=0)
        except LockError as e:
            err = str(e)
        except OSError as e:
            err = f"output.dir={cfg.output.dir}: cannot be created or written ({e.strerror or e})"
        except Exception as e:  # noqa: BLE001 - rank 0 must reach the bcast below, whatever happened
            err = f"output.dir={cfg.output.dir}: cannot take the run lock ({_one_line(e)})"
    err = dist.comm.bcast(err, root=0)
    if err:
        if dist.is_root:
            error_line(err)
        return EXIT_CONFIG
    if lock is not None:
        dist.before_abort = lock.release  # an aborting rank 0 still frees the lock
    try:
        return _stages(cfg, dist, stages, bundle, paths, stop)
    finally:
        if lock is not None:
            lock.release()


def _stages(cfg, dist, stages, bundle, paths, stop) -> int:
    from loft_hpc.checkpoint.h5file import CheckpointError
    from loft_hpc.config import config_to_yaml
    from loft_hpc.exchange.collectives import Collectives
    from loft_hpc.prune.masks import MaskError
    from loft_hpc.train.engine import Context, StopForRequeue
    from loft_hpc.train.signals import EXIT_REQUEUE
    from loft_hpc.exchange.backends import make_backend
    from loft_hpc.utils.log import error_line, log

    backend = None
    try:
        backend = make_backend(cfg.train.backend, dist)  # collective: Horovod's init or the process group, every rank
        if dist.is_root:
            written = paths.save_config(config_to_yaml(cfg))
            if written != paths.config:
                log(f"config: {paths.config.name} holds another config; this job's is {written.name}", rank=0)
        ctx = Context(cfg, dist, Collectives(dist.size, backend=backend, rank=dist.rank), paths, stop, bundle.train,
                      bundle.test)
        log(f"job: stages {','.join(stages)} on {dist.size} rank(s), device {dist.device}, "
            f"{'collectives over ' + backend.name + ', ' if backend else ''}output {paths.root}", rank=dist.rank)
        if "pretrain" in stages:
            from loft_hpc.stages.pretrain import run_pretrain

            run_pretrain(ctx, bundle)
        if dist.any_flag(stop.received is not None) and stages[-1] != "pretrain":  # collective: every rank
            log("stop requested: the finished stages are written; exiting for requeue before the next stage", rank=dist.rank)
            return EXIT_REQUEUE
        if "prune" in stages:
            from loft_hpc.stages.ticket import run_prune

            run_prune(ctx, bundle)
        if "retrain" in stages and dist.any_flag(stop.received is not None):  # collective: every rank
            log("stop requested: the finished stages are written; exiting for requeue before retraining", rank=dist.rank)
            return EXIT_REQUEUE
        if "retrain" in stages:
            from loft_hpc.stages.retrain import run_retrain

            run_retrain(ctx, bundle)
        if "retrain" in stages and dist.is_root:
            # The job that retrains the last ticket ends the chain (--stage all, or the retrain
            # job of a SLURM chain): it writes the summary and prints the table.
            from loft_hpc.stages.summary import finish_summary

            finish_summary(paths, cfg.prune.ratios, cfg.prune.mask_from, cfg.retrain.controls)
        if "snapshots" in stages:
            from loft_hpc.stages.snapshot_tickets import run_snapshot_tickets

            if len(stages) > 1 and dist.any_flag(stop.received is not None):  # collective: every rank
                log("stop requested: the finished stages are written; exiting for requeue before the snapshot tickets",
                    rank=dist.rank)
                return EXIT_REQUEUE
            if not run_snapshot_tickets(ctx, bundle, end_summary="retrain" not in stages):
                return EXIT_REQUEUE
        return 0
    except StopForRequeue:
        return EXIT_REQUEUE
    except (CheckpointError, MaskError) as e:
        # agreed: every rank raised it at the same point (rank 0's decision, or the same file
        # checked on every rank): one line, exit 2, no abort needed
        if getattr(e, "agreed", False) or isinstance(e, MaskError):
            if dist.is_root:
                error_line(str(e))
            return EXIT_CONFIG
        error_line(f"rank {dist.rank}: {e}")
        dist.abort(EXIT_CONFIG)
    except OSError as e:
        # a file that cannot be read or written (disk full, quota, a corrupt image): one line,
        # and every other rank is stopped at once
        error_line(f"rank {dist.rank}: {type(e).__name__ + ': ' if type(e) is not OSError else ''}{e}")
        dist.abort(1)
    except Exception:
        # A failure on one rank must end every rank at once, never leave them in a collective.
        error_line(f"rank {dist.rank} failed:\n{traceback.format_exc()}")
        dist.abort(1)
    finally:
        from loft_hpc.utils.dist import close_torch_group

        close_torch_group()  # the torch backend's, or GPipe's, process group: every rank reaches here
    return 1


if __name__ == "__main__":
    sys.exit(main())
