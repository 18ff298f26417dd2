"""A CPU mock of the CUDA features the CUDA GEMM bodies use (test support).

The CUDA GEMM bodies (metal/mul_mm_id_cuda.h, every CUDA_GEMM variant) compiled
with g++ against a stand-in for CUDA: one OS thread per CUDA thread,
__syncthreads a real barrier, __shared__ arrays static (blocks run one after
another), and the PTX helpers (TF32 rounding, mma.sync m16n8k8 tf32 and
m16n8k16 bf16, ldmatrix.x4, the nibble-to-bf16 conversion) as warp-collective C++
that follows the PTX ISA's fragment layouts
(the layouts are written out independently here; an index mistake in the kernel
or the mock shows up as a wrong result against the mlx backend).  This checks
the CUDA index math, the pipeline's stage handling and the vector loads on a
machine without a GPU; it says nothing about speed.  Used by
tests/test_kernels_prefill_emulated.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_moe.kernels import mul_mm_id
from mlx_moe.kernels.mul_mm_id import BM, cuda_body  # BM: output rows per block (grid x = ceil(rows / BM))

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))  # cuda_units: the CUDA text as MLX writes it

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
#define MOE_UNROLL
struct dim3 { unsigned x = 1, y = 1, z = 1; };
thread_local dim3 threadIdx, blockIdx;
typedef unsigned short ushort;
typedef unsigned int uint;
struct uint4 { unsigned x, y, z, w; };
struct uint2 { unsigned x, y; };
struct float4 { float x, y, z, w; };
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }
inline uint2 make_uint2(unsigned a, unsigned b) { return {a, b}; }
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
struct MockWarp { std::barrier<>* bar; const float* ptr[32]; unsigned a[32][4]; unsigned b[32][2]; float f[32]; };
static MockWarp mock_warp[32];
thread_local int mock_lane, mock_warp_id;

// shfl.sync.bfly over the whole warp: lane l gets lane l ^ mask's value.
inline float moe_shuffle_xor(float v, unsigned short mask) {
  MockWarp& w = mock_warp[mock_warp_id];
  w.f[mock_lane] = v;
  w.bar->arrive_and_wait();
  const float r = w.f[mock_lane ^ mask];
  w.bar->arrive_and_wait();
  return r;
}

inline float moe_as_float(unsigned b) { return __uint_as_float(b); }
inline unsigned moe_q4_pair128(unsigned w) { return (w & 0x000F000Fu) | 0x43004300u; }

// prmt.b32 (default mode): byte i of the result is byte (s >> 4 i) & 7 of {y, x}, x the low word.
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const uint64_t v = (uint64_t(y) << 32) | x;
  unsigned r = 0;
  for (int i = 0; i < 4; ++i) r |= unsigned((v >> (8 * ((s >> (4 * i)) & 7u))) & 0xFFu) << (8 * i);
  return r;
}

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

// mma.m16n8k16 bf16 (PTX ISA fragment layouts, two bf16 per register, the lower k in the
// low half): A(r, k) in lane (r % 8) * 4 + (k % 8) / 2, register (r >= 8) + 2 (k >= 8);
// B(k, n) in lane 4 n + (k % 8) / 2, register (k >= 8); C/D as m16n8k8.
inline float mock_bf16_half(unsigned reg, int hi) { return __uint_as_float((hi ? reg >> 16 : reg & 0xFFFFu) << 16); }
inline void moe_mma_bf16(float* d, const unsigned* a, const unsigned* b) {
  MockWarp& w = mock_warp[mock_warp_id];
  for (int i = 0; i < 4; ++i) w.a[mock_lane][i] = a[i];
  for (int i = 0; i < 2; ++i) w.b[mock_lane][i] = b[i];
  w.bar->arrive_and_wait();
  auto A = [&](int r, int k) { return mock_bf16_half(w.a[(r % 8) * 4 + (k % 8) / 2][(r >= 8) + 2 * (k >= 8)], k & 1); };
  auto B = [&](int k, int n) { return mock_bf16_half(w.b[4 * n + (k % 8) / 2][k >= 8], k & 1); };
  float res[4];
  for (int i = 0; i < 4; ++i) {
    const int r = (mock_lane >> 2) + 8 * (i >> 1), n = 2 * (mock_lane & 3) + (i & 1);
    double s = d[i];
    for (int k = 0; k < 16; ++k) s += double(A(r, k)) * double(B(k, n));
    res[i] = float(s);
  }
  w.bar->arrive_and_wait();
  for (int i = 0; i < 4; ++i) d[i] = res[i];
}

// Bytes 0 and 1 of nib (nibble values) minus 8, as a bf16 pair (low half first).
inline unsigned moe_q4_bf16x2(unsigned nib) {
  const __nv_bfloat16 lo(float(int(nib & 0xFFu) - 8)), hi(float(int((nib >> 8) & 0xFFu) - 8));
  return unsigned(lo.b) | (unsigned(hi.b) << 16);
}

// mma with a zero accumulator input (d = A * B).
inline void moe_mma_bf16_z(float* d, const unsigned* a, const unsigned* b) {
  for (int i = 0; i < 4; ++i) d[i] = 0.0f;
  moe_mma_bf16(d, a, b);
}

// cp.async: the copy happens at once (the wait and the commit have nothing to do), so
// the mock checks the addresses, alignments and the zero fill, not the ring's timing;
// the kernel's barriers are what keeps a slot from being refilled while it is read.
inline void moe_cp4(void* dst, const void* src) {
  if ((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src)) % 4) { std::fprintf(stderr, "cp.async 4: misaligned\n"); std::abort(); }
  std::memcpy(dst, src, 4);
}
inline void moe_cp16(void* dst, const void* src, bool valid) {
  if ((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src)) % 16) { std::fprintf(stderr, "cp.async 16: misaligned\n"); std::abort(); }
  if (valid) std::memcpy(dst, src, 16); else std::memset(dst, 0, 16);
}
inline void moe_cp_commit() {}
template <int N> inline void moe_cp_wait() {}

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

static void mock_write(const char* path, const void* data, size_t n) {
  FILE* fp = std::fopen(path, "wb");
  if (!fp || std::fwrite(data, 1, n, fp) != n) { std::perror(path); std::exit(2); }
  std::fclose(fp);
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
    from cuda_units import CUDA_TYPES, gemm_base, kernel_text

    from mlx_moe.kernels.registry import KERNELS

    spec = KERNELS[gemm_base(name)]
    fn = kernel_text(name, f"k{key}", inputs, outputs, template)
    args = [f"reinterpret_cast<const {CUDA_TYPES[inputs[a]]}*>(ins[{i}].data())" for i, a in enumerate(spec.inputs)]
    (odt,) = outputs.values()
    call = (f"mlx::core::cu::custom_kernel_mlx_moe_{name}_k{key}({', '.join(args)}, "
            f"reinterpret_cast<{CUDA_TYPES[odt]}*>(out))")
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
  // MOCK_SHIFT=n: every input starts n bytes into its buffer (a view at an offset), to run
  // the kernels' paths for unaligned inputs; data() then points there.
  const char* shift = std::getenv("MOCK_SHIFT");
  struct Shifted { std::vector<char>& v; long n; const char* data() const { return v.data() + n; } };
  std::vector<Shifted> ins;
  const long sh = shift ? std::atol(shift) : 0;
  for (auto& v : in) { std::memmove(v.data() + sh, v.data(), v.size() - 64); ins.push_back({v, sh}); }
  std::vector<float> buf(nout / 4 + 16);
  std::memset(buf.data(), 0xFF, buf.size() * 4);  // NaN as float32 and bfloat16: rows the kernel must not write stay NaN
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
    wt, xt = _W_DT[fmt], _DT[x_dtype]
    # The bodies mul_mm_id.cuda_body picks under CUDA_GEMM = variant; the async swiglu
    # body writes h in bfloat16, which the down GEMM then reads (and its async body
    # writes d in bfloat16 too).
    # variant: a CUDA_GEMM name, then options (VARIANT_OPTIONS: "async:lanes:dbf16:r128").
    with _cuda_gemm(variant):
        wdt = mx.uint16 if fmt == "q4_0" else x_dtype
        sfx_gu = cuda_body(x_dtype, wdt, D)
        ht = "bfloat16" if sfx_gu == "_async" else "float32"
        hdt = mx.bfloat16 if sfx_gu == "_async" else mx.float32
        wdd = mx.uint16 if fmt == "q4_0" else mx.float32
        sfx_d = cuda_body(hdt, wdd, F)
        cp_gu = mul_mm_id.async_template("cuda", x_dtype, wdt, D)
        cp_d, _ = mul_mm_id.plain_async_template("cuda", hdt, wdd, F)
        dt = "bfloat16" if sfx_d == "_async" and mul_mm_id.ASYNC_D_BF16 else "float32"
    return [("mul_mm_id_swiglu" + sfx_gu, {"x": xt, "wg": wt, "wu": wt, **ROUTE_IN}, {"h": ht},
             [("T", xt), ("WT", wt), ("K", D), ("N", F), ("KS", k)] + cp_gu),
            ("mul_mm_id" + sfx_d, {"src": ht, "w": wt, **ROUTE_IN}, {"out": dt},
             [("T", ht), ("WT", wt), ("K", F), ("N", D), ("KS", k), ("BCAST", False)] + cp_d)]


# The options after a GEMM body's name in a variant ("async:lanes:dbf16:r128"): the
# mul_mm_id settings each one sets.
VARIANT_OPTIONS = {"rows": ("ASYNC_COPY", "rows"), "lanes": ("ASYNC_COPY", "lanes"),
                   "dbf16": ("ASYNC_D_BF16", True), "dfloat": ("ASYNC_D_BF16", False),
                   "r64": ("ASYNC_ROWS", 64), "r128": ("ASYNC_ROWS", 128)}


def variant_settings(variant: str) -> dict:
    """{mul_mm_id attribute: value} of a variant: a CUDA_GEMM name, then options (VARIANT_OPTIONS)."""
    gemm, *opts = variant.split(":")
    return {"CUDA_GEMM": gemm, **dict(VARIANT_OPTIONS[o] for o in opts)}


def _cuda_gemm(variant):
    return mul_mm_id.switched(**variant_settings(variant))



_MOCK = {}


def mock_binary(tmp_path_factory, layers):
    """(executable, {kernel key: index}) of one program holding the GEMMs of all
    `layers` (one g++ run), built on first use."""
    key = repr(layers)
    if key not in _MOCK:
        kernels = []
        for layer in layers:
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
        _MOCK[key] = exe, {repr(k): i for i, k in enumerate(kernels)}
    return _MOCK[key]


def run_mock(tmp_path, mock, kern, arrays: dict, out_shape, shift: int = 0):
    """Run kernel `kern` (an entry of layer_kernels) under the mock; arrays: {input name: mx.array};
    shift: every input placed that many bytes past an aligned address."""
    from cuda_units import gemm_base

    from mlx_moe.kernels.registry import KERNELS

    exe, index = mock
    name = kern[0]
    spec = KERNELS[gemm_base(name)]
    files = []
    for a in spec.inputs:
        f = tmp_path / f"{name}_{a}.bin"
        arr = arrays[a]
        assert _DT[arr.dtype] == kern[1][a], (a, arr.dtype)
        raw = np.array(arr.view(mx.uint16) if arr.dtype in (mx.float16, mx.bfloat16) else arr)
        f.write_bytes(raw.tobytes())
        files.append(str(f))
    out = tmp_path / f"{name}_out.bin"
    (odt,) = kern[2].values()
    bf16_out = odt == "bfloat16"
    n_out = int(np.prod(out_shape)) * (2 if bf16_out else 4)
    bm = BM * dict(kern[3]).get("MT", 1)  # the async plain GEMM's rows per block
    grid = (-(-out_shape[1] // bm), arrays["tiles"].shape[0])
    r = subprocess.run([str(exe), str(index[repr(kern)]), *map(str, grid), str(out), str(n_out), *files],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "MOCK_SHIFT": str(shift)})
    assert r.returncode == 0, r.stderr[-4000:]
    if bf16_out:  # bfloat16 is the top half of a float32
        return (np.fromfile(out, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(out_shape)
    return np.fromfile(out, dtype=np.float32).reshape(out_shape)


# -- the decode layer's tensor-core tiles (metal/mul_mv_id_cuda.h: moe_gate_up_mma,
# moe_down_mma), each driven by a small C++ main of its test

def build_decode_tile(directory, name: str, defines: str, driver: str):
    """A g++ program of the mock, `defines`, mul_mv_id's CUDA helpers (after the primary
    templates they specialize and the shared helper they call, moe_identity_weight, taken
    from metal/mul_mv_id.metal as the registry prunes a header) and `driver` (its main);
    returns the executable."""
    from mlx_moe.kernels.registry import read_cuda_twin, read_family
    from mlx_moe.kernels.source import compact, prune

    primary = "template <bool MMA> struct moe_gate_up_mma;\ntemplate <bool MMA> struct moe_down_mma;\n"
    shared = prune(compact(read_family("mul_mv_id")[0]), "moe_identity_weight")
    src = directory / f"{name}.cpp"
    src.write_text(CUDA_MOCK + defines + primary + shared + read_cuda_twin("mul_mv_id")[0] + driver)
    exe = directory / name
    r = subprocess.run([CXX, "-std=c++20", "-O1", "-pthread", "-w", str(src), "-o", str(exe)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    return exe


def bf16_bits(a: np.ndarray):
    """float32 -> bfloat16 bits (round to nearest even) and their float32 values."""
    u = a.astype(np.float32).view(np.uint32)
    b = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return b, (b.astype(np.uint32) << 16).view(np.float32)
