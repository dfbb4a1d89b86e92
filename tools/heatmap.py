#!/usr/bin/env python
"""Filter-distance heatmaps and the distance-to-final curve: ``loft-tools heatmap``
(:mod:`loft_hpc.tools.heatmap`), kept here so that ``python tools/heatmap.py ...`` works as before."""
import sys

from loft_hpc.tools.cli import main

if __name__ == "__main__":
    sys.exit(main(prog_name="heatmap"))
