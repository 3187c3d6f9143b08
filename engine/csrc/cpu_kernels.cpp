// CPU kernels over the paged KV cache: decode attention that reads each context's pages where
// they lie (no gather into a batch buffer, no padding to the longest context) and the KV-cache
// write. Built into engine._cpu_kernels at install time (setup.py); engine/ops/cpu_native.py is
// the Python face and falls back to the torch reference (engine/ops/reference.py) without it.
//
// Layouts (as reference.py): cache [KV, N, B, D] per layer; query/out [S, H, D] with H = KV * G;
// block_tables [S, M] int32; seq_lens [S] int32; slot_mapping [T] int64 (slot < 0: skip).
// Accumulation is in fp32 for fp32 and bf16 tensors alike.
//
// Portability: no -ffast-math (GCC 12 would link crtfastmath into the .so and flush denormals
// for the whole process); exp is a vectorisable polynomial below; on x86-64 the hot loops are
// compiled three times (AVX-512, AVX2+FMA, baseline) and picked at load by the CPU's features,
// so the wheel runs on any x86-64 node.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__x86_64__) && !defined(ENGINE_NO_CLONES)
#define ENGINE_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define ENGINE_MULTIVERSION
#endif

namespace {

// 16 floats: GCC lowers these generic vectors to one AVX-512 register, two AVX2 ones or four SSE
// ones, whichever the clone is built for.
typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef uint16_t v16h __attribute__((vector_size(32)));
constexpr int64_t kLanes = 16;

inline v16f load16(const float* p) {
  v16f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline v16f load16(const c10::BFloat16* p) {  // bf16 is the top half of an fp32
  v16h h;
  std::memcpy(&h, p, sizeof(h));
  return reinterpret_cast<v16f>(__builtin_convertvector(h, v16u) << 16);
}
inline void store16(float* p, v16f v) { std::memcpy(p, &v, sizeof(v)); }
typedef float v8f __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));
inline float hsum(v16f v) {  // by halves: 3 vector adds and 3 scalar ones
  const v8f a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const v4f b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}
inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }

// exp(x) for x <= 0 (softmax numerators), ~1 ulp on [-87, 0]: Cephes' reduction x = n ln2 + r,
// |r| <= ln2 / 2, a degree-6 polynomial for e^r, and 2^n built in the exponent bits. Below -87
// the result is 0 (e^-87 < 2^-125: no sum of weights can notice it).
inline v16f exp_nonpositive(v16f x) {
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

// One (sequence, kv head): the G query rows of that head's group over its L context tokens.
// Scratch: scores G * L floats, qf and acc G * D floats. D is a multiple of 16.
template <typename T>
ENGINE_MULTIVERSION void decode_one(
    const T* __restrict query, int64_t q_row_stride,                // G rows of D
    const T* __restrict key_head, const T* __restrict value_head,  // cache[h] = [N, B, D]
    const int32_t* __restrict table, int64_t context_len, int64_t group, int64_t dim, int64_t block_size,
    float scale, float* __restrict scores, float* __restrict qf, float* __restrict acc,
    T* __restrict out, int64_t out_row_stride) {
  const int64_t L = context_len, G = group, D = dim, B = block_size;
  const int64_t num_pages = (L + B - 1) / B;
  for (int64_t g = 0; g < G; ++g)
    for (int64_t d = 0; d < D; ++d) qf[g * D + d] = to_float(query[g * q_row_stride + d]) * scale;

  // Pass 1: scores[g, t] = q_g . k_t, page by page (a page is B contiguous rows of D).
  for (int64_t p = 0; p < num_pages; ++p) {
    const T* page = key_head + static_cast<int64_t>(table[p]) * B * D;
    const int64_t n = std::min(B, L - p * B);
    for (int64_t t = 0; t < n; ++t) {
      const T* k = page + t * D;
      for (int64_t g = 0; g < G; ++g) {
        const float* qg = qf + g * D;
        v16f s = load16(qg) * load16(k);
        for (int64_t d = kLanes; d < D; d += kLanes) s += load16(qg + d) * load16(k + d);
        scores[g * L + p * B + t] = hsum(s);
      }
    }
  }
  // Softmax of each row in the exact two-pass form: max, then normalised exponentials.
  const int64_t full = L / kLanes * kLanes;
  for (int64_t g = 0; g < G; ++g) {
    float* row = scores + g * L;
    float m = -std::numeric_limits<float>::max();
    for (int64_t t = 0; t < L; ++t) m = std::max(m, row[t]);
    v16f sum = v16f{};
    for (int64_t t = 0; t < full; t += kLanes) {
      const v16f e = exp_nonpositive(load16(row + t) - m);
      store16(row + t, e);
      sum += e;
    }
    float total = hsum(sum);
    if (full < L) {  // the tail, through a zero-padded vector
      float tail[kLanes];
      for (int64_t i = 0; i < kLanes; ++i) tail[i] = full + i < L ? row[full + i] - m : -100.0f;
      const v16f e = exp_nonpositive(load16(tail));
      for (int64_t i = 0; full + i < L; ++i) {
        row[full + i] = e[i];
        total += e[i];
      }
    }
    const float inv = 1.0f / total;
    for (int64_t t = 0; t < L; ++t) row[t] *= inv;
    for (int64_t d = 0; d < D; ++d) acc[g * D + d] = 0.0f;
  }
  // Pass 2: out_g = sum_t p[g, t] v_t.
  for (int64_t p = 0; p < num_pages; ++p) {
    const T* page = value_head + static_cast<int64_t>(table[p]) * B * D;
    const int64_t n = std::min(B, L - p * B);
    for (int64_t t = 0; t < n; ++t) {
      const T* v = page + t * D;
      for (int64_t d = 0; d < D; d += kLanes) {
        const v16f vv = load16(v + d);
        for (int64_t g = 0; g < G; ++g) {
          float* a = acc + g * D + d;
          store16(a, load16(a) + scores[g * L + p * B + t] * vv);
        }
      }
    }
  }
  for (int64_t g = 0; g < G; ++g)
    for (int64_t d = 0; d < D; ++d) out[g * out_row_stride + d] = static_cast<T>(acc[g * D + d]);
}

void check(bool ok, const std::string& what) { TORCH_CHECK(ok, "engine._cpu_kernels: ", what); }

}  // namespace

// out [S, H, D] (written), query [S, H, D] (rows may be strided, last dim contiguous).
void paged_decode_attention(torch::Tensor out, torch::Tensor query, torch::Tensor key_cache,
                            torch::Tensor value_cache, torch::Tensor block_tables, torch::Tensor seq_lens,
                            double scale) {
  check(query.dim() == 3 && out.sizes() == query.sizes(), "query and out must be [S, H, D] of one shape");
  check(key_cache.dim() == 4 && key_cache.sizes() == value_cache.sizes(), "caches must be [KV, N, B, D] of one shape");
  check(key_cache.is_contiguous() && value_cache.is_contiguous() && out.is_contiguous(), "caches and out must be contiguous");
  check(query.stride(2) == 1, "query's last dimension must be contiguous");
  check(query.scalar_type() == key_cache.scalar_type() && out.scalar_type() == query.scalar_type() &&
            value_cache.scalar_type() == query.scalar_type(),
        "query, caches and out must share one dtype");
  check(block_tables.scalar_type() == torch::kInt32 && block_tables.dim() == 2 && block_tables.is_contiguous(),
        "block_tables must be a contiguous [S, M] int32 tensor");
  check(seq_lens.scalar_type() == torch::kInt32 && seq_lens.dim() == 1 && seq_lens.is_contiguous(),
        "seq_lens must be a contiguous [S] int32 tensor");
  const int64_t S = query.size(0), H = query.size(1), D = query.size(2);
  const int64_t KV = key_cache.size(0), N = key_cache.size(1), B = key_cache.size(2);
  check(key_cache.size(3) == D, "cache head_dim differs from the query's");
  check(D % kLanes == 0, "head_dim must be a multiple of 16");
  check(KV > 0 && H % KV == 0, "query heads must be a multiple of kv heads");
  check(block_tables.size(0) == S && seq_lens.size(0) == S, "one block table and one length per sequence");
  const int64_t G = H / KV, M = block_tables.size(1);
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  int64_t max_len = 1;
  for (int64_t s = 0; s < S; ++s) {
    check(lens[s] >= 1 && lens[s] <= M * B, "a context length is outside [1, pages * block_size]");
    max_len = std::max<int64_t>(max_len, lens[s]);
  }
  for (int64_t s = 0; s < S; ++s)
    for (int64_t p = 0; p < (lens[s] + B - 1) / B; ++p)
      check(tables[s * M + p] >= 0 && tables[s * M + p] < N, "a block id is outside the cache");
  const int64_t q_seq = query.stride(0), q_head = query.stride(1);
  const auto run = [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* q = static_cast<const scalar_t*>(query.data_ptr());
    const scalar_t* kc = static_cast<const scalar_t*>(key_cache.data_ptr());
    const scalar_t* vc = static_cast<const scalar_t*>(value_cache.data_ptr());
    scalar_t* o = static_cast<scalar_t*>(out.data_ptr());
    at::parallel_for(0, S * KV, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scores(G * max_len), qf(G * D), acc(G * D);
      for (int64_t i = begin; i < end; ++i) {
        const int64_t s = i / KV, h = i % KV;
        decode_one<scalar_t>(q + s * q_seq + h * G * q_head, q_head, kc + h * N * B * D, vc + h * N * B * D,
                             tables + s * M, lens[s], G, D, B, static_cast<float>(scale), scores.data(),
                             qf.data(), acc.data(), o + (s * H + h * G) * D, D);
      }
    });
  };
  if (query.scalar_type() == torch::kFloat32) {
    run(float{});
  } else {
    check(query.scalar_type() == torch::kBFloat16, "dtype must be float32 or bfloat16");
    run(c10::BFloat16{});
  }
}

// key/value [T, KV, D] (strided rows, last dim contiguous) -> cache[h, slot // B, slot % B, :].
void write_kv_cache(torch::Tensor key, torch::Tensor value, torch::Tensor key_cache, torch::Tensor value_cache,
                    torch::Tensor slot_mapping) {
  check(key.dim() == 3 && key.sizes() == value.sizes(), "key and value must be [T, KV, D] of one shape");
  check(key_cache.dim() == 4 && key_cache.sizes() == value_cache.sizes(), "caches must be [KV, N, B, D] of one shape");
  check(key_cache.is_contiguous() && value_cache.is_contiguous(), "caches must be contiguous");
  check(key.stride(2) == 1 && value.stride(2) == 1, "key's and value's last dimension must be contiguous");
  check(key.scalar_type() == key_cache.scalar_type() && value.scalar_type() == key_cache.scalar_type() &&
            value_cache.scalar_type() == key_cache.scalar_type(),
        "key, value and caches must share one dtype");
  check(slot_mapping.scalar_type() == torch::kInt64 && slot_mapping.dim() == 1 && slot_mapping.is_contiguous() &&
            slot_mapping.size(0) == key.size(0),
        "slot_mapping must be a contiguous [T] int64 tensor");
  const int64_t T = key.size(0), KV = key.size(1), D = key.size(2);
  const int64_t N = key_cache.size(1), B = key_cache.size(2);
  check(key_cache.size(0) == KV && key_cache.size(3) == D, "key/value heads or head_dim differ from the cache's");
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) check(slots[t] < N * B, "a slot is outside the cache");
  const size_t row_bytes = static_cast<size_t>(D) * key.element_size();
  const char* k = static_cast<const char*>(key.data_ptr());
  const char* v = static_cast<const char*>(value.data_ptr());
  char* kc = static_cast<char*>(key_cache.data_ptr());
  char* vc = static_cast<char*>(value_cache.data_ptr());
  const int64_t es = key.element_size();
  for (int64_t t = 0; t < T; ++t) {
    if (slots[t] < 0) continue;
    for (int64_t h = 0; h < KV; ++h) {
      const int64_t dst = ((h * N * B) + slots[t]) * D * es;
      std::memcpy(kc + dst, k + (t * key.stride(0) + h * key.stride(1)) * es, row_bytes);
      std::memcpy(vc + dst, v + (t * value.stride(0) + h * value.stride(1)) * es, row_bytes);
    }
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "CPU kernels over the paged KV cache (see engine/ops/cpu_native.py)";
  m.def("paged_decode_attention", &paged_decode_attention, "decode attention reading pages in place");
  m.def("write_kv_cache", &write_kv_cache, "write new tokens' K/V into their cache slots");
}
