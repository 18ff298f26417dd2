// Fused MoE router: scores -> selection bias -> (group limit) -> top-k ->
// renormalization -> scaling, one simdgroup (CUDA: warp) per token.
//
// One body for Metal, CUDA (through shims_cuda.h) and the CPU emulation; see
// mlx_moe/kernels/router.py for the calls and mlx_moe/router.py for the
// per-family reference functions this kernel reproduces.
//
// Lane l holds the scores of experts l, l + 32, l + 64, ... (VPL of them).
// Top-k is K rounds of a simdgroup argmax over order-preserving uint keys
// (moe_router_key): the largest key, then the lowest id among the lanes holding it;
// the winner's key is zeroed for the next round.  Ties go to the lower expert id: a
// lane scans its experts in increasing id with a strict `>`, and the second reduction
// takes the lowest id.  The k ids come out in selection order (highest score first).

// ==== helpers ====

// A selection score as a uint whose order is the floats' order (the sign bit flipped for
// positive values, every bit for negative ones; -0.0 keyed as +0.0, so the two tie as the
// floats compare), and 0 -- below every score -- for -inf and NaN, which are never chosen.
// Why keys: a round of top-k is then two 32-lane integer reductions (the top key, then the
// lowest id holding it), one instruction each on sm_80+ (redux.sync), where a float argmax
// with its id is a butterfly of 15 dependent shuffles.  (On the H100 the MoE layer's
// launch time did not move with it: BENCHMARKS.md 2026-12-06, eleventh session.)
MOE_DEVICE inline uint moe_router_key(float v) {
  const uint u = moe_float_bits(v);
  const uint k = (u & 0x80000000u) ? (u == 0x80000000u ? 0x80000000u : ~u) : (u | 0x80000000u);
  return (v > MOE_NEG_INF) ? k : 0u;
}

// The k experts a token's router outputs choose, and their final weights.
template <int K>
struct moe_router_pick {
  int id[K];
  float w[K];
};

// The scores of one token's NEXP router outputs `logits` (device or threadgroup
// memory) by the rule of the kernel below, in the 32 lanes of one simdgroup (every lane
// must call it): lane l gets experts l, l + 32, ... in p (the weights' source:
// probabilities, or the logits for SCORE 2) and c (the selection scores; -inf past NEXP;
// the group limit applied).
template <int NEXP, int VPL, int SCORE, bool HAS_BIAS, int NGROUP, int TOPKG, typename LP, typename BP, typename F>
MOE_DEVICE inline void moe_router_scores(LP logits, BP bias, uint lane, F p, F c) {
  float m = MOE_NEG_INF;
  for (int i = 0; i < VPL; ++i) {
    const int e = int(lane) + 32 * i;
    p[i] = (e < NEXP) ? float(logits[e]) : MOE_NEG_INF;
    m = (p[i] > m) ? p[i] : m;
  }
  if (SCORE == 0) {
    m = moe_simd_max(m);
    float s = 0.0f;
    for (int i = 0; i < VPL; ++i) {
      p[i] = moe_exp(p[i] - m);  // absent experts: exp(-inf) = 0
      s += p[i];
    }
    s = moe_simd_sum(s);
    for (int i = 0; i < VPL; ++i) {
      p[i] = p[i] / s;
    }
  } else if (SCORE == 1) {
    for (int i = 0; i < VPL; ++i) {
      p[i] = 1.0f / (1.0f + moe_exp(-p[i]));
    }
  }
  for (int i = 0; i < VPL; ++i) {
    const int e = int(lane) + 32 * i;
    c[i] = (e < NEXP) ? p[i] + (HAS_BIAS ? bias[e] : 0.0f) : MOE_NEG_INF;
  }

  if (NGROUP > 1) {
    constexpr int GS = NEXP / NGROUP;
    float gscore[NGROUP];
    for (int gi = 0; gi < NGROUP; ++gi) {
      float v = MOE_NEG_INF;
      for (int i = 0; i < VPL; ++i) {
        const int e = int(lane) + 32 * i;
        v = (e < NEXP && e / GS == gi && c[i] > v) ? c[i] : v;
      }
      gscore[gi] = moe_simd_max(v);
    }
    // The TOPKG best groups (same values in every lane, no collectives).
    bool keep[NGROUP];
    for (int gi = 0; gi < NGROUP; ++gi) {
      keep[gi] = false;
    }
    for (int r = 0; r < TOPKG; ++r) {
      int best = -1;
      for (int gi = 0; gi < NGROUP; ++gi) {
        if (!keep[gi] && (best < 0 || gscore[gi] > gscore[best])) {
          best = gi;
        }
      }
      keep[best] = true;
    }
    for (int i = 0; i < VPL; ++i) {
      const int e = int(lane) + 32 * i;
      if (e < NEXP && !keep[e / GS]) {
        c[i] = 0.0f;
        p[i] = 0.0f;
      }
    }
  }
}

// The final weights of the K chosen, from their p in selection order (in place):
// SCORE 2's softmax over them, NORM's division by their sum, times scale.
template <int K, int SCORE, bool NORM, typename W>
MOE_DEVICE inline void moe_router_finish(W sel_w, float scale) {
  if (SCORE == 2) {
    // softmax over the chosen logits; the first chosen is the largest.
    const float top = sel_w[0];
    float s = 0.0f;
    for (int j = 0; j < K; ++j) {
      // a padding slot (fewer finite logits than K) carries -inf: weight 0, as softmax gives it
      sel_w[j] = (sel_w[j] > MOE_NEG_INF) ? moe_exp(sel_w[j] - top) : 0.0f;
      s += sel_w[j];
    }
    for (int j = 0; j < K; ++j) {
      sel_w[j] = sel_w[j] / s;
    }
  }
  float norm = 1.0f;
  if (NORM) {
    float s = 0.0f;
    for (int j = 0; j < K; ++j) {
      s += sel_w[j];
    }
    norm = 1.0f / (s + 1e-20f);
  }
  const float sc = scale * norm;
  for (int j = 0; j < K; ++j) {
    sel_w[j] = sel_w[j] * sc;
  }
}

// The rule of the kernel below on one token's NEXP router outputs `logits`
// (device or threadgroup memory), run by the 32 lanes of one simdgroup (every
// lane must call it; every lane gets the result).  Template parameters as the
// kernel's; scale multiplies the final weights.
template <int NEXP, int K, int VPL, int SCORE, bool HAS_BIAS, int NGROUP, int TOPKG, bool NORM,
          typename LP, typename BP>
MOE_DEVICE inline moe_router_pick<K> moe_router_select(LP logits, BP bias, float scale, uint lane) {
  float p[VPL];  // weights source: probabilities (or logits for SCORE 2)
  float c[VPL];  // selection scores
  moe_router_scores<NEXP, VPL, SCORE, HAS_BIAS, NGROUP, TOPKG>(logits, bias, lane, p, c);

  uint key[VPL];  // c as selection keys: 0 once chosen (and for -inf, NaN, absent experts)
  for (int i = 0; i < VPL; ++i) {
    key[i] = moe_router_key(c[i]);
  }
  moe_router_pick<K> pick;
  // Rolled: unrolled, the rounds keep every chosen id and weight in registers, and the MoE
  // layer's kernel (mul_mv_id_moe) takes 47 registers a thread instead of 40 under nvcc
  // for sm_90a -- 5 of its threadgroups an SM instead of 6.
  MOE_NO_UNROLL
  for (int j = 0; j < K; ++j) {
    uint bk = 0u;  // the lane's best key: its lowest expert id among equal keys (strict >)
    int bi = NEXP;
    float bw = SCORE == 2 ? MOE_NEG_INF : 0.0f;  // a padding slot's p: a weight of 0 after moe_router_finish
    for (int i = 0; i < VPL; ++i) {
      if (key[i] > bk) {
        bk = key[i];
        bi = int(lane) + 32 * i;
        bw = p[i];
      }
    }
    const uint top = moe_simd_max_u32(bk);
    // The lowest id among the lanes holding the top key: the lowest id of that score.
    // (No candidate left: every lane's bi is NEXP, a padding id.)
    const int id = int(moe_simd_min_u32(bk == top ? uint(bi) : 0xFFFFFFFFu));
    pick.id[j] = id;
    pick.w[j] = moe_shuffle(bw, ushort(uint(id) & 31u));  // the winner's lane holds its p
    for (int i = 0; i < VPL; ++i) {
      key[i] = (int(lane) + 32 * i == id) ? 0u : key[i];
    }
  }
  moe_router_finish<K, SCORE, NORM>(pick.w, scale);
  return pick;
}

// ==== kernel: moe_router_topk ====
// Template:
//   T       logits dtype;  NEXP  experts scored (real + identity experts);
//   K       experts chosen per token;  VPL = ceil(NEXP / 32);
//   SCORE   0: softmax over all NEXP (float32), weights = probabilities;
//           1: sigmoid per expert, weights = sigmoids;
//           2: selection on the raw logits, weights = softmax over the k
//              chosen logits (Mixtral);
//   HAS_BIAS  add bias[e] to the selection score only (LongCat's
//           e_score_correction_bias); the weights stay unbiased;
//   NGROUP, TOPKG  group-limited routing (DeepSeek-V2) when NGROUP > 1: the
//           NEXP experts form NGROUP equal contiguous groups, a group's score
//           is its largest selection score, only the TOPKG best groups stay
//           eligible and every other expert's score and weight become 0 (as
//           mlx_moe/router.py's group_limited_topk and transformers do);
//   NORM    divide the k weights by their sum (+1e-20);
//   TPG     tokens (simdgroups) per threadgroup.
// Inputs: logits [T, NEXP], bias [NEXP] float32 (any 1-element array when
// not HAS_BIAS), scale [1] float32 (multiplies the final weights).
// Outputs: ids [T, K] int32, weights [T, K] float32.
// Grid: (ceil(T / TPG) * 32 * TPG, 1, 1), threadgroup (32 * TPG, 1, 1).
{
  const uint lane = thread_index_in_simdgroup;
  const int tok = int(threadgroup_position_in_grid.x) * TPG + int(simdgroup_index_in_threadgroup);
  const int ntok = int(logits_shape[0]);
  if (tok < ntok) {  // uniform per simdgroup: every lane reaches every collective of the rule
    const auto pick = moe_router_select<NEXP, K, VPL, SCORE, HAS_BIAS, NGROUP, TOPKG, NORM>(
        logits + size_t(tok) * NEXP, bias, scale[0], lane);
    if (lane == 0) {
      for (int j = 0; j < K; ++j) {
        ids[size_t(tok) * K + j] = pick.id[j];
        weights[size_t(tok) * K + j] = pick.w[j];
      }
    }
  }
}
