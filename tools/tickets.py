#!/usr/bin/env python
"""Snapshot tickets of a run folder: retrained accuracy against the snapshot's epoch
(``loft-tools tickets``; see loft_hpc/tools/tickets.py)."""
import sys

from loft_hpc.tools.cli import main

if __name__ == "__main__":
    sys.exit(main(prog_name="tickets"))
