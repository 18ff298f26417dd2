"""The fused router kernel (metal/router.metal) under the CPU emulation of Metal,
against mlx_moe/router.py's function for every family, and against a numpy
oracle for sigmoid scoring and for ties (lower expert id wins).

The kernel returns the k ids in selection order; mlx_moe/router.py returns
them unordered, so both are compared per token after sorting by id.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_moe import router as R
from mlx_moe.kernels.router import RouterParams, fused_topk

FLAVOR = "emulated"
_HAS_CUDA = hasattr(mx, "cuda") and mx.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _HAS_CUDA, reason="needs MLX's CUDA backend and an NVIDIA GPU")
@pytest.mark.parametrize("params", [dict(k=8, normalize=True), dict(k=2, score="topk_softmax"),
                                    dict(k=6, n_group=8, topk_group=3, scaling=16.0)])
def test_cuda_twin_matches_mlx_reference(params):
    # The same body through shims_cuda.h on the GPU against the family's rule in MLX
    # ops (mlx_moe/router.py) on the GPU; the CPU tests below hold the emulation to it.
    lg = _logits(300, 64, seed=12)
    p = RouterParams(**params)
    got = fused_topk(lg, p, "cuda")
    assert_same_routing(got, R.route(lg, p))
    # selection order: weights descend within each token (the score order, for these rules)
    assert np.all(np.diff(np.array(got[1]), axis=1) <= 0)


def _logits(T, E, seed, dtype=mx.float32, scale=2.0):
    rng = np.random.default_rng(seed)
    return mx.array((rng.standard_normal((T, E)) * scale).astype(np.float32)).astype(dtype)


def _by_id(ids, w):
    ids, w = np.array(ids), np.array(w)
    order = np.argsort(ids, axis=1, kind="stable")
    return np.take_along_axis(ids, order, 1), np.take_along_axis(w, order, 1)


def assert_same_routing(got, want, rtol=1e-5):
    gi, gw = _by_id(*got)
    wi, ww = _by_id(*want)
    np.testing.assert_array_equal(gi, wi)
    np.testing.assert_allclose(gw, ww, rtol=rtol, atol=1e-7)
    assert got[0].dtype == mx.int32 and got[1].dtype == mx.float32


def test_selection_order_is_descending():
    lg = _logits(5, 40, 0)
    ids, w = fused_topk(lg, RouterParams(6), FLAVOR)
    probs = np.array(mx.softmax(lg, axis=-1))
    sel = np.take_along_axis(probs, np.array(ids), 1)
    assert np.all(np.diff(sel, axis=1) <= 0)
    np.testing.assert_allclose(np.array(w), sel, rtol=1e-5)


@pytest.mark.parametrize("T,E,k,normalize,dtype", [
    (7, 128, 8, True, mx.float32),     # qwen3_moe (Qwen3-30B-A3B router shape)
    (5, 60, 4, False, mx.bfloat16),    # qwen2_moe: 60 experts, not a multiple of 32
    (6, 64, 8, True, mx.float16),      # olmoe
])
def test_softmax_topk_families(T, E, k, normalize, dtype):
    lg = _logits(T, E, seed=E + k, dtype=dtype)
    got = fused_topk(lg, RouterParams(k, normalize=normalize), FLAVOR)
    assert_same_routing(got, R.softmax_topk(lg, k, normalize=normalize))


def test_mixtral_topk_then_softmax():
    lg = _logits(9, 8, seed=3)
    got = fused_topk(lg, RouterParams(2, score="topk_softmax"), FLAVOR)
    assert_same_routing(got, R.topk_softmax(lg, 2))


def test_deepseek_greedy_with_scaling():
    lg = _logits(5, 64, seed=4)
    got = fused_topk(lg, RouterParams(6, scaling=2.5), FLAVOR)
    assert_same_routing(got, R.greedy_topk(lg, 6, scaling=2.5))


def test_deepseek_group_limited():
    # 64 experts in 8 groups of 8, 3 groups kept, top-6, scaled.
    lg = _logits(8, 64, seed=5)
    got = fused_topk(lg, RouterParams(6, n_group=8, topk_group=3, scaling=16.0), FLAVOR)
    assert_same_routing(got, R.group_limited_topk(lg, 6, 8, 3, scaling=16.0))


@pytest.mark.parametrize("normalize", [False, True])
def test_longcat_bias_for_selection_and_scaling(normalize):
    # 40 real + 20 identity experts, k = 12; a bias large enough to change the choice.
    n = 60
    lg = _logits(6, n, seed=6)
    bias = mx.array(np.random.default_rng(7).uniform(-0.05, 0.05, n).astype(np.float32))
    p = RouterParams(12, bias=bias, normalize=normalize, scaling=6.0)
    got = fused_topk(lg, p, FLAVOR)
    want = R.biased_topk(lg, 12, bias, normalize=normalize, scaling=6.0)
    assert_same_routing(got, want)
    unbiased = R.biased_topk(lg, 12, None, normalize=normalize, scaling=6.0)
    assert not np.array_equal(_by_id(*want)[0], _by_id(*unbiased)[0]), "the bias changed nothing: a weak test"


def test_sigmoid_scoring_against_numpy():
    lg = _logits(6, 72, seed=8)
    x = np.array(lg, dtype=np.float64)
    bias = np.random.default_rng(9).uniform(-0.5, 0.5, 72)
    sig = 1 / (1 + np.exp(-x))
    ids = np.argsort(-(sig + bias), axis=1, kind="stable")[:, :8]
    w = np.take_along_axis(sig, ids, 1)
    w = w / w.sum(1, keepdims=True) * 2.5
    params = RouterParams(8, score="sigmoid", bias=mx.array(bias.astype(np.float32)), normalize=True, scaling=2.5)
    got = fused_topk(lg, params, FLAVOR)
    np.testing.assert_array_equal(np.array(got[0]), ids)  # same order too: by score
    np.testing.assert_allclose(np.array(got[1]), w, rtol=1e-5)
    # the MLX-op rule (mlx_moe.router.route) against the same oracle, ids in any order
    assert_same_routing(R.route(lg, params), (mx.array(ids.astype(np.int32)), mx.array(w.astype(np.float32))))


def test_ties_go_to_the_lower_expert_id():
    # Blocks of equal logits: expected = a stable sort on -score (lower id first among equals).
    E, k = 48, 8
    rng = np.random.default_rng(10)
    x = rng.integers(0, 4, size=(6, E)).astype(np.float32)  # many exact ties
    x[0] = 1.0  # every expert tied
    ids, w = fused_topk(mx.array(x), RouterParams(k), FLAVOR)
    want = np.argsort(-x, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(np.array(ids), want)
    np.testing.assert_array_equal(np.array(ids)[0], np.arange(k))


def test_signed_zeros_tie_and_minus_infinity_is_never_chosen():
    # The kernel selects on integer keys of the scores: -0.0 must tie with +0.0 (the lower
    # id wins, as numpy's stable sort orders them), negative scores must order below zero,
    # and -inf experts are never picked: with fewer finite scores than k, the rest of the
    # slots get the padding id E and weight 0.  The Mixtral rule (topk_softmax) selects on
    # the raw logits, and a bias of -0.0 keeps a -0.0 logit's sign in the score.
    E, k = 40, 5
    x = np.full((5, E), -3.0, dtype=np.float32)
    x[0, [9, 3, 12, 20]] = [0.0, -0.0, -0.0, 0.0]  # the top four: zeros of either sign
    x[1, :] = -np.inf
    x[1, [30, 2, 17, 5, 11, 33]] = [-0.5, -0.25, -0.0, -0.5, 0.0, -1e-30]
    x[2, 1::2] = -np.inf
    x[3] = -np.linspace(0.0, 1.0, E, dtype=np.float32)[::-1]  # ascending: the top is the last id
    x[3, 0] = -0.0
    x[4, :] = -np.inf
    x[4, [7, 21, 36]] = [1.0, -2.0, 0.5]  # three finite scores for five slots
    params = RouterParams(k, score="topk_softmax", bias=mx.array(np.full(E, -0.0, dtype=np.float32)))
    ids, w = (np.array(a) for a in fused_topk(mx.array(x), params, FLAVOR))
    want = np.argsort(-x, axis=1, kind="stable")[:, :k]
    want[4, 3:] = E
    np.testing.assert_array_equal(ids, want)
    np.testing.assert_array_equal(ids[0, :4], [3, 9, 12, 20])
    top = np.take_along_axis(x, np.minimum(want, E - 1), 1).astype(np.float64)
    top[4, 3:] = -np.inf
    e = np.exp(top - top[:, :1])
    np.testing.assert_allclose(w, e / e.sum(1, keepdims=True), rtol=1e-6)


def test_bad_parameters_raise_clear_errors():
    lg = _logits(2, 16, seed=11)
    with pytest.raises(ValueError, match="top-k"):
        fused_topk(lg, RouterParams(17), FLAVOR)
    with pytest.raises(ValueError, match="divisible by n_group"):
        fused_topk(lg, RouterParams(2, n_group=3, topk_group=1), FLAVOR)
    with pytest.raises(ValueError, match="router bias"):
        fused_topk(lg, RouterParams(2, bias=mx.zeros((15,))), FLAVOR)
    with pytest.raises(ValueError, match="unknown router score"):
        fused_topk(lg, RouterParams(2, score="relu"), FLAVOR)


@pytest.mark.parametrize("name", ["qwen3_moe_mixed", "qwen2_moe_shared", "mixtral", "olmoe",
                                  "deepseek_v2_group", "deepseek_v2_qlora_yarn", "longcat_flash"])
def test_every_family_routes_the_same_through_the_kernel_backend(reference_checkpoints, name, monkeypatch):
    """Each family's MoE layers, on the kernel backend, route through the fused
    kernel (one launch, not the MLX-op rule) to the same experts and weights as
    the family's rule in MLX ops, on the real router logits of a tiny model."""
    import mlx_moe
    import mlx_moe.backends.base as base
    from mlx_moe.backends import MLXBackend
    from mlx_moe.backends.kernels import KernelBackend

    ref = reference_checkpoints.reference(name)
    model, _ = mlx_moe.load(str(ref.path), tokenizer=False)
    x = mx.array(np.random.default_rng(1).standard_normal((11, model.args.hidden_size)).astype(np.float32))
    layers = mlx_moe.moe_layers(model)
    want = [MLXBackend().route(layer.router_logits(x), layer.router_params()) for layer in layers]

    def not_fused(*args):
        raise AssertionError("the kernel backend fell back to the MLX-op router")

    monkeypatch.setattr(base, "reference_route", not_fused)
    for layer, w in zip(layers, want):
        layer.backend = KernelBackend(FLAVOR)
        assert_same_routing(layer.route(x), w)

