// CUDA twins of the tensor-core kernels of metal/mul_mm_id.metal.
//
// Same sections, same names, same tiles and steps as the Metal bodies; only
// the matrix-unit part differs (DESIGN.md section 2): Metal multiplies 8x8
// simdgroup_float8x8 fragments, CUDA issues mma.sync m16n8k8 on TF32 (and,
// for bfloat16 activations with Q4_0 weights, m16n8k16 on bf16: moe_mm_bf16).
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

// The three PTX-level helpers (TF32 rounding, the mma, ldmatrix) are the only
// inline assembly; tests/test_kernels_prefill_emulated.py defines
// MOE_CUDA_MOCK and supplies warp-collective C++ stand-ins for them, to run
// these bodies on the CPU.
#ifndef MOE_CUDA_MOCK
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

// Four 8 x 4 float matrices from shared memory in one instruction: lane l
// gives the address of row l % 8 of matrix l / 8 (16 bytes, 16-byte
// aligned); register j of lane (g = lane / 4, q = lane % 4) receives float q
// of row g of matrix j.  (ldmatrix moves 8 x 8 b16 matrices: one b16 pair =
// one float.)  That is exactly a TF32 mma fragment's (row g, column q).
__device__ inline void moe_ldsm_x4(unsigned* r, const float* p) {
  unsigned a;
  asm volatile("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a)
               : "memory");
}
#endif  // MOE_CUDA_MOCK

__device__ inline float moe_tf32f(float f) {
  return __uint_as_float(moe_tf32(f));
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

// ---- The pipelined GEMM (kernels mul_mm_id_pipe, mul_mm_id_swiglu_pipe) ----
//
// Same tile (BM x BN x BK = 64 x 32 x 32, 128 threads, 4 warps of 32 rows x
// 16 pairs), same grid, same tile table and same results as mul_mm_id and
// mul_mm_id_swiglu above (and as the Metal bodies); what differs is how a K
// step is fed, because the simple bodies stall on every step (measured on
// the H100: 1.1 ms per layer at 64 tokens, where the weights need 0.15 ms):
// - the next K step's weights and activations are loaded from global memory
//   into registers while the tensor cores work on the current one
//   (software pipelining), and shared memory holds two stages, so one
//   barrier per K step is enough;
// - the tiles are stored already rounded to TF32 and k-contiguous ([rows][BK]
//   for A, [pairs][BK] for B), so each fragment is one ldmatrix.x4 instead of
//   four scalar loads and four conversions;
// - activations and float weights move in 16-byte loads and stores; a Q4_0
//   thread reads only the quarter block it dequantizes (4 words + scale), with
//   an exact int -> float trick instead of a conversion instruction.
#define MOE_MM_LDP (MOE_MM_BK + 4)  // row pitch (floats) of the pipelined tiles: 144 B, conflict-free

__device__ inline bool moe_aligned16(const void* p) {
  return (reinterpret_cast<size_t>(p) & 15) == 0;
}

// q - 8 for the 4-bit field of w at bit `sh`, exactly: the float with bits
// 0x4B000000 | q is 2^23 + q, and 2^23 + 8 = 8388616.
__device__ inline float moe_nib_m8(unsigned w, int sh) {
  return __uint_as_float(0x4B000000u | ((w >> sh) & 0xFu)) - 8388616.0f;
}

__device__ inline float4 moe_tf32x4(float a, float b, float c, float d) {
  return make_float4(moe_tf32f(a), moe_tf32f(b), moe_tf32f(c), moe_tf32f(d));
}

// One thread's share of an A (weight) tile for one K step: 16 weights of its
// row.  Float rows: columns 16 * ah .. + 15 of the step.
template <typename WT>
struct moe_pipe_a {
  uint4 raw[sizeof(WT)];  // 16 WT values

  // vec: 16-byte loads (K % 32 == 0 and w 16-byte aligned), else one by one
  // with zeros past K.
  template <int K>
  MOE_DEVICE void load(const WT* row, int k0, int ah, bool vec) {
    const int c0 = k0 + 16 * ah;
    if (vec) {
      const uint4* p = reinterpret_cast<const uint4*>(row + c0);
      for (int i = 0; i < int(sizeof(WT)); ++i) {
        raw[i] = p[i];
      }
    } else {
      WT* v = reinterpret_cast<WT*>(raw);
      for (int i = 0; i < 16; ++i) {
        v[i] = (c0 + i < K) ? row[c0 + i] : WT(0.0f);
      }
    }
  }

  // Into the thread's row of the tile (dst = &tile[row][0]).
  MOE_DEVICE void store(float* dst, int ah) const {
    const WT* v = reinterpret_cast<const WT*>(raw);
    float4* o = reinterpret_cast<float4*>(dst + 16 * ah);
    for (int i = 0; i < 4; ++i) {
      o[i] = moe_tf32x4(float(v[4 * i]), float(v[4 * i + 1]), float(v[4 * i + 2]), float(v[4 * i + 3]));
    }
  }
};

// Q4_0: the thread takes words 1 + 4 * ah .. 4 + 4 * ah of the K step's block
// (quant bytes 8 * ah .. 8 * ah + 7): low nibbles are weights 8 * ah .. + 7,
// high nibbles weights 16 + 8 * ah .. + 7 (layout in moe_dequant<ushort>).
template <>
struct moe_pipe_a<ushort> {
  ushort d;
  ushort q[4];

  template <int K>
  MOE_DEVICE void load(const ushort* row, int k0, int ah, bool) {
    const ushort* blk = row + (k0 / 32) * 9;
    d = blk[0];
    for (int j = 0; j < 4; ++j) {
      q[j] = blk[1 + 4 * ah + j];
    }
  }

  MOE_DEVICE void store(float* dst, int ah) const {
    const float s = moe_f16_bits(d);
    float lo[8];
    float hi[8];
    for (int j = 0; j < 4; ++j) {
      const unsigned w = q[j];
      lo[2 * j] = s * moe_nib_m8(w, 0);  // d * (q - 8): exact in float32
      lo[2 * j + 1] = s * moe_nib_m8(w, 8);
      hi[2 * j] = s * moe_nib_m8(w, 4);
      hi[2 * j + 1] = s * moe_nib_m8(w, 12);
    }
    float4* ol = reinterpret_cast<float4*>(dst + 8 * ah);
    float4* oh = reinterpret_cast<float4*>(dst + 16 + 8 * ah);
    ol[0] = moe_tf32x4(lo[0], lo[1], lo[2], lo[3]);
    ol[1] = moe_tf32x4(lo[4], lo[5], lo[6], lo[7]);
    oh[0] = moe_tf32x4(hi[0], hi[1], hi[2], hi[3]);
    oh[1] = moe_tf32x4(hi[4], hi[5], hi[6], hi[7]);
  }
};

// One thread's share of the B (activation) tile for one K step: 8
// consecutive columns of one pair's source row.
template <typename T>
struct moe_pipe_b {
  uint4 raw[sizeof(T) / 2];  // 8 T values

  MOE_DEVICE void load(const T* xr, bool valid, int c0, int K, bool vec) {
    if (vec) {
      const uint4* p = reinterpret_cast<const uint4*>(xr + c0);
      for (int i = 0; i < int(sizeof(T) / 2); ++i) {
        raw[i] = valid ? p[i] : make_uint4(0u, 0u, 0u, 0u);
      }
    } else {
      T* v = reinterpret_cast<T*>(raw);
      for (int i = 0; i < 8; ++i) {
        v[i] = (valid && c0 + i < K) ? xr[c0 + i] : T(0.0f);
      }
    }
  }

  MOE_DEVICE void store(float* dst) const {
    const T* v = reinterpret_cast<const T*>(raw);
    float4* o = reinterpret_cast<float4*>(dst);
    o[0] = moe_tf32x4(float(v[0]), float(v[1]), float(v[2]), float(v[3]));
    o[1] = moe_tf32x4(float(v[4]), float(v[5]), float(v[6]), float(v[7]));
  }
};

// Four results of one pair to out (n: the first one's row): float4 / 8-byte
// stores where N allows, else one by one up to N.
template <int N>
MOE_DEVICE inline void moe_store4(float* o, float4 v, int n) {
  if (N % 4 == 0 && n + 3 < N) {
    *reinterpret_cast<float4*>(o) = v;
    return;
  }
  const float vv[4] = {v.x, v.y, v.z, v.w};
  for (int j = 0; j < 4 && n + j < N; ++j) {
    o[j] = vv[j];
  }
}

template <int N>
MOE_DEVICE inline void moe_store4(__nv_bfloat16* o, float4 v, int n) {
  const __nv_bfloat16 b[4] = {__nv_bfloat16(v.x), __nv_bfloat16(v.y), __nv_bfloat16(v.z), __nv_bfloat16(v.w)};
  if (N % 4 == 0 && n + 3 < N) {
    *reinterpret_cast<uint2*>(o) = *reinterpret_cast<const uint2*>(b);
    return;
  }
  for (int j = 0; j < 4 && n + j < N; ++j) {
    o[j] = b[j];
  }
}

// The GEMM tiles' epilogue, after the results are staged in shared memory
// (`smem`: NA stages [BN][BM + 4], pair-major) and a barrier: each thread writes
// BM / 4 results of one pair, SwiGLU applied when NA = 2.  O: float, or
// __nv_bfloat16 for the bf16 h of the async bodies.
template <int NA, int N, typename O, int BM = MOE_MM_BM>
MOE_DEVICE inline void moe_mm_write(const float* smem, const int* pairs, int start, int nvalid, int row0,
                                    O* out) {
  constexpr int BN = MOE_MM_BN, LDS = BM + 4;  // the stage [NA][BN][LDS]; LDS = MOE_MM_LDS for 64 rows
  const int t = int(threadIdx.x);
  const int oj = t >> 2;
  const int or0 = (t & 3) * (BM / 4);
  if (oj < nvalid) {
    const int p = pairs[start + oj];
    const float* sg = smem + oj * LDS + or0;
    const float* su = sg + BN * LDS;
    O* o = out + size_t(p) * N + row0 + or0;
    for (int i = 0; i < BM / 4; i += 4) {
      float4 v = *reinterpret_cast<const float4*>(sg + i);
      if (NA == 2) {
        const float4 u = *reinterpret_cast<const float4*>(su + i);
        v = make_float4(moe_silu(v.x) * u.x, moe_silu(v.y) * u.y, moe_silu(v.z) * u.z, moe_silu(v.w) * u.w);
      }
      moe_store4<N>(o + i, v, row0 + or0 + i);
    }
  }
}

// The block's tile of the map (grid y) and of the output rows (grid x), read from
// map0's tile table: expert e (< 0: an empty tile, nothing else set), its first
// pair `start` in the expert's list, the pairs it holds (at most BN), its first row.
struct moe_mm_tile {
  int e, start, nvalid, row0;
};

MOE_DEVICE inline moe_mm_tile moe_mm_tile_of(const int* tiles, const int* offsets, int bm = MOE_MM_BM) {
  const int g = int(blockIdx.y);
  moe_mm_tile tl = {tiles[2 * g], 0, 0, 0};
  if (tl.e >= 0) {
    tl.start = tiles[2 * g + 1];
    const int left = offsets[tl.e + 1] - tl.start;
    tl.nvalid = left < MOE_MM_BN ? left : MOE_MM_BN;
    tl.row0 = int(blockIdx.x) * bm;
  }
  return tl;
}

// The pipelined tiles' epilogue: the accumulators of every warp (acc[a], 2 x 2 mma
// tiles of 32 rows x 16 pairs) through shared memory (`smem`, at least NA * BN * LDS
// floats, no longer read by any warp) to out.
template <int NA, int N>
MOE_DEVICE inline void moe_mm_pipe_out(const float (*acc)[16], float* smem, const int* pairs, int start,
                                       int nvalid, int row0, float* out) {
  const int lane = int(threadIdx.x) & 31;
  const int warp = int(threadIdx.x) >> 5;
  for (int a = 0; a < NA; ++a) {
    moe_mm_warp_stage(acc[a], smem + a * MOE_MM_BN * MOE_MM_LDS, (warp % 2) * 32, (warp / 2) * 16, lane);
  }
  __syncthreads();
  moe_mm_write<NA, N>(smem, pairs, start, nvalid, row0, out);
}

// The whole pipelined tile: NA = 1 (out = W . src) or 2 (SwiGLU of W0 . x and
// W1 . x).  Block (blockIdx.x, blockIdx.y) = (row tile, tile of the map), 128
// threads, as the simple bodies.
template <int NA, typename T, typename WT, int K, int N, int KS, bool BCAST>
MOE_DEVICE inline void moe_mm_pipe(const T* src, const int* pairs, const int* tiles, const int* offsets,
                                   const WT* w0, const WT* w1, float* out) {
  constexpr int BM = MOE_MM_BM, BN = MOE_MM_BN, BK = MOE_MM_BK, LD = MOE_MM_LDP;
  constexpr int RL = K * moe_dequant<WT>::NUM / moe_dequant<WT>::DEN;
  constexpr int NK = (K + BK - 1) / BK;
  constexpr int STAGE = (NA * BM + BN) * LD;  // floats per pipeline stage: NA A tiles, then B
  // Two stages; after the K loop, stage 0 holds the output tile(s) [BN][LDS].
  __shared__ __align__(16) float smem[2 * STAGE];

  const int t = int(threadIdx.x);
  const int lane = t & 31;
  const int warp = t >> 5;
  const moe_mm_tile tile = moe_mm_tile_of(tiles, offsets);
  if (tile.e < 0) {
    return;  // an empty tile: the whole block leaves before any barrier
  }
  const int e = tile.e, start = tile.start, nvalid = tile.nvalid, row0 = tile.row0;

  // A loads: warp w fills rows 16w .. 16w + 15, lanes 0-15 and 16-31 the two
  // halves of a row (a quarter warp then stores 8 rows: 32 distinct banks).
  const int arow = warp * 16 + (lane & 15);
  const int ah = lane >> 4;
  const size_t woff = (size_t(e) * N + ((row0 + arow < N) ? row0 + arow : N - 1)) * RL;
  const WT* wr0 = w0 + woff;
  const WT* wr1 = w1 + woff;
  // B loads: pair bj, columns bk .. bk + 7 of each K step.
  const int bj = t >> 2;
  const int bk = (t & 3) * 8;
  const int bp = (bj < nvalid) ? pairs[start + bj] : -1;
  const T* xr = src + size_t(bp < 0 ? 0 : (BCAST ? bp / KS : bp)) * K;
  const bool avec = (K % 32 == 0) && moe_aligned16(w0) && moe_aligned16(w1);
  const bool bvec = (K % 32 == 0) && moe_aligned16(src);

  moe_pipe_a<WT> ra[NA];
  moe_pipe_b<T> rb;
  ra[0].template load<K>(wr0, 0, ah, avec);
  if (NA == 2) {
    ra[NA - 1].template load<K>(wr1, 0, ah, avec);
  }
  rb.load(xr, bp >= 0, bk, K, bvec);

  const int sr = (warp % 2) * 32;  // this warp's rows in the tile
  const int sc = (warp / 2) * 16;  // and its pairs
  // ldmatrix row addresses (see moe_ldsm_x4): A fragments take matrices
  // (rows 0-7, k 0-3), (rows 8-15, k 0-3), (rows 0-7, k 4-7), (rows 8-15, k 4-7);
  // the B fragments of both n8 halves (pairs 0-7, k 0-3), (0-7, 4-7), (8-15, 0-3), (8-15, 4-7).
  const int a_ld = (sr + (lane & 7) + 8 * ((lane >> 3) & 1)) * LD + 4 * (lane >> 4);
  const int b_ld = (NA * BM + sc + (lane & 7) + 8 * (lane >> 4)) * LD + 4 * ((lane >> 3) & 1);
  float acc[NA][16];
  for (int a = 0; a < NA; ++a) {
    for (int i = 0; i < 16; ++i) {
      acc[a][i] = 0.0f;
    }
  }
  for (int s = 0; s < NK; ++s) {
    float* buf = smem + (s & 1) * STAGE;
    // Stage s: the registers loaded during step s - 1 (or before the loop).
    // Nobody reads this buffer now: its last readers (step s - 2) passed
    // step s - 1's barrier first.
    for (int a = 0; a < NA; ++a) {
      ra[a].store(buf + (a * BM + arow) * LD, ah);
    }
    rb.store(buf + (NA * BM + bj) * LD + bk);
    if (s + 1 < NK) {  // step s + 1's loads fly while step s computes
      const int k1 = (s + 1) * BK;
      ra[0].template load<K>(wr0, k1, ah, avec);
      if (NA == 2) {
        ra[NA - 1].template load<K>(wr1, k1, ah, avec);
      }
      rb.load(xr, bp >= 0, k1 + bk, K, bvec);
    }
    __syncthreads();
    for (int kk = 0; kk < BK; kk += 8) {
      unsigned b[4];
      moe_ldsm_x4(b, buf + b_ld + kk);
      for (int a = 0; a < NA; ++a) {
        for (int mi = 0; mi < 2; ++mi) {
          unsigned af[4];
          moe_ldsm_x4(af, buf + a * BM * LD + 16 * mi * LD + a_ld + kk);
          moe_mma_tf32(acc[a] + (mi * 2) * 4, af, b);
          moe_mma_tf32(acc[a] + (mi * 2 + 1) * 4, af, b + 2);
        }
      }
    }
  }
  __syncthreads();  // every warp is done with the last stage before stage 0 becomes the output
  moe_mm_pipe_out<NA, N>(acc, smem, pairs, start, nvalid, row0, out);
}

// ---- The bf16 GEMM for Q4_0 weights and bfloat16 activations ----
// (kernels mul_mm_id_bf16, mul_mm_id_swiglu_bf16).  Same tile, grid, pipeline
// and epilogue as moe_mm_pipe; the tensor cores run mma.m16n8k16 on bf16 with
// float32 accumulation, twice the k per instruction of TF32, on tiles of half
// the bytes.  Exact up to float32 accumulation: the A tile holds q - 8
// (integers in [-8, 7], exact in bf16) and the B tile the bf16 activations as
// given, so every product is exact; a K step is one Q4_0 block (BK = 32), so
// each step is accumulated on its own and added to the result times the
// block's scale, in float32.  (The TF32 path rounds each dequantized weight
// d * (q - 8) to 10 mantissa bits.)
// (The fragments of mma.m16n8k16 .bf16: shims_cuda.h, beside moe_mma_bf16.)
#define MOE_MM_LDH (MOE_MM_BK + 8)  // row pitch (bf16) of the bf16 tiles: 80 B, conflict-free ldmatrix

// (moe_mma_bf16, moe_mma_bf16_z and moe_q4_bf16x2 are in shims_cuda.h: the decode layer's
// gate/up tile uses them too; the mock supplies its own.)

// The thread's half block (moe_pipe_a<ushort>) as bf16 q - 8 into its tile row:
// low nibbles are k = 8 ah .. 8 ah + 7, high nibbles k = 16 + 8 ah .. + 7.
MOE_DEVICE inline void moe_q4_store_bf16(const moe_pipe_a<ushort>& ra, ushort* row, int ah) {
  unsigned lo[4];
  unsigned hi[4];
  for (int j = 0; j < 4; ++j) {
    const unsigned w = ra.q[j];
    lo[j] = moe_q4_bf16x2(w & 0x0F0Fu);
    hi[j] = moe_q4_bf16x2((w >> 4) & 0x0F0Fu);
  }
  *reinterpret_cast<uint4*>(row + 8 * ah) = make_uint4(lo[0], lo[1], lo[2], lo[3]);
  *reinterpret_cast<uint4*>(row + 16 + 8 * ah) = make_uint4(hi[0], hi[1], hi[2], hi[3]);
}

template <int NA, int K, int N, int KS, bool BCAST>
MOE_DEVICE inline void moe_mm_bf16(const __nv_bfloat16* src, const int* pairs, const int* tiles,
                                   const int* offsets, const ushort* w0, const ushort* w1, float* out) {
  constexpr int BM = MOE_MM_BM, BN = MOE_MM_BN, BK = MOE_MM_BK, LH = MOE_MM_LDH;
  static_assert(BK == 32 && K % 32 == 0, "a K step is one Q4_0 block");
  constexpr int RL = K / 32 * 9;
  constexpr int NK = K / BK;
  constexpr int TILE_H = (NA * BM + BN) * LH;     // bf16 per stage: NA A tiles, then B
  constexpr int STAGE = TILE_H / 2 + NA * BM;     // floats per stage: the tiles, then the A rows' scales
  constexpr int OUT = NA * BN * MOE_MM_LDS;       // the epilogue's stage
  __shared__ __align__(16) float smem[2 * STAGE > OUT ? 2 * STAGE : OUT];

  const int t = int(threadIdx.x);
  const int lane = t & 31;
  const int warp = t >> 5;
  const moe_mm_tile tile = moe_mm_tile_of(tiles, offsets);
  if (tile.e < 0) {
    return;  // an empty tile: the whole block leaves before any barrier
  }
  const int e = tile.e, start = tile.start, nvalid = tile.nvalid, row0 = tile.row0;

  // Loads as moe_mm_pipe: A row arow, half block ah; B pair bj, columns bk .. bk + 7.
  const int arow = warp * 16 + (lane & 15);
  const int ah = lane >> 4;
  const size_t woff = (size_t(e) * N + ((row0 + arow < N) ? row0 + arow : N - 1)) * RL;
  const ushort* wr0 = w0 + woff;
  const ushort* wr1 = w1 + woff;
  const int bj = t >> 2;
  const int bk = (t & 3) * 8;
  const int bp = (bj < nvalid) ? pairs[start + bj] : -1;
  const __nv_bfloat16* xr = src + size_t(bp < 0 ? 0 : (BCAST ? bp / KS : bp)) * K;
  const bool bvec = moe_aligned16(src);

  moe_pipe_a<ushort> ra[NA];
  moe_pipe_b<__nv_bfloat16> rb;
  ra[0].template load<K>(wr0, 0, ah, true);
  if (NA == 2) {
    ra[NA - 1].template load<K>(wr1, 0, ah, true);
  }
  rb.load(xr, bp >= 0, bk, K, bvec);

  const int sr = (warp % 2) * 32;
  const int sc = (warp / 2) * 16;
  // ldmatrix row addresses (bf16 elements in a stage): A matrices (rows 0-7, k 0-7),
  // (8-15, 0-7), (0-7, 8-15), (8-15, 8-15) = a0..a3; B (pairs 0-7, k 0-7), (0-7, 8-15),
  // (8-15, 0-7), (8-15, 8-15) = b0, b1 of the first n8 half, then of the second.
  const int a_ld = (sr + (lane & 7) + 8 * ((lane >> 3) & 1)) * LH + 8 * (lane >> 4);
  const int b_ld = (NA * BM + sc + (lane & 7) + 8 * (lane >> 4)) * LH + 8 * ((lane >> 3) & 1);
  float acc[NA][16];
  for (int a = 0; a < NA; ++a) {
    for (int i = 0; i < 16; ++i) {
      acc[a][i] = 0.0f;
    }
  }
  for (int s = 0; s < NK; ++s) {
    float* buf = smem + (s & 1) * STAGE;
    ushort* hb = reinterpret_cast<ushort*>(buf);
    float* scale = buf + TILE_H / 2;
    for (int a = 0; a < NA; ++a) {
      moe_q4_store_bf16(ra[a], hb + (a * BM + arow) * LH, ah);
      if (ah == 0) {
        scale[a * BM + arow] = moe_f16_bits(ra[a].d);
      }
    }
    *reinterpret_cast<uint4*>(hb + (NA * BM + bj) * LH + bk) = rb.raw[0];
    if (s + 1 < NK) {  // step s + 1's loads fly while step s computes
      const int k1 = (s + 1) * BK;
      ra[0].template load<K>(wr0, k1, ah, true);
      if (NA == 2) {
        ra[NA - 1].template load<K>(wr1, k1, ah, true);
      }
      rb.load(xr, bp >= 0, k1 + bk, K, bvec);
    }
    __syncthreads();
    unsigned b[2][4];  // the two k16 halves of the step
    moe_ldsm_x4(b[0], reinterpret_cast<const float*>(hb + b_ld));
    moe_ldsm_x4(b[1], reinterpret_cast<const float*>(hb + b_ld + 16));
    for (int a = 0; a < NA; ++a) {
      for (int mi = 0; mi < 2; ++mi) {
        float part[8];  // this block's products, 2 n8 tiles
        for (int i = 0; i < 8; ++i) {
          part[i] = 0.0f;
        }
        for (int kh = 0; kh < 2; ++kh) {
          unsigned af[4];
          moe_ldsm_x4(af, reinterpret_cast<const float*>(hb + (a * BM + 16 * mi) * LH + a_ld + 16 * kh));
          moe_mma_bf16(part, af, b[kh]);
          moe_mma_bf16(part + 4, af, b[kh] + 2);
        }
        const float d0 = scale[a * BM + sr + 16 * mi + (lane >> 2)];  // rows g and g + 8
        const float d8 = scale[a * BM + sr + 16 * mi + 8 + (lane >> 2)];
        float* c = acc[a] + 8 * mi;
        for (int ni = 0; ni < 2; ++ni) {
          c[4 * ni] += d0 * part[4 * ni];
          c[4 * ni + 1] += d0 * part[4 * ni + 1];
          c[4 * ni + 2] += d8 * part[4 * ni + 2];
          c[4 * ni + 3] += d8 * part[4 * ni + 3];
        }
      }
    }
  }
  __syncthreads();  // every warp is done with the last stage before stage 0 becomes the output
  moe_mm_pipe_out<NA, N>(acc, smem, pairs, start, nvalid, row0, out);
}

// ---- The asynchronous-copy GEMM for Q4_0 weights and bfloat16 activations ----
// (kernels mul_mm_id_async, mul_mm_id_swiglu_async).  Same tile (BM x BN =
// 64 x 32, 128 threads; or 128 x 32 for the plain GEMM with MT = 2,
// mul_mm_id.ASYNC_ROWS), grid, tile table and arithmetic as moe_mm_bf16 (exact
// bf16 products of q - 8 and x, each Q4_0 block's partial sums scaled by its
// d in float32); what differs is how the tensor cores are fed.  moe_mm_bf16
// keeps one K step in flight per thread, in registers, loaded 2 bytes at a
// time: its warps wait on memory (ncu on the TF32 twin: 35% issue, 15% tensor
// pipe at 25% occupancy).  Here
// - a stage is MOE_MM_AK = 2 Q4_0 blocks (K 64); MOE_MM_STAGES = 4 stages
//   rotate in shared memory, filled with cp.async (the weights' raw bytes in
//   4-byte pieces, the activations in 16-byte pieces, zero-filled for pairs
//   past the tile's end), so three stages are in flight while one is used;
// - the weights stay packed in shared memory (18 bytes a block, 4.5 bits a
//   weight): each warp builds its own A fragments from the nibbles (lane
//   (g, q) of m16n8k16 needs bytes 2q, 2q + 1, 2q + 8, 2q + 9 of rows g and
//   g + 8; their low nibbles are k 0-15 of the block, their high nibbles
//   k 16-31), so no bf16 A tile is stored and read back;
// - warp w owns rows 16 MT w .. 16 MT (w + 1) - 1 of each weight matrix and all
//   32 pairs: every weight is converted once per block, and each B fragment
//   (ldmatrix from the activation stage) is shared by the NA x MT A fragments
//   of a k16 (shared-memory reads were the limit in ncu: MT = 2 halves the B
//   reads per weight row of the plain GEMM).
// h comes out in bfloat16 (O = __nv_bfloat16) for the down GEMM's own async
// body, as mlx-lm's SwitchGLU keeps it in the activations' dtype.
#define MOE_MM_AK 2        // Q4_0 blocks per stage
#define MOE_MM_STAGES 4    // stages in the ring
#define MOE_MM_AP 48       // bytes per weight row in a stage (36 used): conflict-free fragment reads
#define MOE_MM_XP (32 * MOE_MM_AK + 8)  // bf16 per activation row in a stage: 144 B, conflict-free ldmatrix

#ifndef MOE_CUDA_MOCK
// (moe_smem, moe_cp16, moe_cp_commit and moe_cp_wait are in shims_cuda.h.)
// 4 bytes global -> shared, asynchronously (both 4-byte aligned).
__device__ inline void moe_cp4(void* dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(moe_smem(dst)), "l"(src) : "memory");
}

#endif  // MOE_CUDA_MOCK

// One ushort of a stage (2-byte aligned: blocks are 18 bytes).
MOE_DEVICE inline unsigned moe_ld16(const unsigned char* p) {
  return *reinterpret_cast<const ushort*>(p);
}

template <int NA, int K, int N, int KS, bool BCAST, int CP, int MT, typename O>
MOE_DEVICE inline void moe_mm_async(const __nv_bfloat16* src, const int* pairs, const int* tiles,
                                    const int* offsets, const ushort* w0, const ushort* w1, O* out) {
  // MT: 16-row m tiles per warp, so a block's tile is BM = 64 MT rows x 32 pairs.
  constexpr int BM = MOE_MM_BM * MT, BN = MOE_MM_BN, S = MOE_MM_STAGES, AK = MOE_MM_AK;
  constexpr int AP = MOE_MM_AP, XP = MOE_MM_XP;
  static_assert(K % (32 * AK) == 0 && AK % 2 == 0, "a stage is AK whole Q4_0 blocks, 4-byte aligned");
  static_assert(MOE_MM_THREADS == 128 && MOE_MM_BM == 64 && BN == 32, "the copy and warp layouts below");
  static_assert((MT == 1 || MT == 2) && (MT == 1 || CP == 1), "64 or 128 rows; 128 rows copy in lanes");
  constexpr int RL = K / 32 * 9;           // ushorts per weight row
  constexpr int NK = K / (32 * AK);        // stages along K
  constexpr int WB = 18 * AK;              // weight bytes per row and stage
  constexpr int A_BYTES = NA * BM * AP;
  constexpr int STAGE = A_BYTES + BN * XP * 2;
  constexpr int LDS = BM + 4;              // the epilogue's stage [NA][BN][LDS] floats (conflict-free stores)
  constexpr int OUT = NA * BN * LDS * 4;
  constexpr int SMEM = S * STAGE > OUT ? S * STAGE : OUT;
  static_assert(SMEM <= 48 * 1024, "static shared memory: at most 48 kB a block");
  __shared__ __align__(16) unsigned char smem[SMEM];

  const int t = int(threadIdx.x);
  const int lane = t & 31;
  const int warp = t >> 5;
  const moe_mm_tile tile = moe_mm_tile_of(tiles, offsets, BM);
  if (tile.e < 0) {
    return;  // an empty tile: the whole block leaves before any barrier
  }
  const int e = tile.e, start = tile.start, nvalid = tile.nvalid, row0 = tile.row0;

  // Weight copies, WW 4-byte words per row and stage; rows past N read row N - 1
  // (their results are never written).  Two layouts (template CP):
  // - CP = 0 ("rows"): NA = 2: thread t copies all words of row t % 64 of matrix
  //   t / 64; NA = 1: the first or second half of row t % 64's words.  One copy
  //   instruction of a warp touches 32 rows (32 L1 wavefronts).
  // - CP = 1 ("lanes", the default): warp w copies rows RPW w .. RPW w + RPW - 1 of
  //   the stacked (matrix, row) list (all of one matrix), 8 lanes taking 8
  //   consecutive words of one row: an instruction touches 4 rows (the last word of
  //   each row: RPW rows), about a quarter of the wavefronts for the same
  //   instruction count.  On the H100 a Qwen3-30B-A3B layer of 512 tokens took
  //   0.670 ms against 0.983 (BENCHMARKS.md): the copies' wavefronts were the limit.
  constexpr int WW = WB / 4;
  constexpr int RPW = NA * BM / 4;
  static_assert(RPW <= 32, "a lane copies the last word of at most one row");
  // Unaligned weights (a view into a larger buffer) fall back to 2-byte copies.
  const bool a4 = ((reinterpret_cast<size_t>(w0) | reinterpret_cast<size_t>(w1)) & 3) == 0;
  auto wrow_of = [&](int R) {  // the first byte of row R of the stacked (matrix, row) list
    const int r = R % BM;
    const ushort* w = R >= BM ? w1 : w0;
    return reinterpret_cast<const unsigned char*>(w + (size_t(e) * N + ((row0 + r < N) ? row0 + r : N - 1)) * RL);
  };
  auto wcopy = [&](unsigned char* dst, const unsigned char* src) {
    if (a4) {
      moe_cp4(dst, src);
    } else {
      reinterpret_cast<ushort*>(dst)[0] = reinterpret_cast<const ushort*>(src)[0];
      reinterpret_cast<ushort*>(dst)[1] = reinterpret_cast<const ushort*>(src)[1];
    }
  };
  // CP = 0: the thread's row and word range.  CP = 1: its first row (rows rl + 4 j
  // of the warp's matrix wm, clamped to N - 1) and the row of its last word.
  const int cR = NA == 2 ? t : (t & 63);
  const int cw0 = NA == 2 ? 0 : ((WW + 1) / 2) * (t >> 6);
  const int cw1 = NA == 2 ? WW : (t >> 6 ? WW : (WW + 1) / 2);
  const unsigned char* wr0 = wrow_of(cR);
  const unsigned char* wm = reinterpret_cast<const unsigned char*>((RPW * warp >= BM ? w1 : w0) + size_t(e) * N * RL);
  const int rl = row0 + (RPW * warp) % BM + (lane >> 3);
  const unsigned char* wl1 = wrow_of(RPW * warp + (lane < RPW ? lane : 0));
  // Activation copies: pair t / 4, 16-byte pieces 2 (t % 4) and 2 (t % 4) + 1 of its stage row.
  const int xj = t >> 2;
  const int xc = (t & 3) * 16;  // first bf16 of the thread's pieces
  const int xp = (xj < nvalid) ? pairs[start + xj] : -1;
  const __nv_bfloat16* xrow = src + size_t(xp < 0 ? 0 : (BCAST ? xp / KS : xp)) * K;
  const bool x16 = moe_aligned16(src);
  unsigned char* xdst = smem + A_BYTES + (xj * XP + xc) * 2;

  auto issue = [&](int s) {  // stage s's copies into ring slot s % S, one commit group
    unsigned char* base = smem + (s % S) * STAGE;
    if (CP == 0) {
      for (int i = cw0; i < cw1; ++i) {
        wcopy(base + cR * AP + 4 * i, wr0 + s * WB + 4 * i);
      }
    } else {
      for (int c = 0; c < WW / 8; ++c) {
        const int i = 8 * c + (lane & 7);
        for (int j = 0; j < RPW / 4; ++j) {
          const int r = rl + 4 * j < N ? rl + 4 * j : N - 1;
          wcopy(base + (RPW * warp + 4 * j + (lane >> 3)) * AP + 4 * i, wm + size_t(r) * RL * 2 + s * WB + 4 * i);
        }
      }
      for (int i = WW / 8 * 8; i < WW; ++i) {
        if (lane < RPW) {
          wcopy(base + (RPW * warp + lane) * AP + 4 * i, wl1 + s * WB + 4 * i);
        }
      }
    }
    const __nv_bfloat16* xs = xrow + s * 32 * AK + xc;
    unsigned char* xd = base + (xdst - smem);
    for (int i = 0; i < 2; ++i) {
      if (x16) {
        moe_cp16(xd + 16 * i, xs + 8 * i, xp >= 0);
      } else {
        for (int j = 0; j < 8; ++j) {
          reinterpret_cast<__nv_bfloat16*>(xd + 16 * i)[j] = xp >= 0 ? xs[8 * i + j] : __nv_bfloat16(0.0f);
        }
      }
    }
    moe_cp_commit();
  };

  // Fragment addresses.  A: rows 16 (MT warp + m) + g and + 8 (m tile m < MT),
  // bytes 2 + 2q and 10 + 2q of a block.  B (ldmatrix, bf16 elements of the
  // activation stage): matrices (pairs 0-7, k 0-7), (0-7, 8-15), (8-15, 0-7),
  // (8-15, 8-15) of a 16-pair half.
  const int fg = lane >> 2;
  const int fq = lane & 3;
  const int a_off = (warp * 16 * MT + fg) * AP;
  const int b_ld = ((lane & 7) + 8 * (lane >> 4)) * XP + 8 * ((lane >> 3) & 1);
  float acc[NA * MT][16];  // [a * MT + m]
  for (int a = 0; a < NA * MT; ++a) {
    for (int i = 0; i < 16; ++i) {
      acc[a][i] = 0.0f;
    }
  }

  for (int s = 0; s < S - 1; ++s) {
    if (s < NK) {
      issue(s);
    } else {
      moe_cp_commit();  // empty groups keep the wait count uniform
    }
  }
  for (int s = 0; s < NK; ++s) {
    moe_cp_wait<S - 2>();  // this thread's copies of stage s have landed
    __syncthreads();       // everyone's have; and everyone is done with stage s - 1's slot
    if (s + S - 1 < NK) {
      issue(s + S - 1);  // into the slot stage s - 1 used
    } else {
      moe_cp_commit();
    }
    const unsigned char* base = smem + (s % S) * STAGE;
    const ushort* xs = reinterpret_cast<const ushort*>(base + A_BYTES);
    MOE_UNROLL
    for (int blk = 0; blk < AK; ++blk) {
      unsigned b[2][2][4];  // [k16 half][pair half]
      for (int kh = 0; kh < 2; ++kh) {
        for (int ph = 0; ph < 2; ++ph) {
          moe_ldsm_x4(b[kh][ph], reinterpret_cast<const float*>(xs + ph * 16 * XP + b_ld + 32 * blk + 16 * kh));
        }
      }
      MOE_UNROLL
      for (int am = 0; am < NA * MT; ++am) {
        const int a = am / MT, m = am % MT;
        const unsigned char* r0 = base + a * BM * AP + a_off + m * 16 * AP + 18 * blk;
        const unsigned char* r8 = r0 + 8 * AP;
        const float d0 = moe_f16_bits(ushort(moe_ld16(r0)));
        const float d8 = moe_f16_bits(ushort(moe_ld16(r8)));
        const unsigned l0 = moe_ld16(r0 + 2 + 2 * fq), h0 = moe_ld16(r0 + 10 + 2 * fq);
        const unsigned l8 = moe_ld16(r8 + 2 + 2 * fq), h8 = moe_ld16(r8 + 10 + 2 * fq);
        unsigned af[2][4];
        af[0][0] = moe_q4_bf16x2(l0 & 0x0F0Fu);  // (g, 2q..), k 0-15
        af[0][1] = moe_q4_bf16x2(l8 & 0x0F0Fu);  // (g + 8, 2q..)
        af[0][2] = moe_q4_bf16x2(h0 & 0x0F0Fu);  // (g, 2q + 8..)
        af[0][3] = moe_q4_bf16x2(h8 & 0x0F0Fu);
        af[1][0] = moe_q4_bf16x2((l0 >> 4) & 0x0F0Fu);  // the same for k 16-31
        af[1][1] = moe_q4_bf16x2((l8 >> 4) & 0x0F0Fu);
        af[1][2] = moe_q4_bf16x2((h0 >> 4) & 0x0F0Fu);
        af[1][3] = moe_q4_bf16x2((h8 >> 4) & 0x0F0Fu);
        for (int ni = 0; ni < 4; ++ni) {
          float part[4];
          moe_mma_bf16_z(part, af[0], b[0][ni >> 1] + 2 * (ni & 1));
          moe_mma_bf16(part, af[1], b[1][ni >> 1] + 2 * (ni & 1));
          float* c = acc[am] + 4 * ni;
          c[0] += d0 * part[0];
          c[1] += d0 * part[1];
          c[2] += d8 * part[2];
          c[3] += d8 * part[3];
        }
      }
    }
  }
  moe_cp_wait<0>();
  __syncthreads();  // every warp is done with the ring before it becomes the output stage
  float* stage = reinterpret_cast<float*>(smem);
  for (int am = 0; am < NA * MT; ++am) {
    const int a = am / MT, m = am % MT;
    for (int ni = 0; ni < 4; ++ni) {
      const float* c = acc[am] + 4 * ni;
      const int r = (warp * MT + m) * 16 + fg;
      const int p = 8 * ni + 2 * fq;
      float* st = stage + a * BN * LDS;
      st[p * LDS + r] = c[0];
      st[(p + 1) * LDS + r] = c[1];
      st[p * LDS + r + 8] = c[2];
      st[(p + 1) * LDS + r + 8] = c[3];
    }
  }
  __syncthreads();
  moe_mm_write<NA, N, O, BM>(stage, pairs, start, nvalid, row0, out);
}

// ==== kernel: mul_mm_id ====
// As metal/mul_mm_id.metal's mul_mm_id (grid, template, inputs, output).
{
  constexpr int BM = MOE_MM_BM, BN = MOE_MM_BN, BK = MOE_MM_BK;
  constexpr int RL = K * moe_dequant<WT>::NUM / moe_dequant<WT>::DEN;
  const int t = int(threadIdx.x);
  const int lane = t & 31;
  const int warp = t >> 5;
  const moe_mm_tile tile = moe_mm_tile_of(tiles, offsets);
  if (tile.e < 0) {
    return;  // an empty tile: the whole block leaves before any barrier
  }
  const int e = tile.e, start = tile.start, nvalid = tile.nvalid, row0 = tile.row0;

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
  const moe_mm_tile tile = moe_mm_tile_of(tiles, offsets);
  if (tile.e < 0) {
    return;  // an empty tile: the whole block leaves before any barrier
  }
  const int e = tile.e, start = tile.start, nvalid = tile.nvalid, row0 = tile.row0;

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

// ==== kernel: mul_mm_id_pipe ====
// mul_mm_id, pipelined (moe_mm_pipe above): same grid, template, inputs, output.
{
  moe_mm_pipe<1, T, WT, K, N, KS, BCAST>(src, pairs, tiles, offsets, w, w, out);
}

// ==== kernel: mul_mm_id_swiglu_pipe ====
// mul_mm_id_swiglu, pipelined (moe_mm_pipe above): same grid, template, inputs, output.
{
  moe_mm_pipe<2, T, WT, K, N, KS, true>(x, pairs, tiles, offsets, wg, wu, h);
}

// ==== kernel: mul_mm_id_bf16 ====
// mul_mm_id for bfloat16 src and Q4_0 weights on bf16 tensor cores (moe_mm_bf16
// above): same grid, template, inputs, output.
{
  moe_mm_bf16<1, K, N, KS, BCAST>(src, pairs, tiles, offsets, w, w, out);
}

// ==== kernel: mul_mm_id_swiglu_bf16 ====
// mul_mm_id_swiglu for bfloat16 x and Q4_0 weights on bf16 tensor cores
// (moe_mm_bf16 above): same grid, template, inputs, output.
{
  moe_mm_bf16<2, K, N, KS, true>(x, pairs, tiles, offsets, wg, wu, h);
}

// ==== kernel: mul_mm_id_async ====
// mul_mm_id for bfloat16 src and Q4_0 weights, K % 64 == 0, fed by cp.async
// (moe_mm_async above): same template, inputs and output as mul_mm_id, plus CP
// and MT (row tiles of 64 MT rows: grid x = ceil(N / (64 MT)) * 128).
{
  moe_mm_async<1, K, N, KS, BCAST, CP, MT>(src, pairs, tiles, offsets, w, w, out);
}

// ==== kernel: mul_mm_id_swiglu_async ====
// mul_mm_id_swiglu for bfloat16 x and Q4_0 weights, K % 64 == 0 (moe_mm_async
// above): same grid, template and inputs; h in bfloat16.
{
  moe_mm_async<2, K, N, KS, true, CP, 1>(x, pairs, tiles, offsets, wg, wu, h);
}
