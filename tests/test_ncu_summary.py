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
    text = ncu_summary.table(stats)
    assert "best per kernel" in text
    # Totals: every launch summed, per kernel (both swiglu variants under one base name).
    total_us = (27264 + 26688 + 25696 + 9000 + 8000 + 30000) / 1e3 + 18.0
    assert by_geo["2x4x1"].total_us == pytest.approx(47.0)
    assert f"all launches: {total_us / 1e3:.3f} ms" in text
    swiglu_ms = (total_us - 18.0) / 1e3
    assert any(line.split()[:2] == ["mul_mv_id_swiglu", f"{swiglu_ms:.3f}"] for line in text.splitlines())


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


def test_fused_layer_kernel_geometries(tmp_path):
    """The fused decoder layer's kernels (bench_kernels.py --ncu --fused): the geometry
    read from MLX's kernel names (custom_kernel_<name> + _<template argument> each;
    bools as t / f), NRxNSG for the dense ones and NSGxUxS for the attention."""
    names = {
        "custom_kernel_mlx_moe_dense_norm_bfloat16_t_4_64_2048_4096_512_512_2_4_f": ("dense_norm", "2x4"),
        "custom_kernel_mlx_moe_dense_norm_bfloat16_t_4_64_2048_4096_512_512_4_8_f": ("dense_norm", "4x8"),
        "custom_kernel_mlx_moe_dense_norm_xn_bfloat16_t_8_64_2048_128_0_0_1_4_f": ("dense_norm_xn", "1x4"),
        "custom_kernel_mlx_moe_dense_residual_parts_bfloat16_t_4_64_4096_2048_2_4_128_4":
            ("dense_residual_parts", "2x4"),
        "custom_kernel_mlx_moe_decode_attention_parts_kv_bfloat16_t_128_32_4_512_8_8_4_t_f":
            ("decode_attention_parts_kv", "8x8x4"),
    }
    lines = [HEAD]
    for i, name in enumerate(names):
        lines.append(_row(i, name, "(640, 1, 1)", "gpu__time_duration.sum", "us", f"{20 - i}"))
    p = tmp_path / "ncu.csv"
    p.write_text("".join(lines))
    stats = ncu_summary.parse(str(p))
    assert sorted((s.kernel, s.geometry) for s in stats.values()) == sorted(names.values())
    assert ncu_summary.best(stats)["dense_norm"].geometry == "4x8"  # 19 us against 20


def test_moe_layer_kernel_geometries(tmp_path):
    """The one-launch decode MoE layer (bench_kernels.py --ncu --layer-geometries): each
    launch's LayerGeometry tag (GATE_NRxDOWN_NRxNSGxNQxSTAGE) read from its template
    arguments, routed and under given routing apart, and the fastest stage of each."""
    from mlx_moe.kernels.dispatch import LayerGeometry

    tags = {191: 19.9, 63: 19.1, 255: 19.5}
    lines, want = [HEAD], []
    for i, (stage, us) in enumerate(tags.items()):
        g = LayerGeometry(1, 4, 8, 1, stage=stage)
        args = f"bfloat16_t_uint16_t_2048_768_128_0_8_1_{g.gate_nr}_{g.down_nr}_{g.nsg}_{g.nq}_{g.stage}"
        for kind, extra, t in (("mul_mv_id_moe", "_128_4_0_f_1_1_t_f", us), ("mul_mv_id_moe_ids", "", us - 2.5)):
            lines.append(_row(2 * i, f"custom_kernel_mlx_moe_{kind}_{args}{extra}", "(1280, 1, 1)",
                              "gpu__time_duration.sum", "us", f"{t}"))
            want.append((kind, g.tag))
    # the routed launch with SHARE_ROUTE on (its last template argument true): tagged +share
    lines.append(_row(9, "custom_kernel_mlx_moe_mul_mv_id_moe_bfloat16_t_uint16_t_2048_768_128_0_8_1_1_4_8_1_191"
                         "_128_4_0_f_1_1_t_t", "(1280, 1, 1)", "gpu__time_duration.sum", "us", "19.4"))
    want.append(("mul_mv_id_moe", "1x4x8x1x191+share"))
    # and built under the acq_rel fence (registry.fence_tag names it): tagged +acqrel too
    lines.append(_row(10, "custom_kernel_mlx_moe_mul_mv_id_moe_acqrel_bfloat16_t_uint16_t_2048_768_128_0_8_1_1_4_8_1_191"
                          "_128_4_0_f_1_1_t_t", "(1280, 1, 1)", "gpu__time_duration.sum", "us", "19.2"))
    want.append(("mul_mv_id_moe", "1x4x8x1x191+share+acqrel"))
    p = tmp_path / "ncu.csv"
    p.write_text("".join(lines))
    stats = ncu_summary.parse(str(p))
    assert sorted((s.kernel, s.geometry) for s in stats.values()) == sorted(want)
    best = ncu_summary.best(stats)
    assert best["mul_mv_id_moe"].geometry == best["mul_mv_id_moe_ids"].geometry == "1x4x8x1x63"


def test_fused_geometry_option():
    import bench_kernels

    assert bench_kernels.parse_fused("dense=2x4,4x8 attn=8x8x4") == {"dense": [(2, 4), (4, 8)], "attn": [(8, 8, 4)],
                                                                      "head": [], "tail": []}
    assert bench_kernels.parse_fused("tail=2x16")["tail"] == [(2, 16)]
    assert bench_kernels.parse_fused("head=4x8")["head"] == [(4, 8)]
    for bad in ("dense=2x4x1", "attn=8x8", "qkv=2x4", "dense=0x4", "head=4x8x1"):
        with pytest.raises(SystemExit):
            bench_kernels.parse_fused(bad)


def test_fused_layer_workload_runs(monkeypatch):
    """--ncu --fused's workload, on tiny shapes under the Metal emulation: every
    listed geometry launches (a wrong argument would only show on the GPU)."""
    import bench_kernels
    from mlx_moe.kernels import registry

    launches = []
    real = registry._maker

    def counting(flavor):
        make = real(flavor)

        def maker(**kw):
            k = make(**kw)
            return lambda **call: launches.append(kw["name"]) or k(**call)

        return maker

    monkeypatch.setattr(registry, "_KERNELS", {})
    monkeypatch.setattr(registry, "_maker", counting)
    geoms = bench_kernels.parse_fused("dense=4x2 attn=4x4x2 tail=2x4")
    assert bench_kernels.fused_layer_once("emulated", geoms, layers=1, slots=16, shape=(256, 4, 2, 32, 16)) == 0
    names = set(launches)
    assert {"mlx_moe_dense_norm", "mlx_moe_dense_residual_parts", "mlx_moe_decode_attention_parts_kv",
            "mlx_moe_dense_norm_xn", "mlx_moe_dense_residual_parts_router",
            "mlx_moe_dense_residual_parts_router_split"} <= names
    # defaults + one listed geometry each, one warm-up and one timed launch per layer
    assert launches.count("mlx_moe_dense_norm") == 4 and launches.count("mlx_moe_decode_attention_parts_kv") == 5


def test_fastest_stage_picks_the_step_candidate(tmp_path):
    """tools/gpu_decode_layer.sh's pick (--fastest-stage): of the routed launches at 1x4x8x1,
    the fastest candidate stage that beat the default, compared with the routing as the
    package runs it (shared: the launches tagged +share), else nothing."""
    lines = [HEAD]
    times = {(191, "t"): 19.4, (255, "t"): 19.2, (63, "t"): 19.9, (191, "f"): 19.9, (255, "f"): 20.1, (63, "f"): 18.0,
             ("2_4_4_1_255", "t"): 19.3, ("2_4_4_1_255", "f"): 17.0}
    for i, ((stage, share), us) in enumerate(times.items()):
        geo = stage if isinstance(stage, str) else f"1_4_8_1_{stage}"
        name = (f"custom_kernel_mlx_moe_mul_mv_id_moe_bfloat16_t_uint16_t_2048_768_128_0_8_1_{geo}"
                f"_128_4_0_f_1_1_t_{share}")
        lines.append(_row(i, name, "(1280, 1, 1)", "gpu__time_duration.sum", "us", f"{us}"))
    p = tmp_path / "ncu.csv"
    p.write_text("".join(lines))
    stats = ncu_summary.parse(str(p))
    assert ncu_summary.fastest_stage(stats, ["255", "63"], True, "1x4x8x1x191") == "255"
    assert ncu_summary.fastest_stage(stats, ["255", "63"], False, "1x4x8x1x191") == "63"
    # a whole geometry tag as a candidate, given back as given
    assert ncu_summary.fastest_stage(stats, ["63", "2x4x4x1x255"], False, "1x4x8x1x191") == "2x4x4x1x255"
    assert ncu_summary.fastest_stage(stats, ["2x4x4x1x255", "255"], True, "1x4x8x1x191") == "255"
    assert ncu_summary.fastest_stage(stats, ["63"], True, "1x4x8x1x191") is None  # slower than the default
    assert ncu_summary.fastest_stage(stats, ["255"], True, "1x4x8x1x31") is None  # the default not measured


def test_fastest_stage_option_reads_the_package_default(tmp_path, capsys):
    from mlx_moe.kernels import dispatch

    share = "t" if dispatch.SHARE_ROUTE else "f"
    default = dispatch.MOE_LAYER["q4_0"].stage
    lines = [HEAD]
    for i, (stage, us) in enumerate(((default, 19.4), (255, 19.0))):
        name = (f"custom_kernel_mlx_moe_mul_mv_id_moe_bfloat16_t_uint16_t_2048_768_128_0_8_1_1_4_8_1_{stage}"
                f"_128_4_0_f_1_1_t_{share}")
        lines.append(_row(i, name, "(1280, 1, 1)", "gpu__time_duration.sum", "us", f"{us}"))
    p = tmp_path / "ncu.csv"
    p.write_text("".join(lines))
    assert ncu_summary.main([str(p), "--fastest-stage", "255"]) == 0
    assert capsys.readouterr().out.strip() == "255"
