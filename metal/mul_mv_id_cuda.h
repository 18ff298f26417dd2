// CUDA twin helpers of metal/mul_mv_id.metal: the decode MoE layer's gate/up tile on
// the tensor cores.  mlx_moe/kernels/registry.py appends these helpers after the shared
// ones on the `cuda` flavor; the kernel bodies stay the shared ones.
//
// Why: a gate/up threadgroup's 8 gate and 8 up rows are, on the H100, as long in their
// dot products as in their reads (BENCHMARKS.md 2026-12-06, tenth session: 2.7 us after
// the rows arrive, at ~4.6 instructions a weight in exact float32).  The 16 rows are one
// m16n8k16 A tile: a lane converts 8 of a block's weights to bf16 q - 8 (exact) per row
// pair and the tensor cores do the multiply-adds, ~2.8 instructions a weight.  Measured
// (BENCHMARKS.md 2026-12-06, eleventh session): ncu 20.06 / 19.58 us a layer against 20.54
// for the float32 GEMV, but slower in the chained trace (the dot products 3.1 us after the
// rows against 2.9): a warp's chain of dependent mma, scale and add is no shorter in
// latency.  Not the default (stage bit 32 off); kept for the next attempt.
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
// a shared-memory read, not an L2 round trip every unrolled step).
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

  // Stage bit 256: warp sg's own share of the tile -- blocks sg * NB .. sg * NB + NB - 1 of
  // the 8 gate and 8 up rows, and the activations they multiply -- copied by its own lanes
  // (cp.async) in two groups, the first U0 units of each row's share with the blocks
  // they hold whole (NB0) and their activations, then the rest; run<.., true> waits for each
  // group and computes its blocks as it lands, with no threadgroup barrier before it.
  // Why: with the threadgroup's whole copy waited for, every warp of an SM sat idle until
  // its threadgroup's last byte came, and then all of them ran their dot products at once,
  // ~2 us of issue after the rows had arrived (BENCHMARKS.md 2026-12-06, tenth session,
  // staged -> stored); warp by warp, half a share at a time, the dot products run while
  // other warps' rows are still in flight.  Needs a warp's share of a row to be whole
  // 16-byte units: D a multiple of 2048 at 8 warps (Qwen3-30B-A3B's 2048, Mixtral's 4096).
  // gw, uw: the threadgroup's first gate and up rows (device memory, RG16 units a row);
  // rows past nrows are zero-filled.
  template <int D, int NSG>
  struct own {
    enum {
      RG16 = D / 32 * 18 / 16,  // a row's 16-byte units
      UPW = RG16 / NSG,         // a warp's units of a row
      NB = D / 32 / NSG,        // a warp's blocks
      U0 = UPW / 2,             // group 0's units of a row
      NB0 = U0 * 16 / 18,       // the blocks group 0 holds whole
      XU = D / 8 / NSG,         // a warp's 16-byte units of x (8 bf16 each: 4 a block)
      OK = (RG16 % NSG == 0) && ((D / 8) % NSG == 0) && NB0 > 0,
    };
  };

  template <int D, int NSG, int RPITCH, typename SP, typename QP, typename WP, typename XP>
  MOE_DEVICE static void copy_own(SP stage, QP xs, WP gw, WP uw, XP x, int nrows, uint sg, uint lane) {
    using O = own<D, NSG>;
    uint4* st = reinterpret_cast<uint4*>(stage);
    uint4* xd = reinterpret_cast<uint4*>(xs);
    const uint4* g4 = reinterpret_cast<const uint4*>(gw);
    const uint4* u4 = reinterpret_cast<const uint4*>(uw);
    const uint4* x4 = reinterpret_cast<const uint4*>(x);
    const int c0 = int(sg) * O::UPW;  // the warp's first unit of a row
    const int x0 = int(sg) * O::XU;   // and of x
    for (int grp = 0; grp < 2; ++grp) {
      const int ulo = grp == 0 ? 0 : O::U0;  // this group's units of a row: ulo .. ulo + nu - 1
      const int nu = grp == 0 ? O::U0 : O::UPW - O::U0;
      const int xlo = grp == 0 ? 0 : 4 * O::NB0;  // and of the warp's x
      const int nx = grp == 0 ? 4 * O::NB0 : O::XU - 4 * O::NB0;
      for (int i = int(lane); i < 16 * nu + nx; i += 32) {
        if (i < 16 * nu) {
          const int row = i / nu;  // 0-7 gate, 8-15 up
          const int r = row & 7;
          const int u = c0 + ulo + i % nu;
          const int rs = r < nrows ? r : nrows - 1;  // valid memory; zeros stored past nrows
          moe_cp16(st + row * RPITCH + u, (row < 8 ? g4 : u4) + size_t(rs) * O::RG16 + u, r < nrows);
        } else {
          const int j = x0 + xlo + (i - 16 * nu);
          moe_cp16(xd + j, x4 + j, true);
        }
      }
      moe_cp_commit();
    }
  }

  // Blocks j0 .. j1 - 1 of warp sg's share into ag (gate row g) and au (up row g).
  template <int D, int NSG, int RW, typename XP, typename SP>
  MOE_DEVICE static void blocks(XP xs, SP stage, int j0, int j1, uint sg, uint lane, float& ag, float& au) {
    constexpr int NB = D / 32 / NSG;  // blocks a warp
    const int g = int(lane >> 2);
    const int q = int(lane & 3u);
    const ushort* rg = reinterpret_cast<const ushort*>(stage) + g * RW;
    const ushort* ru = rg + 8 * RW;
    const unsigned* xw = reinterpret_cast<const unsigned*>(xs);  // bf16 pairs
    // by 2: unrolled in full, nvcc keeps every block's loads in flight -- 48 registers, 5
    // threadgroups an SM, where 40 leave 6
    #pragma unroll 2
    for (int j = j0; j < j1; ++j) {
      const int b = int(sg) * NB + j;
      const ushort* bg = rg + b * 9;
      const ushort* bu = ru + b * 9;
      // bytes 2q, 2q + 1 (ushort 1 + q: k 2q, 2q + 1 in the low nibbles, 16 + 2q.. in the
      // high ones) and bytes 2q + 8, 2q + 9 (ushort 5 + q: k 2q + 8.., 24 + 2q..)
      const unsigned g0 = bg[1 + q], g1 = bg[5 + q], u0 = bu[1 + q], u1 = bu[5 + q];
      const unsigned lo[4] = {moe_q4_bf16x2(g0 & 0x0F0Fu), moe_q4_bf16x2(u0 & 0x0F0Fu),
                              moe_q4_bf16x2(g1 & 0x0F0Fu), moe_q4_bf16x2(u1 & 0x0F0Fu)};
      const unsigned hi[4] = {moe_q4_bf16x2((g0 >> 4) & 0x0F0Fu), moe_q4_bf16x2((u0 >> 4) & 0x0F0Fu),
                              moe_q4_bf16x2((g1 >> 4) & 0x0F0Fu), moe_q4_bf16x2((u1 >> 4) & 0x0F0Fu)};
      const unsigned blo[2] = {xw[b * 16 + q], xw[b * 16 + 4 + q]};      // x[32 b + 2q ..], x[32 b + 2q + 8 ..]
      const unsigned bhi[2] = {xw[b * 16 + 8 + q], xw[b * 16 + 12 + q]}; // x[32 b + 16 + 2q ..], x[.. + 24 + 2q ..]
      float c[4];
      moe_mma_bf16_z(c, lo, blo);
      moe_mma_bf16(c, hi, bhi);
      ag += moe_f16_bits(bg[0]) * c[0];
      au += moe_f16_bits(bu[0]) * c[2];
    }
  }

  // The warps' sums met in red, h stored by threads t < nrows (a barrier inside).
  template <int NSG, typename HP, typename RP>
  MOE_DEVICE static void finish(HP h, RP red, int nrows, uint sg, uint lane, uint tid, float ag, float au) {
    const int g = int(lane >> 2);
    if ((lane & 3u) == 0) {
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

  // OWN (after copy_own, stage bit 256): each of copy_own's two groups computed once this
  // warp's copies of it have landed; else the whole share (its copy waited for before).
  template <int D, int NSG, int RW, bool OWN = false, typename XP, typename SP, typename HP, typename RP>
  MOE_DEVICE static void run(XP xs, SP stage, HP h, RP red, int nrows, uint sg, uint lane, uint tid) {
    using O = own<D, NSG>;
    float ag = 0.0f;
    float au = 0.0f;
    if (OWN) {
      moe_cp_wait<1>();
      __syncwarp();
      blocks<D, NSG, RW>(xs, stage, 0, O::NB0, sg, lane, ag, au);
      moe_cp_wait<0>();
      __syncwarp();
      blocks<D, NSG, RW>(xs, stage, O::NB0, O::NB, sg, lane, ag, au);
    } else {
      blocks<D, NSG, RW>(xs, stage, 0, D / 32 / NSG, sg, lane, ag, au);
    }
    finish<NSG>(h, red, nrows, sg, lane, tid, ag, au);
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

  template <int F, int NE, int NI, int KS, int NSG, int RW, typename HP, typename IP, typename WP, typename XP,
            typename SP, typename RP>
  MOE_DEVICE static float run(HP h, IP ids, WP wts, XP x, SP stage, RP red, int nvalid, uint sg, uint lane,
                              bool prefetch = false) {
    constexpr int NT = KS / 4;          // tiles
    constexpr int WPT = NSG / NT;       // warps a tile
    constexpr int NB = F / 32 / WPT;    // blocks a warp
    const int g = int(lane >> 2);
    const int q = int(lane & 3u);
    const int t = int(sg) / WPT;
    const int b0 = (int(sg) % WPT) * NB;
    // Stage bit 1024: the warp's whole share of h (its 4 slots' NB * 64 bytes each) asked
    // of L1 at once, so the loop's loads -- two at a time (unroll 2: more in registers
    // would cost threadgroups an SM) -- wait for one round trip to L2, not NB / 2 of them
    // on the launch's last path.
    if (prefetch) {
      constexpr int LPS = (NB * 64 + 127) / 128 + 1;  // lines a slot's share may touch
      if (int(lane) < 4 * LPS) {
        const int l = int(lane) % LPS;
        const auto base = h + size_t(4 * t + int(lane) / LPS) * F + b0 * 32;
        moe_prefetch_l1(base + (l * 64 < NB * 32 ? l * 64 : NB * 32 - 1));  // 64 bf16 a line
      }
    }
    const ushort* r0 = reinterpret_cast<const ushort*>(stage) + ((4 * t + (g >> 2)) * 4 + (g & 3)) * RW;  // row g
    const ushort* r1 = r0 + 8 * RW;                                                                    // row g + 8
    const ushort* rs = q == 1 ? r1 : r0;  // the row whose dot product this lane keeps (q < 2)
    // B column g: slot 4t + g's h, bf16 pairs (columns 4-7 read nothing: zeros)
    const unsigned* hw = reinterpret_cast<const unsigned*>(h + size_t(4 * t + (g & 3)) * F);
    const bool bcol = g < 4;
    const bool right = g >= 4;  // the column this lane keeps: c1 / c3 (else c0 / c2)
    float acc = 0.0f;
    #pragma unroll 2
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
