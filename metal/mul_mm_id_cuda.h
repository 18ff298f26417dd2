// CUDA twins of the tensor-core kernels of metal/mul_mm_id.metal.
//
// Same sections, same names, same tiles and steps as the Metal bodies; only
// the matrix-unit part differs (DESIGN.md section 2): Metal multiplies 8x8
// simdgroup_float8x8 fragments, CUDA issues mma.sync m16n8k8 on TF32.
// mlx_moe/kernels/registry.py appends this file's helpers after the shared
// helpers of mul_mm_id.metal (so MOE_MM_* and moe_dequant are defined) and
// uses these bodies instead of the Metal ones on the `cuda` flavor.  map0 and
// combine have no twin: their Metal bodies compile for CUDA through the shims.
//
// Overflow: the tiles are float32 in shared memory and the tensor cores take
// TF32 (float32's 8-bit exponent, 10-bit mantissa): activations beyond
// 65504 (and the float32 intermediate h) stay finite.  TF32 rounds operands to
// 10 mantissa bits, the precision of float16: float16 and bfloat16 weights are
// exact, activations and dequantized Q4_0 weights carry a 2^-11 relative
// rounding (tests/test_kernels_cuda.py's prefill tolerance says so).
//
// Warp layout, per threadgroup (block) of 128 threads = 4 warps on a 64 x 32
// tile: warp w owns rows (w % 2) * 32 .. +32 (two m16 fragments) and pairs
// (w / 2) * 16 .. +16 (two n8 fragments): 2 x 2 mma tiles per k8 step.
//
// Fragment layouts of mma.m16n8k8 .tf32 (PTX ISA), with g = lane / 4 and
// q = lane % 4: A (16 x 8, row): a0 (g, q), a1 (g + 8, q), a2 (g, q + 4),
// a3 (g + 8, q + 4); B (8 x 8, col): b0 (k = q, n = g), b1 (k = q + 4, n = g);
// C (16 x 8): c0 (g, 2q), c1 (g, 2q + 1), c2 (g + 8, 2q), c3 (g + 8, 2q + 1).

// ==== helpers ====

// Shared-memory row pitches (floats), padded so that each fragment load and
// the staged stores hit 32 different banks.
#define MOE_MM_LDA (MOE_MM_BK + 4)  // A tile [BM][LDA]
#define MOE_MM_LDB (MOE_MM_BN + 8)  // B tile, k-major [BK][LDB]
#define MOE_MM_LDS (MOE_MM_BM + 4)  // output stage [BN][LDS] (reuses the A tile)

__device__ inline unsigned moe_tf32(float f) {
  unsigned r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(f));
  return r;
}

// d += A (16 x 8) * B (8 x 8), float32 accumulate.
__device__ inline void moe_mma_tf32(float* d, const unsigned* a, const unsigned* b) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// One k8 step of a warp's 32 x 16 sub-tile: acc[(mi * 2 + ni) * 4 + c].
__device__ inline void moe_mm_warp_k8(const float* sa, const float* sb, int sr, int sc, int kk,
                                      int lane, float* acc) {
  const int g = lane >> 2;
  const int q = lane & 3;
  unsigned a[2][4];
  unsigned b[2][2];
  for (int mi = 0; mi < 2; ++mi) {
    const float* r0 = sa + (sr + 16 * mi + g) * MOE_MM_LDA + kk;
    const float* r8 = r0 + 8 * MOE_MM_LDA;
    a[mi][0] = moe_tf32(r0[q]);
    a[mi][1] = moe_tf32(r8[q]);
    a[mi][2] = moe_tf32(r0[q + 4]);
    a[mi][3] = moe_tf32(r8[q + 4]);
  }
  for (int ni = 0; ni < 2; ++ni) {
    b[ni][0] = moe_tf32(sb[(kk + q) * MOE_MM_LDB + sc + 8 * ni + g]);
    b[ni][1] = moe_tf32(sb[(kk + q + 4) * MOE_MM_LDB + sc + 8 * ni + g]);
  }
  for (int mi = 0; mi < 2; ++mi) {
    for (int ni = 0; ni < 2; ++ni) {
      moe_mma_tf32(acc + (mi * 2 + ni) * 4, a[mi], b[ni]);
    }
  }
}

// The warp's accumulators into the stage [BN][LDS] (pair-major: each pair's
// BM results contiguous, as on Metal).
__device__ inline void moe_mm_warp_stage(const float* acc, float* stage, int sr, int sc, int lane) {
  const int g = lane >> 2;
  const int q = lane & 3;
  for (int mi = 0; mi < 2; ++mi) {
    for (int ni = 0; ni < 2; ++ni) {
      const float* c = acc + (mi * 2 + ni) * 4;
      const int r = sr + 16 * mi + g;
      const int p = sc + 8 * ni + 2 * q;
      stage[p * MOE_MM_LDS + r] = c[0];
      stage[(p + 1) * MOE_MM_LDS + r] = c[1];
      stage[p * MOE_MM_LDS + r + 8] = c[2];
      stage[(p + 1) * MOE_MM_LDS + r + 8] = c[3];
    }
  }
}

// ==== kernel: mul_mm_id ====
// As metal/mul_mm_id.metal's mul_mm_id (grid, template, inputs, output).
{
  constexpr int BM = MOE_MM_BM, BN = MOE_MM_BN, BK = MOE_MM_BK;
  constexpr int RL = K * moe_dequant<WT>::NUM / moe_dequant<WT>::DEN;
  const int t = int(threadIdx.x);
  const int lane = t & 31;
  const int warp = t >> 5;
  const int g = int(blockIdx.y);
  const int e = tiles[2 * g];
  if (e < 0) {
    return;  // an empty tile: the whole block leaves before any barrier
  }
  const int start = tiles[2 * g + 1];
  const int left = offsets[e + 1] - start;
  const int nvalid = left < BN ? left : BN;
  const int row0 = int(blockIdx.x) * BM;

  __shared__ float sa[BM * MOE_MM_LDA];  // A, then the output stage
  __shared__ float sb[BK * MOE_MM_LDB];

  const int arow = t / 2;
  const int ahalf = t % 2;
  const int wrow = (row0 + arow < N) ? row0 + arow : N - 1;
  const auto* wr = w + (size_t(e) * N + wrow) * RL;
  const int bj = t / 4;
  const int bk = (t % 4) * 8;
  const int bp = (bj < nvalid) ? pairs[start + bj] : -1;
  const auto* xr = src + size_t(bp < 0 ? 0 : (BCAST ? bp / KS : bp)) * K;

  const int sr = (warp % 2) * 32;
  const int sc = (warp / 2) * 16;
  float acc[16];
  for (int i = 0; i < 16; ++i) {
    acc[i] = 0.0f;
  }
  for (int k0 = 0; k0 < K; k0 += BK) {
    float v[16];
    moe_dequant<WT>::template load16<K>(wr, k0, ahalf, v);
    for (int i = 0; i < 16; ++i) {
      sa[arow * MOE_MM_LDA + ahalf * 16 + i] = v[i];
    }
    for (int i = 0; i < 8; ++i) {
      const int c = k0 + bk + i;
      sb[(bk + i) * MOE_MM_LDB + bj] = (bp >= 0 && c < K) ? float(xr[c]) : 0.0f;
    }
    __syncthreads();
    for (int kk = 0; kk < BK; kk += 8) {
      moe_mm_warp_k8(sa, sb, sr, sc, kk, lane, acc);
    }
    __syncthreads();
  }

  float* stage = sa;
  moe_mm_warp_stage(acc, stage, sr, sc, lane);
  __syncthreads();
  const int oj = t / 4;
  const int or0 = (t % 4) * 16;
  if (oj < nvalid) {
    const int p = pairs[start + oj];
    for (int i = 0; i < 16; ++i) {
      const int n = row0 + or0 + i;
      if (n < N) {
        out[size_t(p) * N + n] = stage[oj * MOE_MM_LDS + or0 + i];
      }
    }
  }
}

// ==== kernel: mul_mm_id_swiglu ====
// As metal/mul_mm_id.metal's mul_mm_id_swiglu.
{
  constexpr int BM = MOE_MM_BM, BN = MOE_MM_BN, BK = MOE_MM_BK;
  constexpr int RL = K * moe_dequant<WT>::NUM / moe_dequant<WT>::DEN;
  const int t = int(threadIdx.x);
  const int lane = t & 31;
  const int warp = t >> 5;
  const int g = int(blockIdx.y);
  const int e = tiles[2 * g];
  if (e < 0) {
    return;  // an empty tile: the whole block leaves before any barrier
  }
  const int start = tiles[2 * g + 1];
  const int left = offsets[e + 1] - start;
  const int nvalid = left < BN ? left : BN;
  const int row0 = int(blockIdx.x) * BM;

  __shared__ float sag[BM * MOE_MM_LDA];  // gate weights, then the gate stage
  __shared__ float sau[BM * MOE_MM_LDA];  // up weights, then the up stage
  __shared__ float sb[BK * MOE_MM_LDB];

  const int arow = t / 2;
  const int ahalf = t % 2;
  const size_t woff = (size_t(e) * N + ((row0 + arow < N) ? row0 + arow : N - 1)) * RL;
  const auto* wgr = wg + woff;
  const auto* wur = wu + woff;
  const int bj = t / 4;
  const int bk = (t % 4) * 8;
  const int bp = (bj < nvalid) ? pairs[start + bj] : -1;
  const auto* xr = x + size_t(bp < 0 ? 0 : bp / KS) * K;

  const int sr = (warp % 2) * 32;
  const int sc = (warp / 2) * 16;
  float accg[16];
  float accu[16];
  for (int i = 0; i < 16; ++i) {
    accg[i] = 0.0f;
    accu[i] = 0.0f;
  }
  for (int k0 = 0; k0 < K; k0 += BK) {
    float v[16];
    moe_dequant<WT>::template load16<K>(wgr, k0, ahalf, v);
    for (int i = 0; i < 16; ++i) {
      sag[arow * MOE_MM_LDA + ahalf * 16 + i] = v[i];
    }
    moe_dequant<WT>::template load16<K>(wur, k0, ahalf, v);
    for (int i = 0; i < 16; ++i) {
      sau[arow * MOE_MM_LDA + ahalf * 16 + i] = v[i];
    }
    for (int i = 0; i < 8; ++i) {
      const int c = k0 + bk + i;
      sb[(bk + i) * MOE_MM_LDB + bj] = (bp >= 0 && c < K) ? float(xr[c]) : 0.0f;
    }
    __syncthreads();
    for (int kk = 0; kk < BK; kk += 8) {
      moe_mm_warp_k8(sag, sb, sr, sc, kk, lane, accg);
      moe_mm_warp_k8(sau, sb, sr, sc, kk, lane, accu);
    }
    __syncthreads();
  }

  float* stage_g = sag;
  float* stage_u = sau;
  moe_mm_warp_stage(accg, stage_g, sr, sc, lane);
  moe_mm_warp_stage(accu, stage_u, sr, sc, lane);
  __syncthreads();
  const int oj = t / 4;
  const int or0 = (t % 4) * 16;
  if (oj < nvalid) {
    const int p = pairs[start + oj];
    for (int i = 0; i < 16; ++i) {
      const int n = row0 + or0 + i;
      if (n < N) {
        h[size_t(p) * N + n] = moe_silu(stage_g[oj * MOE_MM_LDS + or0 + i]) * stage_u[oj * MOE_MM_LDS + or0 + i];
      }
    }
  }
}
