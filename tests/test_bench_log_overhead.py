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


def test_pair_statistics():
    """Per-pair extra time and the pooled ratio, by hand: pairs of (with, without)."""
    from bench_generate import pair_overheads, paired_overhead

    r = pair_overheads([(1.1, 1.0), (1.2, 1.0), (0.9, 1.0), (2.0, 2.0)])
    assert [round(p, 9) for p in r["per_pair"]] == [-10.0, 0.0, 10.0, 20.0]
    assert abs(r["median"] - 5.0) < 1e-9 and r["n"] == 4
    assert abs(r["pooled"] - 100 * (5.2 / 5.0 - 1)) < 1e-9
    assert r["q1"] <= r["median"] <= r["q3"]
    assert pair_overheads([(1.0, 1.0)]) is None  # one pair says nothing about spread
    # generate's repetitions: tok/s of the plain and the logged engine, run in pairs
    plain, logged = [{"decode_tps": 100.0}, {"decode_tps": 50.0}], [{"decode_tps": 80.0}, {"decode_tps": 50.0}]
    r = paired_overhead(plain, logged)
    assert [round(p, 9) for p in r["per_pair"]] == [0.0, 25.0]
    assert abs(r["pooled"] - 100 * ((1 / 80 + 1 / 50) / (1 / 100 + 1 / 50) - 1)) < 1e-9


def test_breakdown_times_each_step_and_restores_them(tmp_path):
    """--breakdown wraps the hook's and the log's steps for the timed blocks with the log,
    and puts every one of them back afterwards (later generation must not pay for it)."""
    from mlx_moe import expert_log, hooks
    from mlx_moe.hooks import HOOKS

    before = (hooks._ForwardArrays.buffers, expert_log.pack_frame)
    r = blo.main(["--shape", "tiny", "--kernels", "mlx", "--prompt-tokens", "8", "--blocks", "4",
                  "--block-tokens", "3", "--warmup-blocks", "2", "--breakdown"])
    parts = r["breakdown_us_per_token"]
    assert set(parts) == {label for label, _, _ in blo.HostBreakdown.PARTS}
    # per-layer records on the CPU: every token of a block with the log recorded, read and framed
    assert parts["record (per MoE layer)"] > 0 and parts["read the records (buffers)"] > 0 and parts["frame"] > 0
    assert (hooks._ForwardArrays.buffers, expert_log.pack_frame) == before
    assert not {"record", "begin_forward", "end_forward", "record_joined", "record_chained", "_read_chains"} & set(vars(HOOKS))
