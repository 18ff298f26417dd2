// decode_layer: the dense GEMVs of a one-token decoder layer, spread over the GPU.
//
// Why: a one-token layer is a chain of small launches, each as long as its
// slowest threadgroup.  A launch with one threadgroup per attention head (40
// for Qwen3-30B-A3B) or one for the router leaves most SMs idle and takes 11-17
// us (ncu, BENCHMARKS.md); spread over every SM the same reads take 2-4 us.
// So each GEMV here splits its rows over many threadgroups, and what needs a
// whole vector (the q/k norms and RoPE, the attention's split combine) moves to
// the launch that reads that vector anyway:
//   dense_norm           input RMSNorm -> q, k, v projections (+ biases), one
//                        launch; the router's projection (dense_norm_xn, which
//                        also writes the normalized input for the experts);
//   dense_residual       o_proj and the residual add (dense_residual_parts: the
//                        attention's partial results combined while staged).
// The q/k norms and RoPE run in the attention kernel (metal/attention.metal).
//
// Numerics follow mlx-lm's ops: the normalized input is rounded to T as
// mx.fast.rms_norm rounds it, each projection's output is rounded to T as
// quantized_matmul / matmul return it, the q/k norms and RoPE round as theirs.
//
// Dense weights (FMT), one row per output feature:
//   4, 8   MLX affine quantization, BITS = FMT, group GS: w uint32 [N, K*BITS/32]
//          (element j of a word in bits BITS*j ..), scales and biases [N, K/GS]
//          of ST; value = scale * q + bias;
//   16, 17, 32  float16, bfloat16, float32 weights [N, K].
// A lane reads 16 bytes of a row per step (PER columns), so rows must be
// 16-byte multiples (mlx_moe/kernels/dense.py checks).
//
// Activations are staged once per threadgroup in threadgroup memory as
// float, in the order lanes read them (moe_xs_at), prescaled for affine weights
// (moe_xs_put4): no bank conflicts, no shifts in the weights' unpacking.

// ==== helpers ====
//@uses router  (moe_router_select: dense_residual's RRULE option)

// A threadgroup's hand-off through a counter (mul_mv_id_moe, the decode_chain kernels, the
// router tail): its device writes made visible, then one ticket on count by its one
// `leader` thread; every thread must call it (a barrier).  ONE (mul_mv_id_moe's stage bit
// 2048 where moe_fence_one::ON; elsewhere moe_handoff_one::ON): the leader fences after the
// barrier, the barrier ordering the others' writes before its fence; else every thread
// fences before it.  Returns the leader's ticket (0 in the other threads).
template <bool ONE, typename CP>
MOE_DEVICE inline uint moe_release_ticket(CP count, bool leader) {
  if (!ONE) {
    moe_device_fence();
  }
  threadgroup_barrier(mem_flags::mem_device);
  uint t = 0u;
  if (leader) {
    if (ONE) {
      moe_device_fence();
    }
    t = moe_ticket(count);
  }
  return t;
}

// The other side: the one `leader` thread waits until count reaches n, and the
// threadgroup's reads of what the counted threadgroups wrote come after a fence -- ONE: the
// leader's, before the barrier; else every thread's, after it.  Every thread must call it.
template <bool ONE, typename CP>
MOE_DEVICE inline void moe_acquire_wait(CP count, uint n, bool leader) {
  if (leader) {
    moe_wait_count(count, n);
    if (ONE) {
      moe_device_fence();
    }
  }
  threadgroup_barrier(mem_flags::mem_device | mem_flags::mem_threadgroup);
  if (!ONE) {
    moe_device_fence();
  }
}

// The routing rule (router.metal's moe_router_select) on one token's router outputs in
// one simdgroup, its k ids and weights written out by lane 0.  Out of line on CUDA: the
// split router tail (dense_residual's RRULE option) runs at 128 registers a thread, the
// most its 512-thread threadgroups may have, and the rule inlined took it to 129 (nvcc,
// sm_90a).
template <int NEXP, int K, int VPL, int SCORE, bool HAS_BIAS, int NGROUP, int TOPKG, bool NORM, typename LP,
          typename BP, typename IP, typename WP>
MOE_OUT_OF_LINE void moe_route_out(LP logits, BP bias, float scale, IP ids, WP weights, uint lane) {
  const auto pick = moe_router_select<NEXP, K, VPL, SCORE, HAS_BIAS, NGROUP, TOPKG, NORM>(logits, bias, scale, lane);
  if (lane == 0) {
    for (int j = 0; j < K; ++j) {
      ids[j] = pick.id[j];
      weights[j] = pick.w[j];
    }
  }
}

// Columns of one 16-byte read of a row, per weight format.
template <int FMT>
struct moe_dense_per {
  enum { value = (FMT == 4 || FMT == 8) ? 128 / FMT : (FMT == 32 ? 4 : 8) };
};

// Where column c of K-long activations sits in the staged vector: step s, lane
// l, element i of the lane's PER columns go to row s * PER + i, column l, so the
// 32 lanes of a step read one row's consecutive words, and a lane's PER reads of a
// step sit at constant offsets from each other.  Rows are RS = 33 floats apart (a
// pad word): the stagers write 4 consecutive c per thread, 128 per 32 threads, a
// few l and many rows, which unpadded fall in a few banks (an 8-way conflict on
// every store of a 4-bit row) and padded in 32.
constexpr int MOE_XS_RS = 33;

MOE_DEVICE inline int moe_xs_at(int row, int l) {
  return row * MOE_XS_RS + l;
}

// Floats of the staged vector of XS columns (XS a multiple of 32).
template <int XS>
struct moe_xs_alloc {
  enum { value = XS / 32 * MOE_XS_RS };
};

// Affine weights' values are read in place, masked but not shifted, from the low
// and the high 16 bits of each word: element k of a half-word (bits BITS * k ..)
// comes out as q * 2^(BITS * k).  So the staged activation of column c carries the
// inverse factor 2^-(BITS * (c % (16 / BITS))) (exact: a power of two), and the
// affine bias term's sum of the lane's unscaled PER activations is staged apart
// (xsums [steps * 32], at step * 32 + lane).  Float weights: activations as they are.
template <int FMT>
MOE_DEVICE inline float moe_xs_prescale(int c) {
  return FMT == 4 ? (c % 4 == 0 ? 1.0f : (c % 4 == 1 ? 0.0625f : (c % 4 == 2 ? 0.00390625f : 0.000244140625f)))
                  : (FMT == 8 ? (c % 2 == 0 ? 1.0f : 0.00390625f) : 1.0f);
}

// Stage the activations v of columns c .. c + 3 (c % 4 == 0; 0 past K): into xs,
// prescaled for affine weights, and their sum into xsums[c / PER] (a shuffle over the
// PER / 4 consecutive lanes that hold a lane group's columns).  Every lane of the
// simdgroup must call it, lanes holding consecutive c (c = 4 * (lane + 32 * n) + ..).
template <int FMT, int XS, typename X>
MOE_DEVICE inline void moe_xs_put4(X xs, X xsums, int c, float v0, float v1, float v2, float v3, uint lane) {
  constexpr int PER = moe_dense_per<FMT>::value;
  constexpr bool AFFINE = FMT == 4 || FMT == 8;
  const float v[4] = {v0, v1, v2, v3};
  const uint uc = uint(c);  // unsigned: the divisions by powers of two are shifts
  const uint row = (uc / uint(32 * PER)) * uint(PER) + uc % uint(PER);
  const uint l = (uc / uint(PER)) % 32u;
  for (int m = 0; m < 4; ++m) {
    if (c + m < XS) {  // c % 4 == 0 and PER % 4 == 0: the 4 columns share l, rows row .. row + 3
      xs[moe_xs_at(int(row) + m, int(l))] = v[m] * moe_xs_prescale<FMT>(m);
    }
  }
  if (AFFINE) {
    float t = v0 + v1 + v2 + v3;
    for (int o = 1; o < PER / 4; o *= 2) {
      t += moe_shuffle_xor(t, ushort(o));
    }
    if (lane % (PER / 4) == 0 && c < XS) {
      xsums[c / PER] = t;
    }
  }
}

// Size of the staged vector for K columns (whole steps; the tail holds zeros).
template <int K, int PER>
struct moe_xs_size {
  enum { value = ((K + 32 * PER - 1) / (32 * PER)) * 32 * PER };
};

// The 16 bytes at index i (in 16-byte units) of a weight matrix.
template <typename P>
MOE_DEVICE inline uint4 moe_dense_load(P w, size_t i) {
  return moe_load_u4(w, i);
}

// PER float weights from the four words of one read.
template <int FMT, typename F>
MOE_DEVICE inline void moe_dense_floats(uint4 q, F f) {
  const uint wd[4] = {q.x, q.y, q.z, q.w};
  for (int m = 0; m < 4; ++m) {
    if (FMT == 32) {
      f[m] = moe_as_float(wd[m]);
    } else if (FMT == 17) {  // bfloat16: the upper half of a float32
      f[2 * m] = moe_as_float(wd[m] << 16);
      f[2 * m + 1] = moe_as_float(wd[m] & 0xFFFF0000u);
    } else {  // float16
      f[2 * m] = moe_f16_bits(ushort(wd[m] & 0xFFFFu));
      f[2 * m + 1] = moe_f16_bits(ushort(wd[m] >> 16));
    }
  }
}

// Element i (< moe_dense_per<FMT>::value) of a 16-byte read of a dense weight: the
// float weight, or an affine weight's quantized level (the caller applies scale and bias).
template <int FMT>
MOE_DEVICE inline float moe_dense_unit_at(uint4 q, int i) {
  constexpr int BITS = (FMT == 4 || FMT == 8) ? FMT : (FMT == 32 ? 32 : 16);
  constexpr int EPW = 32 / BITS;  // elements per 32-bit word
  const int wi = i / EPW;
  const uint wd = (wi == 0) ? q.x : (wi == 1) ? q.y : (wi == 2) ? q.z : q.w;
  if (FMT == 32) {
    return moe_as_float(wd);
  }
  const uint v = (wd >> ((i % EPW) * BITS)) & ((BITS == 32) ? 0xFFFFFFFFu : ((1u << BITS) - 1u));
  if (FMT == 17) {
    return moe_as_float(v << 16);
  }
  if (FMT == 16) {
    return moe_f16_bits(ushort(v));
  }
  return float(v);
}

// One lane's reads of CH consecutive steps (from step st0) of NR rows: the
// 16-byte words and, for affine formats, each read's scale and bias.  Kept in
// registers so a kernel can issue its first reads before its prologue (the
// input norm, the staging barrier) and wait for memory once.
template <int NR, int CH>
struct moe_dense_chunk {
  uint4 q[CH][NR];
  float s[CH][NR];
  float b[CH][NR];
};

// Steps of a K-long row (PER columns per lane and step), and the steps loaded at
// once: 8 reads (32 registers) per lane at most.
template <int K, int FMT, int NR>
struct moe_dense_steps {
  enum {
    PER = moe_dense_per<FMT>::value,
    NS = (K + 32 * PER - 1) / (32 * PER),
    CH0 = 8 / NR > 0 ? 8 / NR : 1,
    CH = CH0 < NS ? CH0 : NS,
  };
};

// Issue the reads of steps st0 .. st0 + CH - 1 of rows row0 .. row0 + NR - 1.
// Rows at or past nvalid read row nvalid - 1 (valid memory, result discarded by
// the caller); columns past K read nothing.
template <int K, int FMT, int GS, int NR, int CH, typename WP, typename SP>
MOE_DEVICE inline moe_dense_chunk<NR, CH> moe_dense_load(WP w, SP sc, SP bi, int row0, int nvalid, int st0,
                                                         uint lane) {
  constexpr int PER = moe_dense_per<FMT>::value;
  constexpr int AFFINE = (FMT == 4 || FMT == 8) ? 1 : 0;
  constexpr int ROW16 = K / PER;  // 16-byte reads per row
  constexpr int G = AFFINE ? GS : 1;
  moe_dense_chunk<NR, CH> ch;
  MOE_UNROLL
  for (int j = 0; j < CH; ++j) {
    const int st = st0 + j;
    const int c = (st * 32 + int(lane)) * PER;
    MOE_UNROLL
    for (int r = 0; r < NR; ++r) {
      const int rr = (r < nvalid) ? r : nvalid - 1;
      if (c < K) {
        ch.q[j][r] = moe_dense_load(w, size_t(row0 + rr) * ROW16 + size_t(st * 32 + int(lane)));
        if (AFFINE) {
          const size_t g = size_t(row0 + rr) * (K / G) + size_t(c / G);
          ch.s[j][r] = float(sc[g]);
          ch.b[j][r] = float(bi[g]);
        }
      }
    }
  }
  return ch;
}

// acc[r] += the chunk's part of  W[row0 + r] . x,  x staged in xs and xsums (moe_xs_put4).
template <int K, int FMT, int NR, int CH, typename XS, typename A>
MOE_DEVICE inline void moe_dense_math(moe_dense_chunk<NR, CH> ch, int st0, XS xs, XS xsums, uint lane, A acc) {
  constexpr int PER = moe_dense_per<FMT>::value;
  constexpr int AFFINE = (FMT == 4 || FMT == 8) ? 1 : 0;
  MOE_UNROLL
  for (int j = 0; j < CH; ++j) {
    const int st = st0 + j;
    const int c = (st * 32 + int(lane)) * PER;
    if (c < K) {
      float xv[PER];
      for (int i = 0; i < PER; ++i) {
        xv[i] = xs[moe_xs_at(st * PER + i, int(lane))];
      }
      const float xsum = AFFINE ? xsums[st * 32 + int(lane)] : 0.0f;
      MOE_UNROLL
      for (int r = 0; r < NR; ++r) {
        float s = 0.0f;
        if (AFFINE) {
          const uint4 q = ch.q[j][r];
          const uint wd[4] = {q.x, q.y, q.z, q.w};
          constexpr int B = AFFINE ? FMT : 8;
          constexpr int EPH = 16 / B;  // elements per half-word
          constexpr uint MASK = (1u << B) - 1u;
          // q * 2^(B * k) as float through the 0x4B000000 magic number (2^23 + v,
          // minus 2^23: exact for v < 2^16), not an int->float conversion (a
          // quarter-rate pipe on NVIDIA GPUs); the activation carries 2^-(B * k).
          // Each half-word gets the magic exponent once; an element is then one
          // AND with a mask that keeps it, one subtraction and one FMA.
          for (int m = 0; m < 4; ++m) {
            for (int hf = 0; hf < 2; ++hf) {
              const uint h = moe_opaque((hf ? (wd[m] >> 16) : (wd[m] & 0xFFFFu)) | 0x4B000000u);
              for (int k = 0; k < EPH; ++k) {
                const float f = moe_as_float(h & ((MASK << uint(B * k)) | 0xFFFF0000u)) - 8388608.0f;
                s += f * xv[2 * EPH * m + EPH * hf + k];
              }
            }
          }
          acc[r] += ch.s[j][r] * s + ch.b[j][r] * xsum;
        } else {
          float f[PER];
          moe_dense_floats<FMT>(ch.q[j][r], f);
          for (int i = 0; i < PER; ++i) {
            s += f[i] * xv[i];
          }
          acc[r] += s;
        }
      }
    }
  }
}

// acc[r] += this lane's part of  W[row0 + r] . x  for r < NR, x staged in xs;
// `first`: the reads of the first chunk (steps 0 .. CH - 1), issued by the caller
// before its prologue; the rest are read here, a chunk at a time.
template <int K, int FMT, int GS, int NR, typename WP, typename SP, typename XS, typename A, typename C>
MOE_DEVICE inline void moe_dense_rest(C first, WP w, SP sc, SP bi, int row0, int nvalid, XS xs, XS xsums, uint lane,
                                      A acc) {
  constexpr int NS = moe_dense_steps<K, FMT, NR>::NS;
  constexpr int CH = moe_dense_steps<K, FMT, NR>::CH;
  moe_dense_math<K, FMT, NR, CH>(first, 0, xs, xsums, lane, acc);
  for (int st0 = CH; st0 < NS; st0 += CH) {
    const auto ch = moe_dense_load<K, FMT, GS, NR, CH>(w, sc, bi, row0, nvalid, st0, lane);
    moe_dense_math<K, FMT, NR, CH>(ch, st0, xs, xsums, lane, acc);
  }
}

// Threadgroup `part` of `parts` asks L2 for its share of the n elements at p, a
// 128-byte line per thread (dense_residual's ROUTER tail: the router's weights, which
// one threadgroup reads alone at the end, are fetched by all of them at the start).
template <typename P>
MOE_DEVICE inline void moe_prefetch_share(P p, int n, int part, int parts, int tid, int nt) {
  constexpr int EPL = 128 / int(sizeof(p[0]));  // elements per line
  const int lines = (n + EPL - 1) / EPL;
  const int per = (lines + parts - 1) / parts;
  const int end = (part + 1) * per < lines ? (part + 1) * per : lines;
  for (int l = part * per + tid; l < end; l += nt) {
    moe_prefetch_l2(p + l * EPL);
  }
}

// The attention parts of column quads tid + (i0 + b) * NT, b < QB, from every split
// (dense_residual's PARTS combine): 16-byte reads into pv, all issued before any is
// used.  A quad past the K / 4 quads reads the last one (a valid read, discarded).
template <int QB, int S, int HD, int NQ4, int NT, typename P, typename V>
MOE_DEVICE inline void moe_parts_quads(P parts, V pv, int i0, int tid) {
  MOE_UNROLL
  for (int b = 0; b < QB; ++b) {
    const int qd = tid + (i0 + b) * NT;
    const int c = ((qd < NQ4) ? qd : NQ4 - 1) * 4;
    MOE_UNROLL
    for (int s = 0; s < S; ++s) {
      pv[b][s] = moe_load_u4(parts, (size_t((c / HD) * S + s) * HD + size_t(c % HD)) / 4);
    }
  }
}

// Sum of v over the threadgroup's NSG simdgroups, returned to every thread.
// red: threadgroup float[NSG]; begins and ends with a barrier (red is reused).
template <int NSG, typename R>
MOE_DEVICE inline float moe_tg_sum(float v, R red, uint lane, uint sg) {
  v = moe_simd_sum(v);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (lane == 0) {
    red[sg] = v;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  float t = 0.0f;
  for (int g = 0; g < NSG; ++g) {
    t += red[g];
  }
  return t;
}

// Max of v over the threadgroup's NSG simdgroups (NaN ignored where another value is
// not), returned to every thread; red as moe_tg_sum's.
template <int NSG, typename R>
MOE_DEVICE inline float moe_tg_max(float v, R red, uint lane, uint sg) {
  v = moe_simd_max(v);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (lane == 0) {
    red[sg] = v;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  float t = red[0];
  for (int g = 1; g < NSG; ++g) {
    t = red[g] > t ? red[g] : t;
  }
  return t;
}

// The input RMSNorm of one token, staged for moe_dense_rest: xn = g * T(x * inv_rms)
// rounded as mx.fast.rms_norm rounds it, into xs and xsums (moe_xs_put4), by the NT
// threads of the threadgroup, 4 consecutive columns a thread at a time; with
// write_xn, also into out [K] (T).  Ends with a barrier.  Callers issue their first
// weight reads before it, so those are in flight while it waits for x.
template <typename T, int K, int FMT, int NT, int NSG, typename XP, typename GP, typename XS, typename R,
          typename OP>
MOE_DEVICE inline void moe_rms_stage(XP x, GP gin, float eps, XS xs, XS xsums, R red, int tid, uint lane, uint sg,
                                     OP out, bool write_xn) {
  constexpr int PER = moe_dense_per<FMT>::value;
  constexpr int XN = moe_xs_size<K, PER>::value;
  constexpr int IQ = (XN / 4 + NT - 1) / NT;  // 4-column groups per thread
  float xv[IQ][4];
  float gv[IQ][4];
  for (int i = 0; i < IQ; ++i) {
    for (int m = 0; m < 4; ++m) {
      const int c = 4 * (tid + i * NT) + m;
      xv[i][m] = (c < K) ? float(x[c]) : 0.0f;
      gv[i][m] = (c < K) ? float(gin[c]) : 0.0f;
    }
  }
  float ss = 0.0f;
  for (int i = 0; i < IQ; ++i) {
    for (int m = 0; m < 4; ++m) {
      ss += xv[i][m] * xv[i][m];
    }
  }
  const float inv = moe_rsqrt(moe_tg_sum<NSG>(ss, red, lane, sg) / float(K) + eps);
  for (int i = 0; i < IQ; ++i) {
    const int c = 4 * (tid + i * NT);
    float v[4];
    for (int m = 0; m < 4; ++m) {
      v[m] = (c + m < K) ? float(T(gv[i][m] * float(T(xv[i][m] * inv)))) : 0.0f;
      if (write_xn && c + m < K) {
        out[c + m] = T(v[m]);
      }
    }
    moe_xs_put4<FMT, XN>(xs, xsums, c, v[0], v[1], v[2], v[3], lane);
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
}

// ==== kernel: dense_norm ====
// y = T(W . rms_norm(x, gin, eps) (+ bias)) for one token, over up to three
// weights stacked by rows (q, k and v: N0 + N1 + N2 rows; N1 = N2 = 0 for one):
// each simdgroup takes NR rows of one of them, the threadgroups spread over all
// rows (Qwen3-30B-A3B's q/k/v: 640 threadgroups, every SM busy), and each one
// stages the norm itself (2048 features: 4 KB from L2) instead of waiting for
// another launch to write it.
// Template: T, FMT, GS, K (features), N0, N1, N2 (multiples of NR), NR, NSG, HAS_BIAS.
// Inputs: x [K], gin [K] (T); w0, w0_s, w0_b, w1, w1_s, w1_b, w2, w2_s, w2_b (dense
//   weights; scales and biases of affine ones, 1-element stand-ins otherwise; an
//   unused matrix may repeat w0); b0 [N0], b1 [N1], b2 [N2] (T; 1-element stand-ins
//   unless HAS_BIAS); cst float32 [1]: eps.
// Output: y [N0 + N1 + N2] (T), rounded once as nn.Linear's addmm rounds.
// Option XN (kernel dense_norm_xn): one more output, xn [K] (T), the normalized
//   input (the router's: the experts read it), written by threadgroup 0.
// Grid: (ceil((N0 + N1 + N2) / (NR * NSG)) * 32 * NSG, 1, 1), threadgroup (32 * NSG, 1, 1).
{
  constexpr int PER = moe_dense_per<FMT>::value;
  constexpr int XS = moe_xs_size<K, PER>::value;
  constexpr int NT = 32 * NSG;
  constexpr int N = N0 + N1 + N2;
  constexpr int CH = moe_dense_steps<K, FMT, NR>::CH;
  threadgroup float xs[moe_xs_alloc<XS>::value];
  threadgroup float xsums[(FMT == 4 || FMT == 8) ? XS / PER : 1];
  threadgroup float red[NSG];
  const uint lane = thread_index_in_simdgroup;
  const uint sg = simdgroup_index_in_threadgroup;
  const int tid = int(thread_index_in_threadgroup);
  const int row = (int(threadgroup_position_in_grid.x) * NSG + int(sg)) * NR;  // in the stack
  const int m = (row < N0) ? 0 : ((row < N0 + N1) ? 1 : 2);  // uniform per simdgroup (NR | N0, N1)
  const int row0 = row - ((m == 0) ? 0 : ((m == 1) ? N0 : N0 + N1));
  const int nm = (m == 0) ? N0 : ((m == 1) ? N1 : N2);
  const int nvalid = (row >= N) ? 0 : ((nm - row0 < NR) ? nm - row0 : NR);
  const int lrow = (nvalid > 0) ? row0 : 0;  // a simdgroup past the last row reads row 0, writes nothing
  const int lvalid = (nvalid > 0) ? nvalid : 1;
  const auto w = (m == 0) ? w0 : ((m == 1) ? w1 : w2);
  const auto w_s = (m == 0) ? w0_s : ((m == 1) ? w1_s : w2_s);
  const auto w_b = (m == 0) ? w0_b : ((m == 1) ? w1_b : w2_b);

  // Every read issued before the first wait: the first weights, the biases, then x.
  const auto first = moe_dense_load<K, FMT, GS, NR, CH>(w, w_s, w_b, lrow, lvalid, 0, lane);
  float bv[NR];
  for (int r = 0; r < NR; ++r) {
    bv[r] = 0.0f;
    if (HAS_BIAS && r < nvalid) {
      const auto b = (m == 0) ? b0 : ((m == 1) ? b1 : b2);
      bv[r] = float(b[row0 + r]);
    }
  }
//@if XN
  moe_rms_stage<T, K, FMT, NT, NSG>(x, gin, cst[0], xs, xsums, red, tid, lane, sg, xn,
                                    threadgroup_position_in_grid.x == 0);
//@endif
//@if !XN
  moe_rms_stage<T, K, FMT, NT, NSG>(x, gin, cst[0], xs, xsums, red, tid, lane, sg, y, false);
//@endif

  float acc[NR];
  for (int r = 0; r < NR; ++r) {
    acc[r] = 0.0f;
  }
  moe_dense_rest<K, FMT, GS, NR>(first, w, w_s, w_b, lrow, lvalid, xs, xsums, lane, acc);
  for (int r = 0; r < NR; ++r) {
    const float sr = moe_simd_sum(acc[r]);
    if (lane == 0 && r < nvalid) {
      y[row + r] = T(sr + bv[r]);
    }
  }
}

// ==== kernel: dense_residual ====
// out[n] = T(res[n] + T(W[n] . x)): a projection and the residual add after it
// (mlx-lm's  h = x + o_proj(attn)), for one token.
// Template: T, FMT, GS, K, N, NR (rows per simdgroup), NSG.
// Inputs: x [K] (T), w, w_s, w_b (dense weight, as dense_norm), res [N] (T).
// Output: out [N] (T).
// Option PARTS (kernel dense_residual_parts): x is the attention output in S
//   parts per head (metal/attention.metal's decode_attention_parts), combined
//   while staged: inputs parts [K / HD, S, HD] and ml [K / HD, S, 2] float32 in
//   place of x, template HD and S.  Every threadgroup combines the whole vector
//   (S * K floats from L2) rather than waiting on one more launch to do it.
// Option ROUTER (kernel dense_residual_parts_router, with PARTS): the next launch's
//   work too, the post-attention RMSNorm of out and the router projection
//   (dense_norm_xn's), done by the launch's last threadgroup once every other has
//   written its rows (moe_ticket).  Inputs gpost [N] (T), wr, wr_s, wr_b (the
//   router, RE x N, format RFMT, group RGS), cst float32 [4] (eps first), count
//   uint32 [4] (written: a ticket counter, zero between launches); outputs xn [N]
//   and logits [RE] (T); template RFMT, RGS, RE, RNR (router rows per simdgroup).
//   Why: one graph node fewer per decoder layer (decode is bound by the host's
//   cost per node), and the router's 0.3 MB no longer needs a launch of its own.
//   With option RONE (kernel dense_residual_parts_router) the last threadgroup
//   reads the whole router alone (prefetched into L2 by all of them at the start);
//   that took ~5 us a layer more GPU time than the router's own launch on the H100.
//   With option RSPLIT (kernel dense_residual_parts_router_split) every threadgroup
//   projects its own rows of out instead: the norm's 1/rms is one factor for all
//   columns, so  logits[e] = T(1/rms * sum_n wr[e, n] gpost[n] out[n]),  and each
//   threadgroup writes its rows' share of that sum and of sum out[n]^2 to rpart
//   [RE + 1, threadgroups] (float bits in count[4:], after the ticket: count holds
//   dense.tail_counter_words uint32; an input, not an output, so the host allocates
//   nothing per launch; each launch writes every share before the last threadgroup
//   reads them, so nothing but the ticket is zeroed); the last one adds the shares in
//   threadgroup order (deterministic) and writes xn and the logits.  The logits then
//   come from out and gpost unrounded, not from xn rounded to T (the same in float32).
//   Its router words are read with the projection's first weights, before any wait,
//   and the last threadgroup reads every share at once, a simdgroup per column: the
//   first version (a simdgroup per router row, one row after another, and the shares
//   added by a loop per column) took 21 us on the H100, more than the one-tail launch;
//   this one 14.5 (one-tail 17.7, the two launches 8.6 + 4.9).
//   With option RRULE (kernel dense_residual_parts_router_split_route, with RSPLIT) the
//   last threadgroup also runs the MoE layer's routing rule on the logits it wrote
//   (router.metal's moe_router_select, simdgroup 0; the rule's template as
//   moe_router_topk's under other names -- RKS (k), RVPL, RSCORE, RHAS_BIAS, RNGROUP,
//   RTOPKG, RNORM, NEXP being RE -- inputs rbias and rscale) and writes ids [RKS] int32
//   and weights [RKS] float32: the rule once per token, where each of the MoE launch's
//   1,280 threadgroups ran it (1.5-1.8 us at every start on the H100).
// Option CHAINED (with PARTS): the body run by a kernel that chains it after the
//   attention in one launch (metal/decode_chain.metal), which names this
//   threadgroup's index among the projection's o_tg and the counter the body waits
//   on before it reads parts and ml, chain_count, until it reaches chain_n: every
//   read that does not need them (the weights' first steps, the residuals, the
//   router's words) is issued before the wait.
// Grid: (ceil(N / (NR * NSG)) * 32 * NSG, 1, 1), threadgroup (32 * NSG, 1, 1).
{
  constexpr int PER = moe_dense_per<FMT>::value;
  constexpr int XS = moe_xs_size<K, PER>::value;
  constexpr int NTH = 32 * NSG;
  constexpr int CH = moe_dense_steps<K, FMT, NR>::CH;
  constexpr int IQ = (XS / 4 + NTH - 1) / NTH;  // 4-column groups per thread
//@if ROUTER
  constexpr int RPER = moe_dense_per<RFMT>::value;
  constexpr int RXS = moe_xs_size<N, RPER>::value;  // the router's staged input
  constexpr int XA = moe_xs_alloc<XS>::value > moe_xs_alloc<RXS>::value ? moe_xs_alloc<XS>::value
                                                                         : moe_xs_alloc<RXS>::value;
  constexpr int SUMS = (FMT == 4 || FMT == 8) ? XS / PER : 1;
  constexpr int RSUMS = (RFMT == 4 || RFMT == 8) ? RXS / RPER : 1;
  constexpr int XSUMS = SUMS > RSUMS ? SUMS : RSUMS;
  threadgroup float xs[XA];
  threadgroup float xsums[XSUMS];
  threadgroup float red[NSG];
  threadgroup uint ticket[1];
//@endif
//@if !ROUTER
  threadgroup float xs[moe_xs_alloc<XS>::value];
  threadgroup float xsums[(FMT == 4 || FMT == 8) ? XS / PER : 1];
//@endif
  const uint lane = thread_index_in_simdgroup;
  const uint sg = simdgroup_index_in_threadgroup;
  const int tid = int(thread_index_in_threadgroup);
//@if !CHAINED
  const int dtg = int(threadgroup_position_in_grid.x);
//@endif
//@if CHAINED
  const int dtg = o_tg;  // the chaining kernel's index of this threadgroup among the projection's
//@endif
  const int row0 = (dtg * NSG + int(sg)) * NR;
  const int nvalid = (N - row0 < NR) ? N - row0 : NR;
  const int lrow = (nvalid > 0) ? row0 : 0;  // a simdgroup past the last row reads row 0, writes nothing
  const int lvalid = (nvalid > 0) ? nvalid : 1;

  // Every read issued before the first wait: the first weights, the residuals, the activations.
  const auto first = moe_dense_load<K, FMT, GS, NR, CH>(w, w_s, w_b, lrow, lvalid, 0, lane);
  float rv[NR];
  for (int r = 0; r < NR; ++r) {
    rv[r] = (r < nvalid) ? float(res[row0 + r]) : 0.0f;
  }
//@if RSPLIT
  // This threadgroup's columns c0 .. c0 + nc - 1 of the router (its rows of out):
  // WPR 16-byte words (RPER elements each) of each router row, read now with the
  // projection's weights.
  constexpr int ROWS = NR * NSG;
  constexpr int RAFF = (RFMT == 4 || RFMT == 8) ? 1 : 0;
  constexpr int WPR = (ROWS % RPER == 0) ? ROWS / RPER : ROWS / RPER + 2;  // words ROWS columns can touch
  constexpr int NRI = RE * WPR;                                        // (router row, word) items
  constexpr int IT = (NRI + NTH - 1) / NTH;                            // items per thread
  const int c0 = dtg * ROWS;
  const int nc = (N - c0 < ROWS) ? N - c0 : ROWS;
  const int w0 = c0 / RPER;
  uint4 rq[IT];
  float rsb[IT][2];
  MOE_UNROLL
  for (int k = 0; k < IT; ++k) {
    const int i = tid + k * NTH;
    const int e = i / WPR, w = w0 + i % WPR;
    const bool ok = i < NRI && w * RPER < c0 + nc;  // past the rows: a valid read, unused
    rq[k] = moe_dense_load(wr, ok ? size_t(e) * size_t(N / RPER) + size_t(w) : size_t(0));
    const size_t g = ok ? size_t(e) * size_t(N / RGS) + size_t(w * RPER / RGS) : size_t(0);
    rsb[k][0] = RAFF ? float(wr_s[g]) : 1.0f;
    rsb[k][1] = RAFF ? float(wr_b[g]) : 0.0f;
  }
//@endif
//@if RONE
  {  // the router for the last threadgroup, into L2 (one threadgroup alone reading it from DRAM took 11 us)
    const int part = int(threadgroup_position_in_grid.x), parts = int(threadgroups_per_grid.x);
    constexpr int AFF = (RFMT == 4 || RFMT == 8) ? 1 : 0;
    constexpr int RW = AFF ? RE * N * RFMT / 32 : RE * N;  // elements of wr: uint32 words or floats
    constexpr int RG = AFF ? RE * (N / RGS) : 1;           // scales, biases (stand-ins for floats)
    moe_prefetch_share(wr, RW, part, parts, tid, NTH);
    moe_prefetch_share(wr_s, RG, part, parts, tid, NTH);
    moe_prefetch_share(wr_b, RG, part, parts, tid, NTH);
  }
//@endif
//@if CHAINED
  // The chaining kernel's wait for this launch's parts and ml, after the reads above.
  moe_acquire_wait<moe_handoff_one::ON>(chain_count, chain_n, tid == 0);  // every split's parts and ml
//@endif
//@if PARTS
  // Head hd's split s weighs exp(m_s - M) / sum_s' l_s' exp(m_s' - M), M the largest
  // m of the head's non-empty splits (an empty one has l = 0 and weighs 0): the
  // softmax over all its slots; rounded to T as the one-pass kernel's output.
  constexpr int NH = K / HD;
  constexpr int NQ4 = K / 4;
  constexpr int QB = IQ < 4 ? IQ : 4;
  // The first batch of parts is read before the splits' factors are made from ml:
  // the two L2 round trips overlap (one after the other, they were two links of the
  // launch's chain of latencies).
  uint4 pv[QB][S];
  moe_parts_quads<QB, S, HD, NQ4, NTH>(parts, pv, 0, tid);
  threadgroup float coef[NH * S];
  for (int hd = tid; hd < NH; hd += NTH) {
    float mm = MOE_NEG_INF;
    for (int s = 0; s < S; ++s) {
      const float ms = ml[(hd * S + s) * 2];
      mm = (ml[(hd * S + s) * 2 + 1] > 0.0f && ms > mm) ? ms : mm;
    }
    float tot = 0.0f;
    for (int s = 0; s < S; ++s) {
      const float ls = ml[(hd * S + s) * 2 + 1];
      const float a = (ls > 0.0f) ? moe_exp(ml[(hd * S + s) * 2] - mm) : 0.0f;
      coef[hd * S + s] = a;
      tot += ls * a;
    }
    for (int s = 0; s < S; ++s) {
      coef[hd * S + s] = coef[hd * S + s] / tot;
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  // Each thread combines 4 consecutive columns at a time, reading them from every
  // split as 16 bytes, a batch of QB column quads' reads issued before any is used:
  // one L2 round trip per batch (a read, wait, combine loop per column made this
  // launch 24 us on the H100, BENCHMARKS.md 2026-12-05).  HD % 4 == 0, so a quad
  // never straddles two heads.
  for (int i0 = 0; i0 < IQ; i0 += QB) {
    if (i0 > 0) {
      moe_parts_quads<QB, S, HD, NQ4, NTH>(parts, pv, i0, tid);
    }
    MOE_UNROLL
    for (int b = 0; b < QB; ++b) {
      if (i0 + b < IQ) {  // uniform: every lane stages (moe_xs_put4 shuffles)
        const int qd = tid + (i0 + b) * NTH;
        const int c = qd * 4;
        const int hd = ((qd < NQ4) ? c : 0) / HD;
        float v[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        MOE_UNROLL
        for (int s = 0; s < S; ++s) {
          const float cf = (qd < NQ4) ? coef[hd * S + s] : 0.0f;
          v[0] += moe_as_float(pv[b][s].x) * cf;
          v[1] += moe_as_float(pv[b][s].y) * cf;
          v[2] += moe_as_float(pv[b][s].z) * cf;
          v[3] += moe_as_float(pv[b][s].w) * cf;
        }
        moe_xs_put4<FMT, XS>(xs, xsums, c, float(T(v[0])), float(T(v[1])), float(T(v[2])), float(T(v[3])), lane);
      }
    }
  }
//@endif
//@if !PARTS
  float xv[IQ][4];
  for (int i = 0; i < IQ; ++i) {
    for (int m = 0; m < 4; ++m) {
      const int c = 4 * (tid + i * NTH) + m;
      xv[i][m] = (c < K) ? float(x[c]) : 0.0f;
    }
  }
  for (int i = 0; i < IQ; ++i) {
    moe_xs_put4<FMT, XS>(xs, xsums, 4 * (tid + i * NTH), xv[i][0], xv[i][1], xv[i][2], xv[i][3], lane);
  }
//@endif
  threadgroup_barrier(mem_flags::mem_threadgroup);
  float acc[NR];
  for (int r = 0; r < NR; ++r) {
    acc[r] = 0.0f;
  }
  moe_dense_rest<K, FMT, GS, NR>(first, w, w_s, w_b, lrow, lvalid, xs, xsums, lane, acc);
  float ov[NR];  // this simdgroup's rows of out, as written
  for (int r = 0; r < NR; ++r) {
    const float sr = moe_simd_sum(acc[r]);
    ov[r] = float(T(rv[r] + float(T(sr))));
    if (lane == 0 && r < nvalid) {
      out[row0 + r] = T(ov[r]);
    }
  }
//@if RSPLIT
  // This threadgroup's share of the router projection and of the norm's sum of squares.
  threadgroup float og[ROWS];  // out[n] * gpost[n]
  threadgroup float oo[ROWS];  // out[n]
  threadgroup float pd[NRI];   // each (router row, word) item's dot product
  threadgroup float tot[RE + 1];
  if (lane == 0) {
    for (int r = 0; r < NR; ++r) {
      const int j = int(sg) * NR + r;
      oo[j] = (r < nvalid) ? ov[r] : 0.0f;
      og[j] = (r < nvalid) ? ov[r] * float(gpost[row0 + r]) : 0.0f;
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  MOE_UNROLL
  for (int k = 0; k < IT; ++k) {
    const int i = tid + k * NTH;
    if (i < NRI) {
      const int cw = (w0 + i % WPR) * RPER - c0;  // the word's first column, from c0
      float a = 0.0f;
      MOE_UNROLL
      for (int m = 0; m < RPER; ++m) {
        if (cw + m >= 0 && cw + m < nc) {
          a += (moe_dense_unit_at<RFMT>(rq[k], m) * rsb[k][0] + rsb[k][1]) * og[cw + m];
        }
      }
      pd[i] = a;
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  constexpr int NTG = (N + ROWS - 1) / ROWS;  // threadgroups: rpart's row length
  const auto rpart = moe_inplace(count) + 4;  // after the ticket's 16 bytes
  for (int e = tid; e <= RE; e += NTH) {
    float a = 0.0f;
    if (e < RE) {
      for (int w = 0; w < WPR; ++w) {
        a += pd[e * WPR + w];
      }
    } else {
      for (int j = 0; j < nc; ++j) {
        a += oo[j] * oo[j];
      }
    }
    rpart[size_t(e) * NTG + size_t(dtg)] = moe_float_bits(a);
  }
//@endif
//@if ROUTER
  // Rows written and fenced, a ticket per threadgroup; the last one finishes the
  // norm and the router (every read of another threadgroup's writes after its own fence).
  // (moe_handoff_one::ON: the leader fences before its ticket, and as the last after it,
  // the barrier below ordering the others' reads after its fence)
  constexpr uint TAIL_LAST = uint((N + NR * NSG - 1) / (NR * NSG)) - 1u;
  const uint tk = moe_release_ticket<moe_handoff_one::ON>(count, tid == 0);
  if (tid == 0) {
    if (moe_handoff_one::ON && tk == TAIL_LAST) {
      moe_device_fence();
    }
    ticket[0] = tk;
  }
  threadgroup_barrier(mem_flags::mem_device | mem_flags::mem_threadgroup);
  if (ticket[0] == TAIL_LAST) {  // the launch's last (uniform per threadgroup)
    if (!moe_handoff_one::ON) {
      moe_device_fence();
    }
//@endif
//@if RSPLIT
    // The rows of out and gpost this thread normalizes below, read now: their L2
    // round trip overlaps the shares' (after the 1 / rms they were one more link).
    constexpr int NCT = (N + NTH - 1) / NTH;  // columns per thread
    float xo[NCT], xg[NCT];
    MOE_UNROLL
    for (int j = 0; j < NCT; ++j) {
      const int c = tid + j * NTH;
      xo[j] = (c < N) ? float(out[c]) : 0.0f;
      xg[j] = (c < N) ? float(gpost[c]) : 0.0f;
    }
    // A simdgroup per column e of rpart, its lanes reading the shares of threadgroups
    // lane, lane + 32, ...: QB columns' reads issued before any is added (one L2 round
    // trip for most shapes), each lane's in threadgroup order, then the simdgroup's
    // fixed reduction: deterministic.
    constexpr int CPS = (RE + 1 + NSG - 1) / NSG;  // columns per simdgroup
    constexpr int PPL = (NTG + 31) / 32;           // shares per lane of a column
    constexpr int QB0 = 32 / PPL > 0 ? 32 / PPL : 1;
    constexpr int QB = QB0 < CPS ? QB0 : CPS;      // columns per batch of reads
    for (int q0 = 0; q0 < CPS; q0 += QB) {
      float sv[QB][PPL];
      MOE_UNROLL
      for (int q = 0; q < QB; ++q) {
        const int e = int(sg) + (q0 + q) * NSG;
        MOE_UNROLL
        for (int p = 0; p < PPL; ++p) {
          const int tg = int(lane) + 32 * p;
          sv[q][p] = (q0 + q < CPS && e <= RE && tg < NTG) ? moe_as_float(rpart[size_t(e) * NTG + size_t(tg)]) : 0.0f;
        }
      }
      MOE_UNROLL
      for (int q = 0; q < QB; ++q) {
        float a = 0.0f;
        MOE_UNROLL
        for (int p = 0; p < PPL; ++p) {
          a += sv[q][p];
        }
        a = moe_simd_sum(a);  // uniform: every lane of the simdgroup takes part
        const int e = int(sg) + (q0 + q) * NSG;
        if (lane == 0 && q0 + q < CPS && e <= RE) {
          tot[e] = a;
        }
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    const float inv = moe_rsqrt(tot[RE] / float(N) + cst[0]);
    for (int e = tid; e < RE; e += NTH) {
      const T l = T(tot[e] * inv);
      logits[e] = l;
//@if RRULE
      tot[e] = float(l);  // the rule's input: the logits as written (tot[RE], the sum of squares, is left)
//@endif
    }
    MOE_UNROLL
    for (int j = 0; j < NCT; ++j) {  // as moe_rms_stage rounds it
      const int c = tid + j * NTH;
      if (c < N) {
        xn[c] = T(xg[j] * float(T(xo[j] * inv)));
      }
    }
//@if RRULE
    // The routing rule on the logits just written, in simdgroup 0, once per token (after
    // xn, whose registers are then free): the MoE launch reads ids and weights
    // (mul_mv_id_moe_ids) instead of running the rule in each of its threadgroups.
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (sg == 0) {  // uniform per simdgroup: every lane reaches every collective of the rule
      moe_route_out<RE, RKS, RVPL, RSCORE, RHAS_BIAS, RNGROUP, RTOPKG, RNORM>(tot, rbias, rscale[0], ids, weights,
                                                                            lane);
    }
//@endif
//@endif
//@if RONE
    moe_rms_stage<T, N, RFMT, NTH, NSG>(out, gpost, cst[0], xs, xsums, red, tid, lane, sg, xn, true);
    constexpr int RCH = moe_dense_steps<N, RFMT, RNR>::CH;
    for (int rt = int(sg) * RNR; rt < RE; rt += NSG * RNR) {  // uniform per simdgroup
      const int rvalid = (RE - rt < RNR) ? RE - rt : RNR;
      const auto rfirst = moe_dense_load<N, RFMT, RGS, RNR, RCH>(wr, wr_s, wr_b, rt, rvalid, 0, lane);
      float ra[RNR];
      for (int r = 0; r < RNR; ++r) {
        ra[r] = 0.0f;
      }
      moe_dense_rest<N, RFMT, RGS, RNR>(rfirst, wr, wr_s, wr_b, rt, rvalid, xs, xsums, lane, ra);
      for (int r = 0; r < RNR; ++r) {
        const float sr = moe_simd_sum(ra[r]);
        if (lane == 0 && r < rvalid) {
          logits[rt + r] = T(sr);
        }
      }
    }
//@endif
//@if ROUTER
    if (tid == 0) {
      moe_ticket_reset(count);
    }
  }
//@endif
}

// ==== kernel: dense_embed ====
// out[c] = row `token` of an embedding table, dequantized: the decode step's
// nn.Embedding / nn.QuantizedEmbedding lookup in one launch (MLX's is a gather per
// array, three for an affine table, and a dequantize: four graph nodes, 18 us of an
// H100 decode step).  Affine values rounded as MLX's affine_dequantize rounds them on
// the device the kernel replaces it on: T(T(scale * q) + bias) on the CPU (two roundings
// of T arithmetic), T(scale * q + bias) with FUSED (one: on CUDA, where ptxas fuses the
// bfloat16 / half multiply and add of MLX's kernel into an FMA, as PTX allows for
// mul/add without a rounding modifier); float tables copied.
// Template: T (the output type: the scales' for affine tables, else the weight's),
//   FMT, GS (as dense_norm), K (columns), V (rows), TG (threads per threadgroup), FUSED.
// Inputs: token [1] (any integer type; clamped to [0, V - 1]: never a read outside
//   the table), w, w_s, w_b (dense weight, as dense_norm).
// Output: out [K] (T).
// Grid: (ceil(K / PER / TG) * TG, 1, 1), threadgroup (TG, 1, 1): one 16-byte word a thread.
{
  constexpr int PER = moe_dense_per<FMT>::value;
  constexpr int WPR = K / PER;  // words of a row (K * bits / 8 is a multiple of 16 bytes)
  constexpr bool AFFINE = FMT == 4 || FMT == 8;
  const int j = int(threadgroup_position_in_grid.x) * TG + int(thread_index_in_threadgroup);
  if (j >= WPR) {
    return;
  }
  const long t = long(token[0]);
  const int row = t < 0 ? 0 : (t >= long(V) ? V - 1 : int(t));
  const uint4 q = moe_dense_load(w, size_t(row) * size_t(WPR) + size_t(j));
  float s = 1.0f;
  float b = 0.0f;
  if (AFFINE) {
    const size_t g = size_t(row) * size_t(K / GS) + size_t(j * PER / GS);  // PER <= GS: one group a word
    s = float(w_s[g]);
    b = float(w_b[g]);
  }
  for (int i = 0; i < PER; ++i) {
    const float v = moe_dense_unit_at<FMT>(q, i);
    out[j * PER + i] = AFFINE ? (FUSED ? T(moe_fma(s, v, b)) : T(float(T(s * v)) + b)) : T(v);
  }
}
