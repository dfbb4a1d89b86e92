#!/usr/bin/env python
"""When did the ticket emerge: offline ticket detection on a pretraining file: ``loft-tools detect``
(:mod:`loft_hpc.tools.detect`), kept here so that ``python tools/detect.py ...`` works as before."""
import sys

from loft_hpc.tools.cli import main

if __name__ == "__main__":
    sys.exit(main(prog_name="detect"))
