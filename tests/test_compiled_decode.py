"""The compiled decode step (mlx_moe/compiled.py) against the uncompiled path.

Oracle: mlx-lm's own generate_step with its KVCache over the same model (no
code of compiled.py runs there).  Tiny fp32 models with random weights; the
two paths differ only by rounding (fused elementwise ops, attention over a
masked fixed capacity), so tokens must match exactly and log-probabilities
to ~1e-5.
"""

from __future__ import annotations

import itertools
import warnings

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache

from mlx_moe import hooks
from mlx_moe.backends import MLXBackend
from mlx_moe.compiled import (
    CapacityError,
    StaticKVCache,
    compiled_generate_step,
    decoder_for,
    unsupported_reason,
)
from mlx_moe.generation import generate_tokens, stream_generate
from mlx_moe.loader import load, model_classes
from mlx_moe.models import FAMILIES
from mlx_moe.moe import set_expert_backend
from tiny import TINY_QWEN3, write_tiny_qwen3

COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=256, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
              max_position_embeddings=4096)
CONFIGS = {
    "qwen3_moe": dict(TINY_QWEN3),
    "qwen2_moe": dict(COMMON, model_type="qwen2_moe", intermediate_size=96, num_experts=8, num_experts_per_tok=2,
                      moe_intermediate_size=32, shared_expert_intermediate_size=48),
    "mixtral": dict(COMMON, model_type="mixtral", intermediate_size=32, num_local_experts=4, num_experts_per_tok=2),
    "olmoe": dict(COMMON, model_type="olmoe", intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                  norm_topk_prob=False),
    "deepseek_v2": dict(COMMON, model_type="deepseek_v2", num_key_value_heads=4, intermediate_size=96,
                        n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
                        first_k_dense_replace=1, moe_layer_freq=1, kv_lora_rank=16, q_lora_rank=None,
                        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, topk_method="greedy",
                        n_group=1, topk_group=1, routed_scaling_factor=1.0),
    # DeepSeek-V2's attention with YaRN (its rope scaling q and k: mscale != 1), q through a LoRA.
    "deepseek_v2_yarn": dict(COMMON, model_type="deepseek_v2", num_key_value_heads=4, intermediate_size=96,
                             n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                             n_shared_experts=1, first_k_dense_replace=1, moe_layer_freq=1, kv_lora_rank=16,
                             q_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                             topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0,
                             rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=1024,
                                               beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=0.5)),
    # LongCat-Flash (two MLA attentions a layer, caching the latent): not compiled.
    "longcat_flash": dict(vocab_size=256, hidden_size=32, rms_norm_eps=1e-6, tie_word_embeddings=False,
                          max_position_embeddings=4096, model_type="longcat_flash", num_layers=2,
                          num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=16, qk_nope_head_dim=8,
                          qk_rope_head_dim=4, v_head_dim=8, ffn_hidden_size=48, q_lora_rank=16, head_dim=4,
                          n_routed_experts=4, zero_expert_num=4, moe_topk=3, expert_ffn_hidden_size=32,
                          routed_scaling_factor=2.0, rope_theta=10000.0),
}
COMPILED = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "deepseek_v2", "deepseek_v2_yarn")
PROMPT = [7, 3, 99, 150, 21, 42, 8]


def tiny_model(family: str, seed: int = 0):
    """A random fp32 model of the family, built by our loader's model classes.
    Weights are N(0, 0.3) (norm scales 1 + N(0, 0.1)) so that every block,
    the experts included, moves the logits."""
    config = FAMILIES[CONFIGS[family].get("model_type", family)].normalize_config(dict(CONFIGS[family]))
    Model, Args = model_classes(dict(config))
    model = Model(Args.from_dict(dict(config)))
    rng = np.random.default_rng(seed)
    params = []
    for name, p in tree_flatten(model.parameters()):
        noise = rng.standard_normal(p.shape).astype(np.float32)
        params.append((name, mx.array(1 + 0.1 * noise if "norm" in name else 0.3 * noise)))
    model.update(tree_unflatten(params))
    mx.eval(model.parameters())
    model.eval()
    return model


def uncompiled(model, prompt, n):
    steps = generate_step(mx.array(prompt), model, max_tokens=n, prompt_cache=make_prompt_cache(model),
                          sampler=lambda lp: mx.argmax(lp, axis=-1))
    tokens, logprobs = zip(*[(t, np.array(lp)) for t, lp in steps])
    return list(tokens), np.stack(logprobs)


def compiled(model, prompt, n, take=None, **kwargs):
    steps = compiled_generate_step(mx.array(prompt), model, max_tokens=n, **kwargs)
    if take is not None:
        steps = itertools.islice(steps, take)
    tokens, logprobs = zip(*[(t, np.array(lp)) for t, lp in steps])
    return list(tokens), np.stack(logprobs)


@pytest.fixture(scope="module")
def models():
    return {f: tiny_model(f) for f in CONFIGS}


@pytest.mark.parametrize("family", COMPILED)
def test_tokens_and_logprobs_match_uncompiled(models, family):
    model = models[family]
    assert unsupported_reason(model) is None
    ref_tokens, ref_lp = uncompiled(model, PROMPT, 24)
    assert len(set(ref_tokens)) > 2, "degenerate model: the comparison would prove little"
    for n in (1, 5, 24):  # several lengths: one trace (per capacity) serves all of them
        tokens, lp = compiled(model, PROMPT, n)
        assert tokens == ref_tokens[:n]
        np.testing.assert_allclose(lp, ref_lp[:n], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("device_position", [True, False], ids=["device", "host"])
@pytest.mark.parametrize("family", ["qwen3_moe", "olmoe"])
def test_device_position_matches_uncompiled(models, family, device_position, monkeypatch):
    """compiled.DEVICE_POSITION: the write position a device array the step advances
    itself (the default) or a scalar made from the host each step; the same tokens and
    log-probabilities either way, across sequences (a new prompt rebuilds the position)
    and cache growth (the position carries on)."""
    from mlx_moe import compiled as C

    model = models[family]
    ref_tokens, ref_lp = uncompiled(model, PROMPT, 40)
    monkeypatch.setattr(C, "DEVICE_POSITION", device_position)
    for n in (24, 5):
        tokens, lp = compiled(model, PROMPT, n)
        assert tokens == ref_tokens[:n]
        np.testing.assert_allclose(lp, ref_lp[:n], atol=2e-5, rtol=1e-5)
    tokens, lp = compiled(model, PROMPT, -1, capacity=16, capacity_step=16, take=40)
    assert tokens == ref_tokens
    np.testing.assert_allclose(lp, ref_lp, atol=2e-5, rtol=1e-5)
    if device_position:
        decoder = decoder_for(model)
        assert decoder._position is not None and decoder._position.shape == (4,)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_cache_growth_retraces_and_stays_exact(models, family):
    """max_tokens=-1: the cache grows by capacity_step when full (a new shape,
    one new trace each); tokens stay those of the uncompiled path."""
    model = models[family]
    ref_tokens, ref_lp = uncompiled(model, PROMPT, 40)
    decoder = decoder_for(model)
    decoder._compiled.clear()  # an earlier test may have traced these capacities already
    before = decoder.traces
    tokens, lp = compiled(model, PROMPT, -1, capacity=16, capacity_step=16, take=40)
    assert tokens == ref_tokens
    np.testing.assert_allclose(lp, ref_lp, atol=2e-5, rtol=1e-5)
    # capacities 16, 32, 48 (7 prompt + 40 steps = 47 slots): at most one trace each
    assert 1 <= decoder.traces - before <= 3


def test_one_trace_serves_every_step(models):
    model = tiny_model("olmoe", seed=3)  # a fresh model: a fresh decoder
    compiled(model, PROMPT, 30)
    decoder = decoder_for(model)
    assert decoder.traces == 1
    compiled(model, PROMPT[:3], 50)  # same capacity (rounded up): no new trace
    assert decoder.traces == 1


@pytest.mark.parametrize("family", COMPILED)
def test_generate_tokens_compile_flag(models, family):
    model = models[family]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a supported model must not fall back
        got = list(generate_tokens(model, PROMPT, max_tokens=12, compile=True))
    assert got == list(generate_tokens(model, PROMPT, max_tokens=12))


def test_unsupported_family_falls_back_with_reason(models):
    model = models["longcat_flash"]
    reason = unsupported_reason(model)
    assert reason is not None and "longcat_flash" in reason
    with pytest.warns(RuntimeWarning, match="longcat_flash.*decoding uncompiled"):
        got = list(generate_tokens(model, PROMPT, max_tokens=10, compile=True))
    assert got == uncompiled(model, PROMPT, 10)[0]
    with pytest.raises(ValueError, match="cannot compile the decode step"):
        decoder_for(model)


def test_unsupported_option_falls_back(models):
    model = models["qwen3_moe"]
    with pytest.warns(RuntimeWarning, match="max_kv_size"):
        got = list(generate_tokens(model, PROMPT, max_tokens=6, compile=True, max_kv_size=64))
    assert got == uncompiled(model, PROMPT, 6)[0]


def test_capacity_overflow_is_a_clear_error(models):
    model = models["qwen3_moe"]
    with pytest.raises(CapacityError, match="capacity 8"):
        next(compiled_generate_step(mx.array(PROMPT), model, max_tokens=5, capacity=8))
    decoder = decoder_for(model)
    cache = decoder.make_cache(len(PROMPT))
    model(mx.array(PROMPT)[None], cache=cache)
    with pytest.raises(CapacityError, match="full"):
        decoder.step(mx.array([1]), cache)
    assert cache[0].offset == len(PROMPT) and cache[0].keys is not None  # left intact
    with pytest.raises(ValueError, match="prefilled"):
        decoder.step(mx.array([1]), decoder.make_cache(16))


def test_prompt_cache_continues_like_kvcache(models):
    """A second prompt on the same cache (multi-turn) continues exactly as mlx-lm's KVCache does."""
    model = models["qwen2_moe"]
    kv = make_prompt_cache(model)
    greedy = dict(sampler=lambda lp: mx.argmax(lp, axis=-1))
    ref = [t for t, _ in generate_step(mx.array(PROMPT), model, max_tokens=6, prompt_cache=kv, **greedy)]
    ref += [t for t, _ in generate_step(mx.array([5, 6, 7]), model, max_tokens=6, prompt_cache=kv, **greedy)]
    static = [StaticKVCache(64) for _ in model.layers]
    got = [t for t, _ in compiled_generate_step(mx.array(PROMPT), model, max_tokens=6, prompt_cache=static)]
    got += [t for t, _ in compiled_generate_step(mx.array([5, 6, 7]), model, max_tokens=6, prompt_cache=static)]
    assert got == ref
    assert static[0].offset == kv[0].offset


def test_decoder_rebuilt_when_backend_changes(models):
    model = models["mixtral"]
    first = decoder_for(model)
    assert decoder_for(model) is first
    set_expert_backend(model, MLXBackend())  # the old trace holds the old backend object
    assert decoder_for(model) is not first


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe"])
def test_routing_hook_under_compile(models, family):
    """Every forward's events (phase, positions, ids, weights) as the uncompiled forward reports them."""
    model = models[family]

    def events(compile):
        seen = []

        def cb(forward):
            ids, w = hooks.RoutingEvent.stacked(forward)
            seen.append((forward[0].phase, forward[0].positions.tolist(), [ev.layer for ev in forward],
                         ids.tolist(), w))
        with hooks.routing_hook(cb, per_forward=True):
            tokens = list(generate_tokens(model, PROMPT, max_tokens=8, compile=compile))
        return tokens, seen

    ref_tokens, ref = events(False)
    tokens, got = events(True)
    assert tokens == ref_tokens
    # prefill of the prompt but its last token, the last prompt token, 8 steps (the last one queued ahead)
    assert len(got) == len(ref) == 1 + 1 + 8
    for a, b in zip(got, ref):
        assert a[:4] == b[:4]
        np.testing.assert_allclose(a[4], b[4], atol=1e-6)
    assert [e[0] for e in got] == ["prefill", "prefill"] + ["decode"] * 8


def test_stream_generate_compile(tmp_path):
    model, tokenizer = load(str(write_tiny_qwen3(tmp_path / "m")), kernels="mlx")
    ref = list(stream_generate(model, tokenizer, "hello", max_tokens=12, chat_template=False))
    got = list(stream_generate(model, tokenizer, "hello", max_tokens=12, chat_template=False, compile=True))
    assert [r.token for r in got] == [r.token for r in ref]
    assert "".join(r.text for r in got) == "".join(r.text for r in ref)
    assert got[-1].finish_reason == ref[-1].finish_reason
    assert got[-1].generation_tokens == ref[-1].generation_tokens


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])  # head dims 32 and 16
def test_attention_kernel_wiring(models, family, monkeypatch):
    """With ATTENTION_KERNEL on, the traced step sends every layer's attention over the
    static cache to decode_attention (position array, whole capacity), and decodes
    the same tokens.  The kernel itself cannot run inside a CPU trace (the emulation
    evaluates eagerly), so an MLX-op stand-in takes its place here; the kernel is held
    to mx.fast.scaled_dot_product_attention in tests/test_attention_kernel_emulated.py."""
    from mlx_moe import compiled as C

    calls = []

    def stand_in(q, k, v, pos, scale, flavor):
        calls.append((flavor, q.shape, k.shape))
        rep = q.shape[1] // k.shape[1]
        k, v = mx.repeat(k, rep, axis=1), mx.repeat(v, rep, axis=1)
        scores = (q * scale) @ k.swapaxes(-1, -2)  # [1, H, 1, C]
        visible = mx.arange(k.shape[2]) <= pos.reshape(())
        scores = mx.where(visible, scores, -mx.inf)
        return mx.softmax(scores, axis=-1, precise=True) @ v

    model = models[family]
    want, want_lp = uncompiled(model, PROMPT, 10)
    monkeypatch.setattr(C, "ATTENTION_KERNEL", "probe")
    monkeypatch.setattr(C, "decode_attention", stand_in)
    got, got_lp = compiled(model, PROMPT, 10)
    assert got == want
    np.testing.assert_allclose(got_lp, want_lp, rtol=1e-4, atol=1e-4)
    head_dim = model.layers[0].self_attn.k_proj.weight.shape[0] // model.args.num_key_value_heads
    if head_dim % 32:  # the kernel's lanes hold 32 dims each: mx.fast's attention stays
        assert calls == []
    else:
        assert len(calls) == len(model.layers)  # traced once: one call per layer
        assert all(f == "probe" and q[2] == 1 and k[2] >= len(PROMPT) + 10 for f, q, k in calls)
    monkeypatch.setattr(C, "ATTENTION_KERNEL", False)
    assert C.attention_flavor(model) is None
