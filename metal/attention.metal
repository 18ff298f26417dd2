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
// One threadgroup per query head; its NSG simdgroups take the valid slots
// round-robin, U at a time, each keeping a running max, sum and weighted value sum (the
// online softmax), merged through threadgroup memory at the end.  Lane l holds
// dimensions l, l + 32, ... of the head.

// ==== helpers ====

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
