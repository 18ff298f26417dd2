// Decode attention over a fixed-capacity KV cache: one query token, the first
// pos + 1 slots of the cache, no mask array.
//
// Why: the compiled decode step (mlx_moe/compiled.py) keeps a static cache and
// must hide its empty slots; through mx.fast.scaled_dot_product_attention that
// takes an array mask, which MLX's fused CUDA attention kernels do not accept,
// so every layer ran MLX's unfused fallback (about ten graph nodes, each a host
// cost of several microseconds, over the whole capacity).  Here the number of
// valid slots is read from an array on the device: one launch per layer, and
// the same trace serves every position.
//
// One body for Metal, CUDA (through shims_cuda.h) and the CPU emulation; see
// mlx_moe/kernels/attention.py for the call.
//
// decode_attention: one threadgroup per query head; its NSG simdgroups take the
// valid slots round-robin, U at a time, each keeping a running max, sum and weighted value sum (the
// online softmax), merged through threadgroup memory at the end.  Lane l holds
// dimensions l, l + 32, ... of the head.  decode_attention_parts (the fused
// decoder layers) splits each head's slots over S threadgroups and does the q/k
// norms and RoPE itself (its section says why).

// ==== helpers ====

// The new token's heads made ready for attention by the NT threads of the
// threadgroup, from the projections as dense_norm rounds them: query yq and key
// yk, when NORM through their per-head RMSNorms (weights qn, kn, eps) rounded as
// mx.fast.rms_norm rounds them, then nn.RoPE's rotation at angle0 * inv_freq
// (pairs (i, i + D/2), or (2i, 2i+1) when TRAD) rounded to T, as mlx-lm's
// q_norm / k_norm and rope modules compute them, into tq and tk; the value yv as
// projected into tv (each threadgroup float[D]).
// Why all three at once: every read is issued before the first wait and the two
// norms share one reduction, so the prologue waits for memory once and passes
// three barriers (one vector at a time waited for its y, then for its norm
// weight, and passed three barriers per vector: ~8 dependent steps).
// tmp: threadgroup float[2 * D] scratch, red: float[2 * NSG].  Every thread must
// call it; ends with a barrier.
template <typename T, int D, int NT, int NSG, bool NORM, bool TRAD, typename YP, typename NP, typename TP,
          typename R>
MOE_DEVICE inline void moe_heads_prep(YP yq, YP yk, YP yv, NP qn, NP kn, float eps, float angle0, float log2_base,
                                      TP tmp, TP tq, TP tk, TP tv, R red, int tid, uint lane, uint sg) {
  constexpr int IT = (D + NT - 1) / NT;
  constexpr int HALF = D / 2;
  float q[IT];
  float k[IT];
  float v[IT];
  float gq[IT];
  float gk[IT];
  for (int i = 0; i < IT; ++i) {
    const int t = tid + i * NT;
    const bool in = t < D;
    q[i] = in ? float(yq[t]) : 0.0f;
    k[i] = in ? float(yk[t]) : 0.0f;
    v[i] = in ? float(yv[t]) : 0.0f;
    gq[i] = (NORM && in) ? float(qn[t]) : 0.0f;
    gk[i] = (NORM && in) ? float(kn[t]) : 0.0f;
  }
  if (NORM) {
    float sq = 0.0f;
    float sk = 0.0f;
    for (int i = 0; i < IT; ++i) {
      sq += q[i] * q[i];
      sk += k[i] * k[i];
    }
    sq = moe_simd_sum(sq);
    sk = moe_simd_sum(sk);
    if (lane == 0) {
      red[sg] = sq;
      red[NSG + sg] = sk;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    float tq2 = 0.0f;
    float tk2 = 0.0f;
    for (int g = 0; g < NSG; ++g) {
      tq2 += red[g];
      tk2 += red[NSG + g];
    }
    const float iq = moe_rsqrt(tq2 / float(D) + eps);
    const float ik = moe_rsqrt(tk2 / float(D) + eps);
    for (int i = 0; i < IT; ++i) {
      q[i] = float(T(gq[i] * float(T(q[i] * iq))));
      k[i] = float(T(gk[i] * float(T(k[i] * ik))));
    }
  }
  for (int i = 0; i < IT; ++i) {
    const int t = tid + i * NT;
    if (t < D) {
      tmp[t] = q[i];
      tmp[D + t] = k[i];
      tv[t] = v[i];
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (int i = 0; i < IT; ++i) {
    const int t = tid + i * NT;
    if (t < D) {
      const int j = TRAD ? t / 2 : t % HALF;  // the rotation's frequency index
      const bool lo = TRAD ? (t % 2 == 0) : (t < HALF);
      const int i1 = TRAD ? 2 * j : j;
      const int i2 = TRAD ? 2 * j + 1 : j + HALF;
      const float theta = angle0 * moe_exp2(-(float(j) / float(HALF)) * log2_base);
      const float cs = moe_cos(theta);
      const float sn = moe_sin(theta);
      tq[t] = float(T(lo ? tmp[i1] * cs - tmp[i2] * sn : tmp[i1] * sn + tmp[i2] * cs));
      tk[t] = float(T(lo ? tmp[D + i1] * cs - tmp[D + i2] * sn : tmp[D + i1] * sn + tmp[D + i2] * cs));
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
}

// The cache slots [b0, b1) split sp of S takes (decode_attention_parts): of the
// last + 1 valid slots (at most C), ceil(that / S) each in order, the last splits
// shorter or empty (b0 >= b1).
struct moe_slot_span {
  int b0;
  int b1;
};

template <int C, int S>
MOE_DEVICE inline moe_slot_span moe_split_slots(int last, int sp) {
  const int n = (last + 1 < C) ? last + 1 : C;
  const int per = (n + S - 1) / S;
  moe_slot_span r;
  r.b0 = sp * per;
  r.b1 = (r.b0 + per < n) ? r.b0 + per : n;
  return r;
}

// The cache lines split sp of query head h reads (decode_attention_parts: slots
// [b0, b1) of its kv head's keys and values, one contiguous range each), asked of L2
// by threadgroup att_tg (= h * S + sp) before it waits for the q/k/v projections
// (metal/decode_chain.metal): the cache, 1 MB a layer, is evicted from L2 by the
// step's weights, and its DRAM round trip was one link of the attention's chain of
// latencies after the wait.  The G query heads of a kv head read the same lines:
// each asks for every G-th line of them.  Slot pos is written by this launch and
// read from the new key and value, but its line is asked for too (harmless: a
// prefetch changes nothing).
template <typename T, int D, int HQ, int HKV, int C, int S, typename KP, typename PP>
MOE_DEVICE inline void moe_attention_prefetch(KP k, KP v, PP pos, int att_tg, int tid, int nt) {
  constexpr int G = HQ / HKV;
  constexpr int EPL = 128 / int(sizeof(T));  // elements per 128-byte line
  const int sp = att_tg % S, h = att_tg / S;
  const moe_slot_span span = moe_split_slots<C, S>(int(pos[0]), sp);
  if (span.b0 >= span.b1) {
    return;  // an empty split
  }
  const size_t first = (size_t(h / G) * C + size_t(span.b0)) * D;
  const int lines = ((span.b1 - span.b0) * D + EPL - 1) / EPL;
  for (int i = (h % G) + G * tid; i < 2 * lines; i += G * nt) {
    const size_t e = first + size_t(i % lines) * EPL;
    moe_prefetch_l2((i < lines ? k : v) + e);
  }
}

// ==== kernel: decode_attention ====
// Template: T  q/k/v/out dtype;  D  head dimension (a multiple of 32);
//   HQ, HKV  query and key/value heads (GQA: HQ a multiple of HKV);
//   C  cache capacity (slots);  NSG  simdgroups per threadgroup;  U  slots a
//   simdgroup takes per step.
// Inputs: q [HQ, D] (one token), k and v [HKV, C, D], pos int32 [1] (slots
// 0..pos are attended to, clamped to the capacity), scale float32 [1].
// Output: out [HQ, D].
// Grid: (HQ * 32 * NSG, 1, 1), threadgroup (32 * NSG, 1, 1).
{
  constexpr int DPL = D / 32;
  const int lane = int(thread_index_in_simdgroup);
  const int sg = int(simdgroup_index_in_threadgroup);
  const int h = int(threadgroup_position_in_grid.x);
  const int kvh = h / (HQ / HKV);
  const int last = int(pos[0]);
  const int n = (last + 1 < C) ? last + 1 : C;
  const float sc = scale[0];

  float qv[DPL];
  float acc[DPL];
  for (int i = 0; i < DPL; ++i) {
    qv[i] = float(q[size_t(h) * D + lane + 32 * i]) * sc;
    acc[i] = 0.0f;
  }
  float m = MOE_NEG_INF;  // running max of the scores
  float l = 0.0f;         // running sum of exp(score - m)
  const size_t base = size_t(kvh) * C * D;
  // U slots per step: their key and value loads are issued together, so a
  // simdgroup waits for memory once per U slots, not once per slot.
  for (int j0 = sg * U; j0 < n; j0 += NSG * U) {  // uniform per simdgroup: every lane reaches the sums
    float s[U];
    float vv[U][DPL];  // the values, read with the keys: one wait per step
    for (int u = 0; u < U; ++u) {
      const int j = (j0 + u < n) ? j0 + u : n - 1;  // past the end: a valid slot, masked below
      const size_t row = base + size_t(j) * D + lane;
      s[u] = 0.0f;
      for (int i = 0; i < DPL; ++i) {
        s[u] += qv[i] * float(k[row + 32 * i]);
        vv[u][i] = float(v[row + 32 * i]);
      }
    }
    float m2 = m;
    for (int u = 0; u < U; ++u) {
      const float su = moe_simd_sum(s[u]);
      s[u] = (j0 + u < n) ? su : MOE_NEG_INF;
      m2 = (s[u] > m2) ? s[u] : m2;
    }
    const float a = moe_exp(m - m2);  // first step: exp(-inf) = 0
    l *= a;
    for (int i = 0; i < DPL; ++i) {
      acc[i] *= a;
    }
    for (int u = 0; u < U; ++u) {
      const float p = moe_exp(s[u] - m2);  // masked slots: exp(-inf) = 0
      l += p;
      for (int i = 0; i < DPL; ++i) {
        acc[i] += p * vv[u][i];
      }
    }
    m = m2;
  }

  threadgroup float tg_m[NSG];
  threadgroup float tg_l[NSG];
  threadgroup float tg_acc[NSG * D];
  if (lane == 0) {
    tg_m[sg] = m;
    tg_l[sg] = l;
  }
  for (int i = 0; i < DPL; ++i) {
    tg_acc[sg * D + lane + 32 * i] = acc[i];
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (sg == 0) {
    float mx_all = MOE_NEG_INF;
    for (int g = 0; g < NSG; ++g) {
      mx_all = (tg_m[g] > mx_all) ? tg_m[g] : mx_all;
    }
    float total = 0.0f;
    float o[DPL];
    for (int i = 0; i < DPL; ++i) {
      o[i] = 0.0f;
    }
    for (int g = 0; g < NSG; ++g) {
      // a simdgroup that saw no slot has l = 0 and m = -inf: weight 0, never NaN
      const float a = (tg_l[g] > 0.0f) ? moe_exp(tg_m[g] - mx_all) : 0.0f;
      total += tg_l[g] * a;
      for (int i = 0; i < DPL; ++i) {
        o[i] += tg_acc[g * D + lane + 32 * i] * a;
      }
    }
    for (int i = 0; i < DPL; ++i) {
      out[size_t(h) * D + lane + 32 * i] = T(o[i] / total);
    }
  }
}

// ==== kernel: decode_attention_parts ====
// The fused decoder layer's attention (mlx_moe/fused_step.py): from the raw
// q/k/v projections of the new token to S partial softmax results per query
// head, which dense_residual_parts combines.
//   q, k = rms_norm per head (QKNORM) -> RoPE at position pos, rounded to T as
//          mlx-lm's ops round them; v as projected;
//   the new k and v are also outputs (the cache write after this launch), or
//   written into the cache in place (option KV); slot pos is read from them,
//   the earlier slots from the cache;
//   split s of a head takes slots [s * P, (s + 1) * P) of the pos + 1 valid ones
//   (P = ceil((pos + 1) / S)), its NSG simdgroups U slots at a time as
//   decode_attention does, and writes its unnormalized output and (max, sum).
// Why S splits: one threadgroup per head walks all slots in sequence and uses
// HQ of the SMs (32 of 132 on an H100/H200); HQ * S threadgroups keep every SM
// loading, and the q/k norms and RoPE (the whole head's vector) cost each split
// D values from L2.
// Template: T, D (a multiple of 32), HQ, HKV, C (cache slots), NSG, U, S, QKNORM, TRAD.
// Inputs: y [HQ + 2 * HKV, D] (T: q heads, k heads, v heads, as dense_norm
//   stacks them), q_norm, k_norm [D] (T; 1-element stand-ins unless QKNORM),
//   k, v [HKV, C, D] (the cache before this token), pos int32 [1],
//   cst float32 [4]: eps of the q/k norms, log2(rope base), rope position scale,
//   softmax scale.
// Outputs: parts [HQ, S, D] float32 (sum_j exp(s_j - m) v_j), ml [HQ, S, 2]
//   float32 (m, sum_j exp(s_j - m); an empty split: -inf, 0), kn, vn [HKV, D] (T).
// Option KV (kernel decode_attention_parts_kv): no kn / vn outputs; the new key
//   and value go straight into slot pos of the cache k, v (inputs written in
//   place: two scatter launches fewer per layer and token, the decode step's
//   host cost being per launch).
// Option CHAINED: the body run by a kernel that chains it after other work in one
//   launch (metal/decode_chain.metal), which names this threadgroup's index among the
//   attention's att_tg (split att_tg % S of head att_tg / S).
// Grid: (S * 32 * NSG, HQ, 1), threadgroup (32 * NSG, 1, 1).
{
  constexpr int DPL = D / 32;
  constexpr int NT = 32 * NSG;
  constexpr int G = HQ / HKV;
  threadgroup float tq[D];
  threadgroup float tk[D];
  threadgroup float tv[D];
  threadgroup float tmp[2 * D];
  threadgroup float red[2 * NSG];
  const uint lane = thread_index_in_simdgroup;
  const uint sg = simdgroup_index_in_threadgroup;
  const int tid = int(thread_index_in_threadgroup);
//@if !CHAINED
  const int sp = int(threadgroup_position_in_grid.x);
  const int h = int(threadgroup_position_in_grid.y);
//@endif
//@if CHAINED
  const int sp = att_tg % S;  // the chaining kernel's index of this threadgroup among the attention's
  const int h = att_tg / S;
//@endif
  const int kvh = h / G;
  const int last = int(pos[0]);
  const moe_slot_span span = moe_split_slots<C, S>(last, sp);
  const int b0 = span.b0, b1 = span.b1;
  const float angle0 = cst[2] * float(last);

  moe_heads_prep<T, D, NT, NSG, QKNORM, TRAD>(y + size_t(h) * D, y + size_t(HQ + kvh) * D,
                                             y + size_t(HQ + HKV + kvh) * D, q_norm, k_norm, cst[0], angle0, cst[1],
                                             tmp, tq, tk, tv, red, tid, lane, sg);
//@if !KV
  if (sp == 0 && h % G == 0) {
    for (int t = tid; t < D; t += NT) {
      kn[size_t(kvh) * D + t] = T(tk[t]);
      vn[size_t(kvh) * D + t] = T(tv[t]);
    }
  }
//@endif
//@if KV
  // Slot `last` of the cache, in place: no other threadgroup of this launch reads
  // it (the split holding it takes the new key and value from tk / tv).
  if (sp == 0 && h % G == 0 && last < C) {
    const auto kw = moe_inplace(k);
    const auto vw = moe_inplace(v);
    for (int t = tid; t < D; t += NT) {
      kw[(size_t(kvh) * C + size_t(last)) * D + t] = T(tk[t]);
      vw[(size_t(kvh) * C + size_t(last)) * D + t] = T(tv[t]);
    }
  }
//@endif

  const float sc = cst[3];
  float qv[DPL];
  float acc[DPL];
  for (int i = 0; i < DPL; ++i) {
    qv[i] = tq[lane + 32 * i] * sc;
    acc[i] = 0.0f;
  }
  float m = MOE_NEG_INF;
  float l = 0.0f;
  const size_t base = size_t(kvh) * C * D;
  for (int j0 = b0 + int(sg) * U; j0 < b1; j0 += NSG * U) {  // uniform per simdgroup
    float s[U];
    float vv[U][DPL];
    for (int u = 0; u < U; ++u) {
      const int j = (j0 + u < b1) ? j0 + u : b1 - 1;  // past the split's end: a valid slot, masked below
      const bool cur = (j == last);                  // the new token: from this launch's k and v
      const size_t row = base + size_t(j) * D + lane;
      s[u] = 0.0f;
      for (int i = 0; i < DPL; ++i) {
        const float kf = cur ? tk[lane + 32 * i] : float(k[row + 32 * i]);
        s[u] += qv[i] * kf;
        vv[u][i] = cur ? tv[lane + 32 * i] : float(v[row + 32 * i]);
      }
    }
    float m2 = m;
    for (int u = 0; u < U; ++u) {
      const float su = moe_simd_sum(s[u]);
      s[u] = (j0 + u < b1) ? su : MOE_NEG_INF;
      m2 = (s[u] > m2) ? s[u] : m2;
    }
    const float a = moe_exp(m - m2);
    l *= a;
    for (int i = 0; i < DPL; ++i) {
      acc[i] *= a;
    }
    for (int u = 0; u < U; ++u) {
      const float p = moe_exp(s[u] - m2);
      l += p;
      for (int i = 0; i < DPL; ++i) {
        acc[i] += p * vv[u][i];
      }
    }
    m = m2;
  }

  threadgroup float tg_m[NSG];
  threadgroup float tg_l[NSG];
  threadgroup float tg_acc[NSG * D];
  if (lane == 0) {
    tg_m[sg] = m;
    tg_l[sg] = l;
  }
  for (int i = 0; i < DPL; ++i) {
    tg_acc[sg * D + lane + 32 * i] = acc[i];
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (sg == 0) {
    float mx_all = MOE_NEG_INF;
    for (int g = 0; g < NSG; ++g) {
      mx_all = (tg_l[g] > 0.0f && tg_m[g] > mx_all) ? tg_m[g] : mx_all;
    }
    float total = 0.0f;
    float o[DPL];
    for (int i = 0; i < DPL; ++i) {
      o[i] = 0.0f;
    }
    for (int g = 0; g < NSG; ++g) {
      const float a = (tg_l[g] > 0.0f) ? moe_exp(tg_m[g] - mx_all) : 0.0f;
      total += tg_l[g] * a;
      for (int i = 0; i < DPL; ++i) {
        o[i] += tg_acc[g * D + lane + 32 * i] * a;
      }
    }
    const size_t at = size_t(h) * S + size_t(sp);
    for (int i = 0; i < DPL; ++i) {
      parts[at * D + lane + 32 * i] = o[i];
    }
    if (lane == 0) {
      ml[at * 2] = mx_all;
      ml[at * 2 + 1] = total;
    }
  }
}
