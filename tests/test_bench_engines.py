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
