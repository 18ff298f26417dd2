// Metal side of the shims the shared kernel bodies in metal/*.metal use.
//
// The bodies are written in Metal (attribute names such as
// thread_index_in_simdgroup, `threadgroup` arrays, threadgroup_barrier) and
// call the moe_* helpers below for everything whose spelling differs between
// Metal and CUDA.  shims_cuda.h defines the same names for CUDA.  Helper names
// carry a moe_ prefix: on CUDA the bodies live in namespace mlx::core::cu,
// where unprefixed names could resolve to MLX's own functions first.

// Sum over the 32 lanes of a simdgroup; every lane gets the result.
inline float moe_simd_sum(float v) {
  return simd_sum(v);
}

// fp16 bits (a Q4_0 block's scale word) to float.
inline float moe_f16_bits(ushort b) {
  return float(as_type<half>(b));
}

// SwiGLU's activation in float32.  For g -> -inf, exp(-g) -> +inf and the
// quotient is -0, never NaN.
inline float moe_silu(float g) {
  return g / (1.0f + metal::exp(-g));
}

// -- SIMD collectives for the prefill map and the router (mul_mm_id.metal,
// router.metal).  Every lane of the simdgroup must reach each call.

// Integer sum over the 32 lanes.
inline int moe_simd_sum_int(int v) {
  return simd_sum(v);
}

// Max over the 32 lanes.
inline float moe_simd_max(float v) {
  return simd_max(v);
}

// Max and min of a uint over the 32 lanes (the router's selection keys).
inline uint moe_simd_max_u32(uint v) {
  return simd_max(v);
}
inline uint moe_simd_min_u32(uint v) {
  return simd_min(v);
}

// Exclusive prefix sum over lanes 0..lane-1.
inline int moe_simd_prefix_exclusive_sum(int v) {
  return simd_prefix_exclusive_sum(v);
}

// Bit l set when lane l's predicate holds (a simdgroup is 32 lanes wide).
inline uint moe_ballot(bool pred) {
  return uint(static_cast<ulong>(simd_ballot(pred)));
}

inline int moe_popcount(uint v) {
  return int(popcount(v));
}

// Lane `lane ^ mask`'s value.
inline float moe_shuffle_xor(float v, ushort mask) {
  return simd_shuffle_xor(v, mask);
}
inline int moe_shuffle_xor(int v, ushort mask) {
  return simd_shuffle_xor(v, mask);
}

// Lane `src`'s value.
inline float moe_shuffle(float v, ushort src) {
  return simd_shuffle(v, src);
}

inline float moe_exp(float v) {
  return metal::exp(v);
}

inline float moe_log(float v) {
  return metal::precise::log(v);
}

// a * b + c with one rounding.
inline float moe_fma(float a, float b, float c) {
  return metal::fma(a, b, c);
}

// -infinity (masked and absent scores in the router).
#define MOE_NEG_INF (as_type<float>(0xff800000u))

// Marks helper functions of the shared bodies as device code (nothing to say on Metal).
#define MOE_DEVICE

// A helper CUDA keeps out of line (shims_cuda.h says why); inlined as any other here.
#define MOE_OUT_OF_LINE inline

// -- Decode GEMV helpers (mul_mv_id.metal).

// A float's bits as a float (the 0x4B000000 magic-number conversion of small
// integers: as_float(0x4B000000 | n) == 2^23 + n for n < 2^23).
inline float moe_as_float(uint b) {
  return as_type<float>(b);
}

// v, kept from the compiler's constant folding where that would undo a
// hand-shared operation (see shims_cuda.h); Metal has no such barrier: v as is.
inline uint moe_opaque(uint v) {
  return v;
}

// L2 prefetch of the line holding *p (shims_cuda.h).  Metal has no prefetch: the read
// is dead code a compiler drops; under the CPU emulation it bounds-checks p.
template <typename P>
inline void moe_prefetch_l2(P p) {
  const auto v = *p;
  (void)v;
}

// L1 prefetch (shims_cuda.h): none on Metal, as moe_prefetch_l2.
template <typename P>
inline void moe_prefetch_l1(P p) {
  const auto v = *p;
  (void)v;
}

// A clock for mul_mv_id_moe's TRACE option: Metal has no global timer a kernel reads, so
// 0 (traces are CUDA's; tools/trace_moe_layer.py).
inline uint moe_clock_ns() {
  return 0u;
}

// A float's bits as a uint (the routing join packs weights beside ids).
inline uint moe_float_bits(float v) {
  return as_type<uint>(v);
}

// Full unrolling of a loop with a compile-time trip count (lets the compiler
// issue every load of the loop before the first use).  Ignored by the CPU emulation.
#define MOE_UNROLL _Pragma("clang loop unroll(full)")
#define MOE_NO_UNROLL _Pragma("clang loop unroll(disable)")

// -- Dense GEMV and decode-layer helpers (decode_layer.metal).

// The 16 bytes at index i (in 16-byte units) of a buffer (16-byte aligned).
template <typename P>
inline uint4 moe_load_u4(P p, size_t i) {
  return reinterpret_cast<const device uint4*>(p)[i];
}

// Two float32 values at p (device memory, 8-byte aligned) in one load.
template <typename P>
inline float2 moe_load_f2(P p) {
  return *reinterpret_cast<const device float2*>(p);
}

// Two bfloat16 values at p (device memory, 4-byte aligned) in one 32-bit load, as
// floats: a bfloat16 is a float's upper half (p[0] in the word's low 16 bits).
template <typename P>
inline float2 moe_load_bf2(P p) {
  const uint w = *reinterpret_cast<const device uint*>(p);
  return float2(moe_as_float(w << 16), moe_as_float(w & 0xFFFF0000u));
}

// Threadgroup memory viewed as another element type (a 16-byte-aligned staging
// buffer declared as uint4, read as weights).
template <typename T, typename U>
inline threadgroup T* moe_tg_as(threadgroup U* p) {
  return (threadgroup T*)p;
}

inline float moe_rsqrt(float v) {
  return metal::precise::rsqrt(v);
}

inline float moe_exp2(float v) {
  return metal::precise::exp2(v);
}

inline float moe_cos(float v) {
  return metal::precise::cos(v);
}

inline float moe_sin(float v) {
  return metal::precise::sin(v);
}

// An input the kernel also writes: the fused decode step's KV cache, whose new
// slot the attention kernel stores in place (a KernelSpec's `inplace` inputs,
// mlx_moe/kernels/registry.py).  MLX declares every input const; the cache is
// owned by the compiled step and read by no other node of it.
template <typename T>
inline device T* moe_inplace(const device T* p) {
  return (device T*)p;
}

// A launch's last threadgroup (dense_residual's ROUTER option): each threadgroup
// fences its device writes, then takes a ticket from a counter (a uint input the
// kernel also writes, zero between launches); the one holding the last ticket sees
// every other threadgroup's writes after its own fence, and zeroes the counter.
inline void moe_device_fence() {
  atomic_thread_fence(mem_flags::mem_device, memory_order_seq_cst, thread_scope_device);
}
// (see shims_cuda.h) Metal's memory model does not say that a barrier and one thread's
// fence order the other threads' device accesses: every thread fences here.
struct moe_fence_one {
  enum { ON = 0 };
};
struct moe_handoff_one {
  enum { ON = 0 };
};
inline uint moe_ticket(const device uint* count) {
  return atomic_fetch_add_explicit((device atomic_uint*)count, 1u, memory_order_relaxed);
}
inline void moe_ticket_reset(const device uint* count) {
  atomic_store_explicit((device atomic_uint*)count, 0u, memory_order_relaxed);
}

// Waits until a counter other threadgroups of the launch bump (moe_ticket) reaches n:
// the one-launch MoE layer's down threadgroups waiting for its gate/up ones.  Sound
// only where the GPU starts a launch's threadgroups in index order and the counted
// ones come first (a waiting threadgroup then never holds a core one it waits for has
// yet to get): KernelSpec.in_order marks the kernels that lean on it.  The caller
// fences after it (moe_device_fence) before reading what the others wrote.
inline void moe_wait_count(const device uint* count, uint n) {
  while (atomic_load_explicit((device atomic_uint*)count, memory_order_relaxed) < n) {
  }
}
