"""tools/ncu_summary.py on an excerpt of a real ncu CSV log (GPU run 1, H100) plus
launches of the new kernel names (NR, NSG, NQ as the last template arguments)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import ncu_summary  # noqa: E402

HEAD = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size",'
        '"Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"\n')


def _row(i, name, grid, metric, unit, value):
    return (f'"{i}","1274","python3.12","127.0.0.1","{name}(const float *, int *)","1","14","(64, 1, 1)",'
            f'"{grid}","0","9.0","Command line profiler metrics","{metric}","{unit}","{value}"\n')


OLD = "custom_kernel_mlx_moe_mul_mv_id_swiglu_bfloat16_t_uint16_t_2048_768_128_8_8_2"
NEW = "custom_kernel_mlx_moe_mul_mv_id_swiglu_bfloat16_t_uint16_t_2048_768_128_8_2_4_1"
DOWN = "custom_kernel_mlx_moe_mul_mv_id_down_combine_bfloat16_t_uint16_t_768_2048_128_0_8_4_8_1"


def test_summary_medians_units_and_best(tmp_path):
    lines = ["==PROF== Connected to process 1274\n", HEAD]
    times = {OLD: [27264, 26688, 25696], NEW: [9000, 8000, 30000], DOWN: [6.5, 6.0, 5.5]}
    for n, (name, ts) in enumerate(times.items()):
        for j, t in enumerate(ts):
            unit = "usecond" if name == DOWN else "ns"
            lines.append(_row(n * 3 + j, name, "(48, 1, 8)", "dram__bytes_read.sum", "Mbyte", "14.2"))
            lines.append(_row(n * 3 + j, name, "(48, 1, 8)", "gpu__time_duration.sum", unit, f"{t:,}"))
    p = tmp_path / "ncu.csv"
    p.write_text("".join(lines))
    stats = ncu_summary.parse(str(p))
    by_geo = {s.geometry: s for s in stats.values()}
    assert set(by_geo) == {"8x2", "2x4x1", "4x8x1"}
    assert by_geo["8x2"].us == pytest.approx(26.688)
    assert by_geo["2x4x1"].us == pytest.approx(9.0)  # the median, not the mean
    assert by_geo["4x8x1"].us == pytest.approx(6.0)  # usecond unit
    assert by_geo["2x4x1"].gbs == pytest.approx(14.2e6 / 9e-6 / 1e9)
    best = ncu_summary.best(stats)
    assert best["mul_mv_id_swiglu"].geometry == "2x4x1"
    assert best["mul_mv_id_down_combine"].geometry == "4x8x1"
    assert "best per kernel" in ncu_summary.table(stats)


def test_summary_rejects_a_log_without_csv(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("==PROF== nothing\n")
    with pytest.raises(ValueError, match="--csv"):
        ncu_summary.parse(str(p))


@pytest.mark.skipif(not Path("/work/notes/gpu_run1_ncu.csv").exists(), reason="GPU run 1's ncu log is not here")
def test_summary_of_gpu_run1():
    stats = ncu_summary.parse("/work/notes/gpu_run1_ncu.csv")
    best = ncu_summary.best(stats)
    assert best["mul_mv_id_swiglu"].us == pytest.approx(26.67, abs=0.01)
    assert best["mul_mv_id_down_combine"].us == pytest.approx(20.8, abs=0.1)
