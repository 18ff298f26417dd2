// CUDA side of the shims: lets the Metal-dialect bodies of metal/*.metal
// compile under mx.fast.cuda_kernel (NVRTC, body inside namespace
// mlx::core::cu, this header in the global namespace before it).
//
// Kernels are launched with one-dimensional threadgroups (blocks) of
// 32 * n_simdgroups threads, so lane and simdgroup come from threadIdx.x.
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#define thread_index_in_simdgroup (threadIdx.x & 31u)
#define simdgroup_index_in_threadgroup (threadIdx.x >> 5)
#define thread_index_in_threadgroup (threadIdx.x)
#define threadgroup_position_in_grid (blockIdx)
#define threadgroups_per_grid (gridDim)
#define threadgroup __shared__
#define threadgroup_barrier(flags) __syncthreads()

typedef unsigned short ushort;
typedef unsigned int uint;

// Full-warp butterfly sum.  Every lane of the warp must reach the call: the
// bodies never return early before a reduction, they guard instead.
__device__ inline float moe_simd_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}

__device__ inline float moe_f16_bits(ushort b) {
  return __half2float(__ushort_as_half(b));
}

__device__ inline float moe_silu(float g) {
  return g / (1.0f + expf(-g));
}

// -- SIMD collectives for the prefill map and the router (mul_mm_id.metal,
// router.metal).  Full-mask: every lane of the warp must reach each call.

__device__ inline int moe_simd_sum_int(int v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}

__device__ inline float moe_simd_max(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  }
  return v;
}

// Max and min of a uint over the 32 lanes (the router's selection keys): one redux.sync
// on sm_80 and later (where a shuffle butterfly is five dependent shuffles), the
// butterfly before.
__device__ inline uint moe_simd_max_u32(uint v) {
#if __CUDA_ARCH__ >= 800
  return __reduce_max_sync(0xffffffffu, v);
#else
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    v = max(v, __shfl_xor_sync(0xffffffffu, v, offset));
  }
  return v;
#endif
}
__device__ inline uint moe_simd_min_u32(uint v) {
#if __CUDA_ARCH__ >= 800
  return __reduce_min_sync(0xffffffffu, v);
#else
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    v = min(v, __shfl_xor_sync(0xffffffffu, v, offset));
  }
  return v;
#endif
}

// Exclusive prefix sum over lanes 0..lane-1 (Kogge-Stone on the inclusive sum).
__device__ inline int moe_simd_prefix_exclusive_sum(int v) {
  const int lane = int(threadIdx.x & 31u);
  int s = v;
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const int o = __shfl_up_sync(0xffffffffu, s, offset);
    s += (lane >= offset) ? o : 0;
  }
  return s - v;
}

__device__ inline uint moe_ballot(bool pred) {
  return __ballot_sync(0xffffffffu, pred);
}

__device__ inline int moe_popcount(uint v) {
  return __popc(v);
}

__device__ inline float moe_shuffle_xor(float v, ushort mask) {
  return __shfl_xor_sync(0xffffffffu, v, int(mask));
}
__device__ inline int moe_shuffle_xor(int v, ushort mask) {
  return __shfl_xor_sync(0xffffffffu, v, int(mask));
}

__device__ inline float moe_shuffle(float v, ushort src) {
  return __shfl_sync(0xffffffffu, v, int(src));
}

__device__ inline float moe_exp(float v) {
  return expf(v);
}

__device__ inline float moe_log(float v) {
  return logf(v);
}

__device__ inline float moe_fma(float a, float b, float c) {
  return fmaf(a, b, c);
}

// -infinity (masked and absent scores in the router).
#define MOE_NEG_INF (-__int_as_float(0x7f800000))

// Marks helper functions of the shared bodies as device code.  NVRTC (MLX's
// cuda_kernel) compiles with --device-as-default-execution-space and would not
// need it; nvcc (tests/test_kernels_cuda_compile.py) does.
#define MOE_DEVICE __device__

// A helper kept out of line: its registers are allocated apart from its caller's (a
// kernel at its register wall calls it where inlining it would push the caller over).
#define MOE_OUT_OF_LINE __device__ __noinline__

// -- Decode GEMV helpers (mul_mv_id.metal); see shims_metal.h.
__device__ inline float moe_as_float(uint b) {
  return __uint_as_float(b);
}
// v, opaque to the optimizer (an empty asm): the dense GEMVs OR the 0x4B000000
// magic into a half-word once and then take each element with one AND; seeing the
// constants, NVCC/NVRTC rewrite each element back into an AND and an OR.
__device__ inline uint moe_opaque(uint v) {
  asm("" : "+r"(v));
  return v;
}

// Asks L2 for the 128-byte line holding *p, without waiting for it (no register).
template <typename P>
__device__ inline void moe_prefetch_l2(P p) {
  asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
}

// Asks L1 for the 128-byte line holding *p, without waiting for it (no register).
template <typename P>
__device__ inline void moe_prefetch_l1(P p) {
  asm volatile("prefetch.global.L1 [%0];" ::"l"(p));
}

// The GPU's global nanosecond timer, low 32 bits (mul_mv_id_moe's TRACE option).
__device__ inline uint moe_clock_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return uint(t);
}

// A float's bits as a uint (the routing join packs weights beside ids).
__device__ inline uint moe_float_bits(float v) {
  return __float_as_uint(v);
}

#define MOE_UNROLL _Pragma("unroll")
#define MOE_NO_UNROLL _Pragma("unroll 1")

// -- Dense GEMV and decode-layer helpers (decode_layer.metal); see shims_metal.h.
template <typename P>
__device__ inline uint4 moe_load_u4(P p, size_t i) {
  return reinterpret_cast<const uint4*>(p)[i];
}

// Two float32 values at p (8-byte aligned) in one load.
template <typename P>
__device__ inline float2 moe_load_f2(P p) {
  return *reinterpret_cast<const float2*>(p);
}

// Two bfloat16 values at p (4-byte aligned) in one 32-bit load, as floats.
template <typename P>
__device__ inline float2 moe_load_bf2(P p) {
  const uint w = *reinterpret_cast<const uint*>(p);
  return make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xFFFF0000u));
}

template <typename T, typename U>
__device__ inline T* moe_tg_as(U* p) {
  return reinterpret_cast<T*>(p);
}

__device__ inline float moe_rsqrt(float v) {
  return rsqrtf(v);
}

// RoPE's angles (pos * inv_freq, up to pos radians).  MLX's NVRTC may compile with
// fast math, which turns exp2f/cosf/sinf into approximations whose error grows with
// the argument (a RoPE angle at position 700 came out 3e-4 off): exp2 runs in
// double (a chain of DFMAs), and cos/sin reduce the angle to [-pi, pi] in double and
// take the SFU's __cosf/__sinf there (absolute error <= 2^-21.4).  Not libm's double
// cos/sin: they read coefficient tables from global memory, a dependent load in
// the attention's prologue.
__device__ inline float moe_exp2(float v) {
  return float(exp2(double(v)));
}
__device__ inline float moe_reduce_angle(float v) {
  const double d = double(v);
  return float(d - rint(d * 0.15915494309189535) * 6.283185307179586);
}
__device__ inline float moe_cos(float v) {
  return __cosf(moe_reduce_angle(v));
}
__device__ inline float moe_sin(float v) {
  return __sinf(moe_reduce_angle(v));
}
// An input the kernel also writes (see shims_metal.h).
template <typename T>
__device__ inline T* moe_inplace(const T* p) {
  return const_cast<T*>(p);
}

// A launch's last threadgroup (see shims_metal.h).  The device-scope fence of every
// hand-off between threadgroups (a release before a ticket, an acquire after a wait) is
// MOE_FENCE, #defined ahead of these shims by mlx_moe/kernels/registry.py (CUDA_FENCE):
// fence.sc.gpu (__threadfence; MEMBAR.SC.GPU on sm_90) by default, or fence.acq_rel.gpu
// (MEMBAR.ALL.GPU), all that message passing needs -- each hand-off orders one counter
// against the data it guards, never two flags against each other.
__device__ inline void moe_device_fence() {
  MOE_FENCE;
}
// Whether a hand-off may fence in one thread of a threadgroup, after its barrier on the
// releasing side and before it on the acquiring one (mul_mv_id_moe's STAGE bit 2048): the
// PTX memory model orders the barrier's other threads with that thread, and its fence is
// cumulative (CUDA's cooperative-groups grid sync relies on the same).
struct moe_fence_one {
  enum { ON = 1 };
};
// The same for the decode step's other hand-offs (metal/decode_chain.metal's chained
// launches, decode_layer.metal's router tail): MOE_HANDOFF_ONE, #defined ahead of these
// shims by mlx_moe/kernels/registry.py (CUDA_HANDOFF: "all" 0, "one" 1).
struct moe_handoff_one {
  enum { ON = MOE_HANDOFF_ONE };
};
__device__ inline uint moe_ticket(const uint* count) {
  return atomicAdd(const_cast<uint*>(count), 1u);
}
__device__ inline void moe_ticket_reset(const uint* count) {
  atomicExch(const_cast<uint*>(count), 0u);
}
// (see shims_metal.h) A volatile read each round, a short sleep between them so
// hundreds of waiting threadgroups do not crowd the L2 slice the counter lives in.
__device__ inline void moe_wait_count(const uint* count, uint n) {
  while (*(volatile const uint*)count < n) {
    __nanosleep(64);
  }
}

// -- Tensor-core helpers (the prefill GEMMs of mul_mm_id_cuda.h, the decode layer's gate/up
// tile of mul_mv_id_cuda.h).  Fragments of mma.m16n8k16 .bf16 (PTX ISA), g = lane / 4,
// q = lane % 4, two bf16 per register (the lower k in the low half): A (16 x 16, row): a0
// (g, 2q..2q+1), a1 (g + 8, 2q..), a2 (g, 2q + 8..), a3 (g + 8, 2q + 8..); B (16 x 8,
// col): b0 (k 2q..2q+1, n g), b1 (k 2q + 8.., n g); C (16 x 8): c0 (g, 2q), c1 (g,
// 2q + 1), c2 (g + 8, 2q), c3 (g + 8, 2q + 1).  tests/cuda_mock.py has CPU stand-ins.
// d += A (16 x 16) * B (16 x 8), bf16 operands, float32 accumulate.
__device__ inline void moe_mma_bf16(float* d, const unsigned* a, const unsigned* b) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Two nibbles (bytes 0 and 1 of `nib`, each 0..15) as the bf16 pair (q0 - 8,
// q1 - 8): a byte permute puts each under the exponent byte 0x43 (bf16 0x43nn
// is 128 + nn), one packed subtraction of 136 leaves q - 8, exactly.
__device__ inline unsigned moe_q4_bf16x2(unsigned nib) {
  const unsigned v = __byte_perm(nib, 0x43434343u, 0x4140u);
  const __nv_bfloat162 h = __hsub2(*reinterpret_cast<const __nv_bfloat162*>(&v), __float2bfloat162_rn(136.0f));
  return *reinterpret_cast<const unsigned*>(&h);
}

// The nibbles in bits 0-3 and 16-19 of w as the bf16 pair (128 + q0, 128 + q1): each under
// the exponent byte 0x43 (bf16 0x43nn is 128 + nn), (w & 0x000F000F) | 0x43004300 as one LOP3
// (written as C, ptxas splits it in two: LOP3 takes one immediate).
__device__ inline unsigned moe_q4_pair128(unsigned w) {
  unsigned r;
  asm("lop3.b32 %0, %1, 0x000F000F, %2, 0xEA;" : "=r"(r) : "r"(w), "r"(0x43004300u));  // (a & b) | c
  return r;
}

// d = A (16 x 16) * B (16 x 8), bf16 operands, float32 result (no accumulator input).
__device__ inline void moe_mma_bf16_z(float* d, const unsigned* a, const unsigned* b) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%10,%10,%10};"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(0.0f));
}

// -- Asynchronous copies, global -> shared (cp.async; the prefill GEMMs' stages, the decode
// layer's activations).  moe_smem: a generic pointer into shared memory as a 32-bit
// shared-window address.
__device__ inline unsigned moe_smem(const void* p) {
  unsigned a;
  asm volatile("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
  return a;
}

// 16 bytes global -> shared, asynchronously (both 16-byte aligned); zeros when !valid.
__device__ inline void moe_cp16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(moe_smem(dst)), "l"(src),
               "r"(valid ? 16 : 0)
               : "memory");
}

__device__ inline void moe_cp_commit() {
  asm volatile("cp.async.commit_group;" ::: "memory");
}

// Wait until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ inline void moe_cp_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}
