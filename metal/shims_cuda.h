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
