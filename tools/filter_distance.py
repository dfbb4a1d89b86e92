#!/usr/bin/env python
"""Filter distance of every snapshot of a run to a reference ranking: ``loft-tools distance``
(:mod:`loft_hpc.tools.distance`), kept here so that ``python tools/filter_distance.py ...`` works as before."""
import sys

from loft_hpc.tools.cli import main

if __name__ == "__main__":
    sys.exit(main(prog_name="distance"))
