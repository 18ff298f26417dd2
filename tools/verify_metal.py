#!/usr/bin/env python3
"""Prove mlx-moe's Metal kernels on an Apple Silicon Mac in one command, one report.

    python tools/verify_metal.py                    # correctness, kernel benchmarks, end to end vs mlx-lm
    python tools/verify_metal.py --quick --no-bench # a fast correctness pass
    python tools/verify_metal.py --emulate --quick  # any machine: correctness on the CPU emulation of Metal

Writes verify_metal_report/report.json and report.md (--out DIR).  Exit code 0:
everything passed; 1: a check failed (or a benchmark crashed); 2: no Metal here
and no --emulate, nothing was run.  The logic is in mlx_moe/verify/.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlx_moe.verify import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
