"""The CPU emulation of the Metal kernel environment (mlx_moe.emulation).

Kernels here are written in Metal as they would be for mx.fast.metal_kernel
and checked against independent oracles: numpy, MLX's own ops, the gguf
package's Q4_0 reference, and MLX's own generated source.
"""

from __future__ import annotations

import subprocess
import sys
import time

import mlx.core as mx
import numpy as np
import pytest

from mlx_moe.emulation import (
    CompileError,
    MetalEmulationError,
    MetalEmulationTimeout,
    TranslationError,
    generated_source,
)
from mlx_moe.emulation import metal_kernel as emu_metal_kernel


def _np(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32)) if a.dtype == mx.bfloat16 else np.array(a)


# -- the generated source -----------------------------------------------------

_MLX_SOURCE_SCRIPT = """
import sys, mlx.core as mx
src = sys.stdin.read()
k = mx.fast.metal_kernel(name="probe", input_names=["inp", "small", "s", "f"],
                         output_names=["out", "out2"], source=src, header="// header\\n",
                         atomic_outputs={atomic})
def f(a, b):
    return k(inputs=[a, b, 3, 1.5], template=[("T", mx.float16), ("N", -4), ("B", True)],
             grid=(16, 1, 1), threadgroup=(8, 1, 1), output_shapes=[(16,), (2,)],
             output_dtypes=[mx.float32, mx.int32], verbose=True)
mx.export_function("{path}", f, mx.zeros((16,), mx.float16), mx.zeros((4,), mx.bfloat16))
"""

_PROBE_BODY = """
uint elem = thread_position_in_grid.x;   // simd_sum in a comment: grid_size
out[elem] = inp[elem] + small[0] + s + f + inp_shape[0] + inp_strides[0] + small_ndim;
"""


@pytest.mark.parametrize("atomic", [False, True])
def test_generated_source_matches_mlx(tmp_path, atomic):
    script = _MLX_SOURCE_SCRIPT.format(atomic=atomic, path=tmp_path / "probe.mlxfn")
    proc = subprocess.run(
        [sys.executable, "-c", script], input=_PROBE_BODY, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    mlx_text = proc.stdout.split("```\n", 1)[1].rsplit("\n```", 1)[0]
    ours = generated_source(
        "probe", ["inp", "small", "s", "f"], ["out", "out2"], _PROBE_BODY,
        header="// header\n", atomic_outputs=atomic,
        inputs=[mx.zeros((16,), mx.float16), mx.zeros((4,), mx.bfloat16), 3, 1.5],
        output_dtypes=[mx.float32, mx.int32],
        template=[("T", mx.float16), ("N", -4), ("B", True)],
    )
    assert ours == mlx_text


# -- elementwise, partial threadgroups, attributes ----------------------------

def test_elementwise_2d_partial_threadgroups():
    src = """
        uint2 g = thread_position_in_grid.xy;
        if (g.x >= W || g.y >= H) return;     // never true: grid == shape
        uint i = g.y * W + g.x;
        out[i] = inp[i] * 2.0f + 1.0f;
        tgsize[i] = threads_per_threadgroup.x * 100 + threads_per_threadgroup.y;
        pos[i] = threadgroup_position_in_grid.x * 100 + thread_position_in_threadgroup.x;
    """
    k = emu_metal_kernel("ew2d", ["inp"], ["out", "tgsize", "pos"], src)
    H, W = 5, 37
    x = mx.random.normal((H, W))
    out, tgsize, pos = k(
        inputs=[x], template=[("W", W), ("H", H)], grid=(W, H, 1), threadgroup=(8, 2, 1),
        output_shapes=[(H, W)] * 3, output_dtypes=[mx.float32, mx.uint32, mx.uint32],
    )
    np.testing.assert_allclose(np.array(out), np.array(x) * 2 + 1, rtol=1e-6)
    # dispatchThreads: the last column of threadgroups has 37 - 32 = 5 threads,
    # the last row 5 - 4 = 1.
    cols = np.arange(W)
    rows = np.arange(H)
    exp_x = np.where(cols >= 32, 5, 8)[None, :]
    exp_y = np.where(rows >= 4, 1, 2)[:, None]
    np.testing.assert_array_equal(np.array(tgsize), exp_x * 100 + exp_y)
    np.testing.assert_array_equal(np.array(pos), (cols // 8 * 100 + cols % 8)[None, :].repeat(H, 0))


def test_vectors_swizzles_as_type():
    src = """
        uint i = thread_position_in_grid.x;
        float4 v = float4(inp[4 * i], inp[4 * i + 1], inp[4 * i + 2], inp[4 * i + 3]);
        float2 lo = v.xy, hi = v.zw;
        v.xy = hi * 2.0f;                     // swizzle assignment
        v.zw += lo;
        half4 h = half4(v);
        uint bits = as_type<uint>(float(h.w));
        out[4 * i + 0] = v.x; out[4 * i + 1] = v.y;
        out[4 * i + 2] = float(h.z); out[4 * i + 3] = as_type<float>(bits) + dot(lo, float2(1.0f));
    """
    k = emu_metal_kernel("vec", ["inp"], ["out"], src)
    x = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
    (out,) = k(inputs=[mx.array(x)], grid=(8, 1, 1), threadgroup=(8, 1, 1),
               output_shapes=[(8, 4)], output_dtypes=[mx.float32])
    z = (x[:, 2] + x[:, 0]).astype(np.float16).astype(np.float32)
    w = (x[:, 3] + x[:, 1]).astype(np.float16).astype(np.float32)
    expected = np.stack([x[:, 2] * 2, x[:, 3] * 2, z, w + x[:, 0] + x[:, 1]], axis=1)
    np.testing.assert_allclose(np.array(out), expected, rtol=1e-6)


_IDIOMS_HEADER = """
#include <metal_stdlib>
#include <metal_simdgroup>
using namespace metal;
constant float kScale[2] = {2.0f, 3.0f};
constant constexpr int kTwo = 2;
struct blk { half d; uchar qs[16]; };   // 18 bytes, like a Q4_0 block
template <typename T>
inline float load_sum(const device T* p, int n) {
  float s = 0.0f;
  for (int i = 0; i < n; ++i) s += float(p[i]);
  return s;
}
template <typename T>
inline void tg_fill(threadgroup T* dst, uint t, T v) { dst[t] = v; }
inline void bump(thread float& acc, float v) { acc += v; }
"""


def test_common_metal_idioms_translate():
    # Helpers taking address-space pointers and references, program-scope
    # constants, struct pointers through reinterpret_cast, pointer casts,
    # threadgroup scalars and threadgroup atomics.
    src = """
        threadgroup float scratch[64];
        threadgroup uint counter;
        uint t = thread_index_in_threadgroup;
        if (t == 0) counter = 0;
        tg_fill(scratch, t, float(t));
        threadgroup_barrier(mem_flags::mem_threadgroup);
        float acc = 0.0f;
        bump(acc, load_sum(x, kTwo));
        device const blk* b = reinterpret_cast<device const blk*>(raw) + (t % 2);
        bump(acc, float(b->d) * float(b->qs[3]));
        const device half* hp = (const device half*)(raw);
        acc += float(hp[0]) * kScale[1];
        threadgroup float* sp = scratch + 1;
        acc += sp[t % 63];
        atomic_fetch_add_explicit((threadgroup atomic_uint*)&counter, 1u, memory_order_relaxed);
        threadgroup_barrier(mem_flags::mem_threadgroup);
        out[t] = acc + float(counter);
    """
    k = emu_metal_kernel("idioms", ["x", "raw"], ["out"], src, header=_IDIOMS_HEADER)
    blocks = np.zeros(2, dtype=[("d", "<f2"), ("qs", "u1", 16)])
    blocks["d"] = [0.5, 0.25]
    blocks["qs"][:, 3] = [4, 8]
    raw = np.frombuffer(blocks.tobytes(), np.uint8)
    x = np.array([1.5, 2.5, 100], np.float32)
    (out,) = k(inputs=[mx.array(x), mx.array(raw)], grid=(64, 1, 1), threadgroup=(64, 1, 1),
               output_shapes=[(64,)], output_dtypes=[mx.float32])
    t = np.arange(64)
    ref = 4.0 + np.where(t % 2 == 0, 0.5 * 4, 0.25 * 8) + 0.5 * 3 + ((t % 63) + 1) + 64
    np.testing.assert_array_equal(np.array(out), ref)


# -- threadgroup memory, barriers, SIMD collectives ---------------------------

def test_threadgroup_memory_tree_reduction():
    src = """
        threadgroup float buf[256];
        uint t = thread_position_in_threadgroup.x;
        uint row = threadgroup_position_in_grid.x;
        float v = 0.0f;
        for (uint j = t; j < N; j += 256) v += x[row * N + j];
        buf[t] = v;
        threadgroup_barrier(mem_flags::mem_threadgroup);
        for (uint s = 128; s > 0; s >>= 1) {
            if (t < s) buf[t] += buf[t + s];
            threadgroup_barrier(mem_flags::mem_threadgroup);
        }
        if (t == 0) out[row] = buf[0];
    """
    k = emu_metal_kernel("tgreduce", ["x"], ["out"], src)
    x = mx.random.normal((3, 1000))
    (out,) = k(inputs=[x], template=[("N", 1000)], grid=(3 * 256, 1, 1),
               threadgroup=(256, 1, 1), output_shapes=[(3,)], output_dtypes=[mx.float32])
    np.testing.assert_allclose(np.array(out), np.array(x).sum(1), rtol=1e-5, atol=1e-4)


def test_simd_collectives_against_numpy():
    src = """
        uint i = thread_position_in_grid.x;
        uint lane = thread_index_in_simdgroup;
        float v = x[i];
        float down = v;
        for (ushort off = 16; off > 0; off /= 2) down += simd_shuffle_down(down, off);
        float bfly = v;
        for (ushort m = 1; m < 32; m *= 2) bfly += simd_shuffle_xor(bfly, m);
        out[i * 6 + 0] = simd_sum(v);
        out[i * 6 + 1] = simd_max(v);
        out[i * 6 + 2] = lane == 0 ? down : 0.0f;
        out[i * 6 + 3] = bfly;
        out[i * 6 + 4] = simd_prefix_exclusive_sum(v);
        out[i * 6 + 5] = simd_shuffle(v, (lane + 5) % 32) + simd_broadcast(v, 3);
    """
    k = emu_metal_kernel("simdops", ["x"], ["out"], src)
    xs = np.random.default_rng(1).normal(size=128).astype(np.float32)
    (out,) = k(inputs=[mx.array(xs)], grid=(128, 1, 1), threadgroup=(64, 1, 1),
               output_shapes=[(128, 6)], output_dtypes=[mx.float32])
    got = np.array(out)
    g = xs.reshape(4, 32)
    lane = np.arange(32)
    np.testing.assert_allclose(got[:, 0], np.repeat(g.sum(1), 32), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got[:, 1], np.repeat(g.max(1), 32))
    np.testing.assert_allclose(got[::32, 2], g.sum(1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[:, 3], np.repeat(g.sum(1), 32), rtol=1e-5, atol=1e-5)
    excl = np.concatenate([np.zeros((4, 1), np.float32), np.cumsum(g, 1)[:, :-1]], 1)
    np.testing.assert_allclose(got[:, 4], excl.ravel(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[:, 5], (g[:, (lane + 5) % 32] + g[:, 3:4]).ravel(), rtol=1e-6)


def test_shuffle_down_upper_lanes_keep_their_value():
    src = """
        uint i = thread_position_in_grid.x;
        out[i] = simd_shuffle_down(x[i], 4);
    """
    k = emu_metal_kernel("shdown", ["x"], ["out"], src)
    xs = np.arange(32, dtype=np.float32)
    (out,) = k(inputs=[mx.array(xs)], grid=(32, 1, 1), threadgroup=(32, 1, 1),
               output_shapes=[(32,)], output_dtypes=[mx.float32])
    np.testing.assert_array_equal(np.array(out), np.where(xs < 28, xs + 4, xs))


# -- half, bfloat, templates ----------------------------------------------------

def test_half_and_bfloat_rounding():
    src = """
        uint i = thread_position_in_grid.x;
        half h = a[i] * b[i] + c[i];                 // each half op rounds
        out_h[i] = h;
        bfloat16_t p = bfloat16_t(fa[i]) * bfloat16_t(fb[i]);
        out_b[i] = p;
        out_bc[i] = static_cast<bfloat16_t>(fa[i]);
        out_f[i] = float(a[i]) * float(b[i]);        // promoted to float: exact
    """
    k = emu_metal_kernel("rounding", ["a", "b", "c", "fa", "fb"],
                         ["out_h", "out_b", "out_bc", "out_f"], src)
    rng = np.random.default_rng(2)
    n = 257
    a, b, c = (rng.normal(size=n).astype(np.float16) for _ in range(3))
    fa, fb = (rng.normal(size=n).astype(np.float32) * 100 for _ in range(2))
    outs = k(inputs=[mx.array(a), mx.array(b), mx.array(c), mx.array(fa), mx.array(fb)],
             grid=(n, 1, 1), threadgroup=(64, 1, 1), output_shapes=[(n,)] * 4,
             output_dtypes=[mx.float16, mx.bfloat16, mx.bfloat16, mx.float32])
    np.testing.assert_array_equal(np.array(outs[0]), (a * b) + c)  # numpy rounds per op
    bf = lambda v: mx.array(v).astype(mx.bfloat16)  # noqa: E731
    assert mx.array_equal(outs[1], bf(fa) * bf(fb)).item()
    assert mx.array_equal(outs[2], bf(fa)).item()
    np.testing.assert_array_equal(np.array(outs[3]), a.astype(np.float32) * b.astype(np.float32))


def test_half_literals_and_math():
    src = """
        uint i = thread_position_in_grid.x;
        half h = x[i] * 0.5h + 1.0h;
        out[i] = float(metal::exp(h)) + metal::precise::sqrt(float(x[i] * x[i]));
    """
    k = emu_metal_kernel("hlit", ["x"], ["out"], src)
    xs = np.linspace(-2, 2, 9).astype(np.float16)
    (out,) = k(inputs=[mx.array(xs)], grid=(9, 1, 1), threadgroup=(9, 1, 1),
               output_shapes=[(9,)], output_dtypes=[mx.float32])
    h = (xs * np.float16(0.5)) + np.float16(1.0)
    ref = np.exp(h.astype(np.float32)).astype(np.float16).astype(np.float32) + np.abs(xs.astype(np.float32))
    np.testing.assert_allclose(np.array(out), ref, rtol=1e-6)


def test_template_arguments():
    src = """
        uint i = thread_position_in_grid.x;
        T v = x[i] * T(N);
        out[i] = NEG ? -v : v;
    """
    k = emu_metal_kernel("tmpl", ["x"], ["out"], src)
    x = mx.array([1.5, -2.0, 3.25], mx.float16)
    for dtype, n, neg in [(mx.float16, 4, True), (mx.float32, 3, False), (mx.bfloat16, 2, True)]:
        (out,) = k(inputs=[x.astype(dtype)], template=[("T", dtype), ("N", n), ("NEG", neg)],
                   grid=(3, 1, 1), threadgroup=(32, 1, 1), output_shapes=[(3,)],
                   output_dtypes=[dtype])
        assert out.dtype == dtype
        np.testing.assert_array_equal(_np(out), np.array([1.5, -2.0, 3.25]) * n * (-1 if neg else 1))


def test_scalar_and_small_constant_inputs():
    src = """
        uint i = thread_position_in_grid.x;
        out[i] = x[i] * scale + float(offs[i % 3]) + float(n);
    """
    k = emu_metal_kernel("small", ["x", "scale", "offs", "n"], ["out"], src)
    x = mx.arange(10, dtype=mx.float32)
    offs = mx.array([100, 200, 300], mx.int32)
    text = k.generated_source(inputs=[x, 0.5, offs, 7], output_dtypes=[mx.float32])
    assert "const constant float& scale" in text and "const constant int32_t& n" in text
    assert "const constant int32_t* offs" in text and "const device float* x" in text
    (out,) = k(inputs=[x, 0.5, offs, 7], grid=(10, 1, 1), threadgroup=(4, 1, 1),
               output_shapes=[(10,)], output_dtypes=[mx.float32])
    np.testing.assert_array_equal(np.array(out),
                                  np.arange(10) * 0.5 + np.array([100, 200, 300])[np.arange(10) % 3] + 7)


def test_shape_strides_ndim_with_strided_input():
    src = """
        uint e = thread_position_in_grid.x;
        int64_t loc = 0;
        uint rest = e;
        for (int d = x_ndim - 1; d >= 0; --d) {
            loc += (rest % x_shape[d]) * x_strides[d];
            rest /= x_shape[d];
        }
        out[e] = x[loc];
    """
    base = mx.arange(24, dtype=mx.float32).reshape(4, 6)
    view = base.T[1:5]  # shape (4, 4), not row contiguous
    for contiguous in (True, False):
        k = emu_metal_kernel("strided", ["x"], ["out"], src, ensure_row_contiguous=contiguous)
        (out,) = k(inputs=[view], grid=(16, 1, 1), threadgroup=(16, 1, 1),
                   output_shapes=[(4, 4)], output_dtypes=[mx.float32])
        np.testing.assert_array_equal(np.array(out), np.array(view))


def test_atomic_outputs_histogram():
    src = """
        uint i = thread_position_in_grid.x;
        atomic_fetch_add_explicit(&hist[idx[i]], 1, memory_order_relaxed);
        atomic_fetch_add_explicit(total, 0.5f, memory_order_relaxed);
    """
    k = emu_metal_kernel("hist", ["idx"], ["hist", "total"], src, atomic_outputs=True)
    idx = np.random.default_rng(3).integers(0, 10, size=500).astype(np.int32)
    hist, total = k(inputs=[mx.array(idx)], grid=(500, 1, 1), threadgroup=(128, 1, 1),
                    output_shapes=[(10,), (1,)], output_dtypes=[mx.int32, mx.float32],
                    init_value=0)
    np.testing.assert_array_equal(np.array(hist), np.bincount(idx, minlength=10))
    assert float(total[0]) == 250.0


def test_threadgroups_run_last_first():
    """A GPU runs threadgroups in no set order; the emulator runs the last-numbered
    first, so a kernel that counts on the first (or on the last running last, as a
    last-threadgroup handoff must not) fails here instead of passing by order."""
    src = """
        if (thread_index_in_threadgroup == 0) {
          const uint tg = threadgroup_position_in_grid.x + threadgroups_per_grid.x * threadgroup_position_in_grid.y;
          atomic_store_explicit(&order[tg], atomic_fetch_add_explicit(&counter[0], 1u, memory_order_relaxed),
                                memory_order_relaxed);
        }
    """
    k = emu_metal_kernel("order", ["x"], ["order", "counter"], src, atomic_outputs=True)
    order, _ = k(inputs=[mx.zeros((1,))], grid=(4 * 32, 3, 1), threadgroup=(32, 1, 1),
                 output_shapes=[(12,), (1,)], output_dtypes=[mx.uint32, mx.uint32], init_value=0)
    assert np.array(order).tolist() == list(range(11, -1, -1))


def test_in_order_kernels_run_first_numbered_first():
    """A kernel whose later threadgroups wait for earlier ones (registry.KernelSpec.in_order,
    sound on GPUs that start threadgroups in index order) runs them in index order here,
    across grid dimensions x then y; in the default order its wait never ends."""
    src = """
        if (thread_index_in_threadgroup == 0) {
          const uint tg = threadgroup_position_in_grid.x + threadgroups_per_grid.x * threadgroup_position_in_grid.y;
          while (atomic_load_explicit(&counter[0], memory_order_relaxed) < tg) {
          }
          atomic_store_explicit(&order[tg], atomic_fetch_add_explicit(&counter[0], 1u, memory_order_relaxed),
                                memory_order_relaxed);
        }
    """
    kw = dict(inputs=[mx.zeros((1,))], grid=(4 * 32, 3, 1), threadgroup=(32, 1, 1), output_shapes=[(12,), (1,)],
              output_dtypes=[mx.uint32, mx.uint32], init_value=0)
    k = emu_metal_kernel("waits", ["x"], ["order", "counter"], src, atomic_outputs=True, in_order=True)
    order, _ = k(**kw)
    assert np.array(order).tolist() == list(range(12))
    k = emu_metal_kernel("waits_any_order", ["x"], ["order", "counter"], src, atomic_outputs=True)
    k.timeout_s = 1.0
    with pytest.raises(MetalEmulationTimeout, match="did not finish"):
        k(**kw)


# -- simdgroup_matrix ----------------------------------------------------------

def test_simdgroup_matrix_multiply_accumulate():
    # Two simdgroups, each computing one 8x8 tile of C = A @ B + C0 with K = 16.
    src = """
        uint sg = simdgroup_index_in_threadgroup;
        simdgroup_half8x8 ma, mb;
        simdgroup_float8x8 acc;
        simdgroup_load(acc, c0 + sg * 8, 16);
        for (uint k = 0; k < 16; k += 8) {
            simdgroup_load(ma, a + k, 16);                 // A[0:8, k:k+8]
            simdgroup_load(mb, b + k * 16 + sg * 8, 16);   // B[k:k+8, 8sg:8sg+8]
            simdgroup_multiply_accumulate(acc, ma, mb, acc);
        }
        simdgroup_store(acc, out + sg * 8, 16);
    """
    k = emu_metal_kernel("mma", ["a", "b", "c0"], ["out"], src)
    rng = np.random.default_rng(4)
    a = rng.normal(size=(8, 16)).astype(np.float16)
    b = rng.normal(size=(16, 16)).astype(np.float16)
    c0 = rng.normal(size=(8, 16)).astype(np.float32)
    (out,) = k(inputs=[mx.array(a), mx.array(b), mx.array(c0)], grid=(64, 1, 1),
               threadgroup=(64, 1, 1), output_shapes=[(8, 16)], output_dtypes=[mx.float32])
    ref = a.astype(np.float32) @ b.astype(np.float32) + c0
    np.testing.assert_allclose(np.array(out), ref, rtol=1e-5, atol=1e-5)


def test_simdgroup_matrix_thread_elements_layout():
    # thread_elements(): lane l owns (r, c), (r, c + 1) of the 8x8; writing
    # through it changes the matrix seen by the next operation.
    src = """
        uint lane = thread_index_in_simdgroup;
        simdgroup_float8x8 m;
        simdgroup_load(m, ids, 8);
        float2 own = m.thread_elements();
        owner[lane * 2] = own.x;
        owner[lane * 2 + 1] = own.y;
        m.thread_elements() = float2(own.x * 10.0f, own.y * 10.0f);
        simdgroup_float8x8 r;
        simdgroup_multiply(r, m, simdgroup_float8x8(1.0f));   // times the identity
        simdgroup_store(r, out, 8);
    """
    k = emu_metal_kernel("tel", ["ids"], ["owner", "out"], src)
    ids = np.arange(64, dtype=np.float32).reshape(8, 8)
    owner, out = k(inputs=[mx.array(ids)], grid=(32, 1, 1), threadgroup=(32, 1, 1),
                   output_shapes=[(32, 2), (8, 8)], output_dtypes=[mx.float32, mx.float32])
    own = np.array(owner)
    assert sorted(own.ravel().tolist()) == list(range(64))
    assert np.all(own[:, 1] == own[:, 0] + 1)
    np.testing.assert_array_equal(np.array(out), ids * 10)


_TILED_GEMM = """
    // C[M, N] = W[M, K] @ X[N, K]^T: 64 x 32 tiles, K-step 32, 4 simdgroups.
    threadgroup half sa[64 * 32];
    threadgroup half sb[32 * 32];
    uint t = thread_index_in_threadgroup;
    uint sg = simdgroup_index_in_threadgroup;
    uint r0 = threadgroup_position_in_grid.y * 64;
    uint c0 = threadgroup_position_in_grid.x * 32;
    uint sr = (sg / 2) * 32, sc = (sg % 2) * 16;   // each simdgroup: 32 rows x 16 cols
    simdgroup_float8x8 acc[8];
    for (int i = 0; i < 8; ++i) acc[i] = make_filled_simdgroup_matrix<float, 8, 8>(0.f);
    for (uint k0 = 0; k0 < K; k0 += 32) {
        for (uint i = t; i < 64 * 32; i += 128) sa[i] = w[(r0 + i / 32) * K + k0 + i % 32];
        for (uint i = t; i < 32 * 32; i += 128) sb[i] = x[(c0 + i / 32) * K + k0 + i % 32];
        threadgroup_barrier(mem_flags::mem_threadgroup);
        for (uint kk = 0; kk < 32; kk += 8) {
            simdgroup_half8x8 ma[4], mb[2];
            for (int i = 0; i < 4; ++i) simdgroup_load(ma[i], sa + (sr + 8 * i) * 32 + kk, 32);
            for (int j = 0; j < 2; ++j)
                simdgroup_load(mb[j], sb + (sc + 8 * j) * 32 + kk, 32, ulong2(0, 0), true);
            for (int i = 0; i < 4; ++i)
                for (int j = 0; j < 2; ++j)
                    simdgroup_multiply_accumulate(acc[i * 2 + j], ma[i], mb[j], acc[i * 2 + j]);
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 2; ++j)
            simdgroup_store(acc[i * 2 + j], out + (r0 + sr + 8 * i) * N + c0 + sc + 8 * j, N);
"""


def test_tiled_simdgroup_gemm_with_threadgroup_tiles():
    M, N, K = 128, 64, 96
    rng = np.random.default_rng(6)
    w = rng.normal(size=(M, K)).astype(np.float16)
    x = rng.normal(size=(N, K)).astype(np.float16)
    k = emu_metal_kernel("tiled_gemm", ["w", "x"], ["out"], _TILED_GEMM)
    (out,) = k(inputs=[mx.array(w), mx.array(x)], template=[("K", K), ("N", N)],
               grid=(N // 32 * 128, M // 64, 1), threadgroup=(128, 1, 1),
               output_shapes=[(M, N)], output_dtypes=[mx.float32])
    ref = np.array(mx.matmul(mx.array(w).astype(mx.float32), mx.array(x).astype(mx.float32).T))
    np.testing.assert_allclose(np.array(out), ref, rtol=1e-4, atol=1e-4)


def test_divergent_simdgroup_matrix_operations_raise():
    # Lanes 0..15 issue one more simdgroup_load than lanes 16..31; the
    # loads do not block, the mismatch shows at the store.
    src = """
        simdgroup_float8x8 m;
        simdgroup_load(m, x, 8);
        if (thread_index_in_simdgroup < 16) simdgroup_load(m, x, 8);
        simdgroup_store(m, out, 8);
    """
    k = emu_metal_kernel("sgdiverge", ["x"], ["out"], src)
    with pytest.raises(MetalEmulationError, match="simdgroup divergence"):
        k(inputs=[mx.zeros((64,))], grid=(32, 1, 1), threadgroup=(32, 1, 1),
          output_shapes=[(64,)], output_dtypes=[mx.float32])


# -- MLX agreement, a realistic decode kernel ----------------------------------

def test_row_sum_agrees_with_mlx_ops():
    src = """
        uint row = threadgroup_position_in_grid.y;
        uint lane = thread_index_in_simdgroup;
        float acc = 0.0f;
        for (uint j = lane; j < n_cols; j += 32) acc += float(x[row * n_cols + j]);
        acc = simd_sum(acc);
        if (lane == 0) out[row] = static_cast<T>(acc);
    """
    k = emu_metal_kernel("rowsum", ["x", "n_cols"], ["out"], src)
    x = mx.random.normal((6, 300)).astype(mx.float16)
    (out,) = k(inputs=[x, 300], template=[("T", mx.float32)], grid=(32, 6, 1),
               threadgroup=(32, 1, 1), output_shapes=[(6,)], output_dtypes=[mx.float32])
    np.testing.assert_allclose(np.array(out), np.array(mx.sum(x.astype(mx.float32), axis=1)),
                               rtol=1e-4, atol=1e-4)


_Q4_GEMV = """
    // One dispatch for all slots: threadgroup z = slot; 2 simdgroups x 4 rows.
    uint slot = threadgroup_position_in_grid.z;
    uint sg = simdgroup_index_in_threadgroup;
    uint lane = thread_index_in_simdgroup;
    uint row0 = threadgroup_position_in_grid.x * 8 + sg * 4;
    const uint nb = K / 32;
    int e = ids[slot];
    device const uchar* wbase = w + (ulong)e * ROWS * nb * 18;
    device const half* xs = x + slot * K;
    uint il = lane % 2;
    float sumf[4] = {0.f, 0.f, 0.f, 0.f};
    for (uint ib = lane / 2; ib < nb; ib += 16) {
        device const half* yb = xs + ib * 32 + il * 8;
        float yl[16];
        float sumy = 0.f;
        for (int j = 0; j < 8; j += 2) {
            sumy += float(yb[j]) + float(yb[j + 1]) + float(yb[j + 16]) + float(yb[j + 17]);
            yl[j] = yb[j];
            yl[j + 1] = yb[j + 1] / 256.f;
            yl[j + 8] = yb[j + 16] / 16.f;
            yl[j + 9] = yb[j + 17] / 4096.f;
        }
        for (int r = 0; r < 4; ++r) {
            device const uchar* blk = wbase + ((row0 + r) * nb + ib) * 18;
            float d = float(*((device const half*)blk));
            device const ushort* qs = (device const ushort*)(blk + 2) + il * 4;
            float acc = 0.f;
            for (int j = 0; j < 8; j += 2) {
                ushort q = qs[j / 2];
                acc += yl[j] * (q & 0x000F) + yl[j + 1] * (q & 0x0F00)
                     + yl[j + 8] * (q & 0x00F0) + yl[j + 9] * (q & 0xF000);
            }
            sumf[r] += d * (acc - 8.f * sumy);
        }
    }
    for (int r = 0; r < 4; ++r) {
        float s = simd_sum(sumf[r]);
        if (lane == 0) out[slot * ROWS + row0 + r] = s;
    }
"""


def test_q4_0_gemv_against_gguf_reference():
    from gguf.quants import GGMLQuantizationType, dequantize, quantize

    E, ROWS, K, SLOTS = 3, 64, 2048, 8
    rng = np.random.default_rng(5)
    wf = rng.normal(size=(E, ROWS, K)).astype(np.float32)
    wq = quantize(wf, GGMLQuantizationType.Q4_0)  # (E, ROWS, K / 32 * 18) uint8
    wd = dequantize(wq, GGMLQuantizationType.Q4_0).astype(np.float32)
    x = rng.normal(size=(SLOTS, K)).astype(np.float16)
    ids = rng.integers(0, E, size=SLOTS).astype(np.int32)
    k = emu_metal_kernel("q4_0_gemv", ["w", "x", "ids"], ["out"], _Q4_GEMV)
    t0 = time.perf_counter()
    (out,) = k(inputs=[mx.array(wq), mx.array(x), mx.array(ids)],
               template=[("K", K), ("ROWS", ROWS)], grid=(64 * ROWS // 8, 1, SLOTS),
               threadgroup=(64, 1, 1), output_shapes=[(SLOTS, ROWS)],
               output_dtypes=[mx.float32])
    elapsed = time.perf_counter() - t0
    ref = np.einsum("srk,sk->sr", wd[ids], x.astype(np.float32))
    np.testing.assert_allclose(np.array(out), ref, rtol=2e-4, atol=2e-3)
    print(f"q4_0 gemv {SLOTS}x{ROWS}x{K}: {elapsed:.2f} s (compile included on a cold cache)")


# -- failing loudly -------------------------------------------------------------

def test_out_of_bounds_read_raises():
    src = """
        uint i = thread_position_in_grid.x;
        out[i] = x[i + 1];            // the last thread reads one past the end
    """
    k = emu_metal_kernel("oob", ["x"], ["out"], src)
    with pytest.raises(MetalEmulationError) as err:
        k(inputs=[mx.zeros((16,))], grid=(16, 1, 1), threadgroup=(16, 1, 1),
          output_shapes=[(16,)], output_dtypes=[mx.float32])
    msg = str(err.value)
    assert "out-of-bounds" in msg and "input 'x'" in msg and "element 16" in msg
    assert "thread_position_in_grid (15, 0, 0)" in msg
    assert "out[i] = x[i + 1];" in msg  # the source line, from the library's line tables


def test_out_of_bounds_through_cast_and_threadgroup_array_raise():
    cast_src = """
        uint i = thread_position_in_grid.x;
        device const float4* v = (device const float4*)(x + 4 * i);
        out[i] = v[1].x;               // thread 3 reads elements 16..19 of 16
    """
    k = emu_metal_kernel("oobcast", ["x"], ["out"], cast_src)
    with pytest.raises(MetalEmulationError, match=r"out-of-bounds access to input 'x'"):
        k(inputs=[mx.zeros((16,))], grid=(4, 1, 1), threadgroup=(4, 1, 1),
          output_shapes=[(4,)], output_dtypes=[mx.float32])
    tg_src = """
        threadgroup float buf[32];
        uint t = thread_position_in_threadgroup.x;
        buf[t] = 1.0f;                 // 64 threads write a 32-element array
        threadgroup_barrier(mem_flags::mem_threadgroup);
        out[t] = buf[t % 32];
    """
    k = emu_metal_kernel("oobtg", ["x"], ["out"], tg_src)
    with pytest.raises(MetalEmulationError, match=r"threadgroup array 'buf'"):
        k(inputs=[mx.zeros((1,))], grid=(64, 1, 1), threadgroup=(64, 1, 1),
          output_shapes=[(64,)], output_dtypes=[mx.float32])


def test_vector_loads_need_their_alignment():
    """A uint4 read through a cast pointer: aligned (16 bytes) it reads the right words,
    even from an MLX array whose CPU memory is less aligned than a GPU buffer; 8 bytes
    off it fails naming the buffer and the offset, as it would fault on a GPU."""
    src = """
        uint i = thread_position_in_grid.x;
        const device uint4* p = reinterpret_cast<const device uint4*>(inp + 8 * i + OFF);
        uint4 v = *p;
        out[i] = v.x + v.w;
    """
    k = emu_metal_kernel("vload", ["inp"], ["out"], src)
    x = mx.arange(64).astype(mx.uint16)
    (got,) = k(inputs=[x], template=[("OFF", 0)], grid=(8, 1, 1), threadgroup=(8, 1, 1),
               output_shapes=[(8,)], output_dtypes=[mx.uint32])
    words = np.arange(64, dtype=np.uint16).view(np.uint32).reshape(8, 4)
    np.testing.assert_array_equal(np.array(got), words[:, 0] + words[:, 3])
    with pytest.raises(MetalEmulationError, match=r"misaligned 16-byte access to input 'inp' at byte offset \d+: "
                                                  r"the type needs 16-byte alignment"):
        k(inputs=[x], template=[("OFF", 4)], grid=(7, 1, 1), threadgroup=(7, 1, 1),
          output_shapes=[(7,)], output_dtypes=[mx.uint32])


def test_unknown_metal_function_is_a_compile_error():
    src = """
        uint i = thread_position_in_grid.x;
        out[i] = metal::frobnicate(x[i]);
    """
    k = emu_metal_kernel("unknown_fn", ["x"], ["out"], src)
    with pytest.raises(CompileError) as err:
        k(inputs=[mx.zeros((4,))], grid=(4, 1, 1), threadgroup=(4, 1, 1),
          output_shapes=[(4,)], output_dtypes=[mx.float32])
    msg = str(err.value)
    assert "frobnicate" in msg and "metal::frobnicate(x[i])" in msg


def test_unsupported_threadgroup_declaration_is_refused():
    src = """
        threadgroup float a[4], b[4];
        out[0] = 0;
    """
    k = emu_metal_kernel("tgdecl", ["x"], ["out"], src)
    with pytest.raises(TranslationError, match="threadgroup"):
        k(inputs=[mx.zeros((1,))], grid=(1, 1, 1), threadgroup=(1, 1, 1),
          output_shapes=[(1,)], output_dtypes=[mx.float32])


@pytest.mark.parametrize(
    "body, message",
    [
        # Half the threadgroup skips the barrier.
        ("""
            uint t = thread_position_in_threadgroup.x;
            if (t < 32) threadgroup_barrier(mem_flags::mem_threadgroup);
            out[t] = 1.0f;
         """, "returned"),
        # Lanes 16..31 skip a simd_sum the others wait at, then reach a barrier.
        ("""
            uint t = thread_position_in_threadgroup.x;
            float v = 1.0f;
            if (thread_index_in_simdgroup < 16) v = simd_sum(v);
            threadgroup_barrier(mem_flags::mem_threadgroup);
            out[t] = v;
         """, "deadlock"),
        # Two halves of a simdgroup reach different simd_sum calls.
        ("""
            uint t = thread_position_in_threadgroup.x;
            float v = 1.0f;
            if (thread_index_in_simdgroup < 16) {
                v = simd_sum(v);
            } else {
                v = simd_sum(v * 2.0f);
            }
            out[t] = v;
         """, "different SIMD collectives"),
    ],
)
def test_divergent_barriers_and_collectives_raise(body, message):
    k = emu_metal_kernel("diverge", ["x"], ["out"], body)
    k.timeout_s = 20.0
    with pytest.raises(MetalEmulationError, match=message):
        k(inputs=[mx.zeros((1,))], grid=(64, 1, 1), threadgroup=(64, 1, 1),
          output_shapes=[(64,)], output_dtypes=[mx.float32])


def test_infinite_loop_hits_the_timeout():
    src = """
        uint i = 0;
        while (x[0] == 0.0f) { out[0] = float(i++); }
    """
    k = emu_metal_kernel("spin", ["x"], ["out"], src)
    k.timeout_s = 1.0
    with pytest.raises(MetalEmulationTimeout, match="did not finish"):
        k(inputs=[mx.zeros((1,))], grid=(1, 1, 1), threadgroup=(1, 1, 1),
          output_shapes=[(1,)], output_dtypes=[mx.float32])


def test_unwritten_outputs_are_poisoned_not_zero():
    src = """
        uint i = thread_position_in_grid.x;
        if (i % 2 == 0) out[i] = 1.0f;
    """
    k = emu_metal_kernel("partial_write", ["x"], ["out"], src)
    (out,) = k(inputs=[mx.zeros((1,))], grid=(8, 1, 1), threadgroup=(8, 1, 1),
               output_shapes=[(8,)], output_dtypes=[mx.float32])
    got = np.array(out)
    assert np.all(got[::2] == 1.0) and np.all(np.isnan(got[1::2]))
    (out,) = k(inputs=[mx.zeros((1,))], grid=(8, 1, 1), threadgroup=(8, 1, 1),
               output_shapes=[(8,)], output_dtypes=[mx.float32], init_value=0.0)
    np.testing.assert_array_equal(np.array(out)[1::2], 0.0)


def test_bad_launch_arguments_raise_clear_errors():
    k = emu_metal_kernel("args", ["x"], ["out"], "out[0] = x[0];")
    with pytest.raises(ValueError, match="at most 1024"):
        k(inputs=[mx.zeros((1,))], grid=(2048, 1, 1), threadgroup=(2048, 1, 1),
          output_shapes=[(1,)], output_dtypes=[mx.float32])
    with pytest.raises(ValueError, match="Expected `inputs` to have size 1"):
        k(inputs=[], grid=(1, 1, 1), threadgroup=(1, 1, 1),
          output_shapes=[(1,)], output_dtypes=[mx.float32])
