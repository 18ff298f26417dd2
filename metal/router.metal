// Fused MoE router: scores -> selection bias -> (group limit) -> top-k ->
// renormalization -> scaling, one simdgroup (CUDA: warp) per token.
//
// One body for Metal, CUDA (through shims_cuda.h) and the CPU emulation; see
// mlx_moe/kernels/router.py for the calls and mlx_moe/router.py for the
// per-family reference functions this kernel reproduces.
//
// Lane l holds the scores of experts l, l + 32, l + 64, ... (VPL of them).
// Top-k is K rounds of a simdgroup argmax (butterfly over shuffles), the
// winner masked to -inf for the next round.  Ties go to the lower expert id:
// a lane scans its experts in increasing id with a strict `>`, and the
// butterfly keeps the lower id when two scores are equal.  The k ids come out
// in selection order (highest score first).

// ==== helpers ====

// (value, id) a beats (value, id) b: higher value, or equal value and lower id.
MOE_DEVICE inline bool moe_router_beats(float av, int ai, float bv, int bi) {
  return av > bv || (av == bv && ai < bi);
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
//
// moe_router_topk_record (option RECORD) also appends the layer's routing to
// the routing hook's record chain (mlx_moe/hooks.py): input record_in and
// output record_out, uint32 [2 * S * T * K + 1] for S layer slots: slot s's
// ids (int32 bits) at words [s*T*K, (s+1)*T*K), its weights (float32 bits)
// S*T*K words later ([S, T, K] each, as routing_join writes them); the last
// word counts the slots used.  record_out = record_in with this layer in the
// next free slot and the count + 1.  With no free slot nothing but the count
// changes (the host checks it): never a write out of bounds.  MLX outputs are
// new buffers, so every word is copied: the grid may hold more threadgroups
// than tokens need (the extra ones only copy).
{
  const uint lane = thread_index_in_simdgroup;
  const int tok = int(threadgroup_position_in_grid.x) * TPG + int(simdgroup_index_in_threadgroup);
  const int ntok = int(logits_shape[0]);
//@if RECORD
  const uint rec_words = uint(record_in_shape[0]);
  const uint rec_tk = uint(ntok) * uint(K);
  const uint rec_slots = (rec_words - 1u) / (2u * rec_tk);
  const uint rec_slot = record_in[rec_words - 1u];
  const bool rec_room = rec_slot < rec_slots;
  const uint rec_ids = rec_slot * rec_tk;                // this layer's first id word
  const uint rec_wts = (rec_slots + rec_slot) * rec_tk;  // and its first weight word
//@endif
  if (tok < ntok) {  // uniform per simdgroup: every lane reaches every collective below
    float p[VPL];  // weights source: probabilities (or logits for SCORE 2)
    float c[VPL];  // selection scores
    float m = MOE_NEG_INF;
    for (int i = 0; i < VPL; ++i) {
      const int e = int(lane) + 32 * i;
      p[i] = (e < NEXP) ? float(logits[size_t(tok) * NEXP + e]) : MOE_NEG_INF;
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

    int sel_id[K];
    float sel_w[K];
    for (int j = 0; j < K; ++j) {
      float bv = MOE_NEG_INF;
      int bi = NEXP;  // no expert: loses every tie against a real one
      float bw = 0.0f;
      for (int i = 0; i < VPL; ++i) {
        if (c[i] > bv) {
          bv = c[i];
          bi = int(lane) + 32 * i;
          bw = p[i];
        }
      }
      for (ushort off = 16; off > 0; off >>= 1) {
        const float ov = moe_shuffle_xor(bv, off);
        const int oi = moe_shuffle_xor(bi, off);
        const float ow = moe_shuffle_xor(bw, off);
        if (moe_router_beats(ov, oi, bv, bi)) {
          bv = ov;
          bi = oi;
          bw = ow;
        }
      }
      sel_id[j] = bi;
      sel_w[j] = bw;
      for (int i = 0; i < VPL; ++i) {
        c[i] = (int(lane) + 32 * i == bi) ? MOE_NEG_INF : c[i];
      }
    }

    if (SCORE == 2) {
      // softmax over the chosen logits; the first chosen is the largest.
      const float top = sel_w[0];
      float s = 0.0f;
      for (int j = 0; j < K; ++j) {
        sel_w[j] = moe_exp(sel_w[j] - top);
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
    const float sc = scale[0] * norm;
    if (lane == 0) {
      for (int j = 0; j < K; ++j) {
        ids[size_t(tok) * K + j] = sel_id[j];
        weights[size_t(tok) * K + j] = sel_w[j] * sc;
//@if RECORD
        if (rec_room) {
          record_out[rec_ids + uint(tok) * uint(K) + uint(j)] = uint(sel_id[j]);
          record_out[rec_wts + uint(tok) * uint(K) + uint(j)] = moe_float_bits(sel_w[j] * sc);
        }
//@endif
      }
    }
  }
//@if RECORD
  // Every other word of the record, copied by every thread of the grid.
  const uint rec_threads = uint(threadgroups_per_grid.x) * uint(32 * TPG);
  for (uint w = uint(threadgroup_position_in_grid.x) * uint(32 * TPG) + thread_index_in_threadgroup;
       w < rec_words; w += rec_threads) {
    const bool this_layer = rec_room && ((w >= rec_ids && w < rec_ids + rec_tk) ||
                                         (w >= rec_wts && w < rec_wts + rec_tk));
    if (w == rec_words - 1u) {
      record_out[w] = rec_slot + 1u;
    } else if (!this_layer) {
      record_out[w] = record_in[w];
    }
  }
//@endif
}
