"""``loft-tools COMMAND ...``: the offline tools on loft_hpc files (no MPI needed).

Exit status: 0 done, 2 a problem with the command line or an input file (one line on stderr:
``loft-tools COMMAND: error: ...``).
"""
from __future__ import annotations

import argparse
import importlib
import sys

# command -> (module under loft_hpc.tools, one-line help); modules are imported only when used
COMMANDS = {
    "summary": ("summary", "what a file holds: stage, config, snapshots, masks and sparsity, accuracies, ticket detection, bytes"),
    "distance": ("distance", "filter distance of every snapshot to a reference ranking (CSV, plot)"),
    "heatmap": ("heatmap", "heatmap of the filter distance between every pair of snapshots, per group"),
    "detect": ("detect", "when the ticket emerged: filter-distance and Early-Bird criteria on a pretraining file"),
    "comm": ("comm", "communication table: bytes per round, rank and collective; the paper's accounting"),
    "tickets": ("tickets", "snapshot tickets of a run folder: retrained accuracy against the snapshot's epoch"),
    "groups": ("groups", "a model's filter groups (hand-written or derived from its graph), partitioned shares of parameters and FLOPs, sub-network speed"),
    "theory": ("theory", "Theorem 1 check: distance between LoFT's and gradient descent's trajectories against width"),
}
EXIT_USAGE = 2


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser with every command's arguments, or only those of ``only`` (a command name:
    the other modules are not imported)."""
    p = argparse.ArgumentParser(prog="loft-tools", description=__doc__.splitlines()[0].replace("``", ""),
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="exit status: 0 done, 2 bad command line or input file (one line on stderr)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (mod, text) in COMMANDS.items():
        sp = sub.add_parser(name, help=text, description=text)
        if only is None or name == only:
            importlib.import_module(f"loft_hpc.tools.{mod}").add_arguments(sp)
    return p


def main(argv: list[str] | None = None, prog_name: str | None = None) -> int:
    """Run one command. ``prog_name``: a thin ``tools/NAME.py`` entry point passes its command
    (``argv`` then holds only that command's arguments)."""
    from loft_hpc.tools.reading import ToolError

    argv = list(sys.argv[1:] if argv is None else argv)
    if prog_name is not None:
        argv = [prog_name] + argv
    args = build_parser(argv[0] if argv and argv[0] in COMMANDS else None).parse_args(argv)
    mod = importlib.import_module(f"loft_hpc.tools.{COMMANDS[args.command][0]}")
    try:
        return int(mod.run(args) or 0)
    except ToolError as e:
        print(f"loft-tools {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # `loft-tools comm ... | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
