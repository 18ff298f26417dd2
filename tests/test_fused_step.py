"""The fused one-token decoder layer (mlx_moe/fused_step.py) and its kernels.

Oracles: MLX's own ops (mx.fast.rms_norm, nn.Linear / nn.QuantizedLinear,
mx.fast.rope, mlx_moe.router's rules), float64 numpy on the weights MLX
dequantizes, and mlx-lm's decoder forward over the same cache.  The Metal
sources run under the CPU emulation here; the same checks run on the CUDA
twins where MLX's CUDA backend is present (marked gpu).
"""

from __future__ import annotations

import os

import mlx.core as mx
import numpy as np
import pytest

from mlx_moe import fused_step
from mlx_moe.backends import MLXBackend
from mlx_moe.backends import kernels as kernels_backend
from mlx_moe.backends.kernels import KernelBackend
from mlx_moe.compiled import StaticKVCache, _mlx_lm_model_class, _TracedCache
from mlx_moe.hooks import HOOKS, routing_hook
from mlx_moe.kernels import dense, dispatch, registry
from mlx_moe.kernels.kernel_cases import (attention_parts_check, dense_norm_check, dense_residual_check,
                                          router_tail_check)
from mlx_moe.moe import set_expert_backend
from test_compiled_decode import CONFIGS, PROMPT, tiny_model

_HAS_CUDA = hasattr(mx, "cuda") and mx.cuda.is_available()
FLAVORS = ["emulated", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not _HAS_CUDA, reason="needs MLX's CUDA backend and an NVIDIA GPU")])]


# -- kernels ----------------------------------------------------------------------------

def _handoff(flavor, handoff, monkeypatch):
    """registry.CUDA_HANDOFF for a test: "one" only on CUDA (Metal's shims fence in every
    thread whatever it says)."""
    from mlx_moe.kernels import registry

    if flavor != "cuda" and handoff != "all":
        pytest.skip("the CUDA hand-off choice: Metal's shims fence in every thread")
    monkeypatch.setattr(registry, "CUDA_HANDOFF", handoff)


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("fmt,dtype,hidden,rows,bias,rtol", [
    (4, mx.float32, 1280, (128, 64, 64), False, 1e-5),     # Qwen3-like q/k/v; K 1280: a tail step
    (8, mx.float32, 512, (64, 32, 32), True, 1e-5),        # Qwen2: biases
    (32, mx.float32, 256, (96, 32, 32), True, 1e-5),
    (16, mx.float16, 384, (64, 64, 64), False, 4e-3),      # output rounded once, as nn.Linear's addmm
    (17, mx.bfloat16, 1024, (256, 128, 128), False, 1e-2),
    (8, mx.float32, 6144, (16, 8, 8), False, 1e-5),      # the widest input Metal stages (dense.MAX_STAGED)
])
def test_dense_norm_matches_rms_norm_and_float64(flavor, fmt, dtype, hidden, rows, bias, rtol):
    dense_norm_check(flavor, fmt, dtype, hidden, rows, bias, rtol)


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("fmt,dtype,hidden,n,rtol", [
    (8, mx.float32, 512, 128, 1e-5),   # a router: one row per simdgroup, the normalized input too
    (4, mx.bfloat16, 1024, 60, 1e-2),
    (32, mx.float32, 256, 7, 1e-5),    # fewer experts than a threadgroup's rows
])
def test_dense_norm_xn_router_projection(flavor, fmt, dtype, hidden, n, rtol):
    dense_norm_check(flavor, fmt, dtype, hidden, (n,), False, rtol, xn=True, nr=1)


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("dtype,qk_norm,trad,pos,head_dim,heads,capacity,splits,rtol", [
    (mx.float32, True, False, 0, 64, (4, 2), 16, 4, 2e-5),      # first position: one slot, three empty splits
    (mx.float32, True, False, 37, 128, (8, 2), 48, 4, 2e-5),    # Qwen3: per-head norms, GQA 4
    (mx.float32, False, True, 700, 64, (4, 4), 768, 4, 2e-5),   # traditional pairs, far position, MHA
    (mx.float32, False, False, 47, 32, (2, 1), 48, 16, 2e-5),   # the last slot; splits of 3
    (mx.float16, True, False, 20, 64, (4, 2), 32, 4, 4e-3),     # rounding points in float16 as MLX's ops
    (mx.bfloat16, True, False, 300, 128, (4, 1), 320, 4, 2e-2),
])
def test_attention_parts_matches_mlx_ops(flavor, dtype, qk_norm, trad, pos, head_dim, heads, capacity, splits, rtol):
    attention_parts_check(flavor, dtype, qk_norm, trad, pos, head_dim, heads, capacity, splits, rtol)


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("dtype,qk_norm,trad,pos,head_dim,heads,capacity,splits,rtol", [
    (mx.float32, True, False, 0, 64, (4, 2), 16, 4, 2e-5),      # the first slot
    (mx.float32, True, False, 37, 128, (8, 2), 48, 4, 2e-5),    # Qwen3: GQA 4 (one writer per key/value head)
    (mx.bfloat16, False, True, 47, 32, (2, 1), 48, 16, 2e-2),   # the last slot
])
def test_attention_parts_writes_the_cache_in_place(flavor, dtype, qk_norm, trad, pos, head_dim, heads, capacity,
                                                   splits, rtol):
    """decode_attention_parts_kv: slot pos of the cache holds the new key and value
    after the launch, every other slot is unchanged, the split results as without."""
    attention_parts_check(flavor, dtype, qk_norm, trad, pos, head_dim, heads, capacity, splits, rtol,
                          write_cache=True)


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("fmt,dtype,cols,rows,rtol,parts", [
    (4, mx.float32, 4096, 130, 1e-5, None),   # o_proj-like K, rows not a multiple of the threadgroup's 8
    (8, mx.bfloat16, 512, 70, 1e-2, None),    # bfloat16 output rounding
    (17, mx.bfloat16, 256, 33, 1e-2, None),
    (32, mx.float32, 96, 40, 1e-5, None),     # K smaller than one step of 128 columns
    (4, mx.float32, 4096, 66, 1e-5, (32, 4)),  # Qwen3-30B-A3B's attention output in 4 splits
    (17, mx.bfloat16, 512, 40, 1e-2, (4, 8)),
    # the widest input Metal stages (dense.MAX_STAGED): 96 heads of 64 in 4 splits, the
    # combine's coefficients beside it, inside the emulation's 32 KB of threadgroup memory
    (8, mx.float32, 6144, 9, 1e-5, (96, 4)),
])
def test_dense_residual_matches_float64(flavor, fmt, dtype, cols, rows, rtol, parts):
    dense_residual_check(flavor, fmt, dtype, cols, rows, rtol, parts=parts)


@pytest.mark.parametrize("flavor", FLAVORS)
def test_qkv_attention_equals_the_two_launches(flavor):
    """qkv_attention against dense_norm + decode_attention_parts_kv, bit for bit (kernel_cases)."""
    from mlx_moe.kernels.kernel_cases import CASES

    for case in CASES["qkv_attention"]:
        case.check(flavor)


@pytest.mark.parametrize("flavor", FLAVORS)
def test_qkv_attention_oproj_equals_the_two_launches(flavor):
    """qkv_attention_oproj against qkv_attention + dense_residual (split tail), bit for bit
    (kernel_cases)."""
    from mlx_moe.kernels.kernel_cases import CASES

    for case in CASES["qkv_attention_oproj"]:
        case.check(flavor)


@pytest.mark.parametrize("flavor", FLAVORS)
def test_router_tail_rule_is_the_router_kernels(flavor):
    """The split router tail with the MoE routing rule (option RRULE): its other outputs
    bit for bit as without the rule, ids and weights bit for bit as moe_router_topk's on its
    logits (kernel_cases)."""
    from mlx_moe.kernels.kernel_cases import CASES

    for case in CASES["dense_residual_parts_router_split_route"]:
        case.check(flavor)


@pytest.mark.parametrize("flavor", FLAVORS)
def test_oproj_moe_equals_the_two_launches(flavor):
    """oproj_moe against dense_residual (split tail) + mul_mv_id_moe, bit for bit (kernel_cases)."""
    from mlx_moe.kernels.kernel_cases import CASES

    for case in CASES["oproj_moe"]:
        case.check(flavor)


@pytest.mark.parametrize("flavor", FLAVORS)
def test_dense_embed_matches_the_modules(flavor):
    """The token's embedding row (4-bit, 8-bit affine, bfloat16 and float32 tables) equals
    nn.QuantizedEmbedding's / nn.Embedding's own call exactly (kernel_cases)."""
    from mlx_moe.kernels.kernel_cases import CASES

    for case in CASES["dense_embed"]:
        case.check(flavor)


def test_dense_embed_refuses_a_bad_token():
    import mlx.nn as nn

    d = dense.dense_weight(nn.Embedding(10, 64))
    with pytest.raises(ValueError, match="one token id"):
        dense.dense_embed(mx.array([1, 2]), d, "emulated")
    with pytest.raises(ValueError, match="one token id"):
        dense.dense_embed(mx.array([1.0]), d, "emulated")


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("fmt,rfmt,dtype,cols,hidden,experts,nr,nsg,rtol", [
    (4, 8, mx.float32, 512, 128, 61, 2, 2, 1e-5),
    (17, 4, mx.float32, 256, 192, 8, 1, 8, 1e-5),        # bfloat16 o_proj, 4-bit router of 8
    (4, 8, mx.bfloat16, 4096, 2048, 128, 2, 8, 1e-2),    # Qwen3-30B-A3B, the default tail geometry
    (4, 8, mx.bfloat16, 4096, 2048, 128, 2, 16, 1e-2),
    # float routers; a threadgroup's rows not a whole number of the router's 16-byte
    # words (split: a word shared by two threadgroups, or three words touched by one)
    (4, 32, mx.float32, 256, 96, 12, 1, 2, 1e-5),
    (4, 17, mx.bfloat16, 256, 192, 8, 3, 4, 1e-2),
])
@pytest.mark.parametrize("tail", ["one", "split"])
@pytest.mark.parametrize("handoff", ["all", "one"])
def test_router_tail_matches_two_launches(flavor, fmt, rfmt, dtype, cols, hidden, experts, nr, nsg, rtol, tail, handoff,
                                          monkeypatch):
    """dense_residual_parts_router(_split): o_proj + residual, then the post-attention norm
    and the router projection, in the launch's last threadgroup (one) or shared by every
    threadgroup and added up by the last (split), twice on one counter; on CUDA also with
    the last threadgroup's hand-off fenced by one thread (registry.CUDA_HANDOFF "one")."""
    _handoff(flavor, handoff, monkeypatch)
    router_tail_check(flavor, fmt, rfmt, dtype, cols, hidden, experts, nr, nsg, rtol, tail=tail)


def test_split_tail_needs_room_for_its_shares():
    """The split tail keeps its shares in the counter after the ticket: a counter made
    for the one-threadgroup tail (4 words) is refused before any launch, naming the fix."""
    import mlx.nn as nn

    o = dense.dense_weight(nn.QuantizedLinear(256, 64, bias=False, bits=4, group_size=64))
    gate = dense.dense_weight(nn.QuantizedLinear(64, 8, bias=False, bits=8, group_size=64))
    tail = dense.RouterTail(mx.ones((64,)), 1e-6, gate, registry.ticket_counter())
    parts = (mx.zeros((2, 4, 128)), mx.ones((2, 4, 2)))
    with dense.router_tail("split"), pytest.raises(ValueError, match=r"needs 76 uint32.*tail_counter_words"):
        dense.dense_residual(parts, o, mx.zeros((1, 64)), "emulated", nr=2, nsg=4, router=tail)


def test_unreadable_projections_are_named():
    import mlx.nn as nn

    from mlx_moe.kernels.dense import dense_unsupported, dense_weight

    assert "3-bit" in dense_unsupported(nn.QuantizedLinear(256, 64, bits=3, group_size=64))
    assert "16 bytes" in dense_unsupported(nn.Linear(10, 8))
    assert "Conv1d" in dense_unsupported(nn.Conv1d(8, 8, 3))
    assert "16 bytes" in dense_unsupported(nn.Embedding(10, 3))
    assert dense_unsupported(nn.Embedding(10, 8)) is None  # embedding tables: dense_embed
    with pytest.raises(ValueError, match="cannot read this projection"):
        dense_weight(nn.Linear(10, 8))


def test_staging_limit_follows_the_flavor():
    """Wide inputs: Metal's 32 KB of threadgroup memory stages 6144 features (the
    emulation follows it), CUDA's 48 KB 8192 (Qwen3-235B's o_proj); beyond, a clear
    error before any launch (the fused plan then says why and keeps MLX's ops)."""
    import mlx.nn as nn

    from mlx_moe.kernels.dense import dense_residual, dense_weight, stack_unsupported

    wide = dense_weight(nn.QuantizedLinear(8192, 64, bias=False, bits=4, group_size=64))
    assert stack_unsupported([wide], "cuda") is None
    assert "6144" in stack_unsupported([wide], "emulated")
    assert "6144" in stack_unsupported([wide], "metal")
    with pytest.raises(ValueError, match="staging limit"):
        dense_residual(mx.zeros((1, 8192), mx.bfloat16), wide, mx.zeros((1, 64), mx.bfloat16), "emulated")


# -- the fused forward against mlx-lm's ----------------------------------------------------

FUSED = ("qwen3_moe", "qwen2_moe", "mixtral")


def fused_model(family: str, quantize: bool = False, lm_head: bool = False):
    """A tiny fp32 model of test_compiled_decode's configs with head_dim 32 (the
    kernel's lanes hold 32 dims each); quantize: attention and router projections
    as mlx-community checkpoints have them (MLX affine 4-bit, group 64), and the
    LM head too when lm_head."""
    import mlx.nn as nn

    saved = CONFIGS[family]
    if family != "qwen3_moe":
        CONFIGS[family] = dict(saved, num_attention_heads=2, num_key_value_heads=1)
    try:
        model = tiny_model(family)
    finally:
        CONFIGS[family] = saved
    if quantize:
        # (Qwen2's shared expert is 48 wide, not a multiple of the group: it stays float.)
        nn.quantize(model, group_size=64, bits=4,
                    class_predicate=lambda p, m: (isinstance(m, nn.Linear) and m.weight.shape[-1] % 64 == 0
                                                  and (lm_head or "lm_head" not in p)))
        mx.eval(model.parameters())
    return model


def prefilled(model, capacity=16):
    """A cache holding PROMPT, made by mlx-lm's forward on the CPU (on a GPU too: on
    MLX 0.32.4's CUDA backend the quantized forward of the prompt gave different
    results from run to run on these tiny shapes, BENCHMARKS.md 2026-12-05)."""
    cache = [StaticKVCache(capacity) for _ in model.layers]
    with mx.stream(mx.cpu):
        _mlx_lm_model_class(model).__call__(model, mx.array(PROMPT)[None], cache=cache)
        mx.eval([c.state for c in cache])
    return cache


def copy_cache(cache):
    out = [StaticKVCache(c.capacity) for c in cache]
    for o, c in zip(out, cache):
        o.keys, o.values, o.offset = mx.array(c.keys), mx.array(c.values), c.offset
    return out


def one_step(model, family, flavor, token=5, kv_in_place=True, route_in_experts=False, tail=False,
             one_launch=False, chain=False, oproj=False, attn=False, tail_rule=False):
    """(fused logits, mlx-lm logits, fused caches, mlx-lm caches, fused routing, mlx-lm routing)."""
    cache = prefilled(model)
    ref_cache = copy_cache(cache)
    tok = mx.array([[token]], mx.int32)
    routes = {"ref": [], "fused": []}

    def hook(which):
        return lambda ev: routes[which].append((ev.layer, np.sort(np.array(ev.expert_ids), 1),
                                                np.sort(np.array(ev.weights), 1)))

    with routing_hook(hook("ref")):
        HOOKS.begin_forward(1, 1, len(PROMPT), len(model.layers))
        want = HOOKS.end_forward(_mlx_lm_model_class(model).__call__(model, tok, cache=ref_cache))
        mx.eval(want)
    plan, why = fused_step.plan_or_reason(model, flavor)
    assert why is None, why
    set_expert_backend(model, KernelBackend(flavor))
    # tail: False (the router's own launch), True (the o_proj launch's last threadgroup)
    # or "split" (shared by every threadgroup of that launch: dense.ROUTER_TAIL)
    # one_launch: the MoE layer as mul_mv_id_moe (fused_step.MOE_ONE_LAUNCH; with route_in_experts)
    # chain: q/k/v and the attention as qkv_attention (fused_step.QKV_ATTENTION_ONE_LAUNCH)
    # oproj: o_proj's tail and the MoE layer as oproj_moe (fused_step.OPROJ_MOE_ONE_LAUNCH)
    # attn: q/k/v, the attention and o_proj's tail as qkv_attention_oproj (ATTENTION_ONE_LAUNCH)
    # tail_rule: the split tail runs the routing rule, the MoE layer its given-routing launch
    switches = ("KV_IN_PLACE", "ROUTE_IN_EXPERTS", "ROUTER_IN_RESIDUAL", "MOE_ONE_LAUNCH",
                "QKV_ATTENTION_ONE_LAUNCH", "OPROJ_MOE_ONE_LAUNCH", "ATTENTION_ONE_LAUNCH", "ROUTE_IN_TAIL")
    try:
        pos = mx.array([len(PROMPT)], mx.int32)
        traced = [_TracedCache(c.keys, c.values, pos) for c in cache]
        with routing_hook(hook("fused")), dense.router_tail("split" if tail == "split" else "one"), \
                registry.switched(fused_step.__name__, switches, KV_IN_PLACE=kv_in_place,
                                  ROUTE_IN_EXPERTS=route_in_experts, ROUTER_IN_RESIDUAL=bool(tail),
                                  MOE_ONE_LAUNCH=(flavor,) if one_launch else (),
                                  QKV_ATTENTION_ONE_LAUNCH=(flavor,) if chain else (),
                                  OPROJ_MOE_ONE_LAUNCH=(flavor,) if oproj else (),
                                  ATTENTION_ONE_LAUNCH=(flavor,) if attn else (),
                                  ROUTE_IN_TAIL=(flavor,) if tail_rule else ()):
            HOOKS.begin_forward(1, 1, len(PROMPT), len(plan.layers))
            got = HOOKS.end_forward(fused_step.forward(model, plan, tok, traced, pos))
            mx.eval(got, [(c.keys, c.values) for c in traced])
    finally:
        set_expert_backend(model, MLXBackend())
    return got, want, traced, ref_cache, routes["fused"], routes["ref"]


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("family,quantize,kv_in_place,route_in_experts,tail,one_launch",
                         [(f, False, True, False, False, False) for f in FUSED]
                         + [("qwen3_moe", True, True, False, False, False), ("mixtral", True, True, False, False, False),
                            ("qwen3_moe", False, False, False, False, False),
                            ("qwen2_moe", False, True, True, False, False), ("mixtral", True, True, True, False, False),
                            ("qwen3_moe", True, True, True, True, False), ("qwen2_moe", False, True, False, True, False),
                            ("qwen3_moe", True, True, True, "split", False),
                            ("mixtral", False, True, False, "split", False),
                            ("qwen3_moe", True, True, True, True, True), ("qwen2_moe", False, True, True, False, True),
                            ("mixtral", False, True, True, True, True)])
def test_fused_step_matches_mlx_lm_forward(flavor, family, quantize, kv_in_place, route_in_experts, tail,
                                           one_launch):
    """One token through the fused layers against mlx-lm's forward over a copy of the
    same cache: logits, the cache after the step (the new key and value in slot pos,
    written in place or by the scatters) and the routing the hook sees (made in the
    experts' launch, or by moe_router_topk; the router's inputs from the o_proj
    launch's tail or from a launch of their own; the MoE layer in one launch or two)."""
    model = fused_model(family, quantize)
    assert_step_matches(*one_step(model, family, flavor, kv_in_place=kv_in_place, route_in_experts=route_in_experts,
                                  tail=tail, one_launch=one_launch))


def assert_step_matches(got, want, cache, ref_cache, routes, ref_routes):
    """one_step's results agree: logits, the cache after the step (the new key and value in
    the slot mlx-lm wrote) and the routing the hook sees (experts and weights)."""
    g, w = np.array(got), np.array(want)
    assert g.shape == w.shape
    assert np.abs(g - w).max() <= 1e-5 * np.abs(w).max() + 1e-6, np.abs(g - w).max()
    assert g.argmax() == w.argmax()
    for c, r in zip(cache, ref_cache):
        np.testing.assert_allclose(np.array(c.keys[:, :, :len(PROMPT) + 1]),
                                   np.array(r.keys[:, :, :len(PROMPT) + 1]), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.array(c.values), np.array(r.values), rtol=1e-5, atol=1e-5)
    assert [r[0] for r in routes] == [r[0] for r in ref_routes]
    for (_, gi, gw), (_, wi, ww) in zip(routes, ref_routes):
        assert (gi == wi).all()
        np.testing.assert_allclose(gw, ww, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("family,quantize", [("qwen3_moe", True), ("qwen2_moe", False), ("mixtral", False)])
@pytest.mark.parametrize("handoff", ["all", "one"])
def test_chained_launches_match_mlx_lm_forward(flavor, family, quantize, handoff, monkeypatch):
    """With fused_step.QKV_ATTENTION_ONE_LAUNCH the q/k/v projections and the attention are
    one launch (qkv_attention), and with OPROJ_MOE_ONE_LAUNCH o_proj with the split router
    tail and the MoE layer (oproj_moe): a layer is two launches.  Logits, the cache after the
    step and the routing as mlx-lm's forward gives them; Qwen2's q/k/v biases included,
    and its shared expert keeps o_proj and the experts apart.  On CUDA also with every
    hand-off fenced by one thread (registry.CUDA_HANDOFF "one")."""
    from mlx_moe.kernels import chain

    _handoff(flavor, handoff, monkeypatch)

    model = fused_model(family, quantize)
    calls = {"qkv": 0, "oproj": 0}
    real_qkv, real_oproj = fused_step.qkv_attention, chain.oproj_moe
    monkeypatch.setattr(fused_step, "qkv_attention",
                        lambda *a, **k: calls.__setitem__("qkv", calls["qkv"] + 1) or real_qkv(*a, **k))
    monkeypatch.setattr(kernels_backend, "oproj_moe",
                        lambda *a, **k: calls.__setitem__("oproj", calls["oproj"] + 1) or real_oproj(*a, **k))
    results = one_step(model, family, flavor, route_in_experts=True, tail="split", one_launch=True, chain=True,
                       oproj=True)
    assert calls["qkv"] == len(model.layers), "the layers did not take the one-launch q/k/v + attention"
    from mlx_moe.moe import moe_layers

    shared = moe_layers(model)[0].has_shared_expert
    assert calls["oproj"] == (0 if shared else len(model.layers)), calls
    assert_step_matches(*results)


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("family,quantize", [("qwen3_moe", True), ("qwen2_moe", False), ("mixtral", False)])
@pytest.mark.parametrize("handoff", ["all", "one"])
def test_attention_block_launch_matches_mlx_lm_forward(flavor, family, quantize, handoff, monkeypatch):
    """With fused_step.ATTENTION_ONE_LAUNCH q/k/v, the attention and o_proj with the split
    router tail are one launch (qkv_attention_oproj), then the one-launch MoE layer: a layer
    is two launches whatever the family (Qwen2's shared expert runs on MLX's ops between
    them).  Logits, the cache after the step and the routing as mlx-lm's forward gives them;
    on CUDA also with every hand-off fenced by one thread (registry.CUDA_HANDOFF "one")."""
    _handoff(flavor, handoff, monkeypatch)
    calls = []
    real = fused_step.qkv_attention_oproj
    monkeypatch.setattr(fused_step, "qkv_attention_oproj", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = fused_model(family, quantize)
    results = one_step(model, family, flavor, route_in_experts=True, tail="split", one_launch=True, chain=True,
                       attn=True)
    assert len(calls) == len(model.layers), "the layers did not take the one-launch attention block"
    assert_step_matches(*results)


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("family,quantize,chain", [("qwen3_moe", True, True), ("qwen2_moe", False, True),
                                                   ("mixtral", False, False), ("qwen3_moe", False, False)])
def test_routing_rule_in_the_tail_matches_mlx_lm_forward(flavor, family, quantize, chain, monkeypatch):
    """With fused_step.ROUTE_IN_TAIL the split router tail (o_proj's launch) runs the
    routing rule and every layer's experts run under the ids and weights it wrote
    (mul_mv_id_moe_ids), the rule nowhere else: logits, the cache after the step and the
    routing the hook sees as mlx-lm's forward gives them (Qwen2's shared expert included;
    q/k/v and the attention chained in one launch or not)."""
    from mlx_moe.kernels import mul_mv_id as mv

    calls = {"ids": 0, "routed": 0}
    real_ids = kernels_backend.mul_mv_id_moe_ids
    monkeypatch.setattr(kernels_backend, "mul_mv_id_moe_ids",
                        lambda *a, **k: calls.__setitem__("ids", calls["ids"] + 1) or real_ids(*a, **k))
    monkeypatch.setattr(kernels_backend, "mul_mv_id_moe",
                        lambda *a, **k: calls.__setitem__("routed", calls["routed"] + 1) or mv.mul_mv_id_moe(*a, **k))
    model = fused_model(family, quantize)
    results = one_step(model, family, flavor, route_in_experts=True, tail="split", one_launch=True, chain=chain,
                       tail_rule=True)
    assert calls == {"ids": len(model.layers), "routed": 0}, calls
    assert_step_matches(*results)


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("quantized", [False, True], ids=["float_table", "q4_table"])
def test_embedding_launch_matches_mlx_lm(flavor, quantized, monkeypatch):
    """With fused_step.EMBED_LAUNCH the token's embedding is one dense_embed launch
    (plan.embed): logits, the cache after the step and the routing as mlx-lm's forward
    gives them, for a float32 table and a 4-bit one (nn.QuantizedEmbedding, as
    mlx-community checkpoints have it)."""
    import mlx.nn as nn

    model = fused_model("qwen3_moe")
    if quantized:
        nn.quantize(model, group_size=64, bits=4, class_predicate=lambda p, m: isinstance(m, nn.Embedding))
        mx.eval(model.parameters())
    monkeypatch.setattr(fused_step, "EMBED_LAUNCH", (flavor,))
    plan, why = fused_step.plan_or_reason(model, flavor)
    assert why is None and plan.embed is not None and plan.embed.fmt == (4 if quantized else 32)
    calls = []
    real = dense.dense_embed
    monkeypatch.setattr(dense, "dense_embed", lambda *a, **k: calls.append(1) or real(*a, **k))
    results = one_step(model, "qwen3_moe", flavor)
    assert calls, "the fused forward did not take the embedding launch"
    assert_step_matches(*results)


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("quantized_head", [False, True], ids=["float_head", "q4_head"])
def test_lm_head_is_one_launch(flavor, quantized_head):
    """The final norm and the LM head run as one dense_norm launch (plan.head) where the
    head is a projection of its own: logits as mlx-lm's forward gives them (a float32
    head, and a 4-bit one as mlx-community checkpoints have it); tied embeddings keep
    MLX's ops (embed_tokens.as_linear)."""
    model = fused_model("qwen3_moe", quantize=quantized_head, lm_head=quantized_head)
    plan, why = fused_step.plan_or_reason(model, flavor)
    assert why is None and plan.head is not None
    assert plan.head.fmt == (4 if quantized_head else 32) and plan.head.rows == model.args.vocab_size
    got, want, *_ = one_step(model, "qwen3_moe", flavor)
    g, w = np.array(got), np.array(want)
    assert np.abs(g - w).max() <= 1e-5 * np.abs(w).max() + 1e-6, np.abs(g - w).max()
    tied = fused_model("qwen3_moe")
    tied.args.tie_word_embeddings = True
    assert fused_step.plan_or_reason(tied, flavor)[0].head is None


def _dot_nodes(path, arrays) -> int:
    import re

    mx.export_to_dot(str(path), arrays)
    return len(re.findall(r'label ="([^"]+)", shape=rectangle', path.read_text()))


@pytest.mark.parametrize("kv_in_place,route_in_experts,tail,one_launch,most",
                         [(True, False, False, False, 7), (True, True, False, False, 6),
                          (False, False, False, False, 9), (True, True, True, False, 5),
                          (True, True, ("cuda",), False, 6), (True, True, True, True, 4)])
def test_fused_step_is_few_graph_nodes(tmp_path, monkeypatch, kv_in_place, route_in_experts, tail, one_launch, most):
    """Seven nodes per decoder layer (mlx-lm's forward: 30-40), what the path is for;
    six with the routing rule inside the experts' launch, five with the router's
    projection in the o_proj launch too, four with the MoE layer in one launch, nine
    with the cache written by two scatters.

    The emulated kernels run eagerly (their outputs are evaluated arrays, no graph
    nodes), so here every kernel is a lazy stand-in: outputs made by constant ops
    tied to the kernel's inputs by one Depends node.  The stand-ins' own nodes are
    counted as they are made and subtracted, and each launch counts as one node."""

    own = {"nodes": 0, "launches": 0}

    def lazy_maker(name, input_names, output_names, source, header, **_):
        def launch(inputs, output_shapes, output_dtypes, **kwargs):
            outs = [mx.zeros(shape, dtype) for shape, dtype in zip(output_shapes, output_dtypes)]
            own["nodes"] += _dot_nodes(tmp_path / "own.dot", outs) + 1  # + the Depends node
            own["launches"] += 1
            return mx.depends(outs, list(inputs))

        return launch

    monkeypatch.setattr(registry, "_KERNELS", {})
    monkeypatch.setattr(registry, "_maker", lambda flavor: lazy_maker)
    monkeypatch.setattr(fused_step, "KV_IN_PLACE", kv_in_place)
    monkeypatch.setattr(fused_step, "ROUTE_IN_EXPERTS", route_in_experts)
    monkeypatch.setattr(fused_step, "ROUTER_IN_RESIDUAL", tail)
    monkeypatch.setattr(fused_step, "MOE_ONE_LAUNCH", ("emulated",) if one_launch else ())
    model = fused_model("qwen3_moe")
    plan, _ = fused_step.plan_or_reason(model, "emulated")
    cache = prefilled(model)  # (mlx backend)
    pos = mx.array([len(PROMPT)], mx.int32)

    def nodes(n_layers):
        """Graph nodes of a forward through the first n_layers layers, each launch one node."""
        own["nodes"] = own["launches"] = 0
        traced = [_TracedCache(c.keys, c.values, pos) for c in cache[:n_layers]]
        part = fused_step.Plan(plan.flavor, plan.layers[:n_layers])
        out = fused_step.forward(model, part, mx.array([[5]], mx.int32), traced, pos)
        total = _dot_nodes(tmp_path / "g.dot", [out] + [c.keys for c in traced] + [c.values for c in traced])
        # qkv, attention, o_proj, (router projection,) (top-k,) swiglu, down
        tail_on = tail is True or (bool(tail) and "emulated" in tail)  # ("cuda",): not this flavor
        assert own["launches"] == (7 - route_in_experts - tail_on - one_launch) * n_layers
        return total - own["nodes"] + own["launches"]

    set_expert_backend(model, KernelBackend("emulated"))
    try:
        per_layer = nodes(2) - nodes(1)
    finally:
        set_expert_backend(model, MLXBackend())
    assert per_layer <= most, per_layer  # the launches (and two cache writes)


def test_unsupported_models_say_why():
    assert "cover" in fused_step.unsupported(tiny_model("olmoe"), "emulated")
    assert "cover" in fused_step.unsupported(tiny_model("deepseek_v2"), "emulated")
    assert "metal and cuda" in fused_step.unsupported(fused_model("qwen3_moe"), None)
    model = tiny_model("mixtral")  # head_dim 16: decode_attention's lanes hold 32 dimensions each
    assert "head dimension 16" in fused_step.unsupported(model, "emulated")


# -- on the GPU: the compiled step through the fused layers -------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not _HAS_CUDA, reason="needs MLX's CUDA backend and an NVIDIA GPU")
@pytest.mark.skipif(os.environ.get("MLX_ENABLE_TF32") != "0",
                    reason="MLX_ENABLE_TF32 is not 0: TF32 matmuls would make the uncompiled reference inexact")
@pytest.mark.parametrize("family", FUSED)
def test_compiled_fused_decode_tokens_match_uncompiled(family, monkeypatch):
    """12 greedy tokens of the compiled step through the fused layers (the token from
    greedy_sample and from the sampler; the cache
    written in place, and by scatters; the position on the device and from the host;
    the routing inside the gate/up launch and in its own; q/k/v and the attention, and
    o_proj and the MoE layer, in one launch each and apart; the attention block in one
    launch and not; the MoE layer in one launch
    and in two) and without them,
    against the uncompiled path, on float32 weights.  MLX_ENABLE_TF32=0 (conftest.py): MLX's CUDA float32
    matmuls otherwise run in TF32 and the reference is the inexact side (the fused
    step then differs by 5e-3 in the logits).  Float weights, not MLX-quantized
    ones: on MLX 0.32.4's CUDA backend the quantized forward of the 7-token prompt
    through these 64-feature projections gave different logits from run to run,
    on the `mlx` expert backend too (BENCHMARKS.md, 2026-12-05)."""
    from mlx_moe import compiled as C
    from test_compiled_decode import compiled, uncompiled

    model = fused_model(family)
    set_expert_backend(model, KernelBackend("cuda"))
    try:
        want, want_lp = uncompiled(model, PROMPT, 12)
        decoder = C.decoder_for(model)
        assert decoder.fused is not None, decoder.fused_reason
        got, got_lp = compiled(model, PROMPT, 12)  # the defaults (greedy: greedy_sample's token)
        monkeypatch.setattr(C, "GREEDY_KERNEL", False)
        sampled, sampled_lp = compiled(model, PROMPT, 12)  # the sampler on the step's log-probabilities
        monkeypatch.setattr(C, "GREEDY_KERNEL", True)
        monkeypatch.setattr(C, "DEVICE_POSITION", not C.DEVICE_POSITION)
        other_pos, _ = compiled(model, PROMPT, 12)
        one_launch = fused_step.MOE_ONE_LAUNCH
        monkeypatch.setattr(fused_step, "MOE_ONE_LAUNCH", () if one_launch else ("cuda",))
        other_moe, _ = compiled(model, PROMPT, 12)
        monkeypatch.setattr(fused_step, "MOE_ONE_LAUNCH", one_launch)
        chains = (fused_step.QKV_ATTENTION_ONE_LAUNCH, fused_step.OPROJ_MOE_ONE_LAUNCH)
        monkeypatch.setattr(fused_step, "QKV_ATTENTION_ONE_LAUNCH", () if chains[0] else ("cuda",))
        monkeypatch.setattr(fused_step, "OPROJ_MOE_ONE_LAUNCH", () if chains[1] else ("cuda",))
        other_chain, _ = compiled(model, PROMPT, 12)  # (a layer in two launches)
        monkeypatch.setattr(fused_step, "QKV_ATTENTION_ONE_LAUNCH", chains[0])
        monkeypatch.setattr(fused_step, "OPROJ_MOE_ONE_LAUNCH", chains[1])
        block = fused_step.ATTENTION_ONE_LAUNCH
        monkeypatch.setattr(fused_step, "ATTENTION_ONE_LAUNCH", () if block else ("cuda",))
        other_block, _ = compiled(model, PROMPT, 12)  # (the attention block in one launch, or not)
        monkeypatch.setattr(fused_step, "ATTENTION_ONE_LAUNCH", block)
        monkeypatch.setattr(fused_step, "ROUTE_IN_EXPERTS", not fused_step.ROUTE_IN_EXPERTS)
        other_route, _ = compiled(model, PROMPT, 12)
        monkeypatch.setattr(fused_step, "ROUTER_IN_RESIDUAL", not fused_step.ROUTER_IN_RESIDUAL)
        other_tail, _ = compiled(model, PROMPT, 12)
        monkeypatch.setattr(fused_step, "KV_IN_PLACE", False)
        scattered, scattered_lp = compiled(model, PROMPT, 12)
        monkeypatch.setattr(C, "FUSED_LAYERS", False)
        assert C.decoder_for(model).fused is None  # rebuilt without the fused layers
        plain, _ = compiled(model, PROMPT, 12)
    finally:
        set_expert_backend(model, MLXBackend())
    assert len(set(want)) > 2, "degenerate model: the comparison would prove little"
    assert got == want, (got, want)
    assert scattered == want and plain == want and other_pos == want and other_route == want and \
        other_tail == want and other_moe == want and other_chain == want and other_block == want, (
            scattered, plain, other_pos, other_route, other_tail, other_moe, other_chain, other_block, want)
    assert sampled == want, (sampled, want)
    np.testing.assert_allclose(got_lp, want_lp, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(sampled_lp, want_lp, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(scattered_lp, want_lp, rtol=1e-4, atol=1e-4)


def test_every_layer_has_its_own_zeroed_ticket_counter():
    """The router tails' ticket counters (made together, in one evaluation), and the
    one-launch MoE layers': one device buffer per layer and kernel, zero, none shared (two
    layers' launches on one counter would hand one layer's tail to a threadgroup of the
    other's)."""
    model = fused_model("qwen3_moe")
    plan, why = fused_step.plan_or_reason(model, "emulated")
    assert why is None
    counts = [lp.tail.count for lp in plan.layers]
    assert len(counts) == len(model.model.layers) >= 2 and all(c is not None for c in counts)
    assert all(c.dtype == mx.uint32 and not np.array(c).any() for c in counts)
    # room for the split tail's shares at the geometries forward() launches it with: its
    # own launch's, oproj_moe's (TAIL_NR x the MoE layer's simdgroups) and
    # qkv_attention_oproj's (chain.OPROJ_NR x chain.ATTENTION_NSG)
    from mlx_moe.kernels import chain

    lp = plan.layers[0]
    nsg = min(g.nsg for g in dispatch.MOE_LAYER.values())
    groups = max(-(-lp.o.rows // (nr * n)) for nr, n in ((dense.TAIL_NR, dense.TAIL_NSG), (dense.TAIL_NR, nsg),
                                                          (chain.OPROJ_NR, chain.ATTENTION_NSG)))
    assert all(c.size == 4 + (lp.tail.gate.rows + 1) * groups for c in counts)
    assert len({id(c) for c in counts}) == len(counts)  # each its own operation's output buffer
    # and each layer's one-launch MoE (mul_mv_id_moe), q/k/v + attention (qkv_attention) and
    # o_proj + MoE (oproj_moe) a counter of its own: zero, 2 words at least
    own = [c for lp in plan.layers for c in (lp.moe_count, lp.chain_count, lp.oproj_count)]
    assert all(c is not None and c.dtype == mx.uint32 and c.size >= 2 and not np.array(c).any() for c in own)
    assert len({id(c) for c in own + counts}) == len(own) + len(counts)


def test_each_kernel_setting_gets_its_own_trace(monkeypatch):
    """The compiled step replays its trace, so every setting that picks the fused layers'
    kernels must key it: with one key for two settings, a benchmark's second engine (or a
    user's switch) would replay the first one's kernels (as bench_generate's +tailsplit
    did before dense.ROUTER_TAIL was part of the key)."""
    from mlx_moe import compiled as C
    from mlx_moe.kernels import attention, chain

    model = fused_model("qwen3_moe")
    set_expert_backend(model, KernelBackend("emulated"))
    try:
        decoder = C.decoder_for(model)
        assert decoder.fused is not None, decoder.fused_reason
        base = decoder._function(False, False)
        assert decoder._function(False, False) is base
        seen = [base]
        for module, name, value in [
                (fused_step, "MOE_ONE_LAUNCH", ("emulated",)), (dense, "ROUTER_TAIL", "one"),
                (dispatch, "MOE_LAYER", {**dispatch.MOE_LAYER, "q4_0": dispatch.LayerGeometry(1, 4, 4)}),
                (fused_step, "ROUTE_IN_EXPERTS", False), (fused_step, "KV_IN_PLACE", False),
                (fused_step, "EMBED_LAUNCH", () if "emulated" in fused_step.EMBED_LAUNCH else ("emulated",)),
                (fused_step, "HEAD_LAUNCH", False),
                (attention, "SPLITS", 8), (fused_step, "QKV_ATTENTION_ONE_LAUNCH", ("emulated",)),
                (fused_step, "OPROJ_MOE_ONE_LAUNCH", ("emulated",)), (chain, "QKV_NSG", 8),
                (fused_step, "ATTENTION_ONE_LAUNCH", ("emulated",)), (chain, "ATTENTION_NSG", 8),
                (fused_step, "ROUTE_IN_TAIL", ("emulated",))]:
            monkeypatch.setattr(module, name, value)
            fn = decoder._function(False, False)
            assert all(fn is not other for other in seen), name
            seen.append(fn)
    finally:
        set_expert_backend(model, MLXBackend())
