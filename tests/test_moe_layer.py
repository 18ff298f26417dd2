"""The MoE layer's expert compute against an independent numpy oracle, and the
proofs that zero experts and a disabled shared expert cost no FFN work."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models.switch_layers import QuantizedSwitchLinear

from mlx_moe.backends import MLXBackend
from mlx_moe.experts import Experts


def numpy_moe(x, ids, weights, gate, up, down, n_identity=0):
    """sum_j w * down(silu(gate x) * up x) per token, written out token by token."""
    E = gate.shape[0]
    y = np.zeros_like(x, dtype=np.float64)
    for t in range(x.shape[0]):
        for e, w in zip(ids[t], weights[t]):
            if 0 <= e < E:
                g = gate[e] @ x[t]
                h = g / (1 + np.exp(-g)) * (up[e] @ x[t])
                y[t] += w * (down[e] @ h)
            elif E <= e < E + n_identity:
                y[t] += w * x[t]
    return y


def make_experts(E, D, F, seed=0):
    rng = np.random.default_rng(seed)
    ex = Experts(D, F, E)
    ex.gate_proj.weight = mx.array(rng.standard_normal((E, F, D)).astype(np.float32) / np.sqrt(D))
    ex.up_proj.weight = mx.array(rng.standard_normal((E, F, D)).astype(np.float32) / np.sqrt(D))
    ex.down_proj.weight = mx.array(rng.standard_normal((E, D, F)).astype(np.float32) / np.sqrt(F))
    return ex


def dense(ex):
    """Float weights of each projection, dequantized if needed."""
    out = []
    for p in (ex.gate_proj, ex.up_proj, ex.down_proj):
        if isinstance(p, QuantizedSwitchLinear):
            w = mx.dequantize(p.weight, p.scales, p.biases, group_size=p.group_size, bits=p.bits)
        else:
            w = p.weight
        out.append(np.array(w, dtype=np.float64))
    return out


def routing(T, k, E, rng, n_identity=0, pad=False, repeat=False):
    hi = E + n_identity + (3 if pad else 0)
    ids = np.stack([rng.choice(hi, size=k, replace=False) for _ in range(T)]).astype(np.int32)
    if pad:
        ids[rng.random(ids.shape) < 0.2] = -1  # padding: contributes nothing
    if repeat:
        ids[:, 1] = ids[:, 0]  # the same expert twice in one token
    w = rng.random((T, k)).astype(np.float32)
    return ids, w


@pytest.mark.parametrize("T", [1, 5, 40])  # 40 x 4 = 160 pairs: the sorted path
@pytest.mark.parametrize("case", ["plain", "identity", "padding", "repeated"])
def test_mlx_backend_matches_numpy(T, case):
    E, D, F, k = 8, 32, 24, 4
    rng = np.random.default_rng(T)
    ex = make_experts(E, D, F)
    n_identity = 3 if case == "identity" else 0
    ids, w = routing(T, k, E, rng, n_identity, pad=case == "padding", repeat=case == "repeated")
    x = rng.standard_normal((T, D)).astype(np.float32)
    backend = MLXBackend()
    y = backend(mx.array(x), mx.array(ids), mx.array(w), ex, n_identity=n_identity, may_pad=case == "padding")
    ref = numpy_moe(x.astype(np.float64), ids, w, *dense(ex), n_identity=n_identity)
    np.testing.assert_allclose(np.array(y), ref, rtol=1e-4, atol=1e-5)
    real = int(((ids >= 0) & (ids < E)).sum())
    assert backend.stats.rows == real  # FFN work for real pairs only


@pytest.mark.parametrize("bits,group_size", [(4, 32), (8, 64)])
def test_mlx_backend_quantized_matches_numpy(bits, group_size):
    E, D, F, k, T = 8, 64, 64, 2, 7
    rng = np.random.default_rng(1)
    ex = make_experts(E, D, F)
    nn.quantize(ex, group_size=group_size, bits=bits)
    assert isinstance(ex.gate_proj, QuantizedSwitchLinear)
    ids, w = routing(T, k, E, rng, n_identity=2)
    x = rng.standard_normal((T, D)).astype(np.float32)
    y = MLXBackend()(mx.array(x), mx.array(ids), mx.array(w), ex, n_identity=2)
    ref = numpy_moe(x.astype(np.float64), ids, w, *dense(ex), n_identity=2)
    np.testing.assert_allclose(np.array(y), ref, rtol=1e-4, atol=1e-4)


def test_identity_slots_do_no_ffn_work():
    """Every slot an identity expert: zero FFN rows, output = sum(w) * x."""
    E, D, F, k, T = 4, 16, 8, 3, 6
    rng = np.random.default_rng(2)
    ex = make_experts(E, D, F)
    ids = np.full((T, k), E, np.int32) + rng.integers(0, 2, (T, k)).astype(np.int32)
    w = rng.random((T, k)).astype(np.float32)
    x = rng.standard_normal((T, D)).astype(np.float32)
    backend = MLXBackend()
    y = backend(mx.array(x), mx.array(ids), mx.array(w), ex, n_identity=2)
    assert backend.stats.rows == 0
    np.testing.assert_allclose(np.array(y), x * w.sum(1, keepdims=True), rtol=1e-6)


def test_model_level_zero_experts_skip_ffn(reference_checkpoints):
    """LongCat with zero experts really selected: the backend computes exactly the
    (token, real expert) pairs transformers' router chose, no more."""
    import mlx_moe
    from mlx_moe.backends import MLXBackend

    ref = reference_checkpoints.reference("longcat_flash")
    model, _ = mlx_moe.load(str(ref.path), tokenizer=False)
    backend = MLXBackend()
    mlx_moe.set_expert_backend(model, backend)
    layer = mlx_moe.moe_layers(model)[0]
    mx.eval(model(mx.array(ref.tokens)[None]))
    real_pairs = sum(int((r.indices < layer.num_experts).sum()) for r in ref.routing)
    zero_pairs = sum(int((r.indices >= layer.num_experts).sum()) for r in ref.routing)
    assert zero_pairs > 0, "the reference must select zero experts"
    assert backend.stats.rows == real_pairs


def test_disabled_shared_expert_has_no_weights_and_no_compute(reference_checkpoints):
    import mlx_moe

    with_shared, _ = mlx_moe.load(str(reference_checkpoints.reference("qwen2_moe_shared").path), tokenizer=False)
    without, _ = mlx_moe.load(str(reference_checkpoints.reference("qwen2_moe_noshared").path), tokenizer=False)
    for layer in mlx_moe.moe_layers(without):
        assert not layer.has_shared_expert
        assert not any("shared" in k for k, _ in nn.utils.tree_flatten(layer.parameters()))
        assert layer.shared_output(mx.zeros((1, 4))) is None
    assert all(layer.has_shared_expert for layer in mlx_moe.moe_layers(with_shared))
    n_with = sum(v.size for _, v in nn.utils.tree_flatten(with_shared.parameters()))
    n_without = sum(v.size for _, v in nn.utils.tree_flatten(without.parameters()))
    assert n_without < n_with
