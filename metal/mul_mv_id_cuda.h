// CUDA twin helpers of metal/mul_mv_id.metal: the decode MoE layer's gate/up and down
// tiles on the tensor cores (stage bits 32 and 128, both in the default stage 2239).
// mlx_moe/kernels/registry.py appends these helpers after the shared ones on the `cuda`
// flavor; the kernel bodies stay the shared ones.
//
// Why: a gate/up threadgroup's 8 gate and 8 up rows are, on the H100, as long in their
// dot products as in their reads (BENCHMARKS.md 2026-12-06, tenth session: 2.7 us after
// the rows arrive, at ~4.6 instructions a weight in exact float32).  The 16 rows are one
// m16n8k16 A tile: a lane converts 8 of a block's weights to bf16 q - 8 (exact) per row
// pair and the tensor cores do the multiply-adds, ~2.8 instructions a weight.  Measured
// (BENCHMARKS.md 2026-12-06, eleventh session): ncu 20.06 / 19.58 us a layer against 20.54
// for the float32 GEMV, but slower in the chained trace (the dot products 3.1 us after the
// rows against 2.9): a warp's chain of dependent mma, scale and add is no shorter in
// latency.  In the decode step it paid (stage 63, the default from 2026-12-07's sixteenth
// session: 970-973 us of MoE launches a step against 999-1004), and with the down tile too
// (191, seventeenth session).
//
// Numerics: q - 8 (integers in [-8, 7]) and the bfloat16 activations are exact in bf16,
// so every product is exact; each Q4_0 block's sum comes out of the mma in float32 and is
// scaled by the block's d in float32 (as the prefill GEMM's bf16 path, mul_mm_id_cuda.h).
// Only the order of the float32 additions differs from the simd_sum GEMV.

// ==== helpers ====

// The gate/up dot products of one threadgroup (mul_mv_id_moe, stage bit 32) on the tensor
// cores: `stage` holds its 8 gate rows, then its 8 up rows (Q4_0, D columns, RW ushorts
// apart: D / 32 * 9 and the padding, staged by moe_stage_rows); xs the token's D bfloat16
// activations, copied into threadgroup memory with the rows (a block's B fragments are then
// a shared-memory read, not an L2 round trip every unrolled step), or with mul_mv_id_moe's
// stage bit 8192 where they lie in device memory (asked of L1 as the rows staged).
// Warp w takes blocks w * NB .. of every row; its A tile rows are gate row g (a0, a2) and
// up row g (a1, a3); every lane loads the B fragment from x whatever its column n = g, so
// all 8 columns of C hold the same dot products: c0 = gate row g, c2 = up row g.  The
// warps meet in `red` (threadgroup, NSG * 16 floats); threads t < nrows store
// h[t] = silu(gate t) * up t.  Every thread of the threadgroup must call it (a barrier).
template <>
struct moe_gate_up_mma<true> {
  enum { ON = 1 };

  // x (D bfloat16, 16-byte aligned) into xs with cp.async: the copy holds no registers while
  // the threadgroup's rows are loaded beside it.
  template <int D, int NTH, typename QP, typename XP>
  MOE_DEVICE static void copy_x(QP xs, XP x, uint tid) {
    for (int u = int(tid); u < D / 8; u += NTH) {
      moe_cp16(xs + u, reinterpret_cast<const uint4*>(x) + u, true);
    }
    moe_cp_commit();
  }
  MOE_DEVICE static void wait_x() {
    moe_cp_wait<0>();
  }

  // W32 (stage bit 1024): the copy of x made ready for run's word-at-a-time conversion, by
  // the threads that copied it (each rewrites its own units, after its wait_x: the barrier
  // that follows publishes them): within every 4 values, pairs (0, 2) and (1, 3), the order
  // in which run's A fragments hold the weights; and after the D / 8 units, each block's
  // 136 * sum of its 32 values (float32), the offset run takes off.  D / 8 a multiple of 32.
  template <int D, int NTH, bool W32, typename QP>
  MOE_DEVICE static void finish_x(QP xs, uint tid) {
    if (!W32) {
      return;
    }
    float* xsum = reinterpret_cast<float*>(reinterpret_cast<uint4*>(xs) + D / 8);
    for (int u = int(tid); u < D / 8; u += NTH) {  // uniform per warp (D / 8 % 32 == 0)
      const uint4 v = xs[u];
      const unsigned w[4] = {v.x, v.y, v.z, v.w};
      float t = 0.0f;
      for (int i = 0; i < 4; ++i) {
        t += moe_as_float(w[i] << 16) + moe_as_float(w[i] & 0xFFFF0000u);
      }
      xs[u] = make_uint4(__byte_perm(v.x, v.y, 0x5410), __byte_perm(v.x, v.y, 0x7632),
                         __byte_perm(v.z, v.w, 0x5410), __byte_perm(v.z, v.w, 0x7632));
      t += moe_shuffle_xor(t, ushort(1));  // a block's 4 units: 4 consecutive threads
      t += moe_shuffle_xor(t, ushort(2));
      if (u % 4 == 0) {
        xsum[u / 4] = 136.0f * t;
      }
    }
  }

  // Block b's tile product into c (c0: gate row g, c2: up row g), the default way: bytes 2q,
  // 2q + 1 (ushort 1 + q: k 2q, 2q + 1 in the low nibbles, 16 + 2q.. in the high ones) and
  // bytes 2q + 8, 2q + 9 (ushort 5 + q: k 2q + 8.., 24 + 2q..), each pair masked, put under
  // the exponent byte and 136 taken off (moe_q4_bf16x2); x's pairs as they are.
  MOE_DEVICE static void mma_block(float* c, const ushort* bg, const ushort* bu, const unsigned* xw, int b, int q) {
    const unsigned g0 = bg[1 + q], g1 = bg[5 + q], u0 = bu[1 + q], u1 = bu[5 + q];
    const unsigned lo[4] = {moe_q4_bf16x2(g0 & 0x0F0Fu), moe_q4_bf16x2(u0 & 0x0F0Fu),
                            moe_q4_bf16x2(g1 & 0x0F0Fu), moe_q4_bf16x2(u1 & 0x0F0Fu)};
    const unsigned hi[4] = {moe_q4_bf16x2((g0 >> 4) & 0x0F0Fu), moe_q4_bf16x2((u0 >> 4) & 0x0F0Fu),
                            moe_q4_bf16x2((g1 >> 4) & 0x0F0Fu), moe_q4_bf16x2((u1 >> 4) & 0x0F0Fu)};
    const unsigned blo[2] = {xw[b * 16 + q], xw[b * 16 + 4 + q]};      // x[32 b + 2q ..], x[32 b + 2q + 8 ..]
    const unsigned bhi[2] = {xw[b * 16 + 8 + q], xw[b * 16 + 12 + q]}; // x[32 b + 16 + 2q ..], x[.. + 24 + 2q ..]
    moe_mma_bf16_z(c, lo, blo);
    moe_mma_bf16(c, hi, bhi);
  }

  // The same, W32's way (stage bit 1024): a lane's bytes 4q .. 4q + 3 (ushorts 1 + 2q,
  // 2 + 2q) as one word, each bf16 pair one LOP3 of it (moe_q4_pair128: two values 128 + q,
  // nibbles two bytes apart) where the default takes a mask, a byte permute and a packed
  // subtraction of 136: 7 instructions for 8 weights against 14 (NVRTC 13.0: run's loop 81
  // instructions for two blocks against 111, 40 registers either way).  Logical k 2q, 2q + 1
  // are values 4q, 4q + 2 (low nibbles of bytes 0 and 2), k 2q + 8, 2q + 9 values 4q + 1,
  // 4q + 3, the high nibbles the same 16 on; B pairs (0, 2) and (1, 3) of every 4 values,
  // finish_x's order.  The products sum (128 + q) * x: run takes the block's 136 * sum(x)
  // (finish_x) off before its d, leaving (q - 8) * x as the default's.
  MOE_DEVICE static void mma_block_w32(float* c, const ushort* bg, const ushort* bu, const unsigned* xw, int b,
                                       int q) {
    const unsigned gw = unsigned(bg[1 + 2 * q]) | (unsigned(bg[2 + 2 * q]) << 16);
    const unsigned uw = unsigned(bu[1 + 2 * q]) | (unsigned(bu[2 + 2 * q]) << 16);
    const unsigned lo[4] = {moe_q4_pair128(gw), moe_q4_pair128(uw), moe_q4_pair128(gw >> 8), moe_q4_pair128(uw >> 8)};
    const unsigned hi[4] = {moe_q4_pair128(gw >> 4), moe_q4_pair128(uw >> 4), moe_q4_pair128(gw >> 12),
                            moe_q4_pair128(uw >> 12)};
    const uint2 bl = *reinterpret_cast<const uint2*>(xw + b * 16 + 2 * q);      // values 32 b + 4q .. (finish_x's order)
    const uint2 bh = *reinterpret_cast<const uint2*>(xw + b * 16 + 8 + 2 * q);  // values 32 b + 16 + 4q ..
    const unsigned blo[2] = {bl.x, bl.y};
    const unsigned bhi[2] = {bh.x, bh.y};
    moe_mma_bf16_z(c, lo, blo);
    moe_mma_bf16(c, hi, bhi);
  }

  template <int D, int NSG, int RW, bool W32 = false, typename XP, typename SP, typename HP, typename RP>
  MOE_DEVICE static void run(XP xs, SP stage, HP h, RP red, int nrows, uint sg, uint lane, uint tid) {
    constexpr int NB = D / 32 / NSG;  // blocks a warp
    const int g = int(lane >> 2);
    const int q = int(lane & 3u);
    const ushort* rg = reinterpret_cast<const ushort*>(stage) + g * RW;
    const ushort* ru = rg + 8 * RW;
    const unsigned* xw = reinterpret_cast<const unsigned*>(xs);  // bf16 pairs
    const float* xsum = reinterpret_cast<const float*>(reinterpret_cast<const uint4*>(xs) + D / 8);  // W32: finish_x's
    float ag = 0.0f;
    float au = 0.0f;
    // by 2: unrolled in full, nvcc keeps every block's loads in flight -- 48 registers, 5
    // threadgroups an SM, where 40 leave 6
    #pragma unroll 2
    for (int j = 0; j < NB; ++j) {
      const int b = int(sg) * NB + j;
      const ushort* bg = rg + b * 9;
      const ushort* bu = ru + b * 9;
      float c[4];
      if (W32) {
        mma_block_w32(c, bg, bu, xw, b, q);
        const float off = xsum[b];  // the block's 136 * sum(x): (128 + q) * x less it is (q - 8) * x
        ag += moe_f16_bits(bg[0]) * (c[0] - off);
        au += moe_f16_bits(bu[0]) * (c[2] - off);
      } else {
        mma_block(c, bg, bu, xw, b, q);
        ag += moe_f16_bits(bg[0]) * c[0];
        au += moe_f16_bits(bu[0]) * c[2];
      }
    }
    store<NSG>(ag, au, h, red, nrows, sg, g, q, tid);
  }

  // The warps' partial sums (lanes q = 0 hold gate row g's and up row g's) met in red; threads
  // t < nrows store h[t] = silu(gate t) * up t.
  template <int NSG, typename HP, typename RP>
  MOE_DEVICE static void store(float ag, float au, HP h, RP red, int nrows, uint sg, int g, int q, uint tid) {
    if (q == 0) {
      red[int(sg) * 16 + g] = ag;
      red[int(sg) * 16 + 8 + g] = au;
    }
    __syncthreads();
    if (int(tid) < nrows) {
      float sg_ = 0.0f;
      float su = 0.0f;
      for (int w = 0; w < NSG; ++w) {
        sg_ += red[w * 16 + int(tid)];
        su += red[w * 16 + 8 + int(tid)];
      }
      h[int(tid)] = moe_silu(sg_) * su;  // rounded to h's type, as moe_swiglu_store
    }
  }
};

// The down threadgroup's dot products (mul_mv_id_moe, stage bit 128) on the tensor cores:
// its 4 rows of each of the token's KS slots (KS a multiple of 4), staged at
// stage + (s * 4 + r) * RW ushorts (RW: a row's ushorts), against each slot's h row
// (bfloat16, F columns).  Why: after h is ready the down threadgroups' simd_sum GEMV is
// ~4.6 instructions a weight, and all 512 of them run it at once: the tail's 2.4 us
// (BENCHMARKS.md 2026-12-07, sixteenth session) is their issue time.  Four slots make one
// m16n8k16 tile: A row i is slot 4t + i / 4's row i % 4 (lane g: a0/a2 row g, a1/a3 row
// g + 8), B column j slot 4t + j's h (columns 4-7 zero), so row i's dot product is C
// (i, i / 4): c0 or c1 of lanes q = 0 for rows g, c2 or c3 of lanes q = 1 for rows g + 8.
// The NSG warps take the KS / 4 tiles, each a tile's share of the F / 32 blocks.  A block's
// sum comes out of the mma in float32 and is scaled by its d, as moe_gate_up_mma's; the
// warps meet in `red` (threadgroup, NSG * 16 floats).  Padding and identity slots: their
// rows' values (staged memory and h rows nothing wrote) are never selected.  Returns
// moe_down_rows' contract: lane r < nvalid of warp 0 gets  sum_s wts[s] * (row r . h[s])
// plus the identity slots' weights times x[r]; every other thread 0.  Every thread of the
// threadgroup must call it (a barrier).
template <>
struct moe_down_mma<true> {
  enum { ON = 1 };

  // UNR: the block loop's unrolling, 2 or 1 (mul_mv_id_moe's stage bit 512: fewer registers).
  template <int F, int NE, int NI, int KS, int NSG, int RW, int UNR, typename HP, typename IP, typename WP,
            typename XP, typename SP, typename RP>
  MOE_DEVICE static float run(HP h, IP ids, WP wts, XP x, SP stage, RP red, int nvalid, uint sg, uint lane) {
    constexpr int NT = KS / 4;          // tiles
    constexpr int WPT = NSG / NT;       // warps a tile
    constexpr int NB = F / 32 / WPT;    // blocks a warp
    const int g = int(lane >> 2);
    const int q = int(lane & 3u);
    const int t = int(sg) / WPT;
    const int b0 = (int(sg) % WPT) * NB;
    const ushort* r0 = reinterpret_cast<const ushort*>(stage) + ((4 * t + (g >> 2)) * 4 + (g & 3)) * RW;  // row g
    const ushort* r1 = r0 + 8 * RW;                                                                    // row g + 8
    const ushort* rs = q == 1 ? r1 : r0;  // the row whose dot product this lane keeps (q < 2)
    // B column g: slot 4t + g's h, bf16 pairs (columns 4-7 read nothing: zeros)
    const unsigned* hw = reinterpret_cast<const unsigned*>(h + size_t(4 * t + (g & 3)) * F);
    const bool bcol = g < 4;
    const bool right = g >= 4;  // the column this lane keeps: c1 / c3 (else c0 / c2)
    float acc = 0.0f;
    #pragma unroll UNR
    for (int j = 0; j < NB; ++j) {
      const int b = b0 + j;
      const ushort* p0 = r0 + b * 9;
      const ushort* p1 = r1 + b * 9;
      // k permuted within the block (the same for A and B, so the sums are the dot
      // products): lane q's logical k 2q, 2q + 1 are bytes 4q, 4q + 1 (ushort 1 + 2q) and its
      // 2q + 8, 2q + 9 bytes 4q + 2, 4q + 3 (ushort 2 + 2q), so its h words are adjacent: one
      // 8-byte load for each half of the block where the natural order takes two.
      const unsigned w0 = p0[1 + 2 * q], w1 = p0[2 + 2 * q], v0 = p1[1 + 2 * q], v1 = p1[2 + 2 * q];
      const unsigned lo[4] = {moe_q4_bf16x2(w0 & 0x0F0Fu), moe_q4_bf16x2(v0 & 0x0F0Fu),
                              moe_q4_bf16x2(w1 & 0x0F0Fu), moe_q4_bf16x2(v1 & 0x0F0Fu)};
      const unsigned hi[4] = {moe_q4_bf16x2((w0 >> 4) & 0x0F0Fu), moe_q4_bf16x2((v0 >> 4) & 0x0F0Fu),
                              moe_q4_bf16x2((w1 >> 4) & 0x0F0Fu), moe_q4_bf16x2((v1 >> 4) & 0x0F0Fu)};
      const uint2 zero = make_uint2(0u, 0u);
      const uint2 hl = bcol ? *reinterpret_cast<const uint2*>(hw + b * 16 + 2 * q) : zero;      // k 4q ..
      const uint2 hh = bcol ? *reinterpret_cast<const uint2*>(hw + b * 16 + 8 + 2 * q) : zero;  // k 16 + 4q ..
      const unsigned blo[2] = {hl.x, hl.y};
      const unsigned bhi[2] = {hh.x, hh.y};
      float c[4];
      moe_mma_bf16_z(c, lo, blo);
      moe_mma_bf16(c, hi, bhi);
      const float cv = q == 1 ? (right ? c[3] : c[2]) : (right ? c[1] : c[0]);
      acc += moe_f16_bits(rs[b * 9]) * cv;
    }
    if (q < 2) {  // tile row i = g + 8q: slot 4t + i / 4, the threadgroup's row i % 4
      const int i = g + 8 * q;
      const int s = 4 * t + i / 4;
      const int e = ids[s];
      red[int(sg) * 16 + i] = (e >= 0 && e < NE) ? wts[s] * acc : 0.0f;
    }
    __syncthreads();
    float v = 0.0f;
    if (sg == 0 && int(lane) < nvalid) {
      for (int w = 0; w < NSG; ++w) {
        for (int k = 0; k < 4; ++k) {
          v += red[w * 16 + 4 * k + int(lane)];
        }
      }
      if (NI > 0) {
        v += moe_identity_weight<NE, NI, KS>(ids, wts) * float(x[int(lane)]);
      }
    }
    return v;
  }
};
