// mul_mv_id: expert GEMVs for decode, one dispatch for all (token, slot) pairs.
//
// This file holds Metal source in sections.  Python (mlx_moe/kernels/registry.py)
// passes the `helpers` section as the kernel header (after shims_metal.h on
// Metal, shims_cuda.h on CUDA) and each `kernel` section as the body of one
// kernel through mx.fast.metal_kernel / mx.fast.cuda_kernel; MLX writes the
// signatures.  The same text runs on both backends and under the CPU
// emulation of the Metal kernel environment.
//
// Weights, per expert e and output row n (rows = output features):
//   Q4_0 (WT = uint16_t): row n is K/32 blocks of 9 ushort words
//     (word 0 = fp16 d, words 1..8 = the 16 quant bytes);
//   float (WT = half, bfloat16 or float): row n is K plain values.
// ids [T, KS] int32: ids in [0, NE) are real experts, [NE, NE + NI) identity
// experts (weight * x is added in the combine), anything else padding.  Only
// real ids are ever used to address weights.
//
// Launch geometry (mlx_moe/kernels/dispatch.py owns the numbers):
//   threadgroups of 32 * NSG threads laid out along x; a simdgroup owns NR
//   consecutive output rows and walks the whole K dimension on its own;
//   partial sums per lane, one simd_sum per row at the end.  NQ picks the
//   Q4_0 lane map (moe_rows<ushort>; float weights ignore it).
//   plain / swiglu: grid (ceil(N / (NR * NSG)) * 32 * NSG, 1, T * KS),
//     threadgroup z = token * KS + slot; the expert comes from ids.
//   down_combine: grid (ceil(N / NR) * 32 * NSG, T, 1); the NSG simdgroups of
//     a threadgroup take slots sg, sg + NSG, ... of one token for the same NR
//     rows and meet in threadgroup memory for the weighted sum.

// ==== helpers ====
//@uses router  (moe_router_select: the swiglu kernel's ROUTE option)
//@uses decode_layer  (moe_release_ticket, moe_acquire_wait: mul_mv_id_moe's hand-offs)

// Row-tile dot products, per weight format.  acc[m * NR + r] accumulates this
// lane's part of  W_m[row0 + r] . x  for the NM matrices W_0 (w0), W_1 (w1).
// Rows at or past `nvalid` read row nvalid - 1 instead (valid memory, result
// discarded by the caller), so no lane branches around the loads.
template <typename WT>
struct moe_rows {
  // Length of one weight row, in WT elements, is K * NUM / DEN.
  enum { NUM = 1, DEN = 1 };

  // Float weights: in each step a simdgroup covers 128 columns, a lane the 4
  // consecutive columns lane*4 .. lane*4+3.
  template <int K, int NR, int NM, int NQ, int XM = 0, typename XP, typename WP, typename A>
  MOE_DEVICE static void dot(XP x, WP w0, WP w1, int nvalid, uint lane, A acc) {  // XM: Q4_0 only
    for (int c0 = int(lane) * 4; c0 < K; c0 += 128) {
      float xv[4];
      for (int i = 0; i < 4; ++i) {
        xv[i] = (c0 + i < K) ? float(x[c0 + i]) : 0.0f;
      }
      for (int r = 0; r < NR; ++r) {
        const int rr = (r < nvalid) ? r : nvalid - 1;
        for (int m = 0; m < NM; ++m) {
          auto w = (m == 0 ? w0 : w1) + rr * K + c0;
          float s = 0.0f;
          for (int i = 0; i < 4; ++i) {
            if (c0 + i < K) {
              s += float(w[i]) * xv[i];
            }
          }
          acc[m * NR + r] += s;
        }
      }
    }
  }
};

// The 4 activations quant word kw of block ib multiplies (moe_rows<ushort> below), pre-
// scaled by 1 / {1, 256, 16, 4096}, by how they are read (XM): 0 from x ([K] of the
// activation type), four loads; 1 from a threadgroup's prepared copy ([K / 32 * 8]
// float4, one per word: the same values, made once by moe_prepare_x; one 16-byte read
// where a lane would otherwise spend four loads, four conversions and three multiplies a
// word); 2 from float32 x (8-byte aligned) as two float2 loads: a simdgroup's loads then
// use whole 32-byte sectors, where four scalar loads use two thirds of each; 3 from
// bfloat16 x as two 32-bit loads of a pair each (moe_load_bf2).
template <int XM>
struct moe_xword {
  template <typename XP>
  MOE_DEVICE static float4 get(XP x, int ib, int kw) {
    const auto xb = x + ib * 32 + 2 * kw;
    float4 y;
    y.x = float(xb[0]);
    y.y = float(xb[1]) * (1.0f / 256.0f);
    y.z = float(xb[16]) * (1.0f / 16.0f);
    y.w = float(xb[17]) * (1.0f / 4096.0f);
    return y;
  }
};

template <>
struct moe_xword<1> {
  template <typename XP>
  MOE_DEVICE static float4 get(XP x, int ib, int kw) {
    return x[ib * 8 + kw];
  }
};

// 2 and 3: a pair of values a load, pair i being values 2i and 2i + 1: 2 float32, 3
// bfloat16.
template <int XM>
struct moe_xpair {
  template <typename XP>
  MOE_DEVICE static float2 at(XP x, int i) {
    return moe_load_f2(x + 2 * i);
  }
};

template <>
struct moe_xpair<3> {
  template <typename XP>
  MOE_DEVICE static float2 at(XP x, int i) {
    return moe_load_bf2(x + 2 * i);
  }
};

template <int XM>
struct moe_xword_pairs {
  template <typename XP>
  MOE_DEVICE static float4 get(XP x, int ib, int kw) {
    const float2 a = moe_xpair<XM>::at(x, ib * 16 + kw);      // values ib * 32 + 2 kw, + 1
    const float2 b = moe_xpair<XM>::at(x, ib * 16 + 8 + kw);  // 16 values on
    float4 y;
    y.x = a.x;
    y.y = a.y * (1.0f / 256.0f);
    y.z = b.x * (1.0f / 16.0f);
    y.w = b.y * (1.0f / 4096.0f);
    return y;
  }
};

template <>
struct moe_xword<2> : moe_xword_pairs<2> {};

template <>
struct moe_xword<3> : moe_xword_pairs<3> {};

// A threadgroup's prepared activations for moe_xword<1>: xq[ib * 8 + kw] for the K / 32
// blocks of x, NTH threads (tid) sharing the work.  A barrier must follow before use.
template <int K, int NTH, typename QP, typename XP>
MOE_DEVICE inline void moe_prepare_x(QP xq, XP x, uint tid) {
  for (int i = int(tid); i < K / 32 * 8; i += NTH) {
    xq[i] = moe_xword<0>::get(x, i / 8, i % 8);
  }
}

// Q4_0 with ushort reads.  A block's 16 quant bytes are 8 ushort words; word k
// holds weights 2k, 2k+1 in bits 0-3 and 8-11 and weights 2k+16, 2k+17 in bits
// 4-7 and 12-15.  Lane mapping (NQ = quant words per lane, 1, 2 or 4): 8/NQ
// lanes share a block, lane t takes words kw .. kw+NQ-1 (kw = NQ*(t % (8/NQ)))
// of block t / (8/NQ), and a simdgroup covers 4*NQ consecutive blocks per step.
// Small NQ keeps each load instruction of a simdgroup within a few cache lines
// (NQ = 1: 4 blocks = 72 bytes of a row, 128 activations); NQ also picks a
// step that divides the row (K = 768: 24 blocks = 6 steps of 4, 3 of 8).
//
// No int->float conversion instruction: masking a word without shifting
// leaves q * {1, 256, 16, 4096} in the low bits of 0x4B000000 | bits, which
// read as a float is 2^23 + q * s exactly; subtracting 2^23 + 8 * s gives
// s * (q - 8) (the Q4_0 offset folded in, exact), and the activations are
// pre-scaled by 1/s (powers of two: exact in float32).  The activations of a
// step are loaded once and shared by the NR rows of both matrices, read as XM says
// (moe_xword).
template <>
struct moe_rows<ushort> {
  enum { NUM = 9, DEN = 32 };

  template <int K, int NR, int NM, int NQ, int XM = 0, typename XP, typename WP, typename A>
  MOE_DEVICE static void dot(XP x, WP w0, WP w1, int nvalid, uint lane, A acc) {
    constexpr int NB = K / 32;            // blocks per row
    constexpr int RW = NB * 9;            // words per row
    constexpr int LPB = 8 / NQ;           // lanes per block
    constexpr int BPS = 32 / LPB;         // blocks per step
    constexpr int NSTEP = (NB + BPS - 1) / BPS;
    const int kw = int(lane % uint(LPB)) * NQ;
    const int ibl = int(lane / uint(LPB));
    MOE_UNROLL
    for (int st = 0; st < NSTEP; ++st) {
      const int ib = st * BPS + ibl;
      if (NB % BPS == 0 || ib < NB) {  // only the last step of a ragged row has idle lanes
        // All weight loads of the step first (NR * NM rows: scale + NQ words each),
        // so they are in flight together, then the activations, then the math.
        ushort sw[NR * NM];
        ushort qw[NR * NM * NQ];
        for (int r = 0; r < NR; ++r) {
          const int rr = (r < nvalid) ? r : nvalid - 1;
          for (int m = 0; m < NM; ++m) {
            auto blk = (m == 0 ? w0 : w1) + rr * RW + ib * 9;
            sw[m * NR + r] = blk[0];
            for (int i = 0; i < NQ; ++i) {
              qw[(m * NR + r) * NQ + i] = blk[1 + kw + i];
            }
          }
        }
        float y[4 * NQ];
        for (int i = 0; i < NQ; ++i) {
          const float4 q = moe_xword<XM>::get(x, ib, kw + i);
          y[4 * i] = q.x;
          y[4 * i + 1] = q.y;
          y[4 * i + 2] = q.z;
          y[4 * i + 3] = q.w;
        }
        for (int j = 0; j < NR * NM; ++j) {
          float s = 0.0f;
          for (int i = 0; i < NQ; ++i) {
            // The magic ORed into the word once, each weight then one AND (moe_opaque
            // keeps the compiler from splitting it back into an AND and an OR a weight).
            const uint wq = moe_opaque(0x4B000000u | uint(qw[j * NQ + i]));
            s += y[4 * i] * (moe_as_float(wq & 0x4B00000Fu) - 8388616.0f);
            s += y[4 * i + 1] * (moe_as_float(wq & 0x4B000F00u) - 8390656.0f);
            s += y[4 * i + 2] * (moe_as_float(wq & 0x4B0000F0u) - 8388736.0f);
            s += y[4 * i + 3] * (moe_as_float(wq & 0x4B00F000u) - 8421376.0f);
          }
          acc[j] += moe_f16_bits(sw[j]) * s;
        }
      }
    }
  }
};

// Copies n 16-byte units of a (device memory, 16-byte aligned) to dst[0 .. n), and with
// NS = 2 as many of b to dst[half .. half + n), with NTH threads (tid; 1 <= n <= CAP):
// every load of a thread first, in flight together, then the stores.  Threads past n
// load unit n - 1 again (valid memory) and store nothing: no load is branched around.
// ROWU > 0: rows of ROWU units, each stored with one unit of padding after it (unit i at
// dst[i + i / ROWU]; half counts the padded units).
template <int CAP, int NTH, int NS, int ROWU = 0, typename DP, typename SP>
MOE_DEVICE inline void moe_stage_rows(DP dst, SP a, SP b, int n, int half, uint tid) {
  constexpr int PER = (CAP + NTH - 1) / NTH;
  uint4 v[NS * PER];
  MOE_UNROLL
  for (int j = 0; j < PER; ++j) {
    const size_t k = size_t(int(tid) + j * NTH < n ? int(tid) + j * NTH : n - 1);
    v[j] = moe_load_u4(a, k);
    if (NS == 2) {
      v[PER + j] = moe_load_u4(b, k);
    }
  }
  MOE_UNROLL
  for (int j = 0; j < PER; ++j) {
    const int i = int(tid) + j * NTH;
    const int at = ROWU > 0 ? i + i / (ROWU > 0 ? ROWU : 1) : i;
    if (i < n) {
      dst[at] = v[j];
      if (NS == 2) {
        dst[half + at] = v[PER + j];
      }
    }
  }
}

// moe_swiglu_rows' dot products and store (below), its rows found already: wg, wu point
// at row row0 of the expert's gate and up matrices (device memory, or a threadgroup's
// staged copy); nothing is read when !active (uniform per simdgroup).  XM: how x is read
// (moe_xword; 1: a threadgroup's prepared activations, moe_prepare_x; Q4_0 only).
template <typename WT, int K, int N, int NR, int NQ, int XM, typename XP, typename WP, typename HP>
MOE_DEVICE inline void moe_swiglu_store(XP x, WP wg, WP wu, HP h, bool active, int row0, uint lane) {
  float acc[2 * NR];
  for (int r = 0; r < 2 * NR; ++r) {
    acc[r] = 0.0f;
  }
  if (active) {
    const int nvalid = (N - row0 < NR) ? N - row0 : NR;
    moe_rows<WT>::template dot<K, NR, 2, NQ, XM>(x, wg, wu, nvalid, lane, acc);
  }
  for (int r = 0; r < NR; ++r) {
    const float g = moe_simd_sum(acc[r]);
    const float u = moe_simd_sum(acc[NR + r]);
    if (active && lane == 0 && row0 + r < N) {
      h[row0 + r] = moe_silu(g) * u;  // rounded to h's type (bfloat16: mul_mv_id_moe's stage bit 16)
    }
  }
}

// A gate/up threadgroup's dot products on a matrix unit (mul_mv_id_moe's stage bit 32): ON
// where a flavor has one.  This primary template is the Metal one: none (the simd_sum GEMV
// above runs instead); mul_mv_id_cuda.h specializes <true> for CUDA's tensor cores.
template <bool MMA>
struct moe_gate_up_mma {
  enum { ON = 0 };

  // Start copying the token's D activations into xs (threadgroup), NTH threads (tid); wait_x
  // waits for this thread's copies.  Nothing here (the Metal kernel never calls for it).
  template <int D, int NTH, typename QP, typename XP>
  MOE_DEVICE static void copy_x(QP xs, XP x, uint tid) {}
  MOE_DEVICE static void wait_x() {}
  template <int D, int NTH, bool W32, typename QP>
  MOE_DEVICE static void finish_x(QP xs, uint tid) {}

  template <int D, int NSG, int RW, bool W32 = false, typename XP, typename SP, typename HP, typename RP>
  MOE_DEVICE static void run(XP x, SP stage, HP h, RP red, int nrows, uint sg, uint lane, uint tid) {}
};

// A down threadgroup's dot products on a matrix unit (mul_mv_id_moe's stage bit 128): ON
// where a flavor has one.  The Metal primary template: none (moe_down_rows runs instead);
// mul_mv_id_cuda.h specializes <true> for CUDA's tensor cores (4 slots' rows a tile).
template <bool MMA>
struct moe_down_mma {
  enum { ON = 0 };

  template <int F, int NE, int NI, int KS, int NSG, int RW, int UNR, typename HP, typename IP, typename WP,
            typename XP, typename SP, typename RP>
  MOE_DEVICE static float run(HP h, IP ids, WP wts, XP x, SP stage, RP red, int nvalid, uint sg, uint lane) {
    return 0.0f;
  }
};

// moe_swiglu_store from the token's activations x or, XPREP, from their prepared copy xq
// (moe_prepare_x): one specialization per choice, so the prepared store is instantiated
// only where the kernel prepares (Q4_0 weights).
template <bool XPREP>
struct moe_swiglu_from {
  template <typename WT, int K, int N, int NR, int NQ, typename XP, typename QP, typename WP, typename HP>
  MOE_DEVICE static void run(XP x, QP xq, WP wg, WP wu, HP h, bool active, int row0, uint lane) {
    moe_swiglu_store<WT, K, N, NR, NQ, 0>(x, wg, wu, h, active, row0, lane);
  }
};

template <>
struct moe_swiglu_from<true> {
  template <typename WT, int K, int N, int NR, int NQ, typename XP, typename QP, typename WP, typename HP>
  MOE_DEVICE static void run(XP x, QP xq, WP wg, WP wu, HP h, bool active, int row0, uint lane) {
    moe_swiglu_store<WT, K, N, NR, NQ, 1>(xq, wg, wu, h, active, row0, lane);
  }
};

// One simdgroup's NR rows of h for one (token, slot): h[n] = silu(Wg[e][n] . x) *
// (Wu[e][n] . x) for n in row0 .. row0 + NR - 1 (< N), stored by lane 0; nothing is
// read or written for an expert id outside [0, NE) (identity and padding slots).
// x: the token's activations [K]; h: the pair's row of h [N].
template <typename WT, int K, int N, int NE, int NR, int NQ, typename XP, typename WP, typename HP>
MOE_DEVICE inline void moe_swiglu_rows(XP x, WP wg, WP wu, HP h, int e, int row0, uint lane) {
  constexpr int RL = K * moe_rows<WT>::NUM / moe_rows<WT>::DEN;
  const bool active = row0 < N && e >= 0 && e < NE;  // uniform per simdgroup
  const size_t off = active ? (size_t(e) * N + row0) * RL : 0;
  moe_swiglu_store<WT, K, N, NR, NQ, 0>(x, wg + off, wu + off, h, active, row0, lane);
}

// The weight a token's identity experts (ids NE .. NE + NI - 1 among its KS slots) give x
// in the combine: the sum of their slots' weights.
template <int NE, int NI, int KS, typename IP, typename SP>
MOE_DEVICE inline float moe_identity_weight(IP ids, SP wts) {
  float wid = 0.0f;
  for (int s = 0; s < KS; ++s) {
    const int e = ids[s];
    wid += (e >= NE && e < NE + NI) ? wts[s] : 0.0f;
  }
  return wid;
}

// One threadgroup's NR rows n = row0 .. of one token's combined expert output,
//   sum_s wts[s] * (Wd[ids[s]][n] . h[s])  (real ids)  +  sum_s wts[s] * x[n]  (identity ids):
// its NSG simdgroups take slots sg, sg + NSG, ... and meet in `part` (threadgroup,
// NSG * NR floats).  Every thread must call it (a barrier inside); lane r < nvalid of
// simdgroup 0 gets row row0 + r, the others 0.  h: the token's KS rows [KS, K]; ids,
// wts: its KS slots (device or threadgroup memory); x: its activations [N].  STAGED:
// the weight rows come from `stage` (slot s's NR rows at s * NR * row length, already
// copied there) instead of wd.  XM: how h is read (moe_xword; 0 or 2: float32 h, 3:
// bfloat16).
template <typename WT, int K, int N, int NE, int NI, int KS, int NR, int NSG, int NQ, bool STAGED, int XM,
          typename HP, typename IP, typename SP, typename WP, typename XP, typename PP, typename GP>
MOE_DEVICE inline float moe_down_rows(HP h, IP ids, SP wts, WP wd, XP x, PP part, GP stage, int row0, uint sg,
                                      uint lane) {
  constexpr int RL = K * moe_rows<WT>::NUM / moe_rows<WT>::DEN;
  const int nvalid = (N - row0 < NR) ? N - row0 : NR;
  float acc[NR];
  for (int r = 0; r < NR; ++r) {
    acc[r] = 0.0f;
  }
  for (int s = int(sg); s < KS; s += NSG) {
    const int e = ids[s];
    if (nvalid > 0 && e >= 0 && e < NE) {  // uniform per simdgroup
      float part_s[NR];
      for (int r = 0; r < NR; ++r) {
        part_s[r] = 0.0f;
      }
      if (STAGED) {
        const auto wr = stage + s * NR * RL;
        moe_rows<WT>::template dot<K, NR, 1, NQ, XM>(h + size_t(s) * K, wr, wr, nvalid, lane, part_s);
      } else {
        const auto wr = wd + (size_t(e) * N + row0) * RL;
        moe_rows<WT>::template dot<K, NR, 1, NQ, XM>(h + size_t(s) * K, wr, wr, nvalid, lane, part_s);
      }
      const float ws = wts[s];
      for (int r = 0; r < NR; ++r) {
        acc[r] += ws * moe_simd_sum(part_s[r]);
      }
    }
  }
  if (lane == 0) {
    for (int r = 0; r < NR; ++r) {
      part[sg * NR + r] = acc[r];
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  float v = 0.0f;
  if (sg == 0 && int(lane) < nvalid) {
    for (int g = 0; g < NSG; ++g) {
      v += part[g * NR + int(lane)];
    }
    if (NI > 0) {
      v += moe_identity_weight<NE, NI, KS>(ids, wts) * float(x[row0 + int(lane)]);
    }
  }
  return v;
}

// ==== kernel: mul_mv_id ====
// out[p, n] = W[ids[p]][n] . src[BCAST ? p / KS : p]   for p = token * KS + slot.
// Template: T (src dtype), WT (weight element), K (cols), N (rows),
// NE (real experts), KS (slots per token), NR, NSG, BCAST, NQ (Q4_0 lane map).
// Inputs: src [T or T*KS, K], ids [T, KS], w [E, N, K*NUM/DEN].
// Output: out [T*KS, N] float32; rows of identity/padding slots are zero.
{
  const uint lane = thread_index_in_simdgroup;
  const uint sg = simdgroup_index_in_threadgroup;
  const uint pair = threadgroup_position_in_grid.z;
  const int row0 = int(threadgroup_position_in_grid.x * NSG + sg) * NR;
  const int e = ids[pair];
  constexpr int RL = K * moe_rows<WT>::NUM / moe_rows<WT>::DEN;
  float acc[NR];
  for (int r = 0; r < NR; ++r) {
    acc[r] = 0.0f;
  }
  if (row0 < N && e >= 0 && e < NE) {  // uniform per simdgroup
    const int nvalid = (N - row0 < NR) ? N - row0 : NR;
    auto wr = w + (size_t(e) * N + row0) * RL;
    auto xr = src + size_t(BCAST ? pair / KS : pair) * K;
    moe_rows<WT>::template dot<K, NR, 1, NQ>(xr, wr, wr, nvalid, lane, acc);
  }
  for (int r = 0; r < NR; ++r) {
    const float v = moe_simd_sum(acc[r]);
    if (lane == 0 && row0 + r < N) {
      out[size_t(pair) * N + row0 + r] = v;
    }
  }
}

// ==== kernel: mul_mv_id_swiglu ====
// h[p, n] = silu(Wg[e][n] . x[t]) * (Wu[e][n] . x[t]),  e = ids[p], t = p / KS:
// gate and up in one pass over x, the SwiGLU applied before the store.
// Template: T, WT, K, N, NE, KS, NR, NSG, NQ.
// Inputs: x [T, K], ids [T, KS], wg, wu [E, N, K*NUM/DEN].
// Output: h [T*KS, N] float32; rows of identity/padding slots are left
// unwritten (down_combine never reads them).
// Option ROUTE (kernel mul_mv_id_swiglu_route): the routing too.  Inputs logits
//   [T, NEXP], bias, scale (as moe_router_topk's) in place of ids; outputs ids
//   [T, KS] int32 and weights [T, KS] float32 after h; template NEXP, VPL, SCORE,
//   HAS_BIAS, NGROUP, TOPKG, NORM (moe_router_topk's, its K being KS).  Simdgroup
//   0 of every threadgroup runs the family's top-k rule (metal/router.metal) on
//   its token's router outputs; the token's first threadgroup writes the ids and
//   weights (for the down kernel and the routing hook).  Why not a launch of its
//   own: decode is bound by the host's cost per graph node (one fewer per layer),
//   and the rule over a few hundred outputs is a few hundred instructions.
{
  const uint lane = thread_index_in_simdgroup;
  const uint sg = simdgroup_index_in_threadgroup;
  const uint pair = threadgroup_position_in_grid.z;
  const int row0 = int(threadgroup_position_in_grid.x * NSG + sg) * NR;
//@if ROUTE
  threadgroup int chosen[KS];
  if (sg == 0) {  // uniform per simdgroup: every lane reaches every collective of the rule
    const int tok = int(pair) / KS;
    const auto pick = moe_router_select<NEXP, KS, VPL, SCORE, HAS_BIAS, NGROUP, TOPKG, NORM>(
        logits + size_t(tok) * NEXP, bias, scale[0], lane);
    if (lane == 0) {
      for (int j = 0; j < KS; ++j) {
        chosen[j] = pick.id[j];
      }
      if (threadgroup_position_in_grid.x == 0 && int(pair) % KS == 0) {
        for (int j = 0; j < KS; ++j) {
          ids[size_t(tok) * KS + j] = pick.id[j];
          weights[size_t(tok) * KS + j] = pick.w[j];
        }
      }
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const int e = chosen[int(pair) % KS];
//@endif
//@if !ROUTE
  const int e = ids[pair];
//@endif
  moe_swiglu_rows<WT, K, N, NE, NR, NQ>(x + size_t(pair / KS) * K, wg, wu, h + size_t(pair) * N, e, row0, lane);
}

// ==== kernel: mul_mv_id_down_combine ====
// y[t, n] = sum_s wts[t, s] * (Wd[ids[t, s]][n] . h[t*KS + s])   (real ids)
//         + sum_s wts[t, s] * x[t, n]                            (identity ids)
// Template: T (x and y dtype), WT, K (cols = ffn), N (rows = hidden), NE,
// NI (identity experts), KS, NR, NSG, NQ.
// Inputs: h [T*KS, K] float32, ids [T, KS], wts [T, KS] float32, x [T, N],
// wd [E, N, K*NUM/DEN].  Output: y [T, N] in T.
// Option RESIDUAL (kernel mul_mv_id_down_combine_res): one more input, res [T, N]
// in T, and y = T(res + T(sum)): the decoder layer's residual add after the MoE
// block (mlx-lm's  out = h + mlp(...)), in the same launch.
{
  const uint lane = thread_index_in_simdgroup;
  const uint sg = simdgroup_index_in_threadgroup;
  const uint tok = threadgroup_position_in_grid.y;
  const int row0 = int(threadgroup_position_in_grid.x) * NR;
  threadgroup float part[NSG * NR];
  const float v = moe_down_rows<WT, K, N, NE, NI, KS, NR, NSG, NQ, false, 0>(
      h + size_t(tok) * KS * K, ids + tok * KS, wts + tok * KS, wd, x + size_t(tok) * N, part, wd, row0, sg, lane);
  if (sg == 0 && int(lane) < ((N - row0 < NR) ? N - row0 : NR)) {
    const int n = row0 + int(lane);
//@if RESIDUAL
    y[size_t(tok) * N + n] = static_cast<T>(float(res[size_t(tok) * N + n]) + float(static_cast<T>(v)));
//@endif
//@if !RESIDUAL
    y[size_t(tok) * N + n] = static_cast<T>(v);
//@endif
  }
}

// ==== kernel: mul_mv_id_moe ====
// The decode MoE layer in one launch: mul_mv_id_swiglu_route's threadgroups, then
// mul_mv_id_down_combine_res's after them in the same grid,
//   y[t] = res[t] + sum_s w[t,s] * (Wd[e] . silu(Wg[e] . x[t]) * (Wu[e] . x[t]))  (real e)
//                 + sum_s w[t,s] * x[t]                                      (identity e).
// Why: a layer is one graph node less for the host, and decode is bound by them
// (0.10-0.12 ms a token less on the H100), at the two launches' GPU time (23.3 us against
// 14.8 + 8.8, ncu; BENCHMARKS.md 2026-12-06, third session).  The down threadgroups
// start only as gate/up ones retire, so their reads are not hidden behind gate/up;
// gate/up threadgroups prefetching the down weights into L2 was slower (25.1 us).
// Grid (1-D, threadgroups of 32 * NSG threads): NGU = GX * NT * KS gate/up
// threadgroups (GX = ceil(F / (NRG * NSG)) per (token, slot) pair, pair-major),
// then NDN = DX * NT down threadgroups (DX = ceil(D / NRD) per token).
// Order: every threadgroup runs the routing rule on its token's router outputs
// (router.metal's moe_router_select in simdgroup 0), the token's first threadgroup
// writes ids and weights.  A gate/up threadgroup writes its rows of h, fences, and
// bumps count[0].  A down threadgroup waits until count[0] = NGU (moe_wait_count: GPUs
// start threadgroups in index order, so it never holds a core a gate/up one has yet to
// get; KernelSpec.in_order marks that, and the CPU emulation runs this kernel's
// threadgroups in index order), then reads h.  The last down threadgroup to finish (a
// ticket on count[1]) zeroes the counters for the next launch.  SHARE_ROUTE: only
// gate/up threadgroups run the rule; the token's first, having written ids and weights,
// fences and bumps count[2], and a down threadgroup waits until count[2] = NT and reads
// them (the rule's latency leaves the path of the down threadgroups that start as the
// last gate/up ones retire).
// Template: T (x, res, y), WT, D (hidden), F (ffn), NE, NI, KS, NT (tokens), NRG
// (gate/up rows per simdgroup), NRD (down rows per threadgroup), NSG, NQ, STAGE (bits:
// 1 = a down threadgroup's weight rows staged in threadgroup memory, where 16 KB hold
// them; 2 = a gate/up threadgroup's, where 24 KB do; both need 16-byte rows; 4 = the
// gate/up threadgroups' activations prepared in threadgroup memory, Q4_0 with up to 2048
// of them; 8 = the down threadgroups' h read as float2 pairs, Q4_0; 16 = h in bfloat16,
// T = bfloat16 and Q4_0 only, read as pairs; 32 = the gate/up dot products on a matrix
// unit; 64 = the residual read before the down threadgroups' wait; 128 = the down dot
// products on a matrix unit, 4 rows a threadgroup; 256 = the down threadgroups' rows
// staged only once half the gate/up threadgroups are done; 512 = with 128, the down tile's
// block loop not unrolled; 1024 = with 32, the gate/up tile's nibbles converted a word at a
// time; 2048 = each hand-off fenced by one thread, CUDA only; 4096 = with 256, the rows held
// until a quarter of the gate/up threadgroups are done, not half; 8192 = with 32, the gate/up
// tile's x read through L1, not copied), and the routing
// rule's NEXP, VPL, SCORE, HAS_BIAS, NGROUP, TOPKG, NORM (as ROUTE's), and SHARE_ROUTE.
// Inputs: x [NT, D] (the experts' input), logits [NT, NEXP], bias, scale, wg, wu
// [E, F, D*NUM/DEN], wd [E, D, F*NUM/DEN], res [NT, D], count uint32 [>= 2, 3 with SHARE_ROUTE]
// (written, zero between launches).  Outputs: h [NT*KS, F] float32 (bfloat16 with
// STAGE bit 16; rows of identity/padding slots unwritten), ids [NT, KS] int32, weights [NT, KS] float32,
// y [NT, D] in T.
// Option TRACE (kernel mul_mv_id_moe_trace, tools/trace_moe_layer.py): one more output,
//   trace [threadgroups, 7] uint32, thread 0's clock (moe_clock_ns: the GPU's global
//   nanosecond timer on CUDA, 0 on Metal) as the threadgroup starts, when its router
//   outputs have arrived, after the routing rule, after the barrier that follows it
//   (routed), after its rows are staged, when h is ready (down; gate/up: its simdgroup's
//   rows of h stored, before the fence that releases them) and as it ends.  Where a
//   launch's time goes, threadgroup by threadgroup.
// Option CHAINED: the body run by a kernel that chains it after other work in one
//   launch (metal/decode_chain.metal), which names this threadgroup's index among the
//   layer's moe_tg.
// Option IDS (kernel mul_mv_id_moe_ids): the routing given, ids [NT, KS] int32 and
//   weights [NT, KS] float32 inputs in place of logits, bias and scale (outputs h, y; neither
//   the rule's template nor SHARE_ROUTE): gate + up + down + combine of routing made
//   upstream, once per token, where every threadgroup of this launch would run the rule
//   (1.5-1.8 us at each one's start on the H100: BENCHMARKS.md 2026-12-06, eleventh
//   session).
{
  const uint lane = thread_index_in_simdgroup;
  const uint sg = simdgroup_index_in_threadgroup;
  constexpr int GX = (F + NRG * NSG - 1) / (NRG * NSG);
  constexpr int NGU = GX * NT * KS;
  constexpr int DX = (D + NRD - 1) / NRD;
//@if !CHAINED
  const int tg = int(threadgroup_position_in_grid.x);
//@endif
//@if CHAINED
  const int tg = moe_tg;  // the chaining kernel's index of this threadgroup among the layer's
//@endif
  const bool down = tg >= NGU;  // uniform per threadgroup
  const int tok = down ? (tg - NGU) / DX : tg / (GX * KS);
  const auto cnt = moe_inplace(count);
//@if TRACE
  // Thread 0 stores its clock at each event as it passes it (7 stamps held in registers to
  // the end took the kernel from 39 registers to 47 under nvcc: fewer threadgroups an SM
  // than the launch it traces).  Stamp 0 the start, 1 the router outputs loaded, 2
  // the rule done (both the start where the rule is not run), 3 routed (the barrier after
  // the rule), 4 rows staged (routed where none are), 5 h ready (down) or stored (gate/up,
  // before its fence), 6 the end.
  const auto tr = trace + size_t(tg) * 7;
  if (thread_index_in_threadgroup == 0) {
    tr[0] = moe_clock_ns();
    tr[1] = tr[0];
    tr[2] = tr[0];
  }
//@endif
  // Staging (STAGE): a threadgroup's weight rows copied into threadgroup memory in
  // 16-byte reads, all of a thread's in flight at once, before the dot products.  On the
  // H100 (BENCHMARKS.md 2026-12-06, seventh session) the gate/up copy pays only together
  // with the prepared activations (bits 2 + 4: 0.4-0.5 us a layer less; either alone is
  // 1-2 us more), the down copy alone (bit 1: 0.6 us less).
  constexpr int RLG = D * moe_rows<WT>::NUM / moe_rows<WT>::DEN;  // a gate/up row, in WT elements
  constexpr int RLD = F * moe_rows<WT>::NUM / moe_rows<WT>::DEN;  // a down row
  constexpr int RG16 = RLG * int(sizeof(WT)) / 16;                  // rows in 16-byte units
  constexpr int RD16 = RLD * int(sizeof(WT)) / 16;
  constexpr int RT = NRG * NSG;  // a gate/up threadgroup's rows (of each matrix)
  constexpr bool STAGED_GU = (STAGE & 2) != 0 && (RLG * int(sizeof(WT))) % 16 == 0 && 2 * RT * RG16 * 16 <= 24576;
  constexpr bool STAGED_DN = (STAGE & 1) != 0 && (RLD * int(sizeof(WT))) % 16 == 0 && KS * NRD * RD16 * 16 <= 16384;
  // STAGE bit 32: the gate/up dot products on a matrix unit (moe_gate_up_mma; CUDA's tensor
  // cores, mul_mv_id_cuda.h; none on Metal, where the bit changes nothing): the 8 gate and 8
  // up rows of a threadgroup are one 16-row tile.  Q4_0 with bfloat16 activations only (the
  // host drops the bit elsewhere), the rows staged, each padded by 16 bytes (a warp's
  // fragment reads of 8 rows then fall in different banks).
  constexpr bool MMA_GU = (STAGE & 32) != 0 && moe_gate_up_mma<true>::ON && STAGED_GU && RT == 8 &&
                          moe_rows<WT>::DEN == 32 && (D / 32) % NSG == 0;
  constexpr int RPITCH = MMA_GU ? RG16 + 1 : RG16;  // a staged gate/up row's units
  constexpr int NS_GU = STAGED_GU ? 2 * RT * RPITCH : 1;  // 16-byte units each kind stages
  // STAGE bit 4: a gate/up threadgroup's activations prepared once (moe_prepare_x), while
  // simdgroup 0 runs the routing rule.
  constexpr bool XPREP = (STAGE & 4) != 0 && !MMA_GU && moe_rows<WT>::DEN == 32 && D / 32 * 8 * 16 <= 8192;
  constexpr int NS_DN = STAGED_DN ? KS * NRD * RD16 : 1;
  // STAGE bit 128: the down dot products on a matrix unit (moe_down_mma; CUDA's tensor
  // cores, mul_mv_id_cuda.h; none on Metal): 4 slots' 4 rows a 16-row tile.  Q4_0 with h in
  // bfloat16 (bit 16) only, the rows staged (bit 1), 4 rows a threadgroup, the slots a
  // multiple of 4 and the tiles' blocks shared evenly by the simdgroups.  On the H100 0.5 us a
  // layer less than without (stage 191 against 63; BENCHMARKS.md 2026-12-07, seventeenth session).
  constexpr bool MMA_DN = (STAGE & 128) != 0 && moe_down_mma<true>::ON && STAGED_DN && NRD == 4 &&
                          (STAGE & 16) != 0 && moe_rows<WT>::DEN == 32 && KS % 4 == 0 && NSG % (KS / 4) == 0 &&
                          (F / 32) % (NSG / (KS / 4)) == 0;
  // STAGE bit 1024 (with 32, CUDA only): the gate/up tile's nibbles converted a 32-bit word at
  // a time (moe_gate_up_mma's W32: a LOP3 a bf16 pair where the default takes three
  // instructions), its copy of x reordered and each block's sum after it (finish_x, D / 128
  // units more).  Why: the gate/up threadgroups whose rows land last all convert at once, and
  // from the last rows staged to the last h stored the trace shows 2.5 us of their issue.
  constexpr bool GUW = (STAGE & 1024) != 0 && MMA_GU;
  // STAGE bit 256: a down threadgroup holds its rows' loads until half the gate/up
  // threadgroups are done (count[0] >= NGU / 2; a wait on the counter, no fence: weights are
  // not written).  Bit 512 (with 128, CUDA only): the down tile's block loop not unrolled
  // (moe_down_mma's UNR = 1: NVRTC 13.0 then builds the routed layer with the routing shared
  // in 32 registers, 8 threadgroups an SM, where unrolled by 2 it takes 40: 6).  Why both:
  // at 8 an SM (bit 512 alone, stage 2751) 288 down threadgroups start beside the gate/up
  // ones and stage their rows from the launch's start, taking the gate/up rows' bandwidth
  // (the last gate/up ticket 2.9 us later: BENCHMARKS.md 2026-12-07, twenty-first session);
  // held, they are resident early and load while the gate/up threadgroups compute.
  // Bit 4096 (with 256): held until a quarter of them are done (count[0] >= NGU / 4): the
  // gate/up tickets trail their rows' arrival by their dot products, so half may come after
  // the gate/up rows have all streamed and the bandwidth sits idle.
  constexpr bool HOLD = (STAGE & 256) != 0;
  constexpr int HOLD_AT = (STAGE & 4096) != 0 ? NGU / 4 : NGU / 2;
  constexpr int DN_UNROLL = (STAGE & 512) != 0 ? 1 : 2;
  // STAGE bit 2048 (CUDA only: moe_fence_one): each hand-off between threadgroups fenced by
  // one thread, after the threadgroup's barrier on the releasing side and before it on the
  // acquiring one (CUDA's cooperative-groups grid sync does the same: the barrier orders the
  // other threads' accesses with that thread's, and the fence is cumulative), where every
  // thread fenced.  Why: with 256 threads a threadgroup each fencing (MEMBAR.SC.GPU) on both
  // sides of the gate/up -> down hand-off, 191's down threadgroups were ready up to 3.7 us
  // after the last gate/up ticket (2239: 2.5).  On the H100 0.5-1.1 us a layer less (ncu;
  // the decode step's 48 layers 21-23 us; BENCHMARKS.md 2026-12-07, twenty-first session).
  constexpr bool FENCE1 = (STAGE & 2048) != 0 && moe_fence_one::ON;
  // STAGE bit 8192 (with 32, not with 1024; CUDA only): the gate/up tile's x read from device
  // memory through L1 (asked for there as the rows are staged), not copied into threadgroup
  // memory: 4 KB less a threadgroup.  Why: at 128 threads (2x4x4x1) 20,032 B a threadgroup
  // (the driver's 1 KB included) let 11 of them on an SM where 24,128 let 9, and NVRTC 13.0's
  // 46 registers with the routing shared 10 -- the launch's 1,280 threadgroups all resident
  // from its start, so that held down threadgroups (bit 256) stream their rows as the
  // gate/up rows finish, not after the gate/up threadgroups retire.
  constexpr bool XDEV = (STAGE & 8192) != 0 && MMA_GU && !GUW;
  constexpr int XU = D / 8 + (GUW ? D / 128 : 0);  // MMA_GU's copy of x (and its block sums), units
  constexpr int NSTAGE = NS_GU > NS_DN ? NS_GU : NS_DN;  // one buffer for either kind
  threadgroup uint4 stage[NSTAGE];
  // (MMA_GU: the token's bfloat16 activations, copied with the rows: D / 8 16-byte units)
  threadgroup float4 xq[XPREP ? D / 32 * 8 : (MMA_GU && !XDEV ? XU : 1)];
  threadgroup float gred[MMA_GU || MMA_DN ? NSG * 16 : 1];  // moe_gate_up_mma's and moe_down_mma's meeting place
  // STAGE bit 8: the down threadgroups read h (float32) two values a load (moe_xword<2>).
  // Bit 16: h is bfloat16 (the output's dtype, as mlx-lm's SwitchGLU keeps it; the host
  // sets it only for bfloat16 activations), read two values a 32-bit load (moe_xword<3>):
  // half the bytes the down threadgroups read from L2 (each reads its token's whole h).
  constexpr bool XPAIR = (STAGE & 8) != 0 && moe_rows<WT>::DEN == 32;
  constexpr int HXM = (STAGE & 16) != 0 && moe_rows<WT>::DEN == 32 ? 3 : XPAIR ? 2 : 0;
  threadgroup int chosen[KS];
  threadgroup float chosen_w[KS];
//@if IDS
  constexpr int RULE_SG = 0;  // simdgroups running the rule
  // The routing given: its KS ids and weights read by the first KS threads (any id
  // outside [0, NE + NI) is a padding slot below: no weights read, nothing added).
  if (thread_index_in_threadgroup < uint(KS)) {
    chosen[thread_index_in_threadgroup] = ids[size_t(tok) * KS + int(thread_index_in_threadgroup)];
    chosen_w[thread_index_in_threadgroup] = weights[size_t(tok) * KS + int(thread_index_in_threadgroup)];
  }
//@endif
//@if !IDS
  constexpr int RULE_SG = 1;
  if (sg == 0 && !(SHARE_ROUTE && down)) {  // uniform per simdgroup: every lane reaches every collective of the rule
//@if TRACE
    {  // the router outputs' latency apart from the rule's: a first read of them, waited for
       // (a branch on it) before the clock; the rule's own reads then hit L1
      const float l0 = float(logits[size_t(tok) * NEXP + (int(lane) < NEXP ? int(lane) : 0)]);
      if (moe_simd_sum(l0) == 1.0e30f) {  // (never taken; a stamp it changes keeps the branch)
        tr[0] = 0u;
      }
      if (lane == 0) {
        tr[1] = moe_clock_ns();
      }
    }
//@endif
    const auto pick = moe_router_select<NEXP, KS, VPL, SCORE, HAS_BIAS, NGROUP, TOPKG, NORM>(
        logits + size_t(tok) * NEXP, bias, scale[0], lane);
    if (lane == 0) {
      for (int j = 0; j < KS; ++j) {
        chosen[j] = pick.id[j];
        chosen_w[j] = pick.w[j];
      }
    }
//@if TRACE
    if (lane == 0) {
      tr[2] = moe_clock_ns();
    }
//@endif
  }
//@endif
  // The activations prepared beside the rule (simdgroup 0's) when there are other
  // simdgroups; with the routing given (IDS), by all of them.
  constexpr int XSG = NSG > 1 ? RULE_SG : 0;  // the first simdgroup preparing x
  if (XPREP && !down && int(sg) >= XSG) {
    moe_prepare_x<D, 32 * (NSG - XSG)>(xq, x + size_t(tok) * D, thread_index_in_threadgroup - 32u * uint(XSG));
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
//@if TRACE
  if (thread_index_in_threadgroup == 0) {
    tr[3] = moe_clock_ns();
    tr[4] = tr[3];
  }
//@endif
//@if !IDS
  const bool first = !down && tg % (GX * KS) == 0;  // the token's first threadgroup (uniform)
  if (first && thread_index_in_threadgroup < uint(KS)) {
    ids[size_t(tok) * KS + int(thread_index_in_threadgroup)] = chosen[thread_index_in_threadgroup];
    weights[size_t(tok) * KS + int(thread_index_in_threadgroup)] = chosen_w[thread_index_in_threadgroup];
  }
  if (SHARE_ROUTE && first) {  // the token's routing is out
    moe_release_ticket<FENCE1>(cnt + 2, thread_index_in_threadgroup == 0);
  }
  if (SHARE_ROUTE && down) {  // every token's first threadgroup has written its routing (count[2] = NT)
    moe_acquire_wait<FENCE1>(cnt + 2, uint(NT), sg == 0 && lane == 0);
    if (thread_index_in_threadgroup < uint(KS)) {
      chosen[thread_index_in_threadgroup] = ids[size_t(tok) * KS + int(thread_index_in_threadgroup)];
      chosen_w[thread_index_in_threadgroup] = weights[size_t(tok) * KS + int(thread_index_in_threadgroup)];
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
//@endif
  if (!down) {
    const int pair = tg / GX;
    const int e = chosen[pair % KS];
    const int rt0 = (tg % GX) * RT;  // the threadgroup's first row
    const int row0 = rt0 + int(sg) * NRG;
    const bool real = e >= 0 && e < NE;  // uniform per threadgroup
    const auto xt = x + size_t(tok) * D;
    const auto ht = h + size_t(pair) * F;
    if (STAGED_GU) {
      if (real) {  // gate rows at stage[0 ..), up rows at stage[RT * RPITCH ..) (RPITCH: a row's padded units)
        const size_t off = (size_t(e) * F + rt0) * RLG;
        // MMA_GU: x's copy into xq started first (asynchronous: no registers held across the
        // rows' loads), waited for after them
        // (XDEV: x's lines asked of L1 instead, one a thread)
        if (XDEV) {
          for (int u = int(thread_index_in_threadgroup); u < D * int(sizeof(T)) / 128; u += 32 * NSG) {
            moe_prefetch_l1(xt + u * (128 / int(sizeof(T))));
          }
        } else {
          moe_gate_up_mma<MMA_GU>::template copy_x<D, 32 * NSG>(moe_tg_as<uint4>(xq), xt, thread_index_in_threadgroup);
        }
        moe_stage_rows<RT * RG16, 32 * NSG, 2, MMA_GU ? RG16 : 0>(
            stage, wg + off, wu + off, ((F - rt0 < RT) ? F - rt0 : RT) * RG16, RT * RPITCH, thread_index_in_threadgroup);
        if (!XDEV) {
          moe_gate_up_mma<MMA_GU>::wait_x();
          moe_gate_up_mma<MMA_GU>::template finish_x<D, 32 * NSG, GUW>(moe_tg_as<uint4>(xq), thread_index_in_threadgroup);
        }
      }
      threadgroup_barrier(mem_flags::mem_threadgroup);
//@if TRACE
      if (thread_index_in_threadgroup == 0) {
        tr[4] = moe_clock_ns();
      }
//@endif
      if (MMA_GU) {
        if (real && XDEV) {  // uniform per threadgroup (a barrier inside)
          moe_gate_up_mma<MMA_GU>::template run<D, NSG, RPITCH * 8, GUW>(xt, moe_tg_as<const ushort>(stage), ht + rt0,
                                                                   gred, (F - rt0 < RT) ? F - rt0 : RT, sg, lane,
                                                                   thread_index_in_threadgroup);
        } else if (real) {
          moe_gate_up_mma<MMA_GU>::template run<D, NSG, RPITCH * 8, GUW>(moe_tg_as<const ushort>(xq),
                                                                   moe_tg_as<const ushort>(stage), ht + rt0, gred,
                                                                   (F - rt0 < RT) ? F - rt0 : RT, sg, lane,
                                                                   thread_index_in_threadgroup);
        }
      } else {
        const auto wr = moe_tg_as<const WT>(stage) + int(sg) * NRG * RLG;
        moe_swiglu_from<XPREP>::template run<WT, D, F, NRG, NQ>(xt, xq, wr, wr + RT * RLG, ht, real && row0 < F, row0,
                                                                lane);
      }
    } else {
      const bool active = real && row0 < F;  // uniform per simdgroup
      const size_t off = active ? (size_t(e) * F + row0) * RLG : 0;
      moe_swiglu_from<XPREP>::template run<WT, D, F, NRG, NQ>(xt, xq, wg + off, wu + off, ht, active, row0, lane);
    }
//@if TRACE
    if (thread_index_in_threadgroup == 0) {  // (its simdgroup's rows of h stored; the fence's time apart)
      tr[5] = moe_clock_ns();
    }
//@endif
    moe_release_ticket<FENCE1>(cnt, sg == 0 && lane == 0);  // the threadgroup's rows of h
//@if TRACE
    if (thread_index_in_threadgroup == 0) {
      tr[6] = moe_clock_ns();
    }
//@endif
    return;
  }
  const int row0 = ((tg - NGU) % DX) * NRD;
  const int nvalid = (D - row0 < NRD) ? D - row0 : NRD;
  // Down staging: the slots' weight rows copied before the wait (a down threadgroup starts
  // as gate/up ones retire, a few us before h is complete: its DRAM reads then overlap the
  // gate/up tail instead of following it).
  if (HOLD) {  // (uniform) STAGE bit 256
    if (sg == 0 && lane == 0) {
      moe_wait_count(cnt, uint(HOLD_AT));
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  if (STAGED_DN) {
    for (int s = int(sg); s < KS; s += NSG) {
      const int e = chosen[s];
      if (e >= 0 && e < NE) {
        const auto src = wd + (size_t(e) * D + row0) * RLD;
        moe_stage_rows<NRD * RD16, 32, 1>(stage + s * NRD * RD16, src, src, nvalid * RD16, 0, lane);
      }
    }
  }
//@if TRACE
  if (thread_index_in_threadgroup == 0) {
    tr[4] = moe_clock_ns();
  }
//@endif
  // STAGE bit 64: the residual read before the wait, where it was read after the dot
  // products: no threadgroup writes it, and after the fence its L2 round trip is one more
  // step on the launch's last path (the down tail; nvcc sm_90a: 38 registers at 127 as at
  // 63).  Off until the H100 measures it (engine +resfirst).
  constexpr bool RES_FIRST = (STAGE & 64) != 0;
  const size_t yn = size_t(tok) * D + row0 + int(lane);
  const bool writes_y = sg == 0 && int(lane) < nvalid;
  const float rv = RES_FIRST && writes_y ? float(res[yn]) : 0.0f;
  moe_acquire_wait<FENCE1>(cnt, uint(NGU), sg == 0 && lane == 0);  // every gate/up threadgroup's rows of h
//@if TRACE
  if (thread_index_in_threadgroup == 0) {
    tr[5] = moe_clock_ns();
  }
//@endif
  threadgroup float part[NSG * NRD];
  const float v =
      MMA_DN ? moe_down_mma<MMA_DN>::template run<F, NE, NI, KS, NSG, RLD, DN_UNROLL>(
                   h + size_t(tok) * KS * F, chosen, chosen_w, x + size_t(tok) * D + row0,
                   moe_tg_as<const ushort>(stage), gred, nvalid, sg, lane)
             : moe_down_rows<WT, F, D, NE, NI, KS, NRD, NSG, NQ, STAGED_DN, HXM>(
                   h + size_t(tok) * KS * F, chosen, chosen_w, wd, x + size_t(tok) * D, part,
                   moe_tg_as<const WT>(stage), row0, sg, lane);
  if (writes_y) {
    y[yn] = static_cast<T>((RES_FIRST ? rv : float(res[yn])) + float(static_cast<T>(v)));
  }
//@if TRACE
  if (thread_index_in_threadgroup == 0) {
    tr[6] = moe_clock_ns();
  }
//@endif
  if (sg == 0 && lane == 0 && moe_ticket(cnt + 1) == uint(DX * NT - 1)) {
    moe_ticket_reset(cnt);
    moe_ticket_reset(cnt + 1);
//@if !IDS
    if (SHARE_ROUTE) {
      moe_ticket_reset(cnt + 2);
    }
//@endif
  }
}
