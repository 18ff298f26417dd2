"""The decode attention kernel (metal/attention.metal) under the CPU emulation of
Metal, and its CUDA twin on a GPU, against MLX's own
mx.fast.scaled_dot_product_attention on the valid slots of the cache."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_moe.kernels.attention import decode_attention

_HAS_CUDA = hasattr(mx, "cuda") and mx.cuda.is_available()


def _case(HQ, HKV, C, D, dtype, seed, k_scale=3.0, garbage=False, pos=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((1, HQ, 1, D)).astype(np.float32)
    k = (rng.standard_normal((1, HKV, C, D)) * k_scale).astype(np.float32)
    v = rng.standard_normal((1, HKV, C, D)).astype(np.float32)
    if garbage:  # slots past pos hold NaN and inf: they must never be read
        k[:, :, pos + 1:, ::3] = np.nan
        v[:, :, pos + 1:, 1::3] = np.inf
    return (mx.array(a).astype(dtype) for a in (q, k, v))


def _reference(q, k, v, pos, scale):
    n = min(pos + 1, k.shape[2])
    f = mx.float32
    return mx.fast.scaled_dot_product_attention(q.astype(f), k[:, :, :n].astype(f), v[:, :, :n].astype(f), scale=scale)


TOL = {mx.float32: 1e-5, mx.float16: 2e-3, mx.bfloat16: 8e-3}


def _check(flavor, HQ, HKV, C, D, pos, dtype, nsg=8, seed=0, tol=None, **kw):
    q, k, v = _case(HQ, HKV, C, D, dtype, seed, pos=pos, **kw)
    scale = D ** -0.5
    got = decode_attention(q, k, v, mx.array([pos], mx.int32), scale, flavor, nsg=nsg)
    assert got.shape == (1, HQ, 1, D) and got.dtype == dtype
    got = np.array(got.astype(mx.float32))
    want = np.array(_reference(q, k, v, pos, scale))
    assert np.isfinite(got).all()
    tol = tol or TOL[dtype]
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())


@pytest.mark.parametrize("HQ,HKV,C,D,pos,dtype,nsg", [
    (8, 2, 16, 64, 9, mx.float32, 8),      # GQA 4, slots < simdgroups * 2
    (4, 4, 5, 32, 0, mx.float32, 2),       # only the first slot; most simdgroups see none
    (4, 1, 40, 128, 39, mx.bfloat16, 8),   # the whole cache, GQA 4, Qwen3's head dim
    (6, 2, 33, 64, 20, mx.float16, 4),
    (4, 2, 24, 64, 100, mx.float32, 8),    # pos past the capacity: clamped to it
    (2, 2, 300, 32, 257, mx.float32, 1),   # one simdgroup walks every slot
])
def test_matches_mlx_sdpa(HQ, HKV, C, D, pos, dtype, nsg):
    _check("emulated", HQ, HKV, C, D, pos, dtype, nsg)


def test_slots_past_pos_are_never_read_and_large_scores_stay_stable():
    _check("emulated", 4, 2, 32, 64, 11, mx.float32, garbage=True)
    # scores of several hundred: float32 rounding of a score (~1e-5 of it) moves its weight
    # by ~0.3%, in any summation order; what must hold is that nothing overflows
    _check("emulated", 4, 2, 32, 64, 30, mx.float32, k_scale=300.0, tol=1e-2)


def test_unsupported_shapes_are_refused():
    q, k, v = _case(4, 2, 8, 48, mx.float32, 0)
    with pytest.raises(ValueError, match="multiple of 32"):
        decode_attention(q, k, v, mx.array([1], mx.int32), 0.1, "emulated")
    q, k, v = _case(3, 2, 8, 32, mx.float32, 0)
    with pytest.raises(ValueError, match="query heads"):
        decode_attention(q, k, v, mx.array([1], mx.int32), 0.1, "emulated")


@pytest.mark.gpu
@pytest.mark.skipif(not _HAS_CUDA, reason="needs MLX's CUDA backend and an NVIDIA GPU")
@pytest.mark.parametrize("pos,dtype", [(0, mx.bfloat16), (511, mx.bfloat16), (700, mx.float16)])
def test_cuda_twin_matches_mlx_sdpa(pos, dtype):
    _check("cuda", 32, 4, 768, 128, pos, dtype)  # Qwen3-30B-A3B's attention, a 768-slot cache
    _check("cuda", 32, 4, 768, 128, pos, dtype, garbage=True)
