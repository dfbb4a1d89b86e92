#!/usr/bin/env python
"""Mutation testing of loft_hpc's pure modules with mutmut 3, and the kill rate per module.

``make mutation`` installs mutmut into the virtual environment and runs this script. What is
mutated and which tests run are in the ``[mutmut]`` section of setup.cfg: the modules of
``only_mutate`` (partition plans and slicing, pruning, byte accounting, the filter distance, config
steps and loading, the pure functions of validate.py, the checkpoint layout and run identity),
against the fast single-process tests of ``pytest_add_cli_args_test_selection`` (no mpirun, no
SLURM). Test entries naming a file that does not exist are dropped (and said so).

How it runs (frugal on a shared machine):

* everything happens in a copy, ``build/mutation/`` (ignored by git): the package, tests, configs
  and setup.cfg are copied there and mutmut writes its ``mutants/`` folder inside it, so the
  working tree is never modified and other jobs keep importing the real package;
* one module at a time (``mutmut run 'loft_hpc.<module>.x_<function>__mutmut_*' ...``), each
  mutant in its own forked worker that runs only the tests which reached the mutated function
  while mutmut collected its statistics (``--jobs`` workers, default 1);
* functions that are not pure (``EXCLUDED``: validate_job loads data sets and reads the run folder,
  identity.content_digest reads an HDF5 run file) are neither run nor counted.

The table counts, per module: killed (a test failed, or the mutant ran past mutmut's time limit),
survived (every test passed), no tests (no selected test reaches the function: also a survivor)
and the share killed = killed / all mutants. mutmut 3 mutates function bodies only, so a module of
constants (checkpoint/layout.py) has no mutants (shown as "-").

    .venv/bin/python tools/mutation_report.py                       # every module, fresh
    .venv/bin/python tools/mutation_report.py --module prune        # modules whose path contains 'prune'
    .venv/bin/python tools/mutation_report.py --report-only --diffs # the last results, survivors' diffs
"""
from __future__ import annotations

import argparse
import ast
import configparser
import fnmatch
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / "build" / "mutation"
COPY = ("loft_hpc", "tests", "configs", "setup.cfg")
SEP = "\u01c1"  # mutmut's class/method separator in mutant names

# functions that are not pure: not mutated, not counted ({module path: [function]})
EXCLUDED = {"loft_hpc/validate.py": ["validate_job"],                 # loads data, reads the run folder
            "loft_hpc/checkpoint/identity.py": ["content_digest"]}  # reads an HDF5 run file

KILLED = {1, 3, 24, -24, 36, 152, 255}   # test failures, pytest internal errors, time limits
TIMEOUT = {24, -24, 36, 152, 255}
SURVIVED = {0}
NO_TESTS = {5, 33}


def mutmut_config() -> configparser.ConfigParser:
    cp = configparser.ConfigParser()
    cp.read(REPO / "setup.cfg")
    if not cp.has_section("mutmut"):
        sys.exit("setup.cfg has no [mutmut] section")
    return cp


def lines(cp: configparser.ConfigParser, key: str) -> list[str]:
    return [x for x in cp.get("mutmut", key, fallback="").split("\n") if x]


def modules(cp: configparser.ConfigParser) -> list[str]:
    """Module paths of only_mutate (globs expanded), in the order given."""
    out: list[str] = []
    for pat in lines(cp, "only_mutate"):
        for p in sorted(REPO.glob(pat)):
            rel = p.relative_to(REPO).as_posix()
            if p.name != "__init__.py" and rel not in out:
                out.append(rel)
    return out


def functions(path: str) -> list[str]:
    """mutmut's mangled names of the top-level functions and methods of ``path``, minus EXCLUDED."""
    src = WORK / path if (WORK / path).is_file() else REPO / path   # the copy that was mutated
    tree = ast.parse(src.read_text(encoding="utf-8"))
    skip = set(EXCLUDED.get(path, ()))
    out = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name not in skip:
            out.append(f"x_{node.name}")
        elif isinstance(node, ast.ClassDef):
            for sub in node.body:
                if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)) and sub.name not in skip:
                    out.append(f"x{SEP}{node.name}{SEP}{sub.name}")
    return out


def dotted(path: str) -> str:
    return path[:-3].replace("/", ".")


def prepare(cp: configparser.ConfigParser, fresh: bool) -> None:
    """The copy in build/mutation/ with a setup.cfg whose test selection names existing files."""
    if fresh and WORK.exists():
        shutil.rmtree(WORK)
    WORK.mkdir(parents=True, exist_ok=True)
    for name in COPY:
        src, dst = REPO / name, WORK / name
        if dst.exists() and src.is_dir():
            shutil.rmtree(dst)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, dst)
    sel = []
    for arg in lines(cp, "pytest_add_cli_args_test_selection"):
        path, _, name = arg.partition("::")
        if path.startswith("tests/") and not (REPO / path).exists():
            print(f"  (test selection: {path} does not exist, left out)")
            continue
        if name and f"def {name.split('[')[0]}(" not in (REPO / path).read_text(encoding="utf-8"):
            print(f"  (test selection: {arg} does not exist, left out)")
            continue
        sel.append(arg)
    out = configparser.ConfigParser()
    out.read(WORK / "setup.cfg")
    out.set("mutmut", "pytest_add_cli_args_test_selection", "\n" + "\n".join(sel))
    with open(WORK / "setup.cfg", "w") as f:
        out.write(f)


def run_module(path: str, jobs: int) -> tuple[float, int]:
    patterns = [f"{dotted(path)}.{fn}__mutmut_*" for fn in functions(path)]
    if not patterns:
        return 0.0, 0
    logs = WORK / "logs"
    logs.mkdir(exist_ok=True)
    log = logs / (dotted(path) + ".log")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    t0 = time.monotonic()
    with open(log, "w") as f:
        rc = subprocess.call([sys.executable, "-m", "mutmut", "run", "--max-children", str(jobs), *patterns],
                             cwd=WORK, env=env, stdout=f, stderr=subprocess.STDOUT)
    return time.monotonic() - t0, rc


def results(path: str) -> dict[str, int | None]:
    meta = WORK / "mutants" / (path + ".meta")
    if not meta.is_file():
        return {}
    codes = json.loads(meta.read_text())["exit_code_by_key"]
    keep = [f"{dotted(path)}.{fn}__mutmut_" for fn in functions(path)]
    return {k: v for k, v in codes.items() if any(k.startswith(p) for p in keep)}


def show(name: str) -> str:
    p = subprocess.run([sys.executable, "-m", "mutmut", "show", name], cwd=WORK, capture_output=True, text=True)
    return p.stdout.strip()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--module", action="append", default=[],
                    help="only modules whose path contains this text (repeatable)")
    ap.add_argument("--jobs", type=int, default=1, help="mutants tested at once (default 1)")
    ap.add_argument("--keep", action="store_true", help="reuse build/mutation/ (mutmut's cache) instead of starting fresh")
    ap.add_argument("--report-only", action="store_true", help="print the table of the last run, run nothing")
    ap.add_argument("--diffs", action="store_true", help="print the diff of every surviving mutant")
    ap.add_argument("--min-score", type=float, default=None,
                    help="exit 1 when a module with mutants kills less than this percentage")
    args = ap.parse_args(argv)

    cp = mutmut_config()
    mods = modules(cp)
    if args.module:
        mods = [m for m in mods if any(s in m for s in args.module)]
    if not mods:
        sys.exit("no module selected")

    times: dict[str, float] = {}
    t_all = time.monotonic()
    if not args.report_only:
        prepare(cp, fresh=not args.keep)
        for m in mods:
            print(f"mutating {m} ...", flush=True)
            times[m], rc = run_module(m, args.jobs)
            if rc != 0:
                print(f"  mutmut exited {rc}: see {(WORK / 'logs' / (dotted(m) + '.log')).relative_to(REPO)}")
            print(f"  {times[m]:.0f} s", flush=True)

    head = f"{'module':<38} {'killed':>6} {'surv.':>6} {'no test':>7} {'total':>6} {'killed %':>9} {'time':>7}"
    print()
    print(head)
    print("-" * len(head))
    tk = tt = 0
    survivors: list[str] = []
    low = []
    for m in mods:
        r = results(m)
        codes = list(r.values())
        killed = sum(c in KILLED for c in codes)
        surv = sum(c in SURVIVED for c in codes)
        none = sum(c in NO_TESTS for c in codes)
        other = len(codes) - killed - surv - none
        tk, tt = tk + killed, tt + len(codes)
        pct = f"{100 * killed / len(codes):8.1f}%" if codes else f"{'-':>9}"
        t = f"{times[m]:6.0f}s" if m in times else f"{'':>7}"
        note = f"  ({other} not run/suspicious)" if other else ""
        print(f"{m:<38} {killed:>6} {surv:>6} {none:>7} {len(codes):>6} {pct} {t}{note}")
        survivors += sorted(k for k, c in r.items() if c not in KILLED)
        if codes and args.min_score is not None and 100 * killed / len(codes) < args.min_score:
            low.append(m)
    print("-" * len(head))
    total_t = f"{time.monotonic() - t_all:6.0f}s" if times else ""
    print(f"{'all':<38} {tk:>6} {'':>6} {'':>7} {tt:>6} {100 * tk / max(tt, 1):8.1f}% {total_t:>7}")
    if survivors:
        (WORK / "survivors.txt").write_text("\n".join(survivors) + "\n")
        print(f"\n{len(survivors)} mutants not killed: build/mutation/survivors.txt "
              f"(diffs: --report-only --diffs, or cd build/mutation && {Path(sys.executable).name} -m mutmut show NAME)")
        if args.diffs:
            for s in survivors:
                print()
                print(show(s))
    if low:
        print(f"\nbelow {args.min_score}%: {', '.join(low)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
