// Shared by the compiled CPU kernels (engine._cpu_kernels): 16-float generic vectors, an exp
// that vectorises, per-ISA cloning, argument checks and dtype dispatch.
//
// Portability: no -ffast-math (GCC 12 would link crtfastmath into the .so and flush denormals
// for the whole process); exp is a polynomial here; on x86-64 the hot loops are compiled three
// times (AVX-512, AVX2+FMA, baseline) and picked at load by the CPU's features, so one wheel runs
// on any x86-64 node. Accumulation is in fp32 for fp32 and bf16 tensors alike.
#pragma once

#include <torch/extension.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__x86_64__) && !defined(ENGINE_NO_CLONES)
#define ENGINE_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define ENGINE_MULTIVERSION
#endif

// Helpers are forced inline: a helper left out of line would be compiled for the baseline ISA,
// not for the AVX-512 / AVX2 clone that calls it.
#define ENGINE_INLINE inline __attribute__((always_inline))

namespace {

// 16 floats: GCC lowers these generic vectors to one AVX-512 register, two AVX2 ones or four SSE
// ones, whichever the clone is built for.
typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef uint16_t v16h __attribute__((vector_size(32)));
constexpr int64_t kLanes = 16;

ENGINE_INLINE v16f load16(const float* p) {
  v16f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
ENGINE_INLINE v16f load16(const c10::BFloat16* p) {  // bf16 is the top half of an fp32
  v16h h;
  std::memcpy(&h, p, sizeof(h));
  return reinterpret_cast<v16f>(__builtin_convertvector(h, v16u) << 16);
}
ENGINE_INLINE void store16(float* p, v16f v) { std::memcpy(p, &v, sizeof(v)); }
// float -> bf16 bits, rounded to nearest even like c10::BFloat16 (NaN stays a quiet NaN)
ENGINE_INLINE v16u bf16_bits(v16f v) {
  const v16u u = reinterpret_cast<v16u>(v);
  const v16u rounded = (u + (0x7fffu + ((u >> 16) & 1u))) >> 16;
  return v != v ? v16u{} + 0x7fc0u : rounded;
}
ENGINE_INLINE void store16(c10::BFloat16* p, v16f v) {
  const v16h h = __builtin_convertvector(bf16_bits(v), v16h);
  std::memcpy(p, &h, sizeof(h));
}
// v rounded to T's precision and back (what storing to T and loading again gives)
ENGINE_INLINE v16f round_as(float, v16f v) { return v; }
ENGINE_INLINE v16f round_as(c10::BFloat16, v16f v) { return reinterpret_cast<v16f>(bf16_bits(v) << 16); }
typedef float v8f __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));
ENGINE_INLINE float hsum(v16f v) {  // by halves: 3 vector adds and 3 scalar ones
  const v8f a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const v4f b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}
ENGINE_INLINE float hmax(v16f v) {
  const v8f a0 = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7);
  const v8f a1 = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const v8f a = a0 > a1 ? a0 : a1;
  const v4f b0 = __builtin_shufflevector(a, a, 0, 1, 2, 3), b1 = __builtin_shufflevector(a, a, 4, 5, 6, 7);
  const v4f b = b0 > b1 ? b0 : b1;
  return std::max(std::max(b[0], b[1]), std::max(b[2], b[3]));
}
ENGINE_INLINE float to_float(float x) { return x; }
ENGINE_INLINE float to_float(c10::BFloat16 x) { return static_cast<float>(x); }

// exp(x) for x <= 0 (softmax numerators), ~1 ulp on [-87, 0]: Cephes' reduction x = n ln2 + r,
// |r| <= ln2 / 2, a degree-6 polynomial for e^r, and 2^n built in the exponent bits. Below -87
// the result is 0 (e^-87 < 2^-125: no sum of weights can notice it).
ENGINE_INLINE v16f exp_nonpositive(v16f x) {
  const v16f lo = v16f{} - 87.0f;
  const v16f c = x < lo ? lo : x;
  const v16f t = c * 1.44269504088896341f - 0.5f;  // n = ceil(t) = round(c * log2 e), t < 0
  v16i n = __builtin_convertvector(t, v16i);       // truncation toward zero = ceil for t < 0
  const v16f nf = __builtin_convertvector(n, v16f);
  v16f r = c - nf * 0.693359375f;
  r = r - nf * -2.12194440e-4f;
  v16f p = v16f{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const v16f e = p * r * r + r + 1.0f;
  const v16f two_n = reinterpret_cast<v16f>((n + 127) << 23);
  return x < lo ? v16f{} : e * two_n;
}

// Sums of 16 vectors at once: out[i] = hsum(v[i]). Four rounds of pairwise even/odd lane sums
// (15 two-source shuffles and adds) instead of 16 separate horizontal sums.
ENGINE_INLINE v16f pair_sum(v16f a, v16f b) {
  return __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         __builtin_shufflevector(a, b, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}
ENGINE_INLINE v16f hsum16(v16f* v) {
  for (int width = 16; width > 1; width /= 2)
    for (int i = 0; i < width / 2; ++i) v[i] = pair_sum(v[2 * i], v[2 * i + 1]);
  return v[0];
}

// In-place transpose of a 16 x 16 block held as 16 row vectors: four rounds, each swapping one bit
// of the row index with the same bit of the column index (64 two-source shuffles).
template <int K, size_t... I>
ENGINE_INLINE void transpose_round(v16f& a, v16f& b, std::index_sequence<I...>) {
  const v16f x = __builtin_shufflevector(a, b, ((I & K) ? 16 + I - K : I)...);
  b = __builtin_shufflevector(a, b, ((I & K) ? 16 + I : I + K)...);
  a = x;
}
template <int K>
ENGINE_INLINE void transpose_rounds(v16f* v) {  // pairs of rows K apart exchange their K-wide halves
  for (int i = 0; i < 16; ++i)
    if (!(i & K)) transpose_round<K>(v[i], v[i + K], std::make_index_sequence<16>{});
}
ENGINE_INLINE void transpose16(v16f* v) {
  transpose_rounds<8>(v);
  transpose_rounds<4>(v);
  transpose_rounds<2>(v);
  transpose_rounds<1>(v);
}

ENGINE_INLINE void check(bool ok, const std::string& what) { TORCH_CHECK(ok, "engine._cpu_kernels: ", what); }

// Runs run(float{}) or run(c10::BFloat16{}) by t's dtype; anything else is refused.
template <typename F>
ENGINE_INLINE void dispatch(const torch::Tensor& t, const F& run) {
  if (t.scalar_type() == torch::kFloat32) {
    run(float{});
  } else {
    check(t.scalar_type() == torch::kBFloat16, "dtype must be float32 or bfloat16");
    run(c10::BFloat16{});
  }
}

// What every kernel over the cache checks of its operands: a and b [T, heads, D] of one shape with
// contiguous last dims, the caches [KV, N, B, D] of one shape and contiguous, one dtype for all four.
ENGINE_INLINE void check_rows_and_caches(const torch::Tensor& a, const torch::Tensor& b,
                                         const torch::Tensor& key_cache, const torch::Tensor& value_cache,
                                         const std::string& a_name, const std::string& b_name) {
  check(a.dim() == 3 && b.sizes() == a.sizes(), a_name + " and " + b_name + " must be [T, heads, D] of one shape");
  check(key_cache.dim() == 4 && key_cache.sizes() == value_cache.sizes(), "caches must be [KV, N, B, D] of one shape");
  check(key_cache.is_contiguous() && value_cache.is_contiguous(), "caches must be contiguous");
  check(a.stride(2) == 1 && b.stride(2) == 1, a_name + "'s and " + b_name + "'s last dimension must be contiguous");
  check(a.scalar_type() == key_cache.scalar_type() && b.scalar_type() == key_cache.scalar_type() &&
            value_cache.scalar_type() == key_cache.scalar_type(),
        a_name + ", " + b_name + " and caches must share one dtype");
}

// The checks both attention kernels make: query and out as above; D a multiple of 16 and H of KV;
// block_tables [P, M] and seq_lens [P] int32, every length in [1, M * B] and every block id it
// uses inside the cache.
ENGINE_INLINE void check_paged_attention(const torch::Tensor& query, const torch::Tensor& out,
                                         const torch::Tensor& key_cache, const torch::Tensor& value_cache,
                                         const torch::Tensor& block_tables, const torch::Tensor& seq_lens) {
  check_rows_and_caches(query, out, key_cache, value_cache, "query", "out");
  check(block_tables.scalar_type() == torch::kInt32 && block_tables.dim() == 2 && block_tables.is_contiguous(),
        "block_tables must be a contiguous [P, M] int32 tensor");
  check(seq_lens.scalar_type() == torch::kInt32 && seq_lens.dim() == 1 && seq_lens.is_contiguous(),
        "seq_lens must be a contiguous [P] int32 tensor");
  check(block_tables.size(0) == seq_lens.size(0), "one block table and one length per sequence");
  const int64_t H = query.size(1), D = query.size(2);
  const int64_t KV = key_cache.size(0), N = key_cache.size(1), B = key_cache.size(2);
  check(key_cache.size(3) == D, "cache head_dim differs from the query's");
  check(D % kLanes == 0, "head_dim must be a multiple of 16");
  check(KV > 0 && H % KV == 0, "query heads must be a multiple of kv heads");
  const int64_t P = seq_lens.size(0), M = block_tables.size(1);
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  for (int64_t s = 0; s < P; ++s) {
    check(lens[s] >= 1 && lens[s] <= M * B, "a context length is outside [1, pages * block_size]");
    for (int64_t p = 0; p < (lens[s] + B - 1) / B; ++p)
      check(tables[s * M + p] >= 0 && tables[s * M + p] < N, "a block id is outside the cache");
  }
}

ENGINE_INLINE void check_rows(const torch::Tensor& t, const char* name) {
  check(t.dim() == 2 && t.stride(1) == 1, std::string(name) + " must be [T, n] with contiguous rows");
}

}  // namespace
