"""tools/bench_log_overhead.py on a tiny model: the ABBA schedule, and a log that holds
whole tokens of the blocks it was on for (the tool must keep measuring what it says)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import bench_log_overhead as blo  # noqa: E402


def test_abba_pairs_have_one_block_with_the_log():
    p = blo.pattern(8)
    assert p == [True, False, False, True, True, False, False, True]
    assert all(p[i] != p[i + 1] for i in range(0, 8, 2))


def test_tiny_run(tmp_path):
    out = tmp_path / "r.json"
    r = blo.main(["--shape", "tiny", "--kernels", "mlx", "--prompt-tokens", "8", "--blocks", "4",
                  "--block-tokens", "3", "--warmup-blocks", "2", "--json", str(out)])
    assert r["pairs"] == 2 and r["tok_s_with_log"] > 0 and r["tok_s_without"] > 0
    assert out.exists()
    # 4 MoE layers; 3 blocks with the log on (1 warm-up, 2 timed) of 3 tokens each; a switch
    # off may drop the one forward pass still queued
    assert r["rows_logged"] % 4 == 0 and 4 * (3 * 3 - 3) <= r["rows_logged"] <= 4 * 3 * 3
