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
use (end of this file).
"""

from __future__ import annotations

import shutil
import subprocess

import mlx.core as mx
import numpy as np
import pytest

from test_kernels_emulated import TOL, make_experts, make_routing, make_x, reference

from mlx_moe.kernels import dispatch
from mlx_moe.kernels.dispatch import use_prefill_kernels
from mlx_moe.kernels import mul_mm_id as mul_mm_id_module
from mlx_moe.kernels.mul_mm_id import BN, CUDA_GEMMS, map0, tile_table_size

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


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("T,k,E", [(37, 3, 10), (300, 2, 5), (64, 8, 70)])
def test_map0_matches_numpy_counting_sort(flavor, T, k, E):
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


@pytest.mark.gpu
@pytest.mark.skipif(not _HAS_CUDA, reason="needs MLX's CUDA backend and an NVIDIA GPU")
@pytest.mark.parametrize("gemm", CUDA_GEMMS)
@pytest.mark.parametrize("fmt,shape,x_dtype,x_scale", [
    ("q4_0", (128, 2048, 768, 8, 512), mx.bfloat16, 1.0),  # a Qwen3-30B-A3B layer
    ("q4_0", (6, 96, 160, 3, 40), mx.float32, 1e5),        # ragged row tiles, huge activations
    ("float16", (5, 100, 70, 4, 30), mx.float16, 1.0),     # K tails (scalar loads), N % 4 != 0
    ("bfloat16", (6, 256, 64, 2, 70), mx.float32, 1.0),    # float32 activations, 8 K steps
])
def test_cuda_gemm_variants(gemm, fmt, shape, x_dtype, x_scale, monkeypatch):
    # Both CUDA GEMM bodies (mul_mm_id.CUDA_GEMM) on the GPU against the mlx backend.
    monkeypatch.setattr(mul_mm_id_module, "CUDA_GEMM", gemm)
    run_prefill("cuda", fmt, shape, x_dtype, x_scale=x_scale, seed=13)


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
#
# The CUDA GEMM bodies (metal/mul_mm_id_cuda.h, both CUDA_GEMM variants) compiled with g++
# against a stand-in for CUDA: one OS thread per CUDA thread, __syncthreads a real barrier,
# __shared__ arrays static (blocks run one after another), and the three PTX helpers (TF32
# rounding, mma.sync m16n8k8, ldmatrix.x4) as warp-collective C++ that follows the PTX
# ISA's fragment layouts (the layouts are written out independently below; an index mistake
# in the kernel or the mock shows up as a wrong result against the mlx backend).  This
# checks the CUDA index math, the pipeline's stage handling and the vector loads on this
# machine; it says nothing about speed.  Skipped without g++.

CXX = shutil.which("g++")

CUDA_MOCK = r"""
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>
#define MOE_CUDA_MOCK 1
#define __global__
#define __device__
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __grid_constant__
#define MOE_DEVICE
struct dim3 { unsigned x = 1, y = 1, z = 1; };
thread_local dim3 threadIdx, blockIdx;
typedef unsigned short ushort;
typedef unsigned int uint;
struct uint4 { unsigned x, y, z, w; };
struct float4 { float x, y, z, w; };
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
struct __half {
  _Float16 v;
  __half() = default;
  __half(float f) : v(f) {}
  operator float() const { return float(v); }
};
struct __nv_bfloat16 {
  uint16_t b;
  __nv_bfloat16() = default;
  __nv_bfloat16(float f) { unsigned u = __float_as_uint(f); b = uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16); }
  operator float() const { return __uint_as_float(unsigned(b) << 16); }
};
inline float moe_f16_bits(ushort b) { _Float16 h; std::memcpy(&h, &b, 2); return float(h); }
inline float moe_silu(float g) { return g / (1.0f + std::exp(-g)); }

static std::barrier<>* mock_block_bar;
inline void __syncthreads() { mock_block_bar->arrive_and_wait(); }
struct MockWarp { std::barrier<>* bar; const float* ptr[32]; unsigned a[32][4]; unsigned b[32][2]; };
static MockWarp mock_warp[32];
thread_local int mock_lane, mock_warp_id;

// cvt.rna.tf32.f32: round to 10 mantissa bits, ties away from zero.
inline unsigned moe_tf32(float f) { return (__float_as_uint(f) + 0x1000u) & 0xFFFFE000u; }

// ldmatrix.x4 (b16 pairs = floats): register j of lane (g, q) = float q of the row whose
// address lane 8 j + g gave.
inline void moe_ldsm_x4(unsigned* r, const float* p) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) { std::fprintf(stderr, "ldmatrix: row address not 16-byte aligned\n"); std::abort(); }
  MockWarp& w = mock_warp[mock_warp_id];
  w.ptr[mock_lane] = p;
  w.bar->arrive_and_wait();
  const int g = mock_lane >> 2, q = mock_lane & 3;
  for (int j = 0; j < 4; ++j) r[j] = __float_as_uint(w.ptr[8 * j + g][q]);
  w.bar->arrive_and_wait();
}

// mma.m16n8k8 tf32 (PTX ISA fragment layouts): A(r, k) in lane (r % 8) * 4 + k % 4, register
// (r >= 8) + 2 (k >= 4); B(k, n) in lane 4 n + k % 4, register (k >= 4); C/D(r, n) in lane
// (r % 8) * 4 + n / 2, register 2 (r >= 8) + n % 2.  The tensor cores ignore an operand's
// 13 low mantissa bits.
inline void moe_mma_tf32(float* d, const unsigned* a, const unsigned* b) {
  MockWarp& w = mock_warp[mock_warp_id];
  for (int i = 0; i < 4; ++i) w.a[mock_lane][i] = a[i];
  for (int i = 0; i < 2; ++i) w.b[mock_lane][i] = b[i];
  w.bar->arrive_and_wait();
  auto A = [&](int r, int k) { return __uint_as_float(w.a[(r % 8) * 4 + k % 4][(r >= 8) + 2 * (k >= 4)] & 0xFFFFE000u); };
  auto B = [&](int k, int n) { return __uint_as_float(w.b[4 * n + k % 4][k >= 4] & 0xFFFFE000u); };
  float res[4];
  for (int i = 0; i < 4; ++i) {
    const int r = (mock_lane >> 2) + 8 * (i >> 1), n = 2 * (mock_lane & 3) + (i & 1);
    double s = d[i];
    for (int k = 0; k < 8; ++k) s += double(A(r, k)) * double(B(k, n));
    res[i] = float(s);
  }
  w.bar->arrive_and_wait();
  for (int i = 0; i < 4; ++i) d[i] = res[i];
}

template <class F>
void mock_launch(unsigned gx, unsigned gy, int threads, F f) {
  std::barrier<> bb(threads);
  mock_block_bar = &bb;
  std::vector<std::unique_ptr<std::barrier<>>> wb;
  for (int i = 0; i < threads / 32; ++i) { wb.emplace_back(new std::barrier<>(32)); mock_warp[i].bar = wb.back().get(); }
  for (unsigned by = 0; by < gy; ++by) {
    for (unsigned bx = 0; bx < gx; ++bx) {
      std::vector<std::thread> ts;
      for (int t = 0; t < threads; ++t) {
        ts.emplace_back([=] { threadIdx.x = t; blockIdx.x = bx; blockIdx.y = by; mock_lane = t & 31; mock_warp_id = t >> 5; f(); });
      }
      for (auto& th : ts) th.join();
    }
  }
}

static std::vector<char> mock_read(const char* path) {
  FILE* fp = std::fopen(path, "rb");
  if (!fp) { std::perror(path); std::exit(2); }
  std::fseek(fp, 0, SEEK_END); long n = std::ftell(fp); std::fseek(fp, 0, SEEK_SET);
  std::vector<char> v(n + 64);
  if (std::fread(v.data(), 1, n, fp) != size_t(n)) std::exit(3);
  std::fclose(fp);
  return v;
}
"""


def _mock_function(key, name, inputs, outputs, template):
    from test_kernels_cuda_compile import CUDA_TYPES, kernel_text

    from mlx_moe.kernels.registry import KERNELS

    spec = KERNELS[name.removesuffix("_pipe")]
    fn = kernel_text(name, f"k{key}", inputs, outputs, template)
    args = [f"reinterpret_cast<const {CUDA_TYPES[inputs[a]]}*>(in[{i}].data())" for i, a in enumerate(spec.inputs)]
    call = f"mlx::core::cu::custom_kernel_mlx_moe_{name}_k{key}({', '.join(args)}, out)"
    return fn, f"    case {key}: mock_launch(gx, gy, 128, [&] {{ {call}; }}); break;\n"


def _mock_program(kernels):
    """One g++ program running any of `kernels` [(name, inputs, outputs, template)]:
    argv = kernel index, grid x, grid y, output file, output bytes, input files (KERNELS order)."""
    from mlx_moe.kernels.registry import read_cuda_twin, read_family

    helpers = read_family("mul_mm_id")[0] + "\n" + read_cuda_twin("mul_mm_id")[0]
    fns, cases = zip(*(_mock_function(i, *kern) for i, kern in enumerate(kernels)))
    main = """
int main(int argc, char** argv) {
  const int which = std::atoi(argv[1]);
  const unsigned gx = std::atoi(argv[2]), gy = std::atoi(argv[3]);
  const long nout = std::atol(argv[5]);
  std::vector<std::vector<char>> in;
  for (int i = 6; i < argc; ++i) in.push_back(mock_read(argv[i]));
  std::vector<float> buf(nout / 4 + 16, std::nanf(""));  // rows the kernel must not write stay NaN
  float* out = buf.data();
  switch (which) {
""" + "".join(cases) + """    default: return 4;
  }
  FILE* fp = std::fopen(argv[4], "wb");
  std::fwrite(buf.data(), 1, nout, fp);
  std::fclose(fp);
  return 0;
}
"""
    return CUDA_MOCK + helpers + "\nnamespace mlx::core::cu {\n" + "".join(fns) + "}\n" + main


_DT = {mx.float32: "float32", mx.float16: "float16", mx.bfloat16: "bfloat16", mx.uint16: "uint16",
       mx.int32: "int32"}
_W_DT = {"q4_0": "uint16", "float16": "float16", "bfloat16": "bfloat16", "float32": "float32"}
ROUTE_IN = {"pairs": "int32", "tiles": "int32", "offsets": "int32"}


def layer_kernels(variant, fmt, shape, x_dtype):
    """The (name, inputs, outputs, template) of the swiglu and down GEMMs of a mock layer."""
    E, D, F, k, T = shape
    sfx = "_pipe" if variant == "pipe" else ""
    wt, xt = _W_DT[fmt], _DT[x_dtype]
    return [("mul_mm_id_swiglu" + sfx, {"x": xt, "wg": wt, "wu": wt, **ROUTE_IN}, {"h": "float32"},
             [("T", xt), ("WT", wt), ("K", D), ("N", F), ("KS", k)]),
            ("mul_mm_id" + sfx, {"src": "float32", "w": wt, **ROUTE_IN}, {"out": "float32"},
             [("T", "float32"), ("WT", wt), ("K", F), ("N", D), ("KS", k), ("BCAST", False)])]


# Every layer the mock tests run: one program holds all their kernels (one g++ run).
MOCK_LAYERS = [
    ("pipe", "q4_0", (5, 96, 160, 3, 40), mx.bfloat16),    # ragged row tiles (160 = 2.5 x 64), 3 K steps
    ("simple", "q4_0", (5, 96, 160, 3, 40), mx.bfloat16),  # the GPU-verified bodies: checks the mock
    ("pipe", "float16", (4, 100, 70, 2, 24), mx.float16),  # K tails: the scalar load paths, N % 4 != 0
    ("pipe", "bfloat16", (6, 256, 64, 2, 70), mx.float32),  # 8 K steps, float32 activations, skewed routing
    ("pipe", "q4_0", (4, 64, 128, 2, 20), mx.float32),     # huge activations
]
_MOCK = {}


def mock_binary(tmp_path_factory):
    """(executable, {kernel key: index}), built on first use."""
    if "exe" not in _MOCK:
        kernels = []
        for layer in MOCK_LAYERS:
            for kern in layer_kernels(*layer):
                if kern not in kernels:
                    kernels.append(kern)
        d = tmp_path_factory.mktemp("cuda_mock")
        src = d / "mock.cpp"
        src.write_text(_mock_program(kernels))
        exe = d / "mock"
        r = subprocess.run([CXX, "-std=c++20", "-O1", "-pthread", "-w", str(src), "-o", str(exe)],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-4000:]
        _MOCK["exe"] = exe
        _MOCK["index"] = {repr(k): i for i, k in enumerate(kernels)}
    return _MOCK["exe"], _MOCK["index"]


def run_mock(tmp_path, mock, kern, arrays: dict, out_shape):
    """Run kernel `kern` (an entry of layer_kernels) under the mock; arrays: {input name: mx.array}."""
    from mlx_moe.kernels.registry import KERNELS

    exe, index = mock
    name = kern[0]
    spec = KERNELS[name.removesuffix("_pipe")]
    files = []
    for a in spec.inputs:
        f = tmp_path / f"{name}_{a}.bin"
        arr = arrays[a]
        assert _DT[arr.dtype] == kern[1][a], (a, arr.dtype)
        raw = np.array(arr.view(mx.uint16) if arr.dtype in (mx.float16, mx.bfloat16) else arr)
        f.write_bytes(raw.tobytes())
        files.append(str(f))
    out = tmp_path / f"{name}_out.bin"
    n_out = int(np.prod(out_shape)) * 4
    grid = (-(-out_shape[1] // BM_), arrays["tiles"].shape[0])
    r = subprocess.run([str(exe), str(index[repr(kern)]), *map(str, grid), str(out), str(n_out), *files],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    return np.fromfile(out, dtype=np.float32).reshape(out_shape)


def mock_layer(tmp_path, mock, variant, fmt, shape, x_dtype, ids=None, weights=None, x_scale=1.0, seed=0):
    """map0 (numpy) -> swiglu GEMM -> down GEMM (both under the mock) -> combine (numpy),
    against the mlx backend; rows of non-routed pairs must stay unwritten."""
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
    h = run_mock(tmp_path, mock, k_gu, {"x": x, "wg": wg, "wu": wu, **route}, (P, F))
    real = (ids_np >= 0) & (ids_np < E)
    assert np.isnan(h[~real.reshape(-1)]).all(), "rows of non-routed pairs were written"
    assert not np.isnan(h[real.reshape(-1)]).any(), "rows of routed pairs were not (all) written"
    h = np.where(np.isnan(h), 0, h).astype(np.float32)
    d = run_mock(tmp_path, mock, k_down, {"src": mx.array(h), "w": wd, **route}, (P, D))
    d = np.where(np.isnan(d), 0, d).reshape(T, k, D)
    y = (d * np.where(real, np.array(weights), 0)[..., None]).sum(1)
    assert np.isfinite(y).all()
    err = np.abs(y - ref).max()
    assert err <= 3e-3 * np.abs(ref).max(), f"max |err| {err:.3g} vs max |ref| {np.abs(ref).max():.3g}"


BM_ = 64


@pytest.mark.skipif(CXX is None, reason="g++ is not installed")
@pytest.mark.parametrize("layer", MOCK_LAYERS[:3], ids=lambda l: f"{l[0]}-{l[1]}-{l[2]}")
def test_cuda_gemms_under_cpu_mock(tmp_path, tmp_path_factory, layer):
    mock_layer(tmp_path, mock_binary(tmp_path_factory), *layer, seed=21)


@pytest.mark.skipif(CXX is None, reason="g++ is not installed")
def test_cuda_pipe_gemms_under_cpu_mock_skewed_and_huge(tmp_path, tmp_path_factory):
    # One expert with several tiles and empty experts; |x| ~ 1e5 stays finite.
    mock = mock_binary(tmp_path_factory)
    layer = MOCK_LAYERS[3]
    E, k, T = layer[2][0], layer[2][3], layer[2][4]
    ids, w = skewed_routing(T, k, E)
    mock_layer(tmp_path, mock, *layer, ids=ids, weights=w, seed=22)
    mock_layer(tmp_path, mock, *MOCK_LAYERS[4], x_scale=1e5, seed=23)
