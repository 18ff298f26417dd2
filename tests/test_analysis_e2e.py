"""End to end: `mlx-moe generate --expert-log` writes a log, the analyzer reads it."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from tiny import write_tiny_qwen3

ROOT = Path(__file__).resolve().parents[1]


def test_generate_log_then_analyze(tmp_path):
    model = write_tiny_qwen3(tmp_path / "model")
    log = tmp_path / "experts.csv"
    gen = subprocess.run([sys.executable, "-m", "mlx_moe.generate", "--model", str(model), "--prompt", "hello moe",
                          "--max-tokens", "24", "--expert-log", str(log), "--expert-log-weights"],
                         capture_output=True, text=True, timeout=300)
    assert gen.returncode == 0, gen.stderr
    out = tmp_path / "report"
    ana = subprocess.run([sys.executable, str(ROOT / "tools" / "analyze_expert_log.py"), str(log),
                          "--out", str(out), "--json"], capture_output=True, text=True, timeout=300)
    assert ana.returncode == 0, ana.stderr
    report = json.loads(ana.stdout)

    # Independent count straight from the CSV.
    with open(log, newline="") as f:
        rows = list(csv.DictReader(f))
    k = sum(c.startswith("expert_") for c in rows[0])
    counts = {}
    for r in rows:
        c = counts.setdefault(int(r["layer_id"]), np.zeros(8, int))
        for j in range(k):
            c[int(r[f"expert_{j}"])] += 1
    assert sorted(counts) == [l["layer"] for l in report["layers"]] == [0, 1]
    for layer in report["layers"]:
        assert layer["tokens"] == len(rows) // 2
        assert list(layer["frequency"]) == counts[layer["layer"]].tolist()
    assert report["meta"]["n_experts"] == 8

    import matplotlib.image as mpimg

    for name in ("expert_frequency", "cache_hit_rates", "overlap", "working_set"):
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        img = mpimg.imread(png)
        assert img.shape[0] > 100 and img.shape[1] > 100 and img.std() > 0
