// Routing join: the (expert ids, routing weights) of every MoE layer of one
// forward pass gathered into one uint32 array, in one launch, for the routing
// hook (mlx_moe/hooks.py): words [0, L*T*k) hold the ids (int32 bits) as
// [L, T, k], words [L*T*k, 2*L*T*k) the weights (float32 bits); one array,
// so the host reads one buffer per forward pass.
//
// Why: on MLX's CUDA backend, reading a device array from the host moves it to
// newly allocated unified memory (cudaMallocManaged + a synchronous cudaMemcpy,
// mlx/backend/cuda/allocator.cpp, Buffer::raw_ptr), per array: 96 per token at
// 48 layers.  MLX's concatenate is one copy launch per input.  This kernel is
// one launch, and the host then reads one array (hooks.join_flavor, on by
// default on CUDA; on Metal and the CPU the per-layer arrays are host memory
// already).  Even one read per token cost the generating thread 0.2-0.3 ms on
// the H100, so the hook uses the record-chain variant below: one read per
// several forward passes.
//
// The inputs are per layer (ids0..ids{L-1}, weights0..weights{L-1}), so the
// body is expanded per layer count by mlx_moe/kernels/registry.py: a line
// PER_LAYER(text) becomes L copies of text with every @ replaced by 0..L-1.

// ==== helpers ====

// ==== kernel: routing_join ====
// Template: NL layers; N = T * k values per layer; TG threads per threadgroup.
// Inputs ids@ [T, k] (any integer type), weights@ [T, k] (any float type);
// output out uint32 [>= 2 * NL * N] (words past 2 * NL * N are not written).
// One thread per (layer, value).
//
// routing_join_record (option RECORD) writes into the routing hook's record
// chain instead: input record_in, output record_out, uint32 [2 * S * N + 1]
// for S layer slots: slot s's ids at words [s*N, (s+1)*N), its weights S*N
// words later ([S, T, k] each, the packed layout above for S layers), the
// last word counts the slots used.  The NL layers go to slots count ..
// count + NL - 1 (those past S are dropped: never a write out of bounds),
// every other word is copied (MLX outputs are new buffers), the count grows
// by NL.  One chain spans several forward passes, so the host reads one
// array per several tokens (mlx_moe/hooks.py).  Threads stride over the grid,
// which covers the chain's words as well as the NL * N values.
    const uint first = threadgroup_position_in_grid.x * uint(TG) + thread_index_in_threadgroup;
//@if !RECORD
    const uint i = first;
    if (i >= uint(NL * N)) return;
    const uint l = i / uint(N);
    const uint j = i - l * uint(N);
    switch (l) {
    PER_LAYER(case @: out[i] = uint(int(ids@[j])); out[NL * N + i] = moe_float_bits(float(weights@[j])); break;)
    default: break;
    }
//@endif
//@if RECORD
    const uint words = uint(record_in_shape[0]);
    const uint slots = (words - 1u) / (2u * uint(N));
    const uint slot0 = record_in[words - 1u];
    const uint lo = (slot0 < slots ? slot0 : slots) * uint(N);  // ids words this launch writes: [lo, hi)
    const uint hi = (slot0 + uint(NL) < slots ? slot0 + uint(NL) : slots) * uint(N);
    const uint wts = slots * uint(N);  // first weight word
    const uint stride = uint(threadgroups_per_grid.x) * uint(TG);
    for (uint w = first; w < words; w += stride) {
      const bool written = (w >= lo && w < hi) || (w >= wts + lo && w < wts + hi);
      if (w == words - 1u) {
        record_out[w] = slot0 + uint(NL);
      } else if (!written) {
        record_out[w] = record_in[w];
      }
    }
    for (uint i = first; i < uint(NL * N); i += stride) {
      const uint l = i / uint(N);
      const uint j = i - l * uint(N);
      if (slot0 + l < slots) {
        uint id_bits = 0u;
        uint w_bits = 0u;
        switch (l) {
        PER_LAYER(case @: id_bits = uint(int(ids@[j])); w_bits = moe_float_bits(float(weights@[j])); break;)
        default: break;
        }
        record_out[(slot0 + l) * uint(N) + j] = id_bits;
        record_out[wts + (slot0 + l) * uint(N) + j] = w_bits;
      }
    }
//@endif
