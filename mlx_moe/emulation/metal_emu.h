// metal_emu.h: the Metal kernel environment, emulated in C++17 for the CPU.
//
// A kernel source assembled exactly as mx.fast.metal_kernel assembles it is
// translated by mlx_moe/emulation/translate.py (address-space pointers become
// the bounds-checked `metal_emu::ptr<T>`, `threadgroup` variables become
// per-threadgroup storage, swizzles become member calls) and compiled against
// this header, which stands in for <metal_stdlib> plus MLX's prelude.
//
// Semantics worth knowing:
// - half is the compiler's IEEE binary16 (_Float16): every operation rounds
//   to half, half op float is float, half op int is half, as in Metal.
// - bfloat16_t is a struct like MLX's pre-Metal-3.1 emulation: bf op bf
//   rounds to bfloat (round to nearest even), bf op float is float.  As with
//   MLX's struct, `cond ? bf : 0` is ambiguous: write `bfloat16_t(0)`.
// - Every SIMD function (simd_sum, shuffles, simdgroup_matrix operations,
//   simdgroup_barrier) is a real collective of the 32 threads of a
//   simdgroup: all lanes must reach the same call (same source line), or
//   the launch fails with a divergence/deadlock error.
// - Indexing a device/constant/threadgroup pointer is bounds-checked against
//   the buffer it points into; an out-of-bounds access fails the launch with
//   the buffer's name and the offending index.
// - Only functions Metal has are declared: an unknown one is a compile error.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include <limits>
#include <type_traits>

#include "metal_emu_abi.h"

#define __METAL_VERSION__ 310
#define METAL_FUNC inline
#define METAL_CONST

typedef unsigned char uchar;
typedef unsigned short ushort;
typedef unsigned int uint;
typedef unsigned long ulong;
typedef _Float16 half;

namespace metal {

// ---------------------------------------------------------------------------
// bfloat
// ---------------------------------------------------------------------------

constexpr uint16_t emu_float_to_bf16_bits(float x) {
  uint32_t u = __builtin_bit_cast(uint32_t, x);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;  // NaN stays NaN
  u += 0x7FFFu + ((u >> 16) & 1u);                     // round to nearest even
  return uint16_t(u >> 16);
}
constexpr float emu_bf16_bits_to_float(uint16_t b) {
  return __builtin_bit_cast(float, uint32_t(b) << 16);
}

struct bfloat;
template <class T>
struct emu_is_scalar
    : std::integral_constant<bool, std::is_arithmetic<T>::value ||
                                       std::is_same<T, _Float16>::value ||
                                       std::is_same<T, bfloat>::value> {};
template <class T>
constexpr bool emu_is_scalar_v = emu_is_scalar<std::remove_cv_t<T>>::value;

struct bfloat {
  uint16_t bits_;
  bfloat() = default;
  struct from_bits_t {};
  constexpr bfloat(uint16_t b, from_bits_t) : bits_(b) {}
  template <class S, class = std::enable_if_t<emu_is_scalar_v<S> &&
                                              !std::is_same<S, bfloat>::value>>
  constexpr bfloat(S s) : bits_(emu_float_to_bf16_bits(static_cast<float>(s))) {}
  template <class U, class = std::enable_if_t<emu_is_scalar_v<U> &&
                                              !std::is_same<U, bfloat>::value>>
  constexpr operator U() const {
    return static_cast<U>(emu_bf16_bits_to_float(bits_));
  }
};

// Result type of a binary operation with at least one bfloat operand.
template <class A, class B>
struct emu_bf_result {
  static constexpr bool a_bf = std::is_same<A, bfloat>::value;
  static constexpr bool b_bf = std::is_same<B, bfloat>::value;
  static constexpr bool other_int =
      std::is_integral<A>::value || std::is_integral<B>::value;
  using type = std::conditional_t<(a_bf && b_bf) || other_int, bfloat, float>;
};
template <class A, class B>
using emu_bf_enable =
    std::enable_if_t<(std::is_same<A, bfloat>::value ||
                      std::is_same<B, bfloat>::value) &&
                         emu_is_scalar_v<A> && emu_is_scalar_v<B>,
                     typename emu_bf_result<A, B>::type>;
template <class A, class B>
using emu_bf_cmp = std::enable_if_t<(std::is_same<A, bfloat>::value ||
                                     std::is_same<B, bfloat>::value) &&
                                        emu_is_scalar_v<A> && emu_is_scalar_v<B>,
                                    bool>;

#define EMU_BF_BINOP(op)                                                  \
  template <class A, class B>                                             \
  constexpr emu_bf_enable<A, B> operator op(A a, B b) {                   \
    return typename emu_bf_result<A, B>::type(static_cast<float>(a)       \
                                                  op static_cast<float>(b)); \
  }                                                                       \
  template <class L, class R,                                             \
            class = std::enable_if_t<(std::is_same<L, bfloat>::value ||   \
                                      std::is_same<R, bfloat>::value) &&  \
                                     emu_is_scalar_v<L> && emu_is_scalar_v<R>>> \
  L& operator op##=(L& l, R r) {                                          \
    l = L(static_cast<float>(l) op static_cast<float>(r));                \
    return l;                                                             \
  }
EMU_BF_BINOP(+)
EMU_BF_BINOP(-)
EMU_BF_BINOP(*)
EMU_BF_BINOP(/)
#undef EMU_BF_BINOP
#define EMU_BF_CMP(op)                                      \
  template <class A, class B>                               \
  constexpr emu_bf_cmp<A, B> operator op(A a, B b) {        \
    return static_cast<float>(a) op static_cast<float>(b);  \
  }
EMU_BF_CMP(==)
EMU_BF_CMP(!=)
EMU_BF_CMP(<)
EMU_BF_CMP(<=)
EMU_BF_CMP(>)
EMU_BF_CMP(>=)
#undef EMU_BF_CMP
constexpr bfloat operator-(bfloat x) { return bfloat(uint16_t(x.bits_ ^ 0x8000u), bfloat::from_bits_t{}); }
constexpr bfloat operator+(bfloat x) { return x; }

// ---------------------------------------------------------------------------
// as_type
// ---------------------------------------------------------------------------

template <class T, class U>
inline T as_type(const U& u) {
  static_assert(sizeof(T) == sizeof(U), "as_type: sizes differ");
  T t;
  __builtin_memcpy(&t, &u, sizeof(T));
  return t;
}

[[noreturn]] inline void emu_vector_index_error(int i, int n) {
  (void)i;
  (void)n;
  emu_fail("vector component index out of range");
}

// ---------------------------------------------------------------------------
// Vectors: vec<T, N> with N = 2, 3, 4 (x, y, z, w), Metal layout (a 3-vector
// takes the room of 4).  Swizzles .xy, .zw, .xyz ... are rewritten by the
// translator into v.template sw<0, 1>(); reading one gives a vector,
// assigning to one writes the components back.
// ---------------------------------------------------------------------------

template <class T, int N>
struct vec;
template <class T>
struct emu_vec_traits {
  static constexpr int n = 1;
  using elem = T;
};
template <class T, int N>
struct emu_vec_traits<vec<T, N>> {
  static constexpr int n = N;
  using elem = T;
};
template <class T, int N, int... I>
struct swz;
template <class T, int N, int... I>
struct emu_vec_traits<swz<T, N, I...>> {
  static constexpr int n = sizeof...(I);
  using elem = T;
};

template <class T>
constexpr int emu_ncomp() {
  return emu_vec_traits<std::remove_cv_t<std::remove_reference_t<T>>>::n;
}

template <class T, class A>
inline void emu_put(T* dst, int& k, const A& a) {
  if constexpr (emu_ncomp<A>() == 1) {
    dst[k++] = static_cast<T>(a);
  } else {
    for (int i = 0; i < emu_ncomp<A>(); ++i) dst[k++] = static_cast<T>(a[i]);
  }
}

#define EMU_VEC_COMMON(N)                                                      \
  using value_type = T;                                                        \
  vec() = default;                                                             \
  template <class S, class = std::enable_if_t<emu_is_scalar_v<S>>>            \
  vec(S s) {                                                                   \
    for (int i = 0; i < N; ++i) (*this)[i] = static_cast<T>(s);                \
  }                                                                            \
  template <class U, class = std::enable_if_t<!std::is_same<U, T>::value>>     \
  explicit vec(const vec<U, N>& o) {                                           \
    for (int i = 0; i < N; ++i) (*this)[i] = static_cast<T>(o[i]);             \
  }                                                                            \
  template <class A, class B, class... R>                                      \
  vec(const A& a, const B& b, const R&... r) {                                 \
    static_assert(emu_ncomp<A>() + emu_ncomp<B>() + (0 + ... + emu_ncomp<R>()) \
                      == N,                                                    \
                  "vector constructor: wrong number of components");           \
    T tmp[N];                                                                  \
    int k = 0;                                                                 \
    emu_put(tmp, k, a);                                                        \
    emu_put(tmp, k, b);                                                        \
    (emu_put(tmp, k, r), ...);                                                 \
    for (int i = 0; i < N; ++i) (*this)[i] = tmp[i];                           \
  }                                                                            \
  T& operator[](int i) {                                                       \
    if ((unsigned)i >= (unsigned)N) emu_vector_index_error(i, N);              \
    return v_[i];                                                              \
  }                                                                            \
  const T& operator[](int i) const {                                           \
    if ((unsigned)i >= (unsigned)N) emu_vector_index_error(i, N);              \
    return v_[i];                                                              \
  }                                                                            \
  template <int... I>                                                          \
  swz<T, N, I...> sw() & {                                                     \
    return swz<T, N, I...>(this);                                              \
  }                                                                            \
  template <int... I>                                                          \
  vec<T, sizeof...(I)> sw() const& {                                           \
    static_assert(((I < N) && ...), "swizzle component out of range");         \
    return vec<T, sizeof...(I)>((*this)[I]...);                                \
  }                                                                            \
  template <int... I>                                                          \
  vec<T, sizeof...(I)> sw() && {                                               \
    static_assert(((I < N) && ...), "swizzle component out of range");         \
    return vec<T, sizeof...(I)>((*this)[I]...);                                \
  }

template <class T>
struct alignas(2 * sizeof(T)) vec<T, 2> {
  union {  // named components and an array over the same storage
    struct {
      T x, y;
    };
    T v_[2];
  };
  EMU_VEC_COMMON(2)
};
template <class T>
struct alignas(4 * sizeof(T)) vec<T, 3> {
  union {  // named components and an array over the same storage
    struct {
      T x, y, z;
    };
    T v_[3];
  };
  EMU_VEC_COMMON(3)
};
template <class T>
struct alignas(4 * sizeof(T)) vec<T, 4> {
  union {  // named components and an array over the same storage
    struct {
      T x, y, z, w;
    };
    T v_[4];
  };
  EMU_VEC_COMMON(4)
};
#undef EMU_VEC_COMMON

template <class T, int N, int... I>
struct swz : vec<T, sizeof...(I)> {
  using base = vec<T, sizeof...(I)>;
  static_assert(((I < N) && ...), "swizzle component out of range");
  vec<T, N>* src_;
  explicit swz(vec<T, N>* s) : base((*s)[I]...), src_(s) {}
  swz(const swz&) = default;
  swz& operator=(const base& v) {
    int k = 0;
    (((*src_)[I] = v[k++]), ...);
    base::operator=(v);
    return *this;
  }
  swz& operator=(const swz& o) { return *this = static_cast<const base&>(o); }
  template <class R>
  swz& operator+=(const R& r) { return *this = base(*this) + r; }
  template <class R>
  swz& operator-=(const R& r) { return *this = base(*this) - r; }
  template <class R>
  swz& operator*=(const R& r) { return *this = base(*this) * r; }
  template <class R>
  swz& operator/=(const R& r) { return *this = base(*this) / r; }
};

#define EMU_VEC_BINOP(op)                                                     \
  template <class T, int N>                                                   \
  inline vec<T, N> operator op(const vec<T, N>& a, const vec<T, N>& b) {      \
    vec<T, N> r;                                                              \
    for (int i = 0; i < N; ++i) r[i] = static_cast<T>(a[i] op b[i]);         \
    return r;                                                                 \
  }                                                                           \
  template <class T, int N, class S,                                          \
            class = std::enable_if_t<emu_is_scalar_v<S>>>                     \
  inline vec<T, N> operator op(const vec<T, N>& a, S s) {                     \
    vec<T, N> r;                                                              \
    const T t = static_cast<T>(s);                                            \
    for (int i = 0; i < N; ++i) r[i] = static_cast<T>(a[i] op t);             \
    return r;                                                                 \
  }                                                                           \
  template <class T, int N, class S,                                          \
            class = std::enable_if_t<emu_is_scalar_v<S>>>                     \
  inline vec<T, N> operator op(S s, const vec<T, N>& a) {                     \
    vec<T, N> r;                                                              \
    const T t = static_cast<T>(s);                                            \
    for (int i = 0; i < N; ++i) r[i] = static_cast<T>(t op a[i]);             \
    return r;                                                                 \
  }                                                                           \
  template <class T, int N, class R>                                          \
  inline vec<T, N>& operator op##=(vec<T, N>& a, const R& b) {                \
    a = a op b;                                                               \
    return a;                                                                 \
  }
EMU_VEC_BINOP(+)
EMU_VEC_BINOP(-)
EMU_VEC_BINOP(*)
EMU_VEC_BINOP(/)
EMU_VEC_BINOP(%)
EMU_VEC_BINOP(&)
EMU_VEC_BINOP(|)
EMU_VEC_BINOP(^)
EMU_VEC_BINOP(<<)
EMU_VEC_BINOP(>>)
#undef EMU_VEC_BINOP

#define EMU_VEC_CMP(op)                                                        \
  template <class T, int N>                                                    \
  inline vec<bool, N> operator op(const vec<T, N>& a, const vec<T, N>& b) {    \
    vec<bool, N> r;                                                            \
    for (int i = 0; i < N; ++i) r[i] = a[i] op b[i];                           \
    return r;                                                                  \
  }                                                                            \
  template <class T, int N, class S,                                           \
            class = std::enable_if_t<emu_is_scalar_v<S>>>                      \
  inline vec<bool, N> operator op(const vec<T, N>& a, S s) {                   \
    return a op vec<T, N>(static_cast<T>(s));                                  \
  }                                                                            \
  template <class T, int N, class S,                                           \
            class = std::enable_if_t<emu_is_scalar_v<S>>>                      \
  inline vec<bool, N> operator op(S s, const vec<T, N>& a) {                   \
    return vec<T, N>(static_cast<T>(s)) op a;                                  \
  }
EMU_VEC_CMP(==)
EMU_VEC_CMP(!=)
EMU_VEC_CMP(<)
EMU_VEC_CMP(<=)
EMU_VEC_CMP(>)
EMU_VEC_CMP(>=)
EMU_VEC_CMP(&&)
EMU_VEC_CMP(||)
#undef EMU_VEC_CMP

template <class T, int N>
inline vec<T, N> operator-(const vec<T, N>& a) {
  vec<T, N> r;
  for (int i = 0; i < N; ++i) r[i] = static_cast<T>(-a[i]);
  return r;
}
template <class T, int N>
inline vec<T, N> operator+(const vec<T, N>& a) { return a; }
template <class T, int N>
inline vec<T, N> operator~(const vec<T, N>& a) {
  vec<T, N> r;
  for (int i = 0; i < N; ++i) r[i] = static_cast<T>(~a[i]);
  return r;
}
template <class T, int N>
inline vec<bool, N> operator!(const vec<T, N>& a) {
  vec<bool, N> r;
  for (int i = 0; i < N; ++i) r[i] = !a[i];
  return r;
}

template <int N>
inline bool all(const vec<bool, N>& v) {
  for (int i = 0; i < N; ++i)
    if (!v[i]) return false;
  return true;
}
template <int N>
inline bool any(const vec<bool, N>& v) {
  for (int i = 0; i < N; ++i)
    if (v[i]) return true;
  return false;
}
inline bool all(bool b) { return b; }
inline bool any(bool b) { return b; }

#define EMU_VEC_TYPES(T, name) \
  typedef vec<T, 2> name##2;   \
  typedef vec<T, 3> name##3;   \
  typedef vec<T, 4> name##4;
EMU_VEC_TYPES(float, float)
EMU_VEC_TYPES(half, half)
EMU_VEC_TYPES(bfloat, bfloat)
EMU_VEC_TYPES(int, int)
EMU_VEC_TYPES(uint, uint)
EMU_VEC_TYPES(short, short)
EMU_VEC_TYPES(ushort, ushort)
EMU_VEC_TYPES(char, char)
EMU_VEC_TYPES(uchar, uchar)
EMU_VEC_TYPES(long, long)
EMU_VEC_TYPES(ulong, ulong)
EMU_VEC_TYPES(bool, bool)
#undef EMU_VEC_TYPES

// ---------------------------------------------------------------------------
// Math.  Scalar float versions call the C library through GCC builtins;
// half and bfloat compute in float and round back; vectors go component-wise.
// metal::fast:: and metal::precise:: give the same (precise) results.
// ---------------------------------------------------------------------------

#define EMU_UNARY_F(name, impl)                                            \
  inline float name(float x) { return impl; }                             \
  inline half name(half h) {                                               \
    float x = static_cast<float>(h);                                       \
    return static_cast<half>(impl);                                        \
  }                                                                        \
  inline bfloat name(bfloat b) {                                           \
    float x = static_cast<float>(b);                                       \
    return bfloat(impl);                                                   \
  }                                                                        \
  template <class T, int N>                                                \
  inline vec<T, N> name(const vec<T, N>& v) {                              \
    vec<T, N> r;                                                           \
    for (int i = 0; i < N; ++i) r[i] = name(v[i]);                         \
    return r;                                                              \
  }

EMU_UNARY_F(exp, __builtin_expf(x))
EMU_UNARY_F(exp2, __builtin_exp2f(x))
EMU_UNARY_F(exp10, __builtin_powf(10.0f, x))
EMU_UNARY_F(log, __builtin_logf(x))
EMU_UNARY_F(log2, __builtin_log2f(x))
EMU_UNARY_F(log10, __builtin_log10f(x))
EMU_UNARY_F(sqrt, __builtin_sqrtf(x))
EMU_UNARY_F(rsqrt, 1.0f / __builtin_sqrtf(x))
EMU_UNARY_F(sin, __builtin_sinf(x))
EMU_UNARY_F(cos, __builtin_cosf(x))
EMU_UNARY_F(tan, __builtin_tanf(x))
EMU_UNARY_F(asin, __builtin_asinf(x))
EMU_UNARY_F(acos, __builtin_acosf(x))
EMU_UNARY_F(atan, __builtin_atanf(x))
EMU_UNARY_F(sinh, __builtin_sinhf(x))
EMU_UNARY_F(cosh, __builtin_coshf(x))
EMU_UNARY_F(tanh, __builtin_tanhf(x))
EMU_UNARY_F(asinh, __builtin_asinhf(x))
EMU_UNARY_F(acosh, __builtin_acoshf(x))
EMU_UNARY_F(atanh, __builtin_atanhf(x))
EMU_UNARY_F(floor, __builtin_floorf(x))
EMU_UNARY_F(ceil, __builtin_ceilf(x))
EMU_UNARY_F(round, __builtin_roundf(x))
EMU_UNARY_F(rint, __builtin_rintf(x))
EMU_UNARY_F(trunc, __builtin_truncf(x))
EMU_UNARY_F(fract, __builtin_fminf(x - __builtin_floorf(x), 0x1.fffffep-1f))
EMU_UNARY_F(fabs, __builtin_fabsf(x))
EMU_UNARY_F(saturate, __builtin_fminf(__builtin_fmaxf(x, 0.0f), 1.0f))
EMU_UNARY_F(sign, (x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : (x == x ? 0.0f : 0.0f))))
EMU_UNARY_F(sinpi, __builtin_sinf(x * 3.14159265358979323846f))
EMU_UNARY_F(cospi, __builtin_cosf(x * 3.14159265358979323846f))
EMU_UNARY_F(tanpi, __builtin_tanf(x * 3.14159265358979323846f))
#undef EMU_UNARY_F

#define EMU_BINARY_F(name, impl)                                             \
  inline float name(float x, float y) { return impl; }                       \
  inline half name(half a, half b) {                                         \
    float x = static_cast<float>(a), y = static_cast<float>(b);              \
    return static_cast<half>(impl);                                          \
  }                                                                          \
  inline bfloat name(bfloat a, bfloat b) {                                   \
    float x = static_cast<float>(a), y = static_cast<float>(b);              \
    return bfloat(impl);                                                     \
  }                                                                          \
  template <class T, int N>                                                  \
  inline vec<T, N> name(const vec<T, N>& a, const vec<T, N>& b) {            \
    vec<T, N> r;                                                             \
    for (int i = 0; i < N; ++i) r[i] = name(a[i], b[i]);                     \
    return r;                                                                \
  }

EMU_BINARY_F(pow, __builtin_powf(x, y))
EMU_BINARY_F(powr, __builtin_powf(x, y))
EMU_BINARY_F(atan2, __builtin_atan2f(x, y))
EMU_BINARY_F(fmod, __builtin_fmodf(x, y))
EMU_BINARY_F(fmax, __builtin_fmaxf(x, y))
EMU_BINARY_F(fmin, __builtin_fminf(x, y))
EMU_BINARY_F(copysign, __builtin_copysignf(x, y))
EMU_BINARY_F(fdim, __builtin_fdimf(x, y))
EMU_BINARY_F(step, (y < x ? 0.0f : 1.0f))
EMU_BINARY_F(nextafter, __builtin_nextafterf(x, y))
EMU_BINARY_F(divide, x / y)
#undef EMU_BINARY_F

// max/min/abs/clamp exist for every scalar type; mixed types are ambiguous,
// as in Metal.
#define EMU_MINMAX(T)                                                        \
  inline T max(T a, T b) { return a > b ? a : b; }                           \
  inline T min(T a, T b) { return a < b ? a : b; }                           \
  inline T clamp(T x, T lo, T hi) { return min(max(x, lo), hi); }
EMU_MINMAX(int)
EMU_MINMAX(uint)
EMU_MINMAX(short)
EMU_MINMAX(ushort)
EMU_MINMAX(char)
EMU_MINMAX(signed char)
EMU_MINMAX(uchar)
EMU_MINMAX(long)
EMU_MINMAX(ulong)
EMU_MINMAX(long long)
EMU_MINMAX(unsigned long long)
#undef EMU_MINMAX
inline float max(float a, float b) { return __builtin_fmaxf(a, b); }
inline float min(float a, float b) { return __builtin_fminf(a, b); }
inline half max(half a, half b) { return fmax(a, b); }
inline half min(half a, half b) { return fmin(a, b); }
inline bfloat max(bfloat a, bfloat b) { return fmax(a, b); }
inline bfloat min(bfloat a, bfloat b) { return fmin(a, b); }
inline float clamp(float x, float lo, float hi) { return min(max(x, lo), hi); }
inline half clamp(half x, half lo, half hi) { return min(max(x, lo), hi); }
inline bfloat clamp(bfloat x, bfloat lo, bfloat hi) { return min(max(x, lo), hi); }

inline int abs(int x) { return x < 0 ? -x : x; }
inline short abs(short x) { return x < 0 ? short(-x) : x; }
inline char abs(char x) { return x < 0 ? char(-x) : x; }
inline long abs(long x) { return x < 0 ? -x : x; }
inline uint abs(uint x) { return x; }
inline ushort abs(ushort x) { return x; }
inline uchar abs(uchar x) { return x; }
inline float abs(float x) { return __builtin_fabsf(x); }
inline half abs(half x) { return fabs(x); }
inline bfloat abs(bfloat x) { return fabs(x); }

template <class T, int N>
inline vec<T, N> max(const vec<T, N>& a, const vec<T, N>& b) {
  vec<T, N> r;
  for (int i = 0; i < N; ++i) r[i] = max(a[i], b[i]);
  return r;
}
template <class T, int N>
inline vec<T, N> min(const vec<T, N>& a, const vec<T, N>& b) {
  vec<T, N> r;
  for (int i = 0; i < N; ++i) r[i] = min(a[i], b[i]);
  return r;
}
template <class T, int N, class S, class = std::enable_if_t<emu_is_scalar_v<S>>>
inline vec<T, N> max(const vec<T, N>& a, S b) { return max(a, vec<T, N>(b)); }
template <class T, int N, class S, class = std::enable_if_t<emu_is_scalar_v<S>>>
inline vec<T, N> min(const vec<T, N>& a, S b) { return min(a, vec<T, N>(b)); }
template <class T, int N>
inline vec<T, N> abs(const vec<T, N>& a) {
  vec<T, N> r;
  for (int i = 0; i < N; ++i) r[i] = abs(a[i]);
  return r;
}
template <class T, int N, class L, class H>
inline vec<T, N> clamp(const vec<T, N>& x, const L& lo, const H& hi) {
  return min(max(x, vec<T, N>(lo)), vec<T, N>(hi));
}

inline float fma(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
inline half fma(half a, half b, half c) {
  return static_cast<half>(__builtin_fmaf(float(a), float(b), float(c)));
}
inline bfloat fma(bfloat a, bfloat b, bfloat c) {
  return bfloat(__builtin_fmaf(float(a), float(b), float(c)));
}
template <class T, int N>
inline vec<T, N> fma(const vec<T, N>& a, const vec<T, N>& b, const vec<T, N>& c) {
  vec<T, N> r;
  for (int i = 0; i < N; ++i) r[i] = fma(a[i], b[i], c[i]);
  return r;
}
inline float mix(float a, float b, float t) { return a + (b - a) * t; }
inline half mix(half a, half b, half t) { return a + (b - a) * t; }
template <class T, int N, class U>
inline vec<T, N> mix(const vec<T, N>& a, const vec<T, N>& b, const U& t) {
  return a + (b - a) * t;
}
inline float smoothstep(float e0, float e1, float x) {
  float t = clamp((x - e0) / (e1 - e0), 0.0f, 1.0f);
  return t * t * (3.0f - 2.0f * t);
}

template <class T, class = std::enable_if_t<emu_is_scalar_v<T>>>
inline T select(T a, T b, bool c) { return c ? b : a; }
template <class T, int N>
inline vec<T, N> select(const vec<T, N>& a, const vec<T, N>& b, const vec<bool, N>& c) {
  vec<T, N> r;
  for (int i = 0; i < N; ++i) r[i] = c[i] ? b[i] : a[i];
  return r;
}
template <class T, int N>
inline vec<T, N> select(const vec<T, N>& a, const vec<T, N>& b, bool c) {
  return c ? b : a;
}

inline bool isnan(float x) { return __builtin_isnan(x); }
inline bool isinf(float x) { return __builtin_isinf(x); }
inline bool isfinite(float x) { return __builtin_isfinite(x); }
inline bool isnormal(float x) { return __builtin_isnormal(x); }
inline bool signbit(float x) { return __builtin_signbit(x); }
inline bool isnan(half x) { return isnan(float(x)); }
inline bool isinf(half x) { return isinf(float(x)); }
inline bool isfinite(half x) { return isfinite(float(x)); }
inline bool signbit(half x) { return signbit(float(x)); }
inline bool isnan(bfloat x) { return isnan(float(x)); }
inline bool isinf(bfloat x) { return isinf(float(x)); }
inline bool isfinite(bfloat x) { return isfinite(float(x)); }
inline bool signbit(bfloat x) { return signbit(float(x)); }
template <class T, int N>
inline vec<bool, N> isnan(const vec<T, N>& v) {
  vec<bool, N> r;
  for (int i = 0; i < N; ++i) r[i] = isnan(v[i]);
  return r;
}
template <class T, int N>
inline vec<bool, N> isinf(const vec<T, N>& v) {
  vec<bool, N> r;
  for (int i = 0; i < N; ++i) r[i] = isinf(v[i]);
  return r;
}

template <class T, int N>
inline T dot(const vec<T, N>& a, const vec<T, N>& b) {
  T s = a[0] * b[0];
  for (int i = 1; i < N; ++i) s = static_cast<T>(s + a[i] * b[i]);
  return s;
}
template <class T, int N>
inline T length_squared(const vec<T, N>& a) { return dot(a, a); }
template <class T, int N>
inline T length(const vec<T, N>& a) { return sqrt(dot(a, a)); }
template <class T, int N>
inline T distance(const vec<T, N>& a, const vec<T, N>& b) { return length(a - b); }
template <class T, int N>
inline vec<T, N> normalize(const vec<T, N>& a) { return a * rsqrt(dot(a, a)); }
template <class T>
inline vec<T, 3> cross(const vec<T, 3>& a, const vec<T, 3>& b) {
  return vec<T, 3>(a.y * b.z - a.z * b.y, a.z * b.x - a.x * b.z,
                   a.x * b.y - a.y * b.x);
}

// Integer functions.
inline uint popcount(uint x) { return __builtin_popcount(x); }
inline ushort popcount(ushort x) { return ushort(__builtin_popcount(x)); }
inline uchar popcount(uchar x) { return uchar(__builtin_popcount(x)); }
inline int popcount(int x) { return __builtin_popcount(uint(x)); }
inline ulong popcount(ulong x) { return __builtin_popcountl(x); }
inline uint clz(uint x) { return x ? __builtin_clz(x) : 32; }
inline int clz(int x) { return x ? __builtin_clz(uint(x)) : 32; }
inline ulong clz(ulong x) { return x ? __builtin_clzl(x) : 64; }
inline ushort clz(ushort x) { return x ? ushort(__builtin_clz(uint(x)) - 16) : 16; }
inline uint ctz(uint x) { return x ? __builtin_ctz(x) : 32; }
inline int ctz(int x) { return x ? __builtin_ctz(uint(x)) : 32; }
inline ulong ctz(ulong x) { return x ? __builtin_ctzl(x) : 64; }
inline uint reverse_bits(uint x) {
  uint r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}
inline uint extract_bits(uint x, uint offset, uint bits) {
  return bits == 32 ? x : (x >> offset) & ((1u << bits) - 1u);
}
inline int extract_bits(int x, uint offset, uint bits) {
  if (bits == 0) return 0;
  return int(uint(x) << (32 - offset - bits)) >> (32 - bits);
}
inline uint insert_bits(uint base, uint ins, uint offset, uint bits) {
  uint mask = (bits == 32 ? ~0u : ((1u << bits) - 1u)) << offset;
  return (base & ~mask) | ((ins << offset) & mask);
}
inline uint mulhi(uint a, uint b) { return uint((uint64_t(a) * b) >> 32); }
inline int mulhi(int a, int b) { return int((int64_t(a) * b) >> 32); }
inline uint rotate(uint v, uint i) { i &= 31u; return i ? (v << i) | (v >> (32 - i)) : v; }
inline uint absdiff(int a, int b) { return a > b ? uint(a - b) : uint(b - a); }
inline uint absdiff(uint a, uint b) { return a > b ? a - b : b - a; }

namespace fast {
using metal::abs; using metal::acos; using metal::asin; using metal::atan;
using metal::atan2; using metal::ceil; using metal::clamp; using metal::cos;
using metal::cosh; using metal::divide; using metal::exp; using metal::exp10;
using metal::exp2; using metal::fabs; using metal::floor; using metal::fmax;
using metal::fmin; using metal::fmod; using metal::fract; using metal::log;
using metal::log10; using metal::log2; using metal::max; using metal::min;
using metal::pow; using metal::powr; using metal::rint; using metal::round;
using metal::rsqrt; using metal::saturate; using metal::sign; using metal::sin;
using metal::sinh; using metal::sqrt; using metal::tan; using metal::tanh;
using metal::trunc; using metal::length; using metal::normalize;
using metal::distance; using metal::fma;
}  // namespace fast
namespace precise {
using namespace metal::fast;
}

// ---------------------------------------------------------------------------
// numeric_limits (std's, plus half and bfloat)
// ---------------------------------------------------------------------------

template <class T>
struct numeric_limits : std::numeric_limits<T> {};
template <>
struct numeric_limits<half> {
  static constexpr bool is_specialized = true;
  static constexpr bool is_signed = true;
  static constexpr bool is_integer = false;
  static constexpr bool has_infinity = true;
  static constexpr bool has_quiet_NaN = true;
  static constexpr int digits = 11;
  static constexpr half h(uint16_t b) { return __builtin_bit_cast(half, b); }
  static constexpr half min() { return h(0x0400); }
  static constexpr half max() { return h(0x7BFF); }
  static constexpr half lowest() { return h(0xFBFF); }
  static constexpr half epsilon() { return h(0x1400); }
  static constexpr half infinity() { return h(0x7C00); }
  static constexpr half quiet_NaN() { return h(0x7E00); }
  static constexpr half denorm_min() { return h(0x0001); }
};
template <>
struct numeric_limits<bfloat> {
  static constexpr bool is_specialized = true;
  static constexpr bool is_signed = true;
  static constexpr bool is_integer = false;
  static constexpr bool has_infinity = true;
  static constexpr bool has_quiet_NaN = true;
  static constexpr int digits = 8;
  static constexpr bfloat b(uint16_t x) { return bfloat(x, bfloat::from_bits_t{}); }
  static constexpr bfloat min() { return b(0x0080); }
  static constexpr bfloat max() { return b(0x7F7F); }
  static constexpr bfloat lowest() { return b(0xFF7F); }
  static constexpr bfloat epsilon() { return b(0x3C00); }
  static constexpr bfloat infinity() { return b(0x7F80); }
  static constexpr bfloat quiet_NaN() { return b(0x7FC0); }
  static constexpr bfloat denorm_min() { return b(0x0001); }
};

// ---------------------------------------------------------------------------
// Barriers
// ---------------------------------------------------------------------------

enum class mem_flags : uint {
  mem_none = 0,
  mem_device = 1,
  mem_threadgroup = 2,
  mem_texture = 4,
  mem_threadgroup_imageblock = 8,
  mem_object_data = 16,
};
constexpr mem_flags operator|(mem_flags a, mem_flags b) {
  return mem_flags(uint(a) | uint(b));
}

inline void threadgroup_barrier(mem_flags, int line = __builtin_LINE()) {
  emu_threadgroup_barrier(line);
}
inline void simdgroup_barrier(mem_flags, int line = __builtin_LINE()) {
  emu_simd_collective("simdgroup_barrier", line, nullptr, 0, nullptr, 0, nullptr);
}

}  // namespace metal

// ---------------------------------------------------------------------------
// Bounds-checked pointers (what `device T*`, `constant T*` and
// `threadgroup T*` become).  ptr<T> derives from ptr<const T>, so a template
// `f(const device T* x)` still deduces T from a `device T*` argument.
// A pointer made from a raw address (e.g. `&x[i]`) looks its buffer up again,
// so the check survives `&`, casts and pointer arithmetic.
// ---------------------------------------------------------------------------

namespace metal_emu {

struct ptr_core {
  char* p_ = nullptr;
  const char* lo_ = nullptr;  // [lo_, hi_) may be accessed; both null: none
  const char* hi_ = nullptr;
  int id_ = -1;
};

template <class T>
struct ptr;
template <class T>
using ptr_base_t =
    std::conditional_t<std::is_const<T>::value, ptr_core, ptr<const T>>;

template <class T>
struct emu_size {
  static constexpr size_t value = sizeof(T);
};
template <>
struct emu_size<void> {
  static constexpr size_t value = 1;
};
template <>
struct emu_size<const void> {
  static constexpr size_t value = 1;
};
// Alignment an access of T needs on a GPU (Metal and CUDA fault or read wrong
// data on a misaligned vector access; x86 mostly would not notice).
template <class T>
struct emu_align {
  static constexpr size_t value = alignof(T);
};
template <>
struct emu_align<void> {
  static constexpr size_t value = 1;
};
template <>
struct emu_align<const void> {
  static constexpr size_t value = 1;
};

inline ptr_core emu_lookup(const void* raw) {
  ptr_core c;
  c.p_ = (char*)raw;
  if (raw == nullptr) return c;
  const char* lo;
  const char* hi;
  c.id_ = emu_find_region(raw, &lo, &hi);
  if (c.id_ >= 0) {
    c.lo_ = lo;
    c.hi_ = hi;
  } else {  // not a buffer (a thread-local array): unchecked
    c.lo_ = nullptr;
    c.hi_ = (const char*)~uintptr_t(0);
  }
  return c;
}

template <class T>
struct ptr : ptr_base_t<T> {
  using element_type = T;
  using ref = std::add_lvalue_reference_t<T>;

  ptr() = default;
  ptr(std::nullptr_t) {}
  ptr(char* p, const char* lo, const char* hi, int id) {
    this->p_ = p;
    this->lo_ = lo;
    this->hi_ = hi;
    this->id_ = id;
  }
  static ptr from_core(const ptr_core& c) { return ptr(c.p_, c.lo_, c.hi_, c.id_); }
  // Raw addresses (implicit where C++ would convert the pointer implicitly).
  template <class U, std::enable_if_t<std::is_convertible<U*, T*>::value, int> = 0>
  ptr(U* raw) : ptr(from_core(emu_lookup((const void*)raw))) {}
  template <class U, std::enable_if_t<!std::is_convertible<U*, T*>::value, int> = 0>
  explicit ptr(U* raw) : ptr(from_core(emu_lookup((const void*)raw))) {}
  // Pointer casts between element types keep the buffer's bounds.
  template <class U, std::enable_if_t<!std::is_convertible<U*, T*>::value, int> = 0>
  explicit ptr(const ptr<U>& o) : ptr(o.p_, o.lo_, o.hi_, o.id_) {}
  // Integer <-> pointer casts are not supported on purpose.

  T* get() const { return (T*)this->p_; }
  void check(const void* q) const {
    const char* c = (const char*)q;
    if (__builtin_expect(c < this->lo_ || c + emu_size<T>::value > this->hi_, 0))
      emu_fail_oob(this->id_, q, emu_size<T>::value, 0);
    if (__builtin_expect(((uintptr_t)c & (emu_align<T>::value - 1)) != 0, 0))
      emu_fail_misaligned(this->id_, q, emu_size<T>::value, emu_align<T>::value);
  }
  ref operator*() const {
    check(this->p_);
    return *get();
  }
  T* operator->() const {
    check(this->p_);
    return get();
  }
  template <class I, std::enable_if_t<std::is_integral<I>::value || std::is_enum<I>::value, int> = 0>
  auto operator[](I i) const -> std::conditional_t<std::is_array<T>::value,
                                                   ptr<std::remove_extent_t<T>>, ref> {
    T* q = get() + (ptrdiff_t)i;
    check(q);
    if constexpr (std::is_array<T>::value) {
      // A row of a multi-dimensional threadgroup array: bounded to the row.
      return ptr<std::remove_extent_t<T>>((char*)q, (const char*)q,
                                          (const char*)q + sizeof(T), this->id_);
    } else {
      return *q;
    }
  }
  template <class I, std::enable_if_t<std::is_integral<I>::value, int> = 0>
  ptr operator+(I i) const {
    ptr r = *this;
    r.p_ = (char*)(get() + (ptrdiff_t)i);
    return r;
  }
  template <class I, std::enable_if_t<std::is_integral<I>::value, int> = 0>
  friend ptr operator+(I i, const ptr& p) { return p + i; }
  template <class I, std::enable_if_t<std::is_integral<I>::value, int> = 0>
  ptr operator-(I i) const { return *this + (-(ptrdiff_t)i); }
  template <class U>
  ptrdiff_t operator-(const ptr<U>& o) const { return get() - (const T*)o.p_; }
  template <class I>
  ptr& operator+=(I i) { return *this = *this + i; }
  template <class I>
  ptr& operator-=(I i) { return *this = *this - i; }
  ptr& operator++() { return *this = *this + 1; }
  ptr& operator--() { return *this = *this - 1; }
  ptr operator++(int) { ptr r = *this; ++*this; return r; }
  ptr operator--(int) { ptr r = *this; --*this; return r; }
  explicit operator bool() const { return this->p_ != nullptr; }
};

#define EMU_PTR_CMP(op)                                                 \
  inline bool operator op(const ptr_core& a, const ptr_core& b) {       \
    return a.p_ op b.p_;                                                \
  }
EMU_PTR_CMP(==)
EMU_PTR_CMP(!=)
EMU_PTR_CMP(<)
EMU_PTR_CMP(<=)
EMU_PTR_CMP(>)
EMU_PTR_CMP(>=)
#undef EMU_PTR_CMP
inline bool operator==(const ptr_core& a, std::nullptr_t) { return a.p_ == nullptr; }
inline bool operator!=(const ptr_core& a, std::nullptr_t) { return a.p_ != nullptr; }

// A kernel argument buffer as a checked pointer.
template <class T>
inline ptr<T> arg_ptr(const emu_buffer& b, int id) {
  return ptr<T>(b.data, b.lo, b.hi, id);
}
template <class T>
inline T& arg_ref(const emu_buffer& b) {
  return *reinterpret_cast<T*>(b.data);
}

// `threadgroup A name;` (A may be an array type): storage shared by the
// threads of the current threadgroup, one allocation per declaration site.
template <class A>
inline auto tg_array(int site, const char* name) {
  using E = std::remove_extent_t<A>;
  size_t align = alignof(A) > 16 ? alignof(A) : 16;
  char* p = (char*)emu_tg_alloc(site, sizeof(A), align, name);
  const char* lo;
  const char* hi;
  int id = emu_find_region(p, &lo, &hi);
  return ptr<E>(p, p, p + sizeof(A), id);
}
template <class T>
inline T& tg_scalar(int site, const char* name) {
  size_t align = alignof(T) > 16 ? alignof(T) : 16;
  return *(T*)emu_tg_alloc(site, sizeof(T), align, name);
}

// Collective helper: every lane sends `payload`, the last lane to arrive
// runs `complete`, every lane receives its own result.
template <class R, class P>
inline R collective(const char* op, int line, const P& payload, emu_complete_fn fn) {
  R r;
  emu_simd_collective(op, line, &payload, sizeof(P), &r, sizeof(R), fn);
  return r;
}
template <class P>
inline P slot(const char* slots, size_t psize, unsigned lane) {
  P p;
  __builtin_memcpy(&p, slots + lane * psize, sizeof(P));
  return p;
}
template <class R>
inline void put(char* results, size_t rsize, unsigned lane, const R& r) {
  __builtin_memcpy(results + lane * rsize, &r, sizeof(R));
}
template <class T>
inline T poison() {  // what a shuffle reads from a lane that does not exist
  T t;
  __builtin_memset((void*)&t, 0xFF, sizeof(T));
  return t;
}

}  // namespace metal_emu

namespace metal {

// ---------------------------------------------------------------------------
// SIMD-group functions (32 lanes; lanes are consecutive threads of the
// threadgroup by linear index).
// ---------------------------------------------------------------------------

template <class T>
struct emu_sum_op {
  static T apply(const T& a, const T& b) { return static_cast<T>(a + b); }
};
template <class T>
struct emu_prod_op {
  static T apply(const T& a, const T& b) { return static_cast<T>(a * b); }
};
template <class T>
struct emu_max_op {
  static T apply(const T& a, const T& b) { return max(a, b); }
};
template <class T>
struct emu_min_op {
  static T apply(const T& a, const T& b) { return min(a, b); }
};
template <class T>
struct emu_and_op {
  static T apply(const T& a, const T& b) { return static_cast<T>(a & b); }
};
template <class T>
struct emu_or_op {
  static T apply(const T& a, const T& b) { return static_cast<T>(a | b); }
};
template <class T>
struct emu_xor_op {
  static T apply(const T& a, const T& b) { return static_cast<T>(a ^ b); }
};

// Reduction over the lanes of each group of `W` lanes (32: whole simdgroup,
// 4: quadgroup), combined pairwise like a hardware butterfly.
template <class T, class Op, unsigned W>
void emu_reduce_complete(const char* slots, size_t ps, unsigned n, char* res, size_t rs) {
  for (unsigned g = 0; g < n; g += W) {
    T v[32];
    unsigned m = (n - g) < W ? (n - g) : W;
    for (unsigned i = 0; i < m; ++i) v[i] = metal_emu::slot<T>(slots, ps, g + i);
    for (unsigned s = 1; s < m; s *= 2)
      for (unsigned i = 0; i + s < m; i += 2 * s) v[i] = Op::apply(v[i], v[i + s]);
    for (unsigned i = 0; i < m; ++i) metal_emu::put(res, rs, g + i, v[0]);
  }
}

#define EMU_SIMD_REDUCE(name, op, W)                                          \
  template <class T>                                                          \
  inline T name(T x, int line = __builtin_LINE()) {                           \
    return metal_emu::collective<T>(#name, line, x,                           \
                                    &emu_reduce_complete<T, op<T>, W>);       \
  }
EMU_SIMD_REDUCE(simd_sum, emu_sum_op, 32)
EMU_SIMD_REDUCE(simd_product, emu_prod_op, 32)
EMU_SIMD_REDUCE(simd_max, emu_max_op, 32)
EMU_SIMD_REDUCE(simd_min, emu_min_op, 32)
EMU_SIMD_REDUCE(simd_and, emu_and_op, 32)
EMU_SIMD_REDUCE(simd_or, emu_or_op, 32)
EMU_SIMD_REDUCE(simd_xor, emu_xor_op, 32)
EMU_SIMD_REDUCE(quad_sum, emu_sum_op, 4)
EMU_SIMD_REDUCE(quad_max, emu_max_op, 4)
EMU_SIMD_REDUCE(quad_min, emu_min_op, 4)
#undef EMU_SIMD_REDUCE

template <class T, bool Inclusive>
void emu_prefix_complete(const char* slots, size_t ps, unsigned n, char* res, size_t rs) {
  T acc = T(0);
  for (unsigned i = 0; i < n; ++i) {
    T v = metal_emu::slot<T>(slots, ps, i);
    if (Inclusive) acc = (i == 0) ? v : static_cast<T>(acc + v);
    metal_emu::put(res, rs, i, acc);
    if (!Inclusive) acc = static_cast<T>(acc + v);
  }
}
template <class T>
inline T simd_prefix_exclusive_sum(T x, int line = __builtin_LINE()) {
  return metal_emu::collective<T>("simd_prefix_exclusive_sum", line, x,
                                  &emu_prefix_complete<T, false>);
}
template <class T>
inline T simd_prefix_inclusive_sum(T x, int line = __builtin_LINE()) {
  return metal_emu::collective<T>("simd_prefix_inclusive_sum", line, x,
                                  &emu_prefix_complete<T, true>);
}

// Shuffles.  Mode: 0 shuffle(idx), 1 down(delta), 2 up(delta), 3 xor(mask),
// 4 rotate_down, 5 rotate_up; W = 32 (simd) or 4 (quad).  A source lane past
// the end of the group keeps the lane's own value (Metal's rule for down/up);
// a source lane that exists in the group's width but not in a partial
// simdgroup reads poison; an index >= the width fails.
template <class T>
struct emu_shfl {
  T v;
  uint32_t arg;
};
template <class T, int Mode, unsigned W>
void emu_shuffle_complete(const char* slots, size_t ps, unsigned n, char* res, size_t rs) {
  for (unsigned lane = 0; lane < n; ++lane) {
    emu_shfl<T> me = metal_emu::slot<emu_shfl<T>>(slots, ps, lane);
    unsigned g = lane / W * W, l = lane % W;
    long src;
    switch (Mode) {
      case 0: src = me.arg; break;
      case 1: src = l + me.arg; if (src >= (long)W) src = l; break;
      case 2: src = (long)l - (long)me.arg; if (src < 0) src = l; break;
      case 3: src = l ^ me.arg; break;
      case 4: src = (l + me.arg) % W; break;
      default: src = ((long)l - (long)(me.arg % W) + W) % W; break;
    }
    if (src < 0 || src >= (long)W) emu_fail("simd shuffle: source lane index out of range (>= 32)");
    T out = (g + src < n) ? metal_emu::slot<emu_shfl<T>>(slots, ps, g + src).v
                          : metal_emu::poison<T>();
    metal_emu::put(res, rs, lane, out);
  }
}
#define EMU_SHUFFLE(name, mode, W)                                              \
  template <class T, class I>                                                   \
  inline T name(T x, I arg, int line = __builtin_LINE()) {                      \
    return metal_emu::collective<T>(#name, line, emu_shfl<T>{x, uint32_t(arg)}, \
                                    &emu_shuffle_complete<T, mode, W>);         \
  }
EMU_SHUFFLE(simd_shuffle, 0, 32)
EMU_SHUFFLE(simd_broadcast, 0, 32)
EMU_SHUFFLE(simd_shuffle_down, 1, 32)
EMU_SHUFFLE(simd_shuffle_up, 2, 32)
EMU_SHUFFLE(simd_shuffle_xor, 3, 32)
EMU_SHUFFLE(simd_shuffle_rotate_down, 4, 32)
EMU_SHUFFLE(simd_shuffle_rotate_up, 5, 32)
EMU_SHUFFLE(quad_shuffle, 0, 4)
EMU_SHUFFLE(quad_broadcast, 0, 4)
EMU_SHUFFLE(quad_shuffle_down, 1, 4)
EMU_SHUFFLE(quad_shuffle_up, 2, 4)
EMU_SHUFFLE(quad_shuffle_xor, 3, 4)
#undef EMU_SHUFFLE
template <class T>
inline T simd_broadcast_first(T x, int line = __builtin_LINE()) {
  return metal_emu::collective<T>("simd_broadcast_first", line,
                                  emu_shfl<T>{x, 0u}, &emu_shuffle_complete<T, 0, 32>);
}

struct simd_vote {
  uint64_t v;
  explicit operator uint64_t() const { return v; }
  bool any() const { return v != 0; }
};
inline void emu_ballot_complete(const char* slots, size_t ps, unsigned n, char* res, size_t rs) {
  uint64_t bits = 0;
  for (unsigned i = 0; i < n; ++i)
    if (metal_emu::slot<uint8_t>(slots, ps, i)) bits |= uint64_t(1) << i;
  for (unsigned i = 0; i < n; ++i) metal_emu::put(res, rs, i, bits);
}
inline simd_vote simd_ballot(bool c, int line = __builtin_LINE()) {
  return simd_vote{metal_emu::collective<uint64_t>("simd_ballot", line, uint8_t(c),
                                                   &emu_ballot_complete)};
}
inline bool simd_all(bool c, int line = __builtin_LINE()) {
  uint8_t r = metal_emu::collective<uint8_t>(
      "simd_all", line, uint8_t(c), &emu_reduce_complete<uint8_t, emu_and_op<uint8_t>, 32>);
  return r != 0;
}
inline bool simd_any(bool c, int line = __builtin_LINE()) {
  uint8_t r = metal_emu::collective<uint8_t>(
      "simd_any", line, uint8_t(c), &emu_reduce_complete<uint8_t, emu_or_op<uint8_t>, 32>);
  return r != 0;
}
inline bool simd_is_first() { return emu_current_attrs()->thread_index_in_simdgroup == 0; }

// ---------------------------------------------------------------------------
// simdgroup_matrix<T, 8, 8>.  Every lane holds the whole matrix (row-major
// e[row][col]); lane l owns elements (r, c) and (r, c + 1) with the hardware
// layout q = l / 4, r = (q & 4) + (l / 2) % 4, c = (q & 2) * 2 + (l % 2) * 2,
// which is what thread_elements() exposes.
//
// simdgroup_store is always a collective: operands come from their owners
// and the last lane to arrive writes memory once, while all 32 lanes are
// present.  simdgroup_load and simdgroup_multiply(_accumulate) run in each
// lane on its own full copy (identical in every lane), without blocking:
// blocking costs a context switch per lane, and a tiled GEMM issues many of
// them.  Each is recorded (operation, line, arguments) and the runtime checks
// at the next barrier/collective/return that all lanes of the simdgroup
// recorded the same sequence, so a divergent or non-uniform call still
// fails.  A kernel that touches thread_elements() gets the exact lockstep
// version of every operation (the translator defines
// METAL_EMU_SIMDGROUP_MATRIX_LOCKSTEP), since a lane's copy then differs from
// its owners' elements.
// ---------------------------------------------------------------------------

inline void emu_owner(unsigned lane, int& r, int& c) {
  unsigned q = lane / 4;
  r = int((q & 4) + (lane / 2) % 4);
  c = int((q & 2) * 2 + (lane % 2) * 2);
}

template <class T, int Cols = 8, int Rows = 8>
struct simdgroup_matrix {
  static_assert(Cols == 8 && Rows == 8, "only 8x8 simdgroup matrices are emulated");
  alignas(16) T e[8][8];
  simdgroup_matrix() = default;
  explicit simdgroup_matrix(T diag) {
    for (int r = 0; r < 8; ++r)
      for (int c = 0; c < 8; ++c) e[r][c] = (r == c) ? diag : T(0);
  }
  vec<T, 2>& thread_elements() {
    int r, c;
    emu_owner(emu_current_attrs()->thread_index_in_simdgroup, r, c);
    return *reinterpret_cast<vec<T, 2>*>(&e[r][c]);
  }
  const vec<T, 2>& thread_elements() const {
    int r, c;
    emu_owner(emu_current_attrs()->thread_index_in_simdgroup, r, c);
    return *reinterpret_cast<const vec<T, 2>*>(&e[r][c]);
  }
  vec<T, 2> owned() const { return thread_elements(); }
};
typedef simdgroup_matrix<float, 8, 8> simdgroup_float8x8;
typedef simdgroup_matrix<half, 8, 8> simdgroup_half8x8;
typedef simdgroup_matrix<bfloat, 8, 8> simdgroup_bfloat8x8;

template <class T, int C = 8, int R = 8>
inline simdgroup_matrix<T, C, R> make_filled_simdgroup_matrix(T value) {
  simdgroup_matrix<T, C, R> m;
  for (int r = 0; r < 8; ++r)
    for (int c = 0; c < 8; ++c) m.e[r][c] = value;
  return m;
}

#ifndef METAL_EMU_SIMDGROUP_MATRIX_LOCKSTEP
#define METAL_EMU_SIMDGROUP_MATRIX_LOCKSTEP 0
#endif

inline uint64_t emu_mix(uint64_t h, uint64_t v) {
  h ^= v + 0x9E3779B97F4A7C15ull + (h << 6) + (h >> 2);
  return h;
}

// Number of threads of the calling thread's simdgroup.
inline unsigned emu_simdgroup_size() {
  const emu_attrs* a = emu_current_attrs();
  unsigned n = a->threads_per_threadgroup[0] * a->threads_per_threadgroup[1] *
               a->threads_per_threadgroup[2];
  unsigned first = a->simdgroup_index_in_threadgroup * 32;
  return n - first < 32 ? n - first : 32;
}

inline void emu_need_full_simdgroup(unsigned n, const char* op) {
  if (n != 32) {
    (void)op;
    emu_fail("simdgroup_matrix operation in a simdgroup with fewer than 32 threads");
  }
}

template <class T>
struct emu_full {
  T e[8][8];
};
template <class T>
inline void emu_assemble(emu_full<T>& m, const char* slots, size_t ps, size_t off) {
  for (unsigned lane = 0; lane < 32; ++lane) {
    int r, c;
    emu_owner(lane, r, c);
    vec<T, 2> v;
    __builtin_memcpy(&v, slots + lane * ps + off, sizeof(v));
    m.e[r][c] = v.x;
    m.e[r][c + 1] = v.y;
  }
}

template <class T>
struct emu_mem_args {
  metal_emu::ptr_core p;
  ulong epr;
  ulong ox, oy;
  uint8_t transpose;
};
template <class T>
inline bool emu_same_args(const emu_mem_args<T>& a, const emu_mem_args<T>& b) {
  return a.p.p_ == b.p.p_ && a.epr == b.epr && a.ox == b.ox && a.oy == b.oy &&
         a.transpose == b.transpose;
}
// Element (r, c) of the matrix lives at src[(oy + r) * epr + ox + c]
// (transposed: src[(oy + c) * epr + ox + r]).
template <class T>
inline long emu_mem_index(const emu_mem_args<T>& a, int r, int c) {
  return a.transpose ? (long)((a.oy + c) * a.epr + a.ox + r)
                     : (long)((a.oy + r) * a.epr + a.ox + c);
}

template <class T>
void emu_load_complete(const char* slots, size_t ps, unsigned n, char* res, size_t rs) {
  emu_need_full_simdgroup(n, "simdgroup_load");
  emu_mem_args<T> a = metal_emu::slot<emu_mem_args<T>>(slots, ps, 0);
  for (unsigned i = 1; i < n; ++i)
    if (!emu_same_args(a, metal_emu::slot<emu_mem_args<T>>(slots, ps, i)))
      emu_fail("simdgroup_load: lanes passed different pointers/strides/origins");
  auto src = metal_emu::ptr<const T>::from_core(a.p);
  emu_full<T> m;
  for (int r = 0; r < 8; ++r)
    for (int c = 0; c < 8; ++c) m.e[r][c] = src[emu_mem_index(a, r, c)];
  for (unsigned i = 0; i < n; ++i) metal_emu::put(res, rs, i, m);
}

template <class T, class P>
inline void simdgroup_load(simdgroup_matrix<T, 8, 8>& d, const P& src,
                           ulong elements_per_row = 8, vec<ulong, 2> origin = vec<ulong, 2>(0),
                           bool transpose = false, int line = __builtin_LINE()) {
  metal_emu::ptr<const T> p = src;  // copy-init: no silent element-type cast
  emu_mem_args<T> a{p, elements_per_row, origin.x, origin.y, uint8_t(transpose)};
  if (METAL_EMU_SIMDGROUP_MATRIX_LOCKSTEP) {
    emu_full<T> m = metal_emu::collective<emu_full<T>>("simdgroup_load", line, a,
                                                       &emu_load_complete<T>);
    __builtin_memcpy(d.e, m.e, sizeof(m.e));
    return;
  }
  emu_need_full_simdgroup(emu_simdgroup_size(), "simdgroup_load");
  uint64_t h = emu_mix(emu_mix((uint64_t)(uintptr_t)p.p_, a.epr), a.ox);
  emu_note_op("simdgroup_load", line, emu_mix(emu_mix(h, a.oy), a.transpose));
  for (int r = 0; r < 8; ++r)
    for (int c = 0; c < 8; ++c) d.e[r][c] = p[emu_mem_index(a, r, c)];
}

template <class T>
struct emu_store_payload {
  vec<T, 2> own;
  emu_mem_args<T> a;
};
template <class T>
void emu_store_complete(const char* slots, size_t ps, unsigned n, char*, size_t) {
  emu_need_full_simdgroup(n, "simdgroup_store");
  emu_store_payload<T> p0 = metal_emu::slot<emu_store_payload<T>>(slots, ps, 0);
  for (unsigned i = 1; i < n; ++i)
    if (!emu_same_args(p0.a, metal_emu::slot<emu_store_payload<T>>(slots, ps, i).a))
      emu_fail("simdgroup_store: lanes passed different pointers/strides/origins");
  emu_full<T> m;
  emu_assemble(m, slots, ps, offsetof(emu_store_payload<T>, own));
  auto dst = metal_emu::ptr<T>::from_core(p0.a.p);
  for (int r = 0; r < 8; ++r)
    for (int c = 0; c < 8; ++c) dst[emu_mem_index(p0.a, r, c)] = m.e[r][c];
}

template <class T, class P>
inline void simdgroup_store(const simdgroup_matrix<T, 8, 8>& s, const P& dst,
                            ulong elements_per_row = 8, vec<ulong, 2> origin = vec<ulong, 2>(0),
                            bool transpose = false, int line = __builtin_LINE()) {
  metal_emu::ptr<T> p = dst;
  emu_store_payload<T> pl{s.owned(), {p, elements_per_row, origin.x, origin.y, uint8_t(transpose)}};
  emu_simd_collective("simdgroup_store", line, &pl, sizeof(pl), nullptr, 0,
                      &emu_store_complete<T>);
}

template <class TA, class TB, class TC>
struct emu_mma_payload {
  vec<TA, 2> a;
  vec<TB, 2> b;
  vec<TC, 2> c;
};
template <class TD, class TA, class TB, class TC>
void emu_mma_complete(const char* slots, size_t ps, unsigned n, char* res, size_t rs) {
  using P = emu_mma_payload<TA, TB, TC>;
  emu_need_full_simdgroup(n, "simdgroup_multiply_accumulate");
  emu_full<TA> a;
  emu_full<TB> b;
  emu_full<TC> c;
  emu_assemble(a, slots, ps, offsetof(P, a));
  emu_assemble(b, slots, ps, offsetof(P, b));
  emu_assemble(c, slots, ps, offsetof(P, c));
  float fa[8][8], fb[8][8];
  for (int i = 0; i < 8; ++i)
    for (int j = 0; j < 8; ++j) {
      fa[i][j] = static_cast<float>(a.e[i][j]);
      fb[i][j] = static_cast<float>(b.e[i][j]);
    }
  emu_full<TD> d;
  for (int i = 0; i < 8; ++i)
    for (int j = 0; j < 8; ++j) {
      float s = static_cast<float>(c.e[i][j]);
      for (int k = 0; k < 8; ++k) s += fa[i][k] * fb[k][j];
      d.e[i][j] = static_cast<TD>(s);
    }
  for (unsigned i = 0; i < n; ++i) metal_emu::put(res, rs, i, d);
}
template <class TD, class TA, class TB, class TC>
inline void simdgroup_multiply_accumulate(simdgroup_matrix<TD, 8, 8>& d,
                                          const simdgroup_matrix<TA, 8, 8>& a,
                                          const simdgroup_matrix<TB, 8, 8>& b,
                                          const simdgroup_matrix<TC, 8, 8>& c,
                                          int line = __builtin_LINE()) {
  if (METAL_EMU_SIMDGROUP_MATRIX_LOCKSTEP) {
    emu_mma_payload<TA, TB, TC> pl{a.owned(), b.owned(), c.owned()};
    emu_full<TD> r = metal_emu::collective<emu_full<TD>>(
        "simdgroup_multiply_accumulate", line, pl, &emu_mma_complete<TD, TA, TB, TC>);
    __builtin_memcpy(d.e, r.e, sizeof(r.e));
    return;
  }
  emu_need_full_simdgroup(emu_simdgroup_size(), "simdgroup_multiply_accumulate");
  emu_note_op("simdgroup_multiply_accumulate", line, 0);
  float fa[8][8], fb[8][8], fc[8][8];  // convert once: half->float is not free
  for (int i = 0; i < 8; ++i)
    for (int j = 0; j < 8; ++j) {
      fa[i][j] = static_cast<float>(a.e[i][j]);
      fb[i][j] = static_cast<float>(b.e[i][j]);
      fc[i][j] = static_cast<float>(c.e[i][j]);
    }
  for (int i = 0; i < 8; ++i)
    for (int j = 0; j < 8; ++j) {
      float s = fc[i][j];
      for (int k = 0; k < 8; ++k) s += fa[i][k] * fb[k][j];
      d.e[i][j] = static_cast<TD>(s);
    }
}
template <class TD, class TA, class TB>
inline void simdgroup_multiply(simdgroup_matrix<TD, 8, 8>& d, const simdgroup_matrix<TA, 8, 8>& a,
                               const simdgroup_matrix<TB, 8, 8>& b,
                               int line = __builtin_LINE()) {
  simdgroup_multiply_accumulate(d, a, b, simdgroup_matrix<TD, 8, 8>(TD(0)), line);
}

// ---------------------------------------------------------------------------
// Atomics (what atomic_outputs=True makes of every output).
// ---------------------------------------------------------------------------

enum memory_order {
  memory_order_relaxed = __ATOMIC_RELAXED,
  memory_order_acquire = __ATOMIC_ACQUIRE,
  memory_order_release = __ATOMIC_RELEASE,
  memory_order_acq_rel = __ATOMIC_ACQ_REL,
  memory_order_seq_cst = __ATOMIC_SEQ_CST,
};

template <class T>
struct alignas(sizeof(T)) atomic {
  static_assert(std::is_same<T, int>::value || std::is_same<T, uint>::value ||
                    std::is_same<T, float>::value || std::is_same<T, bool>::value ||
                    std::is_same<T, ulong>::value || std::is_same<T, long>::value,
                "Metal atomics exist for int, uint, float, bool (and 64-bit integers "
                "on newer GPUs), not for this type");
  T v;
};
typedef atomic<int> atomic_int;
typedef atomic<uint> atomic_uint;
typedef atomic<float> atomic_float;
typedef atomic<bool> atomic_bool;
typedef atomic<ulong> atomic_ulong;

template <class T>
inline atomic<T>& emu_atomic_ref(atomic<T>* a) { return *a; }
template <class T>
inline atomic<T>& emu_atomic_ref(const metal_emu::ptr<atomic<T>>& a) { return *a; }

template <class T, class Op>
inline T emu_atomic_rmw(atomic<T>& a, Op op) {
  T old;
  __atomic_load(&a.v, &old, __ATOMIC_RELAXED);
  T want;
  do {
    want = op(old);
  } while (!__atomic_compare_exchange(&a.v, &old, &want, true, __ATOMIC_SEQ_CST,
                                      __ATOMIC_RELAXED));
  return old;
}

template <class P>
inline auto atomic_load_explicit(const P& p, memory_order) {
  auto& a = emu_atomic_ref(p);
  std::remove_reference_t<decltype(a.v)> r;
  __atomic_load(&a.v, &r, __ATOMIC_SEQ_CST);
  return r;
}
template <class P, class U>
inline void atomic_store_explicit(const P& p, U val, memory_order) {
  auto& a = emu_atomic_ref(p);
  decltype(a.v) v = static_cast<decltype(a.v)>(val);
  __atomic_store(&a.v, &v, __ATOMIC_SEQ_CST);
}
template <class P, class U>
inline auto atomic_exchange_explicit(const P& p, U val, memory_order) {
  auto& a = emu_atomic_ref(p);
  using T = std::remove_reference_t<decltype(a.v)>;
  T v = static_cast<T>(val), r;
  __atomic_exchange(&a.v, &v, &r, __ATOMIC_SEQ_CST);
  return r;
}
template <class P, class E, class U>
inline bool atomic_compare_exchange_weak_explicit(const P& p, E* expected, U desired,
                                                  memory_order, memory_order) {
  auto& a = emu_atomic_ref(p);
  using T = std::remove_reference_t<decltype(a.v)>;
  T d = static_cast<T>(desired);
  return __atomic_compare_exchange(&a.v, (T*)expected, &d, false, __ATOMIC_SEQ_CST,
                                   __ATOMIC_SEQ_CST);
}
#define EMU_ATOMIC_RMW(name, expr)                                     \
  template <class P, class U>                                          \
  inline auto name(const P& p, U val, memory_order) {                  \
    auto& a = emu_atomic_ref(p);                                       \
    using T = std::remove_reference_t<decltype(a.v)>;                  \
    const T b = static_cast<T>(val);                                   \
    return emu_atomic_rmw(a, [b](T x) -> T { return expr; });          \
  }
EMU_ATOMIC_RMW(atomic_fetch_add_explicit, static_cast<T>(x + b))
EMU_ATOMIC_RMW(atomic_fetch_sub_explicit, static_cast<T>(x - b))
EMU_ATOMIC_RMW(atomic_fetch_and_explicit, static_cast<T>(x & b))
EMU_ATOMIC_RMW(atomic_fetch_or_explicit, static_cast<T>(x | b))
EMU_ATOMIC_RMW(atomic_fetch_xor_explicit, static_cast<T>(x ^ b))
EMU_ATOMIC_RMW(atomic_fetch_max_explicit, (x > b ? x : b))
EMU_ATOMIC_RMW(atomic_fetch_min_explicit, (x < b ? x : b))
#undef EMU_ATOMIC_RMW

// Fences (MSL 3.2's atomic_thread_fence).  Threadgroups run one after another here
// (metal_emu_runtime.h), so a fence only has to order this process's memory accesses.
enum thread_scope {
  thread_scope_thread = 0,
  thread_scope_simdgroup = 1,
  thread_scope_threadgroup = 2,
  thread_scope_device = 3,
};
inline void atomic_thread_fence(mem_flags, memory_order, thread_scope = thread_scope_device) {
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
}

}  // namespace metal

using namespace metal;

// ---------------------------------------------------------------------------
// MLX's Metal prelude (kernels/utils.h): names MLX kernels may rely on.
// ---------------------------------------------------------------------------

typedef half float16_t;
typedef bfloat bfloat16_t;

inline uint16_t bfloat16_to_uint16(const bfloat16_t x) { return x.bits_; }
inline bfloat16_t uint16_to_bfloat16(const uint16_t x) {
  return bfloat16_t(x, bfloat16_t::from_bits_t{});
}

template <typename U>
struct Limits {
  static constexpr U max = metal::numeric_limits<U>::max();
  static constexpr U min = metal::numeric_limits<U>::min();
  static constexpr U finite_max = metal::numeric_limits<U>::max();
  static constexpr U finite_min = metal::numeric_limits<U>::min();
};
#define EMU_FLOAT_LIMIT(T)                                                  \
  template <>                                                               \
  struct Limits<T> {                                                        \
    static constexpr T max = metal::numeric_limits<T>::infinity();          \
    static constexpr T min = -metal::numeric_limits<T>::infinity();         \
    static constexpr T finite_max = metal::numeric_limits<T>::max();        \
    static constexpr T finite_min = -metal::numeric_limits<T>::max();       \
  };
EMU_FLOAT_LIMIT(float)
EMU_FLOAT_LIMIT(half)
EMU_FLOAT_LIMIT(bfloat16_t)
#undef EMU_FLOAT_LIMIT
template <>
struct Limits<bool> {
  static constexpr bool max = true;
  static constexpr bool min = false;
};

template <class S, class St>
inline int64_t elem_to_loc(int64_t elem, const S& shape, const St& strides, int ndim) {
  int64_t loc = 0;
  for (int i = ndim - 1; i >= 0 && elem > 0; --i) {
    loc += (elem % shape[i]) * strides[i];
    elem /= shape[i];
  }
  return loc;
}
inline size_t ceildiv(size_t n, size_t m) { return (n + m - 1) / m; }
