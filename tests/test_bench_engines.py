"""tools/bench_generate.py's engine names: each "+suffix" switches one module setting
for one run and nothing else, and a misspelt suffix fails before any model is built."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import bench_generate  # noqa: E402

from mlx_moe import compiled, fused_step  # noqa: E402


def _settings():
    return {(m.__name__, n): getattr(m, n) for m, n, _ in bench_generate.SWITCHES.values()}


def test_suffixes_switch_their_settings_and_restore_all():
    before = _settings()
    with bench_generate.engine_settings("mlx-moe+compile+hostpos+notail"):
        inside = _settings()
        assert compiled.DEVICE_POSITION is False and fused_step.ROUTER_IN_RESIDUAL is False
    changed = {k for k in before if before[k] != inside[k]}
    assert changed <= {("mlx_moe.compiled", "DEVICE_POSITION"), ("mlx_moe.fused_step", "ROUTER_IN_RESIDUAL")}
    assert _settings() == before
    with pytest.raises(RuntimeError):  # restored after an engine fails too
        with bench_generate.engine_settings("mlx-moe+compile+topk"):
            raise RuntimeError("engine failed")
    assert _settings() == before


def test_unknown_suffix_is_named():
    with pytest.raises(SystemExit, match=r"\+pf2.*known: \+compile"):
        bench_generate.engine_suffixes("mlx-moe+compile+pf2")
    assert bench_generate.engine_suffixes("mlx-moe/mlx") == []
    assert bench_generate.engine_suffixes("mlx-moe+compile+notail") == ["+compile", "+notail"]


def test_moe_geometry_suffix_sets_the_layer_and_restores_it():
    from mlx_moe.kernels import dispatch

    before = dispatch.MOE_LAYER
    with bench_generate.engine_settings("mlx-moe+compile+moe=2x4x4x1x14783"):
        assert dispatch.MOE_LAYER["q4_0"] == dispatch.LayerGeometry(2, 4, 4, 1, stage=14783)
        assert dispatch.MOE_LAYER["float"] == before["float"]
    assert dispatch.MOE_LAYER == before
    for bad in ("+moe=2x4", "+moe=2x4x4x1x99999", "+moe=axbxcxd"):
        with pytest.raises(SystemExit, match=r"\+moe="):
            bench_generate.engine_suffixes("mlx-moe+compile" + bad)


def test_bench_kernels_prefill_switch_variants_turn_each_switch_then_all():
    import bench_kernels

    from mlx_moe.kernels import mul_mm_id

    variants = bench_kernels.switch_variants(mul_mm_id, async_body=True)
    before = {n: getattr(mul_mm_id, n) for n in ("MAP0", "ASYNC_D_BF16", "ASYNC_ROWS")}
    for _, settings in variants[:-1]:  # one switch each, away from its default
        assert len(settings) == 1 and all(before[n] != v for n, v in settings.items())
    assert variants[-1][1] == {n: v for _, st in variants[:-1] for n, v in st.items()}
    with mul_mm_id.switched(**variants[-1][1]):
        assert all(getattr(mul_mm_id, n) == v for n, v in variants[-1][1].items())
    assert {n: getattr(mul_mm_id, n) for n in before} == before
    # Without the async body only map0's switch applies.
    assert [st for _, st in bench_kernels.switch_variants(mul_mm_id, async_body=False)] == \
        [{"MAP0": k} for k in mul_mm_id.MAP0_KINDS if k != mul_mm_id.MAP0]


def test_gpu_decode_layer_script_engines_run_their_stages():
    """tools/gpu_decode_layer.sh's candidate -> engine (which engine its decode-step A/B runs
    for the fastest candidate): a bare stage and a whole geometry tag, the script's default
    candidates among them, each give an engine that sets dispatch.MOE_LAYER's Q4_0 geometry
    to that candidate's."""
    import re
    import subprocess

    from mlx_moe.kernels import dispatch

    text = (Path(__file__).resolve().parents[1] / "tools" / "gpu_decode_layer.sh").read_text()
    funcs = "".join(re.findall(r"^(?:tag_of|engine_of)\(\) \{.*?^\}\n", text, re.M | re.S))
    defaults = re.search(r'CANDIDATES=\$\{3:-([\w ]+)\}', text).group(1).split()
    cands = defaults + ["3007", "2x4x4x1x14783"]
    for cand in cands:
        engine = subprocess.run(["bash", "-c", funcs + f'engine_of "{cand}"'], capture_output=True, text=True,
                                check=True).stdout.strip()
        want = dispatch.LayerGeometry.parse(cand if "x" in cand else f"1x4x8x1x{cand}")
        with bench_generate.engine_settings(f"mlx-moe+compile{engine}"):
            assert dispatch.MOE_LAYER["q4_0"] == want, (cand, engine)


def test_bench_kernels_route_both_flips_the_routing_for_its_launches(monkeypatch):
    """bench_kernels --route-both: each routed one-launch layer also runs with
    dispatch.SHARE_ROUTE flipped, for that launch only, and (the same sums either way) gives
    the same y as the default's launch."""
    import importlib

    import bench_kernels
    import mlx.core as mx
    import numpy as np

    from mlx_moe.kernels import dispatch

    mul_mv_id = importlib.import_module("mlx_moe.kernels.mul_mv_id")  # (the package exports a function of that name)

    runs = dict(bench_kernels.routed_layers("emulated", [bench_kernels.q4_0_experts(8, 256, 64)], 2, [],
                                            route_both=True))
    default = dispatch.SHARE_ROUTE
    flipped = [n for n in runs if "rule in every threadgroup" in n or "routing shared" in n]
    plain = [n for n in runs if "routed, 1 launch" in n and n not in flipped]
    assert len(flipped) == 1 and len(plain) == 1, list(runs)
    seen, launch = [], mul_mv_id._moe_layer
    monkeypatch.setattr(mul_mv_id, "_moe_layer", lambda *a: seen.append(dispatch.SHARE_ROUTE) or launch(*a))
    y_flip = np.array(runs[flipped[0]](0).astype(mx.float32))
    y_plain = np.array(runs[plain[0]](0).astype(mx.float32))
    assert seen == [not default, default] and dispatch.SHARE_ROUTE == default
    np.testing.assert_array_equal(y_flip, y_plain)


def test_fence_both_builds_the_layer_under_the_other_fence(monkeypatch):
    """bench_kernels --fence-both: each routed one-launch layer once more with
    registry.CUDA_FENCE flipped while its kernel is built and launched, the setting back
    afterwards, the same y (the emulation has no fence)."""
    import importlib

    import bench_kernels
    import mlx.core as mx
    import numpy as np

    from mlx_moe.kernels import registry

    mul_mv_id = importlib.import_module("mlx_moe.kernels.mul_mv_id")
    runs = dict(bench_kernels.routed_layers("emulated", [bench_kernels.q4_0_experts(8, 256, 64)], 2, [],
                                            fence_both=True))
    default = registry.CUDA_FENCE
    other = [n for n in runs if "fence " in n]
    plain = [n for n in runs if "routed, 1 launch" in n and n not in other]
    assert len(other) == 1 and len(plain) == 1 and other[0].endswith(
        "fence " + ("acq_rel" if default == "sc" else "sc") + ")"), list(runs)
    seen, launch = [], mul_mv_id._moe_layer
    monkeypatch.setattr(mul_mv_id, "_moe_layer", lambda *a: seen.append(registry.CUDA_FENCE) or launch(*a))
    y_other = np.array(runs[other[0]](0).astype(mx.float32))
    y_plain = np.array(runs[plain[0]](0).astype(mx.float32))
    assert seen[0] != default and seen[1] == default and registry.CUDA_FENCE == default
    np.testing.assert_array_equal(y_other, y_plain)
