"""tools/profile_prefill.py on a tiny model: the per-component wrappers time the real
components (every kind is seen), change no result, and leave the model as it was."""

import sys
from collections import defaultdict
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import profile_prefill as pp  # noqa: E402
from bench_generate import SHAPES, build_models  # noqa: E402


def test_instrumentation_times_every_component_and_changes_nothing():
    mx.random.seed(0)
    config = dict(SHAPES["tiny"])
    _, model = build_models(config, 4, 64, mx.float32)
    x = mx.array([[3, 1, 4, 1, 5, 9, 2, 6]])
    want = np.array(model(x))
    before = {name: type(m) for name, m in model.named_modules()}
    totals = defaultdict(float)
    with pp.instrumented(model, totals):
        got = np.array(model(x))
    assert set(totals) == {"attention projections", "attention block", "router", "experts", "moe block"}
    assert all(v > 0 for v in totals.values())
    assert totals["attention block"] >= totals["attention projections"]  # nested inside it
    assert totals["moe block"] >= totals["router"] + totals["experts"]
    np.testing.assert_array_equal(got, want)
    assert {name: type(m) for name, m in model.named_modules()} == before
    assert all("route" not in layer.mlp.__dict__ for layer in model.layers)  # the method again
    np.testing.assert_array_equal(np.array(model(x)), want)


def test_tiny_run():
    r = pp.main(["--shape", "tiny", "--kernels", "mlx", "--tokens", "8", "--reps", "1"])
    (res,) = r["results"]
    assert res["tokens"] == 8 and res["whole_ms"] > 0
    assert set(res["components_ms"]) >= {"experts", "router", "attention projections"}


def test_build_only_and_once_modes(capsys):
    # --layers trims the model; --build-only times the graph building (one entry per rep);
    # --once runs one plain prefill per size and reports nothing else.
    out = pp.main(["--shape", "tiny", "--kernels", "mlx", "--tokens", "16", "--layers", "2", "--build-only",
                   "--reps", "2"])
    (r,) = out["results"]
    assert r["tokens"] == 16 and len(r["build_ms"]) == 2 and all(m > 0 for m in r["build_ms"])
    assert "per layer" in capsys.readouterr().out
    assert pp.main(["--shape", "tiny", "--kernels", "mlx", "--tokens", "16", "--layers", "2", "--once"]) == \
        {"results": []}
    assert "one plain prefill" in capsys.readouterr().out
