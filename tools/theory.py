#!/usr/bin/env python
"""Theorem 1 check (distance between LoFT's and gradient descent's weights against the width m of a
one-hidden-layer CNN): ``loft-tools theory`` (:mod:`loft_hpc.tools.theory`), also runnable as
``python tools/theory.py [--widths ...] [--out PREFIX]``."""
import sys

from loft_hpc.tools.cli import main

if __name__ == "__main__":
    sys.exit(main(prog_name="theory"))
