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
