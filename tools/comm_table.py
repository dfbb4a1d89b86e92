#!/usr/bin/env python
"""Communication tables of run files, and the paper's table reconstructed: ``loft-tools comm``
(:mod:`loft_hpc.tools.comm`), kept here so that ``python tools/comm_table.py ...`` works as before."""
import sys

from loft_hpc.tools.cli import main

if __name__ == "__main__":
    sys.exit(main(prog_name="comm"))
