"""The prefill kernels (metal/mul_mm_id.metal: map0, the tiled routed GEMMs on
simdgroup_matrix, combine), run under the CPU emulation of the Metal kernel
environment, against the `mlx` backend (MLX's gather_mm / gather_qmm on the
CPU, float32) and, for map0, a numpy counting sort.

Cases: Q4_0, float16, bfloat16 and float32 experts; rows and cols that are not
multiples of the 64 x 32 tile; 1 to 300 tokens, and 2048 tokens at hidden 64;
every token routed to one expert, experts with no token; identity and padding
ids; repeated ids in a token; |x| ~ 1e5 activations and a float32
intermediate beyond float16's range with float16 activations.

The case builders are shared with tests/test_kernels_cuda.py's prefill cases
(a GPU session runs them on the CUDA twins).  The CUDA GEMM bodies also run on
this machine, compiled with g++ against a CPU mock of the CUDA features they
use (tests/cuda_mock.py; the cases are at the end of this file).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from cuda_mock import CXX, layer_kernels, mock_binary, run_mock, variant_settings
from test_kernels_emulated import TOL, make_experts, make_routing, make_x, reference

from mlx_moe.kernels import dispatch
from mlx_moe.kernels.dispatch import use_prefill_kernels
from mlx_moe.kernels import mul_mm_id as mul_mm_id_module
from mlx_moe.kernels.mul_mm_id import BN, CUDA_GEMMS, MAP0_KINDS, map0, tile_table_size

FLAVOR = "emulated"
_HAS_CUDA = hasattr(mx, "cuda") and mx.cuda.is_available()
# Both flavors for the main cases: the CUDA twins run where MLX has a CUDA GPU
# (a GPU session: pytest -m gpu tests/test_kernels_prefill_emulated.py).
FLAVORS = ["emulated", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not _HAS_CUDA, reason="needs MLX's CUDA backend and an NVIDIA GPU")])]
# The CUDA GEMMs round their operands to TF32 (10-bit mantissa, like float16).
TOL_CUDA = {mx.float32: 2e-3, mx.float16: 3e-3, mx.bfloat16: 1e-2}


def kernel_backend(flavor, fuse_swiglu=True):
    from mlx_moe.backends.kernels import KernelBackend

    be = KernelBackend(flavor, fuse_swiglu=fuse_swiglu)

    def no_fallback(*args, **kwargs):
        raise AssertionError("the batch fell back to the mlx backend")

    be.fallback = no_fallback
    return be


def assert_close(y, ref, x_dtype, tol=None):
    assert y.dtype == x_dtype, f"output dtype {y.dtype}, expected {x_dtype}"
    got = np.array(y.astype(mx.float32))
    assert got.shape == ref.shape
    assert np.isfinite(ref).all(), "the case itself overflows: fix the case"
    assert np.isfinite(got).all(), "non-finite values in the kernel output"
    err = np.abs(got - ref).max()
    scale = np.abs(ref).max()
    assert err <= (tol or TOL[x_dtype]) * scale, f"max |err| {err:.3g} vs max |ref| {scale:.3g}"


def run_prefill(flavor, fmt, shape, x_dtype, ids=None, weights=None, n_identity=0, n_pad=0,
                repeats=False, x_scale=1.0, down_scale=1.0, seed=0, fuse_swiglu=True, tol=None):
    """The whole prefill path of a KernelBackend against the `mlx` backend."""
    E, D, F, k, T = shape
    experts = make_experts(E, D, F, fmt, seed=seed)
    if down_scale != 1.0:
        experts.down_proj.weight = scaled_weight(experts.down_proj.weight, down_scale)
    if ids is None:
        ids, weights = make_routing(T, k, E, n_identity, n_pad, repeats, seed=seed)
    x = make_x(T, D, x_dtype, x_scale, seed=seed)
    ref = reference(x, ids, weights, experts, n_identity)
    # Small cases sit below the measured GEMV -> GEMM crossover: force the GEMM path.
    saved = dict(dispatch.MV_MAX_PAIRS)
    dispatch.MV_MAX_PAIRS.update({kind: 0 for kind in saved})
    try:
        assert use_prefill_kernels(x, ids, experts), "the case would not run on the prefill kernels"
        y = kernel_backend(flavor, fuse_swiglu)(x, ids, weights, experts, n_identity=n_identity)
        mx.eval(y)
    finally:
        dispatch.MV_MAX_PAIRS.update(saved)
    assert_close(y, ref, x_dtype, tol or (TOL_CUDA[x_dtype] if flavor == "cuda" else None))


def scaled_weight(w, s):
    if w.dtype == mx.uint16:  # Q4_0: scale the fp16 block scales (word 0 of each 9)
        words = np.array(w).reshape(*w.shape[:2], -1, 9).copy()
        d = words[..., 0].view(np.float16) * np.float16(s)
        words[..., 0] = d.view(np.uint16)
        return mx.array(words.reshape(w.shape))
    return (w.astype(mx.float32) * s).astype(w.dtype)


def skewed_routing(T, k, E, seed=0):
    """Every token's slot 0 goes to expert 1; the other slots to experts 2 and 4 only:
    experts 0, 3, 5, ... get no token, expert 1 gets all T (several tiles)."""
    rng = np.random.default_rng(seed)
    ids = np.empty((T, k), np.int32)
    ids[:, 0] = 1
    for s in range(1, k):
        ids[:, s] = [2, 4][s % 2]
    w = rng.random((T, k)).astype(np.float32) + 0.1
    return mx.array(ids), mx.array(w / w.sum(1, keepdims=True))


# -- map0 ------------------------------------------------------------------------------------

def numpy_map(ids: np.ndarray, E: int):
    flat = ids.reshape(-1)
    lists = [np.nonzero(flat == e)[0] for e in range(E)]
    counts = np.array([len(l) for l in lists])
    offsets = np.concatenate([[0], np.cumsum(counts)])
    tiles = [(e, offsets[e] + i * BN) for e in range(E) for i in range(-(-counts[e] // BN))]
    return counts, offsets, np.concatenate(lists + [np.zeros(0, np.int64)]), tiles


def check_map0(flavor, T, k, E, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, E, size=(T, k)).astype(np.int32)  # repeats within a token are allowed
    bad = rng.random((T, k)) < 0.2
    ids[bad] = rng.choice([-1, E, E + 3, 2**31 - 1, -(2**31)], size=bad.sum())  # identity / padding
    route = map0(mx.array(ids), E, flavor)
    counts, offsets, pairs, tiles = numpy_map(ids, E)
    np.testing.assert_array_equal(np.array(route.counts), counts)
    np.testing.assert_array_equal(np.array(route.offsets), offsets)
    got_pairs = np.array(route.pairs)
    np.testing.assert_array_equal(got_pairs[:offsets[-1]], pairs)
    assert (got_pairs[offsets[-1]:] == -1).all()
    got_tiles = np.array(route.tiles)
    assert got_tiles.shape == (tile_table_size(T * k, E), 2)
    np.testing.assert_array_equal(got_tiles[:len(tiles)], np.array(tiles).reshape(-1, 2))
    assert (got_tiles[len(tiles):, 0] == -1).all()


@pytest.mark.parametrize("kind", MAP0_KINDS)
@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("T,k,E", [(37, 3, 10), (300, 2, 5), (64, 8, 70), (1, 8, 128), (1000, 6, 300)])
def test_map0_matches_numpy_counting_sort(flavor, T, k, E, kind, monkeypatch):
    # (1000, 6, 300): more experts than the grid map0's threadgroups (2 a group), and
    # segments of 768 pairs; (1, 8, 128): more simdgroups than pairs.
    monkeypatch.setattr(mul_mm_id_module, "MAP0", kind)
    check_map0(flavor, T, k, E)


def test_map0_worst_case_tile_table_is_enough():
    # Every expert gets exactly 1 pair more than a multiple of BN: the most tiles per pair.
    E, k = 3, 1
    T = E * (BN + 1)
    ids = np.repeat(np.arange(E, dtype=np.int32), BN + 1)[:, None]
    route = map0(mx.array(ids), E, FLAVOR)
    tiles = np.array(route.tiles)
    assert (tiles[:, 0] >= 0).sum() == 2 * E
    assert tiles.shape[0] >= 2 * E and T * k == ids.size


# -- the whole prefill path ------------------------------------------------------------------

# (n_experts, hidden, ffn, k, tokens)
@pytest.mark.parametrize("fmt,shape,x_dtype", [
    ("q4_0", (6, 96, 160, 3, 40), mx.float32),     # ffn 160 = 2.5 row tiles; hidden 96 = 1.5
    ("q4_0", (5, 64, 96, 2, 300), mx.bfloat16),    # 300 tokens: an expert gets ~4 tiles
    ("float16", (5, 100, 70, 4, 30), mx.float16),  # cols not multiples of 32 (K tails)
    ("bfloat16", (4, 72, 40, 2, 33), mx.bfloat16),
    ("float32", (6, 40, 100, 3, 25), mx.float32),
])
@pytest.mark.parametrize("flavor", FLAVORS)
def test_prefill_matches_mlx(flavor, fmt, shape, x_dtype):
    run_prefill(flavor, fmt, shape, x_dtype, seed=1)


@pytest.mark.parametrize("flavor", FLAVORS)
def test_prefill_2048_tokens_small_hidden(flavor):
    run_prefill(flavor, "q4_0", (8, 64, 32, 2, 2048), mx.float16, seed=2)


@pytest.mark.gpu
@pytest.mark.skipif(not _HAS_CUDA, reason="needs MLX's CUDA backend and an NVIDIA GPU")
@pytest.mark.parametrize("tokens", [64, 512, 2048])
@pytest.mark.parametrize("fmt,x_dtype", [("q4_0", mx.bfloat16), ("bfloat16", mx.bfloat16), ("float16", mx.float16)])
def test_cuda_qwen3_layer_shapes(tokens, fmt, x_dtype):
    # Qwen3-30B-A3B MoE layer: 128 experts, top-8, hidden 2048, ffn 768.
    run_prefill("cuda", fmt, (128, 2048, 768, 8, tokens), x_dtype, seed=12)


def set_gemm(monkeypatch, gemm: str) -> None:
    """mul_mm_id.CUDA_GEMM and the options after it (cuda_mock.VARIANT_OPTIONS) for the test."""
    for name, value in variant_settings(gemm).items():
        monkeypatch.setattr(mul_mm_id_module, name, value)


@pytest.mark.gpu
@pytest.mark.skipif(not _HAS_CUDA, reason="needs MLX's CUDA backend and an NVIDIA GPU")
# "async" alone: the module's defaults (lanes copies, 128-row down tiles, d in bfloat16)
@pytest.mark.parametrize("gemm", CUDA_GEMMS + ("async:rows", "async:lanes:r64:dfloat", "async:lanes:r64:dbf16",
                                               "async:lanes:r128:dfloat"))
@pytest.mark.parametrize("fmt,shape,x_dtype,x_scale", [
    ("q4_0", (128, 2048, 768, 8, 512), mx.bfloat16, 1.0),  # a Qwen3-30B-A3B layer
    ("q4_0", (6, 96, 160, 3, 40), mx.float32, 1e5),        # ragged row tiles, huge activations
    ("float16", (5, 100, 70, 4, 30), mx.float16, 1.0),     # K tails (scalar loads), N % 4 != 0
    ("bfloat16", (6, 256, 64, 2, 70), mx.float32, 1.0),    # float32 activations, 8 K steps
])
def test_cuda_gemm_variants(gemm, fmt, shape, x_dtype, x_scale, monkeypatch):
    # Every CUDA GEMM body (mul_mm_id.CUDA_GEMM; the async one with both copy layouts) on
    # the GPU against the mlx backend.
    set_gemm(monkeypatch, gemm)
    run_prefill("cuda", fmt, shape, x_dtype, x_scale=x_scale, seed=13)


@pytest.mark.gpu
@pytest.mark.skipif(not _HAS_CUDA, reason="needs MLX's CUDA backend and an NVIDIA GPU")
@pytest.mark.parametrize("gemm", ["bf16", "async:rows", "async", "async:lanes:r64:dfloat", "async:lanes:r128:dfloat"])
def test_cuda_bf16_gemms_unfused_huge_and_skewed(gemm, monkeypatch):
    # The bf16 and async bodies: mul_mm_id_{gemm} (gate and up unfused, BCAST) with identity
    # and padding ids and |x| ~ 1e5; the fused one on skewed routing (one expert over many
    # tiles).  Hidden 128 and 256: the async bodies' K % 64 == 0.
    set_gemm(monkeypatch, gemm)
    run_prefill("cuda", "q4_0", (6, 128, 160, 3, 30), mx.bfloat16, n_identity=1, n_pad=1, x_scale=1e5,
                seed=14, fuse_swiglu=False)
    ids, w = skewed_routing(200, 4, 8)
    run_prefill("cuda", "q4_0", (8, 256, 128, 4, 200), mx.bfloat16, ids=ids, weights=w, seed=15)


@pytest.mark.parametrize("tokens", [1, 5])
def test_prefill_kernels_on_few_tokens(tokens, monkeypatch):
    # Below the GEMV threshold the backend would take mul_mv_id; force the GEMM path.
    monkeypatch.setattr(dispatch, "MV_MAX_PAIRS", {"q4_0": 0, "float": 0})
    run_prefill(FLAVOR, "q4_0", (6, 96, 160, 3, tokens), mx.float32, seed=3)


@pytest.mark.parametrize("flavor", FLAVORS)
def test_skewed_routing_one_hot_expert_and_empty_experts(flavor):
    E, k, T = 8, 3, 100
    ids, w = skewed_routing(T, k, E)
    run_prefill(flavor, "q4_0", (E, 64, 96, k, T), mx.float32, ids=ids, weights=w, seed=4)


@pytest.mark.parametrize("flavor", FLAVORS)
def test_identity_padding_and_repeated_ids(flavor):
    run_prefill(flavor, "q4_0", (4, 64, 96, 8, 12), mx.float32, n_identity=3, n_pad=2,
                repeats=True, seed=5)
    run_prefill(flavor, "float16", (5, 40, 64, 6, 20), mx.float16, n_identity=2, n_pad=2, seed=6)


@pytest.mark.parametrize("flavor", FLAVORS)
def test_all_slots_identity_or_padding(flavor):
    # No real expert anywhere: no tiles at all, the output is the identity term alone.
    run_prefill(flavor, "q4_0", (4, 64, 32, 4, 20), mx.float16, n_identity=2, n_pad=2, seed=7)


def test_unfused_gate_and_up():
    # mul_mm_id with BCAST (gate and up as separate GEMMs, SwiGLU in MLX ops).
    run_prefill(FLAVOR, "q4_0", (6, 96, 160, 3, 30), mx.float32, n_identity=1, n_pad=1,
                seed=8, fuse_swiglu=False)


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("fmt,x_dtype", [("q4_0", mx.float32), ("float16", mx.float32),
                                         ("q4_0", mx.bfloat16)])
def test_huge_activations_stay_finite(flavor, fmt, x_dtype):
    # |x| ~ 1e5 > 65504: nothing may round activations (or h ~ 1e10) to half.
    run_prefill(flavor, fmt, (6, 96, 64, 3, 30), x_dtype, x_scale=1e5, seed=9)


@pytest.mark.parametrize("flavor", FLAVORS)
def test_float16_activations_with_intermediate_beyond_half_range(flavor):
    # f16 x ~ 600, f16 weights: gate*up ~ 1e5..1e6 > 65504 must stay float32; down scaled
    # by 1e-3 brings the output back into float16's range.
    run_prefill(flavor, "float16", (5, 64, 96, 2, 40), mx.float16, x_scale=600.0, down_scale=1e-3,
                seed=10)


def test_every_registered_kernel_has_a_verification_case():
    from mlx_moe.kernels.kernel_cases import missing_cases

    assert missing_cases() == []


# -- the CUDA twins on the CPU, under a mock of the CUDA features they use ----------------------
# (tests/cuda_mock.py: g++ builds the CUDA GEMM bodies against a CPU stand-in for CUDA.)

# Every layer the mock tests run: one program holds all their kernels (one g++ run).
MOCK_LAYERS = [
    ("pipe", "q4_0", (5, 96, 160, 3, 40), mx.bfloat16),    # ragged row tiles (160 = 2.5 x 64), 3 K steps
    ("bf16", "q4_0", (5, 96, 160, 3, 40), mx.bfloat16),    # the bf16 swiglu body, same layer
    ("simple", "q4_0", (5, 96, 160, 3, 40), mx.bfloat16),  # the GPU-verified bodies: checks the mock
    ("pipe", "float16", (4, 100, 70, 2, 24), mx.float16),  # K tails: the scalar load paths, N % 4 != 0
    ("pipe", "bfloat16", (6, 256, 64, 2, 70), mx.float32),  # 8 K steps, float32 activations, skewed routing
    ("pipe", "q4_0", (4, 64, 128, 2, 20), mx.float32),     # huge activations
    ("async:rows", "q4_0", (5, 128, 192, 3, 40), mx.bfloat16),  # 2 K stages (ring of 4 half used), bf16 h
    ("async:rows", "q4_0", (4, 320, 160, 2, 24), mx.bfloat16),  # 5 K stages (the ring wraps); down K = 160: bf16 body
    ("async:lanes:r64:dfloat", "q4_0", (5, 128, 192, 3, 40), mx.bfloat16),  # lanes copies (mul_mm_id.ASYNC_COPY)
    ("async:lanes:r64:dfloat", "q4_0", (4, 320, 160, 2, 24), mx.bfloat16),  # ... a partial row tile (160 = 2.5 x 64)
    ("async:lanes:r64:dbf16", "q4_0", (5, 128, 192, 3, 40), mx.bfloat16),  # d in bfloat16 (mul_mm_id.ASYNC_D_BF16)
    ("async:lanes:r128:dfloat", "q4_0", (5, 320, 128, 3, 40), mx.bfloat16),  # down: 128-row tiles, 320 = 2.5 x 128
    ("async:lanes:r128:dbf16", "q4_0", (4, 256, 192, 2, 24), mx.bfloat16),  # the defaults: 2 row tiles, 3 K stages
]


def mock_layer(tmp_path, mock, variant, fmt, shape, x_dtype, ids=None, weights=None, x_scale=1.0, seed=0,
               shift=0):
    """map0 (numpy) -> swiglu GEMM -> down GEMM (both under the mock) -> combine (numpy),
    against the mlx backend; rows of non-routed pairs must stay unwritten.  shift: the
    inputs start that many bytes past an aligned address."""
    E, D, F, k, T = shape
    experts = make_experts(E, D, F, fmt, seed=seed)
    if ids is None:
        ids, weights = make_routing(T, k, E, 0, 1 if k > 2 else 0, False, seed=seed)
    x = make_x(T, D, x_dtype, x_scale, seed=seed)
    ref = reference(x, ids, weights, experts, 0)
    ids_np = np.array(ids)
    counts, offsets, pairs, tiles = numpy_map(ids_np, E)
    P = T * k
    G = tile_table_size(P, E)
    tiles_arr = np.full((G, 2), [-1, 0], np.int32)
    tiles_arr[:len(tiles)] = np.array(tiles, np.int32).reshape(-1, 2)
    pairs_arr = np.full(P, -1, np.int32)
    pairs_arr[:len(pairs)] = pairs
    route = {"pairs": mx.array(pairs_arr), "tiles": mx.array(tiles_arr),
             "offsets": mx.array(offsets.astype(np.int32))}
    wg, wu, wd = (getattr(experts, n).weight for n in ("gate_proj", "up_proj", "down_proj"))
    k_gu, k_down = layer_kernels(variant, fmt, shape, x_dtype)
    h = run_mock(tmp_path, mock, k_gu, {"x": x, "wg": wg, "wu": wu, **route}, (P, F), shift)
    real = (ids_np >= 0) & (ids_np < E)
    assert np.isnan(h[~real.reshape(-1)]).all(), "rows of non-routed pairs were written"
    assert not np.isnan(h[real.reshape(-1)]).any(), "rows of routed pairs were not (all) written"
    h = np.where(np.isnan(h), 0, h).astype(np.float32)
    h = mx.array(h).astype(mx.bfloat16 if k_down[1]["src"] == "bfloat16" else mx.float32)  # exact: h came in that dtype
    d = run_mock(tmp_path, mock, k_down, {"src": h, "w": wd, **route}, (P, D), shift)
    d = np.where(np.isnan(d), 0, d).reshape(T, k, D)
    parts = d * np.where(real, np.array(weights), 0)[..., None]
    y = parts.sum(1)
    assert np.isfinite(y).all()
    err = np.abs(y - ref).max()
    tol = 3e-3 * np.abs(ref).max()
    if k_down[2]["out"] == "bfloat16":  # d rounded to bf16 (half an ulp, 2^-9 relative) before the weighted sum
        tol += 2.0 ** -9 * np.abs(parts).sum(1).max()
    assert err <= tol, f"max |err| {err:.3g} vs max |ref| {np.abs(ref).max():.3g} (tolerance {tol:.3g})"


@pytest.mark.skipif(CXX is None, reason="g++ is not installed")
@pytest.mark.parametrize("layer", MOCK_LAYERS[:4] + MOCK_LAYERS[6:], ids=lambda l: f"{l[0]}-{l[1]}-{l[2]}")
def test_cuda_gemms_under_cpu_mock(tmp_path, tmp_path_factory, layer):
    mock_layer(tmp_path, mock_binary(tmp_path_factory, MOCK_LAYERS), *layer, seed=21)


@pytest.mark.skipif(CXX is None, reason="g++ is not installed")
@pytest.mark.parametrize("layer", [MOCK_LAYERS[i] for i in (0, 1, 7, 9)], ids=lambda l: l[0])
def test_cuda_gemms_under_cpu_mock_unaligned_inputs(tmp_path, tmp_path_factory, layer):
    # Inputs 2 bytes past an aligned address (views into larger buffers): the bodies must
    # take their unaligned copy and load paths (16-byte loads, cp.async, ldmatrix would fault).
    mock_layer(tmp_path, mock_binary(tmp_path_factory, MOCK_LAYERS), *layer, seed=26, shift=2)


@pytest.mark.skipif(CXX is None, reason="g++ is not installed")
def test_cuda_pipe_gemms_under_cpu_mock_skewed_and_huge(tmp_path, tmp_path_factory):
    # One expert with several tiles and empty experts; |x| ~ 1e5 stays finite.
    mock = mock_binary(tmp_path_factory, MOCK_LAYERS)
    layer = MOCK_LAYERS[4]
    E, k, T = layer[2][0], layer[2][3], layer[2][4]
    ids, w = skewed_routing(T, k, E)
    mock_layer(tmp_path, mock, *layer, ids=ids, weights=w, seed=22)
    mock_layer(tmp_path, mock, *MOCK_LAYERS[5], x_scale=1e5, seed=23)
    # The bf16 body: skewed routing (one expert over several tiles, empty experts) and
    # bfloat16 activations ~ 1e5 (bf16 keeps float32's range: nothing overflows).
    bf = MOCK_LAYERS[1]
    E, k, T = bf[2][0], bf[2][3], bf[2][4]
    ids, w = skewed_routing(T, k, E)
    mock_layer(tmp_path, mock, *bf, ids=ids, weights=w, x_scale=1e5, seed=24)
    # The async bodies, the same way (5 K stages: the ring wraps).
    for asy in (MOCK_LAYERS[7], MOCK_LAYERS[9]):
        E, k, T = asy[2][0], asy[2][3], asy[2][4]
        ids, w = skewed_routing(T, k, E)
        mock_layer(tmp_path, mock, *asy, ids=ids, weights=w, x_scale=1e5, seed=25)
