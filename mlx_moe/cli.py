"""The `mlx-moe` console script: `mlx-moe generate ...`, `mlx-moe convert ...`."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"generate": "generate text (default: the built-in demo model)",
                "convert": "convert a Hugging Face MoE checkpoint (Q4_0 / f16 / bf16 experts)"}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print("usage: mlx-moe {generate,convert} [options]\n")
        for name, text in commands.items():
            print(f"  {name:<10} {text}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    command, rest = argv[0], argv[1:]
    if command == "generate":
        from .generation import main as generate_main

        return generate_main(rest, argparse.ArgumentParser(prog="mlx-moe generate"))
    from .convert import main as convert_main

    return convert_main(rest)


if __name__ == "__main__":
    sys.exit(main())
