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
// for CUDA (mlx_moe/fused_step.py QKV_ATTENTION_ONE_LAUNCH), as mul_mv_id_moe.

// ==== helpers ====
//@uses decode_layer  (the chained bodies' helpers)
//@uses attention

// ==== kernel: qkv_attention ====
// dense_norm (the input RMSNorm and the stacked q/k/v projections) then
// decode_attention_parts_kv (per-head q/k norms, RoPE, the new key and value into
// the cache in place, attention in S splits per head), in one launch.
// Threadgroups [0, NQKV) run dense_norm's body (NQKV = ceil((N0 + N1 + N2) / (NR * NSG))),
// write their rows of y, fence and count themselves on count[0]; threadgroups
// [NQKV, NQKV + S * HQ) wait until count[0] = NQKV, then run the attention's body for
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
    moe_device_fence();  // this thread's rows of y, before the count says they are there
    threadgroup_barrier(mem_flags::mem_device);
    if (thread_index_in_threadgroup == 0) {
      moe_ticket(count);
    }
    return;
  }
  const int att_tg = int(threadgroup_position_in_grid.x) - NQKV;
  if (thread_index_in_threadgroup == 0) {
    moe_wait_count(count, uint(NQKV));
  }
  threadgroup_barrier(mem_flags::mem_device | mem_flags::mem_threadgroup);
  moe_device_fence();  // every thread's reads of y after the wait
  {
    const auto cst = acst;  // the attention body's constants
//@body attention/decode_attention_parts KV CHAINED
  }
  if (thread_index_in_threadgroup == 0 && moe_ticket(count + 1) == uint(NATT - 1)) {
    moe_ticket_reset(count);
    moe_ticket_reset(count + 1);
  }
}
