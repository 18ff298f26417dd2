"""`python -m mlx_moe.generate ...`: the generate CLI (implementation in mlx_moe.generation).

Kept separate from the package's eager imports, so `mlx_moe.generate` stays the
function and runpy executes this file fresh."""

import sys

from mlx_moe.generation import main

if __name__ == "__main__":
    sys.exit(main())
