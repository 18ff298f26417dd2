// mul_mm_id: routed expert GEMMs for prefill, one dispatch per projection for
// all (token, slot) pairs of a batch.
//
// Sections (see mlx_moe/kernels/registry.py): `helpers` is shared by Metal,
// CUDA and the CPU emulation (SIMT code only); each `kernel` section is one
// body.  map0 and combine are SIMT and shared with CUDA through the shims;
// mul_mm_id and mul_mm_id_swiglu use simdgroup_matrix here, and
// metal/mul_mm_id_cuda.cuh holds their CUDA twins (tensor-core mma, same
// tiles, same names, same steps), which replace these two bodies on CUDA.
//
// The pipeline for one MoE layer (mlx_moe/backends/kernels.py):
//   1. mul_mm_id_map0: ids [T, KS] -> per real expert the count and the list
//      of pairs p = token * KS + slot routed to it (a counting sort, no
//      atomics), and a table of tiles: (expert, first list position) for
//      every BN-pair slice of every expert's list.  Identity (zero-
//      computation) ids [NE, NE + NI) and padding ids are in no list.
//   2. mul_mm_id_swiglu: per tile, a BM-row slice of gate and up for the
//      tile's pairs, SwiGLU fused, scattered to h [P, F] float32 rows p.
//   3. mul_mm_id (BCAST = false): per tile, down for the same pairs from h,
//      scattered to d [P, D] float32 rows p.
//   4. mul_mm_id_combine: y[t] = sum_s w[t, s] * d[t * KS + s] over real
//      slots + sum_s w[t, s] * x[t] over identity slots, in x's dtype.
//
// Weights, per expert e and output row n (rows = output features), as in
// mul_mv_id.metal: Q4_0 (WT = uint16_t) rows of K/32 blocks of 9 ushort words
// (word 0 = fp16 d, words 1..8 = the 16 quant bytes); float rows of K values.
//
// Overflow: every tile is float32 and every accumulator is float32.
// Activations are never rounded to half: |x| > 65504 (float32 or bfloat16
// activations, or the float32 intermediate h) stays finite and exact.
// Q4_0 weights dequantize exactly into float (d * (q - 8): an fp16 times a
// 4-bit integer).

// ==== helpers ====

// Tile geometry shared by the Metal and CUDA GEMMs and by map0's tile table.
#define MOE_MM_BM 64   // weight rows per tile
#define MOE_MM_BN 32   // routed pairs per tile
#define MOE_MM_BK 32   // K step (one Q4_0 block)
#define MOE_MM_THREADS 128

// 16 consecutive weights of row `row` (a pointer to the row), columns
// c0 .. c0 + 15 with c0 = k0 + 16 * half16, as float.  Columns at or past K
// read as 0 (float rows whose K is not a multiple of the tile).
template <typename WT>
struct moe_dequant {
  // Length of one weight row, in WT elements, is K * NUM / DEN.
  enum { NUM = 1, DEN = 1 };

  template <int K, typename WP, typename VP>
  MOE_DEVICE static void load16(WP row, int k0, int half16, VP v) {
    const int c0 = k0 + 16 * half16;
    for (int i = 0; i < 16; ++i) {
      v[i] = (c0 + i < K) ? float(row[c0 + i]) : 0.0f;
    }
  }
};

// Q4_0: K is a multiple of 32, so the K step is exactly block k0 / 32.
// half16 = 0 takes the low nibbles of the 16 quant bytes (weights 0..15),
// half16 = 1 the high nibbles (weights 16..31).  Word q (q = 0..7) holds
// bytes 2q (bits 0-7) and 2q+1 (bits 8-15).
template <>
struct moe_dequant<ushort> {
  enum { NUM = 9, DEN = 32 };

  template <int K, typename WP, typename VP>
  MOE_DEVICE static void load16(WP row, int k0, int half16, VP v) {
    auto blk = row + (k0 / 32) * 9;
    const float d = moe_f16_bits(blk[0]);
    const int sh = 4 * half16;
    for (int q = 0; q < 8; ++q) {
      const uint wq = uint(blk[1 + q]);
      v[2 * q] = d * float(int((wq >> sh) & 0xFu) - 8);
      v[2 * q + 1] = d * float(int((wq >> (8 + sh)) & 0xFu) - 8);
    }
  }
};

// ==== kernel: mul_mm_id_map0 ====
// Counting sort of the routed pairs by expert, without atomics.
// Template: NE (real experts), NSG (simdgroups), EPS (experts per simdgroup,
// >= ceil(NE / NSG)).  The pair count P = T * KS comes from ids' shape (not a
// template: a new prompt length must not compile a new kernel), and the tile
// table length G = (P + min(NE, P) * (BN - 1)) / BN (>= 1) is the worst case
// of sum_e ceil(count_e / BN); mlx_moe/kernels/mul_mm_id.py sizes it alike.
// One threadgroup of 32 * NSG threads; simdgroup sg owns experts sg, sg + NSG, ...
// Inputs: ids [T, KS] int32.
// Outputs: counts [NE], offsets [NE + 1] (each expert's first position in
// pairs; offsets[NE] = real pairs), pairs [P] (pair ids grouped by expert,
// token order within an expert, -1 past offsets[NE]), tiles [G, 2]
// ((expert, first position) per tile of MOE_MM_BN pairs; (-1, 0) past the
// last tile).
{
  const uint lane = thread_index_in_simdgroup;
  const uint sg = simdgroup_index_in_threadgroup;
  const uint tid = thread_index_in_threadgroup;
  const int P = int(ids_shape[0]) * int(ids_shape[1]);
  const int nz = (NE < P) ? NE : P;  // at most this many experts have pairs
  const int G = (P + nz * (MOE_MM_BN - 1)) / MOE_MM_BN > 1 ? (P + nz * (MOE_MM_BN - 1)) / MOE_MM_BN : 1;
  threadgroup int tg_off[NE + 1];   // counts, then each expert's first position
  threadgroup int tg_tile[NE + 1];  // each expert's first tile

  // 1. Counts: every lane counts its strided share of the ids for each of
  //    the simdgroup's experts; one integer simd_sum per expert at the end.
  int cnt[EPS];
  for (int j = 0; j < EPS; ++j) {
    cnt[j] = 0;
  }
  for (int p = int(lane); p < P; p += 32) {
    const int id = ids[p];
    for (int j = 0; j < EPS; ++j) {
      cnt[j] += (id == int(sg) + j * NSG) ? 1 : 0;
    }
  }
  for (int j = 0; j < EPS; ++j) {
    const int e = int(sg) + j * NSG;
    const int c = moe_simd_sum_int(cnt[j]);
    if (lane == 0 && e < NE) {
      tg_off[e] = c;
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  // 2. Exclusive prefix sums over experts of the counts and of the tiles per
  //    expert, 32 experts per step, by simdgroup 0.
  if (sg == 0) {
    int run = 0;
    int run_tiles = 0;
    for (int base = 0; base < NE; base += 32) {
      const int e = base + int(lane);
      const int c = (e < NE) ? tg_off[e] : 0;
      const int nt = (c + MOE_MM_BN - 1) / MOE_MM_BN;
      const int before = moe_simd_prefix_exclusive_sum(c);
      const int tiles_before = moe_simd_prefix_exclusive_sum(nt);
      if (e < NE) {
        counts[e] = c;
        offsets[e] = run + before;
        tg_off[e] = run + before;
        tg_tile[e] = run_tiles + tiles_before;
      }
      run += moe_simd_sum_int(c);
      run_tiles += moe_simd_sum_int(nt);
    }
    if (lane == 0) {
      offsets[NE] = run;
      tg_off[NE] = run;
      tg_tile[NE] = run_tiles;
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  // 3. Lists: 32 ids per step; for each of the simdgroup's experts a ballot
  //    of the lanes holding it, each match written at its rank among them,
  //    so every list comes out in pair (= token) order.
  int pos[EPS];
  for (int j = 0; j < EPS; ++j) {
    const int e = int(sg) + j * NSG;
    pos[j] = (e < NE) ? tg_off[e] : 0;
  }
  const uint below = (1u << lane) - 1u;  // lanes before this one
  for (int base = 0; base < P; base += 32) {
    const int p = base + int(lane);
    const int id = (p < P) ? ids[p] : -1;
    for (int j = 0; j < EPS; ++j) {
      const bool mine = id == int(sg) + j * NSG && id < NE;
      const uint mask = moe_ballot(mine);
      if (mine) {
        pairs[pos[j] + moe_popcount(mask & below)] = p;
      }
      pos[j] += moe_popcount(mask);
    }
  }
  // Tile table: expert e's tiles are tg_tile[e] .. tg_tile[e + 1] - 1, the
  // i-th starting at list position offsets[e] + i * MOE_MM_BN.
  for (int j = 0; j < EPS; ++j) {
    const int e = int(sg) + j * NSG;
    if (e < NE) {
      const int t0 = tg_tile[e];
      const int nt = tg_tile[e + 1] - t0;
      for (int i = int(lane); i < nt; i += 32) {
        tiles[2 * (t0 + i)] = e;
        tiles[2 * (t0 + i) + 1] = tg_off[e] + i * MOE_MM_BN;
      }
    }
  }
  for (int g = tg_tile[NE] + int(tid); g < G; g += 32 * NSG) {
    tiles[2 * g] = -1;
    tiles[2 * g + 1] = 0;
  }
  for (int q = tg_off[NE] + int(tid); q < P; q += 32 * NSG) {
    pairs[q] = -1;
  }
}

// ==== kernel: mul_mm_id_map0_count ====
// map0 over the whole GPU, first of two kernels (mul_mm_id_map0_lists is the
// second): the one-threadgroup map0 above compares every id with every
// expert on one core (a 512-token Qwen3-30B-A3B prompt: 4,096 pairs x 128
// experts, ~56 us on the H100); here threadgroup b owns experts b * EPB ..
// b * EPB + EPB - 1 and its NW simdgroups split the pairs into NW
// consecutive segments of SEG = 32 * ceil(P / (32 * NW)) pairs, so the work
// spreads over NE / EPB cores and still needs no atomics.
// Template: NE, EPB, NW (simdgroups a threadgroup).  Grid: ceil(NE / EPB)
// threadgroups of 32 * NW threads.
// Inputs: ids [T, KS] int32.  Output: seg [NE, NW] (pairs of segment w routed
// to expert e, at e * NW + w).
{
  const uint lane = thread_index_in_simdgroup;
  const int w = int(simdgroup_index_in_threadgroup);
  const int e0 = int(threadgroup_position_in_grid.x) * EPB;
  const int P = int(ids_shape[0]) * int(ids_shape[1]);
  const int SEG = 32 * ((P + 32 * NW - 1) / (32 * NW));
  const int p1 = (w + 1) * SEG < P ? (w + 1) * SEG : P;
  int cnt[EPB];
  for (int j = 0; j < EPB; ++j) {
    cnt[j] = 0;
  }
  for (int p = w * SEG + int(lane); p < p1; p += 32) {
    const int id = ids[p];
    for (int j = 0; j < EPB; ++j) {
      cnt[j] += (id == e0 + j) ? 1 : 0;
    }
  }
  for (int j = 0; j < EPB; ++j) {
    const int c = moe_simd_sum_int(cnt[j]);
    if (lane == 0 && e0 + j < NE) {
      seg[(e0 + j) * NW + w] = c;
    }
  }
}

// ==== kernel: mul_mm_id_map0_lists ====
// map0 over the whole GPU, second kernel: every threadgroup sums seg into the
// experts' counts and takes their exclusive prefix sums (pairs and tiles; NE
// values, cheap to repeat per threadgroup), then writes its own experts'
// counts, offsets, tiles and lists: simdgroup w writes the matches of its
// segment from offsets[e] + (matches in segments before w), each at its rank
// among the segment's matches (a ballot per 32 ids), so every list comes out
// in pair (= token) order as from the one-threadgroup map0.  The unused tail
// of pairs and tiles (-1) is filled by all threadgroups together.
// Template, grid and geometry as mul_mm_id_map0_count.
// Inputs: ids [T, KS] int32, seg [NE, NW] from mul_mm_id_map0_count.
// Outputs: counts, offsets, pairs, tiles as mul_mm_id_map0.
{
  const uint lane = thread_index_in_simdgroup;
  const int w = int(simdgroup_index_in_threadgroup);
  const int tid = int(thread_index_in_threadgroup);
  const int b = int(threadgroup_position_in_grid.x);
  const int e0 = b * EPB;
  const int TPG = 32 * NW;  // threads a threadgroup
  const int P = int(ids_shape[0]) * int(ids_shape[1]);
  const int SEG = 32 * ((P + 32 * NW - 1) / (32 * NW));
  const int nz = (NE < P) ? NE : P;
  const int G = (P + nz * (MOE_MM_BN - 1)) / MOE_MM_BN > 1 ? (P + nz * (MOE_MM_BN - 1)) / MOE_MM_BN : 1;
  threadgroup int tg_off[NE + 1];   // counts, then each expert's first position
  threadgroup int tg_tile[NE + 1];  // each expert's first tile

  for (int e = tid; e < NE; e += TPG) {
    int c = 0;
    for (int v = 0; v < NW; ++v) {
      c += seg[e * NW + v];
    }
    tg_off[e] = c;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (w == 0) {
    int run = 0;
    int run_tiles = 0;
    for (int base = 0; base < NE; base += 32) {
      const int e = base + int(lane);
      const int c = (e < NE) ? tg_off[e] : 0;
      const int nt = (c + MOE_MM_BN - 1) / MOE_MM_BN;
      const int before = moe_simd_prefix_exclusive_sum(c);
      const int tiles_before = moe_simd_prefix_exclusive_sum(nt);
      if (e >= e0 && e < e0 + EPB && e < NE) {
        counts[e] = c;
        offsets[e] = run + before;
      }
      if (e < NE) {
        tg_off[e] = run + before;
        tg_tile[e] = run_tiles + tiles_before;
      }
      run += moe_simd_sum_int(c);
      run_tiles += moe_simd_sum_int(nt);
    }
    if (lane == 0) {
      if (b == 0) {
        offsets[NE] = run;
      }
      tg_off[NE] = run;
      tg_tile[NE] = run_tiles;
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  const uint below = (1u << lane) - 1u;  // lanes before this one
  for (int j = 0; j < EPB; ++j) {
    const int e = e0 + j;
    if (e >= NE) {
      break;  // uniform across the threadgroup
    }
    int pos = tg_off[e];
    for (int v = 0; v < w; ++v) {
      pos += seg[e * NW + v];
    }
    const int p1 = (w + 1) * SEG < P ? (w + 1) * SEG : P;
    for (int base = w * SEG; base < p1; base += 32) {
      const int p = base + int(lane);
      const bool mine = p < p1 && ids[p] == e;
      const uint mask = moe_ballot(mine);
      if (mine) {
        pairs[pos + moe_popcount(mask & below)] = p;
      }
      pos += moe_popcount(mask);
    }
    const int t0 = tg_tile[e];
    const int nt = tg_tile[e + 1] - t0;
    for (int i = tid; i < nt; i += TPG) {
      tiles[2 * (t0 + i)] = e;
      tiles[2 * (t0 + i) + 1] = tg_off[e] + i * MOE_MM_BN;
    }
  }
  const int gi = b * TPG + tid;
  const int stride = int(threadgroups_per_grid.x) * TPG;
  for (int g = tg_tile[NE] + gi; g < G; g += stride) {
    tiles[2 * g] = -1;
    tiles[2 * g + 1] = 0;
  }
  for (int q = tg_off[NE] + gi; q < P; q += stride) {
    pairs[q] = -1;
  }
}

// ==== kernel: mul_mm_id ====
// out[p, n] = W[e][n] . src[BCAST ? p / KS : p] for every pair p of every tile
// (e = the tile's expert): a BM x BN tile of (weight rows) x (routed pairs)
// per threadgroup, K in steps of BK through threadgroup memory, 4 simdgroups
// of 32 rows x 16 pairs each (4 x 2 simdgroup_float8x8 accumulators).
// Grid: (ceil(N / BM) * 128, G, 1), threadgroup (128, 1, 1): threadgroup
// (x, y) = (row tile, tile of the map); tiles past the last exit at once.
// Template: T (src dtype), WT (weight element), K (cols), N (rows), KS, BCAST.
// Inputs: src [T or P, K], pairs [P], tiles [G, 2], offsets [NE + 1],
// w [E, N, K * NUM / DEN].  Output: out [P, N] float32; rows of pairs that are
// in no list (identity, padding) are not written.
{
  constexpr int BM = MOE_MM_BM, BN = MOE_MM_BN, BK = MOE_MM_BK;
  constexpr int RL = K * moe_dequant<WT>::NUM / moe_dequant<WT>::DEN;
  const uint t = thread_index_in_threadgroup;
  const uint sg = simdgroup_index_in_threadgroup;
  const int g = int(threadgroup_position_in_grid.y);
  const int e = tiles[2 * g];
  if (e < 0) {
    return;  // an empty tile: the whole threadgroup leaves before any barrier
  }
  const int start = tiles[2 * g + 1];
  const int nvalid = min(BN, offsets[e + 1] - start);
  const int row0 = int(threadgroup_position_in_grid.x) * BM;

  threadgroup float sa[BM * BK];  // A: weights, [BM][BK]; later the output stage [BN][BM]
  threadgroup float sb[BK * BN];  // B: activations, k-major [BK][BN]

  // The weight row and the source row this thread loads, fixed for all K steps.
  const int arow = int(t) / 2;
  const int ahalf = int(t) % 2;
  const int wrow = min(row0 + arow, N - 1);
  auto wr = w + (size_t(e) * N + wrow) * RL;
  const int bj = int(t) / 4;        // tile column (pair) this thread loads
  const int bk = (int(t) % 4) * 8;  // its 8 columns of the K step
  const int bp = (bj < nvalid) ? pairs[start + bj] : -1;
  auto xr = src + size_t(bp < 0 ? 0 : (BCAST ? bp / KS : bp)) * K;

  const int sr = (int(sg) % 2) * 32;  // this simdgroup's rows in the tile
  const int sc = (int(sg) / 2) * 16;  // and its pairs
  simdgroup_float8x8 acc[8];
  for (int i = 0; i < 8; ++i) {
    acc[i] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  }
  for (int k0 = 0; k0 < K; k0 += BK) {
    float v[16];
    moe_dequant<WT>::template load16<K>(wr, k0, ahalf, v);
    for (int i = 0; i < 16; ++i) {
      sa[arow * BK + ahalf * 16 + i] = v[i];
    }
    for (int i = 0; i < 8; ++i) {
      const int c = k0 + bk + i;
      sb[(bk + i) * BN + bj] = (bp >= 0 && c < K) ? float(xr[c]) : 0.0f;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (int kk = 0; kk < BK; kk += 8) {
      simdgroup_float8x8 ma[4];
      simdgroup_float8x8 mb[2];
      for (int i = 0; i < 4; ++i) {
        simdgroup_load(ma[i], sa + (sr + 8 * i) * BK + kk, BK);
      }
      for (int j = 0; j < 2; ++j) {
        simdgroup_load(mb[j], sb + kk * BN + sc + 8 * j, BN);
      }
      for (int i = 0; i < 4; ++i) {
        for (int j = 0; j < 2; ++j) {
          simdgroup_multiply_accumulate(acc[i * 2 + j], ma[i], mb[j], acc[i * 2 + j]);
        }
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }

  // Epilogue: the tile goes to threadgroup memory transposed ([BN][BM], each
  // pair's BM results contiguous), then each thread writes 16 results of one
  // pair to that pair's output row.
  threadgroup float* stage = sa;
  for (int i = 0; i < 4; ++i) {
    for (int j = 0; j < 2; ++j) {
      simdgroup_store(acc[i * 2 + j], stage + (sc + 8 * j) * BM + sr + 8 * i, BM, ulong2(0, 0), true);
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const int oj = int(t) / 4;
  const int or0 = (int(t) % 4) * 16;
  if (oj < nvalid) {
    const int p = pairs[start + oj];
    for (int i = 0; i < 16; ++i) {
      const int n = row0 + or0 + i;
      if (n < N) {
        out[size_t(p) * N + n] = stage[oj * BM + or0 + i];
      }
    }
  }
}

// ==== kernel: mul_mm_id_swiglu ====
// h[p, n] = silu(Wg[e][n] . x[p / KS]) * (Wu[e][n] . x[p / KS]) for every pair
// of every tile: mul_mm_id with two A tiles (gate and up) sharing the B tile,
// SwiGLU applied in the epilogue.
// Grid, template (no BCAST: x is always per token) and inputs as mul_mm_id,
// with wg, wu in place of w.  Output: h [P, N] float32 (rows of identity and
// padding pairs are not written; nothing reads them).
{
  constexpr int BM = MOE_MM_BM, BN = MOE_MM_BN, BK = MOE_MM_BK;
  constexpr int RL = K * moe_dequant<WT>::NUM / moe_dequant<WT>::DEN;
  const uint t = thread_index_in_threadgroup;
  const uint sg = simdgroup_index_in_threadgroup;
  const int g = int(threadgroup_position_in_grid.y);
  const int e = tiles[2 * g];
  if (e < 0) {
    return;  // an empty tile: the whole threadgroup leaves before any barrier
  }
  const int start = tiles[2 * g + 1];
  const int nvalid = min(BN, offsets[e + 1] - start);
  const int row0 = int(threadgroup_position_in_grid.x) * BM;

  threadgroup float sag[BM * BK];  // gate weights; later the gate stage [BN][BM]
  threadgroup float sau[BM * BK];  // up weights; later the up stage
  threadgroup float sb[BK * BN];   // activations, k-major [BK][BN]

  const int arow = int(t) / 2;
  const int ahalf = int(t) % 2;
  const size_t woff = (size_t(e) * N + min(row0 + arow, N - 1)) * RL;
  auto wgr = wg + woff;
  auto wur = wu + woff;
  const int bj = int(t) / 4;
  const int bk = (int(t) % 4) * 8;
  const int bp = (bj < nvalid) ? pairs[start + bj] : -1;
  auto xr = x + size_t(bp < 0 ? 0 : bp / KS) * K;

  const int sr = (int(sg) % 2) * 32;
  const int sc = (int(sg) / 2) * 16;
  simdgroup_float8x8 accg[8];
  simdgroup_float8x8 accu[8];
  for (int i = 0; i < 8; ++i) {
    accg[i] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    accu[i] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  }
  for (int k0 = 0; k0 < K; k0 += BK) {
    float v[16];
    moe_dequant<WT>::template load16<K>(wgr, k0, ahalf, v);
    for (int i = 0; i < 16; ++i) {
      sag[arow * BK + ahalf * 16 + i] = v[i];
    }
    moe_dequant<WT>::template load16<K>(wur, k0, ahalf, v);
    for (int i = 0; i < 16; ++i) {
      sau[arow * BK + ahalf * 16 + i] = v[i];
    }
    for (int i = 0; i < 8; ++i) {
      const int c = k0 + bk + i;
      sb[(bk + i) * BN + bj] = (bp >= 0 && c < K) ? float(xr[c]) : 0.0f;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (int kk = 0; kk < BK; kk += 8) {
      simdgroup_float8x8 mb[2];
      for (int j = 0; j < 2; ++j) {
        simdgroup_load(mb[j], sb + kk * BN + sc + 8 * j, BN);
      }
      for (int i = 0; i < 4; ++i) {
        simdgroup_float8x8 ma;
        simdgroup_load(ma, sag + (sr + 8 * i) * BK + kk, BK);
        for (int j = 0; j < 2; ++j) {
          simdgroup_multiply_accumulate(accg[i * 2 + j], ma, mb[j], accg[i * 2 + j]);
        }
        simdgroup_load(ma, sau + (sr + 8 * i) * BK + kk, BK);
        for (int j = 0; j < 2; ++j) {
          simdgroup_multiply_accumulate(accu[i * 2 + j], ma, mb[j], accu[i * 2 + j]);
        }
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }

  threadgroup float* stage_g = sag;
  threadgroup float* stage_u = sau;
  for (int i = 0; i < 4; ++i) {
    for (int j = 0; j < 2; ++j) {
      simdgroup_store(accg[i * 2 + j], stage_g + (sc + 8 * j) * BM + sr + 8 * i, BM, ulong2(0, 0), true);
      simdgroup_store(accu[i * 2 + j], stage_u + (sc + 8 * j) * BM + sr + 8 * i, BM, ulong2(0, 0), true);
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const int oj = int(t) / 4;
  const int or0 = (int(t) % 4) * 16;
  if (oj < nvalid) {
    const int p = pairs[start + oj];
    for (int i = 0; i < 16; ++i) {
      const int n = row0 + or0 + i;
      if (n < N) {
        h[size_t(p) * N + n] = moe_silu(stage_g[oj * BM + or0 + i]) * stage_u[oj * BM + or0 + i];
      }
    }
  }
}

// ==== kernel: mul_mm_id_combine ====
// y[t, n] = sum_s w[t, s] * d[t * KS + s, n]   over real slots (0 <= id < NE)
//         + sum_s w[t, s] * x[t, n]            over identity slots (NE <= id < NE + NI)
// accumulated in float32, written once in T.  Rows of d of other slots are
// never read (mul_mm_id does not write them).
// Template: T (x and y dtype), N (hidden), NE, NI, KS, TG (threads per group).
// Grid: (ceil(N / TG) * TG, T, 1), threadgroup (TG, 1, 1).
// Inputs: d [P, N] float32 (bfloat16 from the CUDA async GEMM), ids [T, KS], wts [T, KS]
// float32, x [T, N].  Output: y [T, N] in T.
{
  const int tok = int(threadgroup_position_in_grid.y);
  const int n = int(threadgroup_position_in_grid.x) * TG + int(thread_index_in_threadgroup);
  if (n < N) {
    float v = 0.0f;
    float wid = 0.0f;
    for (int s = 0; s < KS; ++s) {
      const int e = ids[tok * KS + s];
      const float ws = wts[tok * KS + s];
      if (e >= 0 && e < NE) {
        v += ws * float(d[size_t(tok * KS + s) * N + n]);
      } else if (e >= NE && e < NE + NI) {
        wid += ws;
      }
    }
    if (NI > 0) {
      v += wid * float(x[size_t(tok) * N + n]);
    }
    y[size_t(tok) * N + n] = static_cast<T>(v);
  }
}
