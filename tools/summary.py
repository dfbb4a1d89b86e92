#!/usr/bin/env python
"""What one loft_hpc file holds: stage, config, snapshots, masks, accuracies, ticket, bytes: ``loft-tools summary``
(:mod:`loft_hpc.tools.summary`), kept here so that ``python tools/summary.py ...`` works as before."""
import sys

from loft_hpc.tools.cli import main

if __name__ == "__main__":
    sys.exit(main(prog_name="summary"))
