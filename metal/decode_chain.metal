// Chains of the fused decoder layer's launches run as one launch: later kernels'
// threadgroups wait inside the launch for the earlier ones they read from, so the
// graph has one node where it had several (decode is bound by the host's cost per
// node, ~2.5 us on the H100's encoder: BENCHMARKS.md), and the later threadgroups
// start while the earlier ones drain.  The bodies are the kernels' own (`//@body`
// lines: mlx_moe/kernels/registry.py), unchanged but for how a chained body learns
// its threadgroup's index.
//
// The wait is sound where the GPU starts a launch's threadgroups in index order (a
// waiting threadgroup never holds a core that one it waits for has yet to get), as
// NVIDIA's do: KernelSpec.in_order, and the CPU emulation runs these kernels'
// threadgroups in index order; Apple documents no such order, so these kernels are
// for CUDA (mlx_moe/fused_step.py QKV_ATTENTION_ONE_LAUNCH, ATTENTION_ONE_LAUNCH,
// OPROJ_MOE_ONE_LAUNCH), as mul_mv_id_moe.

// ==== helpers ====
//@uses decode_layer  (the chained bodies' helpers)
//@uses attention
//@uses mul_mv_id

// ==== kernel: qkv_attention ====
// dense_norm (the input RMSNorm and the stacked q/k/v projections) then
// decode_attention_parts_kv (per-head q/k norms, RoPE, the new key and value into
// the cache in place, attention in S splits per head), in one launch.
// Threadgroups [0, NQKV) run dense_norm's body (NQKV = ceil((N0 + N1 + N2) / (NR * NSG))),
// write their rows of y, fence and count themselves on count[0]; threadgroups
// [NQKV, NQKV + S * HQ) ask L2 for the cache lines they will read
// (moe_attention_prefetch), wait until count[0] = NQKV, then run the attention's body for
// split (i - NQKV) % S of head (i - NQKV) / S; the last of them to finish zeroes the
// counters for the next launch.
// Template: dense_norm's (T, FMT, GS, K, N0, N1, N2, NR, HAS_BIAS) and
//   decode_attention_parts's (D, HQ, HKV, C, U, S, QKNORM, TRAD); NSG, the simdgroups
//   of every threadgroup, is both kernels'.
// Inputs: dense_norm's (x .. b2, cst: its eps), the attention's (q_norm, k_norm, k, v,
//   pos, acst: its cst), count uint32 [4] (written: zero between launches).  k, v and
//   count are written in place.
// Outputs: y [N0 + N1 + N2] (T: the projections), parts [HQ, S, D], ml [HQ, S, 2] float32.
// Grid: ((NQKV + S * HQ) * 32 * NSG, 1, 1), threadgroup (32 * NSG, 1, 1).
{
  constexpr int NQKV = (N0 + N1 + N2 + NR * NSG - 1) / (NR * NSG);
  constexpr int NATT = S * HQ;
  if (int(threadgroup_position_in_grid.x) < NQKV) {
//@body decode_layer/dense_norm
    moe_release_ticket<moe_handoff_one::ON>(count, thread_index_in_threadgroup == 0);  // the rows of y
    return;
  }
  const int att_tg = int(threadgroup_position_in_grid.x) - NQKV;
  moe_attention_prefetch<T, D, HQ, HKV, C, S>(k, v, pos, att_tg, int(thread_index_in_threadgroup), 32 * NSG);
  moe_acquire_wait<moe_handoff_one::ON>(count, uint(NQKV), thread_index_in_threadgroup == 0);  // every row of y
  {
    const auto cst = acst;  // the attention body's constants
//@body attention/decode_attention_parts KV CHAINED
  }
  if (thread_index_in_threadgroup == 0 && moe_ticket(count + 1) == uint(NATT - 1)) {
    moe_ticket_reset(count);
    moe_ticket_reset(count + 1);
  }
}

// ==== kernel: qkv_attention_oproj ====
// qkv_attention's two parts, then dense_residual_parts_router_split (o_proj over the
// attention's splits, the residual add, the post-attention RMSNorm and the router
// projection shared by every threadgroup, the last one adding the shares), in one
// launch: the decoder layer's attention block, one graph node.  Why: o_proj's own
// launch is a chain of dependent latencies (ncu on the H100: 14.1 us a layer for 4 MB,
// 64 threadgroups, its multiprocessors active half of it, BENCHMARKS.md 2026-12-06,
// sixth session); chained, its threadgroups issue their weight rows (the whole row at
// NRO = 2), residuals and router words before they wait, while the attention runs.
// Threadgroups [0, NQKV) and [NQKV, NQKV + NATT) are qkv_attention's; the attention's
// fence their parts and ml and count themselves on count[1]; threadgroups
// [NQKV + NATT, NQKV + NATT + NOP) (NOP = ceil(NO / (NRO * NSG))) run the o_proj body
// as its threadgroup i - NQKV - NATT, waiting inside it for count[1] = NATT; the last
// of them to finish zeroes count[0..2] (each has passed its wait by then).
// Template: qkv_attention's (T, FMT, GS, K, N0, N1, N2, NR, NSG, HAS_BIAS, D, HQ, HKV,
//   C, U, S, QKNORM, TRAD), and dense_residual's under other names where the two
//   projections differ: FMTO, GSO (o_proj's format), KO (= HQ * D), NO (= K), NRO (its
//   rows per simdgroup), and HD (= D), RFMT, RGS, RE, RNR.
// Inputs: qkv_attention's (x .. acst, count uint32 [4]: its words 0..2 used, zero between
//   launches), then o_proj's weight ow, ow_s, ow_b, the post-attention norm's gpost, the
//   router wr, wr_s, wr_b, ocst float32 [4] (eps first), ocount (the split tail's
//   counter with its shares, dense.tail_counter_words at NRO x NSG).  x is the residual.
// Outputs: y, parts, ml (qkv_attention's), out, xn, logits (dense_residual's).
// Grid: ((NQKV + S * HQ + NOP) * 32 * NSG, 1, 1), threadgroup (32 * NSG, 1, 1).
{
  constexpr int NQKV = (N0 + N1 + N2 + NR * NSG - 1) / (NR * NSG);
  constexpr int NATT = S * HQ;
  constexpr int NOP = (NO + NRO * NSG - 1) / (NRO * NSG);
  const int tg_all = int(threadgroup_position_in_grid.x);
  if (tg_all < NQKV) {
//@body decode_layer/dense_norm
    moe_release_ticket<moe_handoff_one::ON>(count, thread_index_in_threadgroup == 0);  // the rows of y
    return;
  }
  if (tg_all < NQKV + NATT) {
    const int att_tg = tg_all - NQKV;
    moe_attention_prefetch<T, D, HQ, HKV, C, S>(k, v, pos, att_tg, int(thread_index_in_threadgroup), 32 * NSG);
    moe_acquire_wait<moe_handoff_one::ON>(count, uint(NQKV), thread_index_in_threadgroup == 0);  // every row of y
    {
      const auto cst = acst;  // the attention body's constants
//@body attention/decode_attention_parts KV CHAINED
    }
    moe_release_ticket<moe_handoff_one::ON>(count + 1, thread_index_in_threadgroup == 0);  // its parts and ml
    return;
  }
  const int o_tg = tg_all - NQKV - NATT;
  const auto chain_count = count + 1;  // the body waits for every attention threadgroup's count
  const uint chain_n = uint(NATT);
  {
    const auto w = ow;
    const auto w_s = ow_s;
    const auto w_b = ow_b;
    const auto res = x;
    const auto cst = ocst;
    const auto count = ocount;
//@body decode_layer/dense_residual PARTS ROUTER RSPLIT CHAINED FMT=FMTO GS=GSO K=KO N=NO NR=NRO
  }
  if (thread_index_in_threadgroup == 0 && moe_ticket(count + 2) == uint(NOP - 1)) {
    moe_ticket_reset(count);
    moe_ticket_reset(count + 1);
    moe_ticket_reset(count + 2);
  }
}

// ==== kernel: oproj_moe ====
// dense_residual_parts_router_split (o_proj over the attention's splits, the residual
// add, the post-attention RMSNorm and the router projection shared by every threadgroup,
// the last one adding the shares) then mul_mv_id_moe (the routing rule, the routed
// experts' gate/up, down, combine and residual add), in one launch.
// Threadgroups [0, NO) run the o_proj body (NO = ceil(N / (NR * NSG))), then count
// themselves on ccount[0]: the last one's count comes after its tail (xn, logits), so
// ccount[0] = NO says every output of that part is written.  Threadgroups [NO, NO + NMOE)
// wait for it, then run mul_mv_id_moe's body as its threadgroup i - NO, with xn as its
// input x and o_proj's output as its residual; the last of them to pass the wait
// zeroes ccount (all have read it by then).  A model with a shared expert (Qwen2-MoE)
// adds MLX ops between the two parts and keeps two launches.
// Template: dense_residual's (T, FMT, GS, K, N, NR, NSG, HD, S, RFMT, RGS, RE, RNR) and
//   mul_mv_id_moe's (WT, D, F, NE, NI, KS, NT, NRG, NRD, NQ, STAGE and the routing
//   rule's); NSG, the simdgroups of every threadgroup, is both kernels'.
// Inputs: dense_residual_parts_router_split's (parts .. cst, count: its counter with the
//   shares), mul_mv_id_moe's (bias, scale, wg, wu, wd, mcount: its counter), ccount
//   uint32 [4] (written: zero between launches).  The counters are written in place.
// Outputs: out, xn, logits (o_proj's), h, ids, weights, y (the MoE layer's).
// Grid: ((NO + NMOE) * 32 * NSG, 1, 1), threadgroup (32 * NSG, 1, 1).
{
  constexpr int NO = (N + NR * NSG - 1) / (NR * NSG);
  constexpr int NMOE = (F + NRG * NSG - 1) / (NRG * NSG) * NT * KS + (D + NRD - 1) / NRD * NT;
  if (int(threadgroup_position_in_grid.x) < NO) {
//@body decode_layer/dense_residual PARTS ROUTER RSPLIT
    // its rows of out (the last one's: after its tail's xn and logits)
    moe_release_ticket<moe_handoff_one::ON>(ccount, thread_index_in_threadgroup == 0);
    return;
  }
  const int moe_tg = int(threadgroup_position_in_grid.x) - NO;
  moe_acquire_wait<moe_handoff_one::ON>(ccount, uint(NO), thread_index_in_threadgroup == 0);  // out, xn, logits
  if (thread_index_in_threadgroup == 0 && moe_ticket(ccount + 1) == uint(NMOE - 1)) {  // the last past the wait
    moe_ticket_reset(ccount);
    moe_ticket_reset(ccount + 1);
  }
  {
    const auto x = xn;     // the experts' input: the post-attention norm
    const auto res = out;  // their residual: o_proj's output
    const auto count = mcount;
//@body mul_mv_id/mul_mv_id_moe CHAINED
  }
}
