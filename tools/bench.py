#!/usr/bin/env python
"""``make bench``: LoFT, dense and GPipe pretraining side by side on one config (loft_hpc.bench.suite).

    python tools/bench.py [--ranks 2 4] [--methods loft dense gpipe] [--epochs 1] [--tiny] [--out build/bench]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loft_hpc.bench.suite import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
