"""Thin entry point for the benchmark suite; the bench itself lives in :mod:`tigbev.bench`.

    python benchmarks/bench.py --preset demo --out /tmp/bench-demo [--repeats 3] [...]
    python benchmarks/bench.py --preset nuscenes --dataroot ../shared/data/nuscenes-real-slice --out /tmp/bench-nusc

is the same as ``tigbev bench ...`` (every option of the command is accepted). It replaces the former
``extract_cost.py``, whose forward-only vs. extraction rate and bytes per storage option are now the bench's
``extraction`` and ``storage`` sections, measured side by side with the training-step, loader and growth sections.
"""

from __future__ import annotations

import sys

from tigbev.cli import app

if __name__ == "__main__":
    sys.exit(app(["bench", *sys.argv[1:]]))
