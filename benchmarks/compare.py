#!/usr/bin/env python
"""Side-by-side comparison of kimiha's event bus: a wrapper of ``kimiha bench compare`` for the source tree.

The comparison lives in the package (``kimiha/bench/compare.py``) so that ``python -m kimiha bench``
runs it from an installed wheel; this script runs the same code, with the same options:

    python benchmarks/compare.py --quick
    python benchmarks/compare.py --json bench-results/compare.json

``python benchmarks/compare.py --help`` lists the cases and options.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import kimiha  # noqa: F401 - an installed kimiha comes first
except ImportError:  # not installed: use the source tree this script lives in (built in place)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kimiha.bench.compare import main

if __name__ == "__main__":
    sys.exit(main())
