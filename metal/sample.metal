// Greedy sampling of one token's logits in one launch: the log-sum-exp of the
// logits and the first index of the largest log-probability, as mlx-lm's
// generate_step computes them with MLX's ops,
//     lse = logsumexp(logits);  logprobs = logits - lse;  token = argmax(logprobs),
// logprobs rounded to the logits' type T before the argmax (so two logits that
// round to one log-probability tie, and the first wins, as in MLX's argmax).
//
// Why: on the H100 MLX's logsumexp, subtraction and argmax over Qwen3's 151936
// logits took 17.0 + 6.6 + 27.6 us of a decode step's GPU time (three launches,
// each of one row; BENCHMARKS.md 2026-12-06, fourth session) and three graph
// nodes of host time.  Here every threadgroup reduces a slice and the last one
// finishes, in one launch; the log-probabilities themselves are left to the
// caller (mlx_moe/compiled.py computes them lazily, for whoever reads them).

// ==== helpers ====
//@uses decode_layer  (moe_tg_sum, moe_tg_max)

// s * exp(m - mm), 0 for an empty share (m = -inf): one term of a log-sum-exp
// whose shares (max m, sum of exp(v - m)) are rescaled to the common max mm.
MOE_DEVICE inline float moe_lse_term(float m, float s, float mm) {
  return (m == MOE_NEG_INF) ? 0.0f : s * moe_exp(m - mm);
}

// The better of two (key, index) candidates of an argmax: the larger key, the
// smaller index on a tie (NaN keys never win: every comparison with them fails).
MOE_DEVICE inline bool moe_argmax_better(float k2, int i2, float k1, int i1) {
  return k2 > k1 || (k2 == k1 && i2 < i1);
}

struct moe_best {
  float v;
  int i;
};

// The best (key, index) over the threadgroup's NSG simdgroups (moe_argmax_better),
// returned to every thread.  rv, ri: threadgroup float[NSG], int[NSG] (reused: the
// function begins with a barrier).
template <int NSG, typename RV, typename RI>
MOE_DEVICE inline moe_best moe_tg_argmax(float v, int i, RV rv, RI ri, uint lane, uint sg) {
  for (ushort off = 16; off > 0; off >>= 1) {
    const float ov = moe_shuffle_xor(v, off);
    const int oi = moe_shuffle_xor(i, off);
    if (moe_argmax_better(ov, oi, v, i)) {
      v = ov;
      i = oi;
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (lane == 0) {
    rv[sg] = v;
    ri[sg] = i;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  moe_best b;
  b.v = rv[0];
  b.i = ri[0];
  for (int g = 1; g < NSG; ++g) {
    if (moe_argmax_better(rv[g], ri[g], b.v, b.i)) {
      b.v = rv[g];
      b.i = ri[g];
    }
  }
  return b;
}

// ==== kernel: greedy_sample ====
// Template: T (the logits' type), V (logits), NT (threads per threadgroup, a
// multiple of 32), NTG (threadgroups: the grid).
// Inputs: logits [V] (T); count uint32 [4 + 2 * NTG] (written: a ticket counter in
//   word 0, zero between launches, then each threadgroup's share as float bits;
//   mlx_moe/kernels/sample.py counter_words).
// Outputs: token int32 [1] (the first index of the largest T(logits - T(lse)); 0 if
//   every logit is NaN), lse [1] (T).
// Threadgroup g reduces logits [g * C, (g + 1) * C), C = ceil(V / NTG), to its max
// m and sum of exp(v - m); the last to finish combines the NTG shares in a fixed
// order (deterministic) and finds the token in the one slice that holds it (step 3).
// Grid: (NTG * NT, 1, 1), threadgroup (NT, 1, 1).
{
  constexpr int NSG = NT / 32;
  constexpr int C = (V + NTG - 1) / NTG;  // logits per threadgroup
  constexpr int IPT = (C + NT - 1) / NT;  // per thread
  threadgroup float rm[NSG];
  threadgroup float rs[NSG];
  threadgroup int ri[NSG];
  threadgroup uint ticket[1];
  const uint lane = thread_index_in_simdgroup;
  const uint sg = simdgroup_index_in_threadgroup;
  const int tid = int(thread_index_in_threadgroup);
  const int g = int(threadgroup_position_in_grid.x);
  const int hi = (g + 1) * C < V ? (g + 1) * C : V;

  // 1. This threadgroup's share: max and sum of exp over its slice.
  float v[IPT];
  float m = MOE_NEG_INF;
  MOE_UNROLL
  for (int k = 0; k < IPT; ++k) {
    const int i = g * C + tid + k * NT;
    v[k] = (i < hi) ? float(logits[i]) : MOE_NEG_INF;
    m = v[k] > m ? v[k] : m;
  }
  m = moe_tg_max<NSG>(m, rm, lane, sg);
  float s = 0.0f;
  MOE_UNROLL
  for (int k = 0; k < IPT; ++k) {
    s += (m == MOE_NEG_INF) ? 0.0f : moe_exp(v[k] - m);
  }
  s = moe_tg_sum<NSG>(s, rs, lane, sg);
  const auto share = moe_inplace(count) + 4;  // after the ticket's 16 bytes
  if (tid == 0) {
    share[2 * g] = moe_float_bits(m);
    share[2 * g + 1] = moe_float_bits(s);
  }
  moe_device_fence();
  threadgroup_barrier(mem_flags::mem_device | mem_flags::mem_threadgroup);
  if (tid == 0) {
    ticket[0] = moe_ticket(count);
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (ticket[0] != uint(NTG) - 1u) {  // uniform per threadgroup
    return;
  }
  moe_device_fence();

  // 2. The last threadgroup: lse from the shares, in threadgroup order.
  float mm = MOE_NEG_INF;
  for (int j = tid; j < NTG; j += NT) {
    const float mj = moe_as_float(share[2 * j]);
    mm = mj > mm ? mj : mm;
  }
  mm = moe_tg_max<NSG>(mm, rm, lane, sg);
  float st = 0.0f;
  for (int j = tid; j < NTG; j += NT) {
    st += moe_lse_term(moe_as_float(share[2 * j]), moe_as_float(share[2 * j + 1]), mm);
  }
  st = moe_tg_sum<NSG>(st, rs, lane, sg);
  const T lt = T(mm + moe_log(st));
  const float c = float(lt);

  // 3. The token.  T(v - c) does not decrease with v, so the largest key is the largest
  // logit's, F = T(mm - c), and the token is the first index whose key is F.  A slice
  // holds such an index iff its max maps to F, so the token lies in the first slice whose
  // max does: only that slice is scanned.  (Scanning every logit here is ~20 PTX
  // instructions a logit on one multiprocessor: an estimated ~13 us of the launch's 22 on
  // the H100, BENCHMARKS.md 2026-12-06, fifth session.)  F is NaN where lse is (no finite logit, or
  // an infinite one): no key equals it, and the token is 0, as no key won the scan.
  const float F = float(T(mm - c));
  float hit = MOE_NEG_INF;
  int hj = NTG;
  for (int j = tid; j < NTG; j += NT) {
    if (float(T(moe_as_float(share[2 * j]) - c)) == F) {
      hit = 0.0f;
      hj = j;
      break;  // this thread's later slices come after j
    }
  }
  const int js = moe_tg_argmax<NSG>(hit, hj, rm, ri, lane, sg).i;  // the first such slice, or NTG
  float best = MOE_NEG_INF;
  int bi = V;  // none yet: the first non-NaN key takes its place
  if (js < NTG) {  // uniform
    const int end = (js + 1) * C < V ? (js + 1) * C : V;
    for (int i = js * C + tid; i < end; i += NT) {
      const float key = float(T(float(logits[i]) - c));
      if (moe_argmax_better(key, i, best, bi)) {
        best = key;
        bi = i;
      }
    }
  }
  const moe_best b = moe_tg_argmax<NSG>(best, bi, rm, ri, lane, sg);
  if (tid == 0) {
    token[0] = b.i < V ? b.i : 0;
    lse[0] = lt;
    moe_ticket_reset(count);
  }
}
