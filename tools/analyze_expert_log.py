#!/usr/bin/env python
"""Turn --expert-log CSVs into numbers and pictures for expert-cache design.

    python tools/analyze_expert_log.py LOG.csv [LOG2.csv ...] --out DIR [--json]
        [--n-experts E] [--model DIR] [--expert-bytes N] [--window W] [--skip-bad]

Prints a Markdown report (or JSON with --json) and writes PNG plots into --out.
"""

from __future__ import annotations

import argparse
import os
import sys

try:
    from mlx_moe.analysis import POLICIES, LogFormatError, analyze
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from mlx_moe.analysis import POLICIES, LogFormatError, analyze


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("logs", nargs="+", help="CSV files written by --expert-log")
    ap.add_argument("--out", help="directory for the PNG plots (and report.md / report.json)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    ap.add_argument("--n-experts", type=int, help="real experts per layer (default: sidecar, --model, max id + 1)")
    ap.add_argument("--model", help="model directory (or config.json) for n_experts, zero experts, expert size")
    ap.add_argument("--expert-bytes", type=int, help="bytes of one expert's weights (gate + up + down)")
    ap.add_argument("--window", type=int, default=16, help="window w in tokens (default 16)")
    ap.add_argument("--policies", default=",".join(POLICIES),
                    help="cache policies to replay, comma separated (default lru,lfu,belady)")
    ap.add_argument("--knee-points", type=float, default=5.0,
                    help="knee rule: within this many points of the all-resident LRU hit rate (default 5)")
    ap.add_argument("--skip-bad", action="store_true", help="skip malformed rows (counted) instead of failing")
    ap.add_argument("--seed", type=int, default=0, help="seed of the shuffled-token null")
    a = ap.parse_args(argv)
    try:
        report = analyze(a.logs, n_experts=a.n_experts, model=a.model, expert_bytes=a.expert_bytes,
                         window=a.window, skip_bad=a.skip_bad,
                         policies=[p.strip() for p in a.policies.split(",") if p.strip()],
                         knee_points=a.knee_points, seed=a.seed)
    except (LogFormatError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = report.to_json() if a.json else report.to_markdown()
    print(text)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "report.json" if a.json else "report.md"), "w", encoding="utf-8") as f:
            f.write(text + "\n")
        for p in report.save_plots(a.out):
            print(f"wrote {p}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
