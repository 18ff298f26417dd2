"""mlx_moe/prefill.py: a long prompt's decoder layers evaluated one by one as they
are built (prefill.LAYER_EVAL_MIN_ROWS).

Oracle: the same model with the setting off (one evaluation of the whole graph),
and mlx-lm's generate_step; the evaluations themselves are counted by a spy on
mx.async_eval."""

from __future__ import annotations

import sys

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_moe import prefill
from mlx_moe.compiled import compiled_generate_step
from test_compiled_decode import tiny_model, uncompiled

PROMPT = [(7 * i + 3) % 256 for i in range(40)]


@pytest.fixture
def spy(monkeypatch):
    """Records the decoder layers' mx.async_eval calls (and still evaluates); those
    of the generation loops (the decode steps' pipelining) are not counted."""
    calls = []
    real = mx.async_eval

    def async_eval(*args):
        if sys._getframe(1).f_code.co_filename == prefill.__file__:
            calls.append(args)
        return real(*args)

    monkeypatch.setattr(prefill.mx, "async_eval", async_eval)
    return calls


def _forward(model, tokens):
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    out = model(mx.array(tokens)[None], cache=cache)
    mx.eval(out, [c.state for c in cache])
    return np.array(out), [np.array(s) for _, s in tree_flatten([c.state for c in cache])]


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v2", "longcat_flash"])
def test_layer_by_layer_prompt_matches_one_evaluation(family, spy, monkeypatch):
    model = tiny_model(family)
    names = [n for n, _ in tree_flatten(model.parameters())]
    layer_types = {type(layer).__name__ for layer in model.layers}
    monkeypatch.setattr(prefill, "LAYER_EVAL_MIN_ROWS", 0)
    want, want_cache = _forward(model, PROMPT)
    assert spy == []  # off: the whole graph at once
    monkeypatch.setattr(prefill, "LAYER_EVAL_MIN_ROWS", 16)
    got, got_cache = _forward(model, PROMPT)
    n_layers = len(model.layers)
    assert len(spy) == n_layers  # one evaluation per decoder layer
    np.testing.assert_array_equal(got, want)  # the same graph, evaluated in pieces
    for g, w in zip(got_cache, want_cache):
        np.testing.assert_array_equal(g, w)
    # Below the row threshold (and a one-token step): nothing evaluated early.
    spy.clear()
    _forward(model, PROMPT[:15])
    assert spy == []
    # The class switch keeps parameter names and class names (checkpoints, messages).
    assert [n for n, _ in tree_flatten(model.parameters())] == names
    assert {type(layer).__name__ for layer in model.layers} == layer_types
    assert all(isinstance(layer, prefill._LayerEval) for layer in model.layers)
    assert prefill.pipeline_layers(model) == n_layers  # idempotent
    assert all(type(layer).__mro__.count(prefill._LayerEval) == 1 for layer in model.layers)


def test_generation_and_compiled_decoding_unchanged(spy, monkeypatch):
    """Greedy tokens and log-probabilities with the setting on equal those with it
    off, on mlx-lm's generate_step and on the compiled step (whose traced decode
    step must not try to evaluate: rows 1 < the threshold, and tracing forbids it)."""
    model = tiny_model("qwen3_moe")
    monkeypatch.setattr(prefill, "LAYER_EVAL_MIN_ROWS", 0)
    ref = uncompiled(model, PROMPT, 8)
    steps = compiled_generate_step(mx.array(PROMPT), model, max_tokens=8)
    ref_c = [(t, np.array(lp)) for t, lp in steps]
    monkeypatch.setattr(prefill, "LAYER_EVAL_MIN_ROWS", 8)
    got = uncompiled(model, PROMPT, 8)
    assert len(spy) > 0
    assert got[0] == ref[0]
    np.testing.assert_array_equal(got[1], ref[1])
    spy.clear()
    got_c = [(t, np.array(lp)) for t, lp in compiled_generate_step(mx.array(PROMPT), model, max_tokens=8)]
    assert len(spy) == len(model.layers)  # the prompt's chunk, layer by layer; no decode step
    assert [t for t, _ in got_c] == [t for t, _ in ref_c]
    for (_, a), (_, b) in zip(got_c, ref_c):
        np.testing.assert_array_equal(a, b)


def test_inside_a_transformation_the_layers_do_not_evaluate(spy, monkeypatch):
    """mx.compile of a whole prompt forward: async_eval is not allowed while tracing
    (MLX raises); each layer tries, and leaves the graph to the caller instead of failing."""
    model = tiny_model("mixtral")
    monkeypatch.setattr(prefill, "LAYER_EVAL_MIN_ROWS", 1)
    x = mx.array(PROMPT)[None]
    want = model(x)
    spy.clear()
    got = mx.compile(lambda t: model(t))(x)
    assert len(spy) == len(model.layers)  # tried while tracing, refused by MLX
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-5)
