// Prefill attention over the paged KV cache: the new tokens of every prefill chunk of a step attend
// causally over their sequence's cached prefix and themselves, reading K/V pages where they lie
// (the chunk's own K/V were written to the cache first). engine/ops/reference.py is the oracle.
//
// Layouts (as reference.py): cache [KV, N, B, D] per layer; query/out [T, H, D] with H = KV * G
// (rows may be strided); block_tables [P, M] int32; query_start_loc [P + 1] int32 (offsets of each
// sequence's chunk in query); seq_lens [P] int32 (context length after the chunk).
//
// Work item: one sequence, one kv head, a tile of up to 64 query rows (64 / G tokens x the G query
// heads of that kv head; compiled for 16, 32, 48 and 64 row lanes). Scores are computed transposed,
// S^T[key][row], with the tile's rows in the vector lanes: every key's score for 16 rows is 64 FMAs over the head dim (a broadcast K
// element times a row of the transposed queries), the online softmax per row is element-wise
// across the 16 keys of a step (no horizontal reductions), and the weighted V sum takes each row's
// probability as a broadcast against whole V rows. Keys come 16 at a time, page by page.

#include <ATen/Parallel.h>

#include <cmath>

#include "vec.h"

namespace {

constexpr int64_t kMaxRows = 64;  // query rows per tile
constexpr int64_t kKeys = kLanes;  // keys per step

struct PrefillScratch {
  std::vector<float> qt;     // [D][kMaxRows] scaled queries, transposed
  std::vector<float> acc;    // [kMaxRows][D] weighted V sums
  std::vector<float> probs;  // [kKeys][kMaxRows] this step's exp(score - max), transposed
  std::vector<float> keys;   // [kKeys][D] the step's keys in fp32 (bf16 caches)
  std::vector<float> zeros;  // [D] stands in for the keys past a context's end
  explicit PrefillScratch(int64_t D)
      : qt(D * kMaxRows), acc(kMaxRows * D), probs(kKeys * kMaxRows), keys(kKeys * D), zeros(D) {}
};

// One tile of kRV * 16 row lanes (R of them real): row r = (token j0 + r / G, query head r % G),
// token j0 at context position `first`. Keys [0, first + n_tok) are read; key k is visible to row
// r iff k <= first + r / G. Padding lanes (r >= R) compute on zero queries and are dropped.
template <typename T, int kRV>
ENGINE_MULTIVERSION void prefill_tile(
    const T* __restrict query, int64_t q_tok_stride, int64_t q_head_stride,  // &query[j0, h * G]
    const T* __restrict key_head, const T* __restrict value_head, const int32_t* __restrict table, int64_t B,
    int64_t D, int64_t first, int64_t n_tok, int64_t G, float scale, PrefillScratch& scratch,
    T* __restrict out, int64_t out_tok_stride, int64_t out_head_stride) {
  constexpr int64_t kRows = kRV * kLanes;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const int64_t R = n_tok * G;
  float* __restrict qt = scratch.qt.data();
  float* __restrict acc = scratch.acc.data();
  float* __restrict probs = scratch.probs.data();
  alignas(64) float rescale[kMaxRows];  // per row: e^(old max - new max) for what was summed so far
  for (int64_t r0 = 0; r0 < kRows; r0 += kLanes) {  // 16 query rows x 16 dims at a time, transposed
    const T* src[kLanes];
    for (int64_t i = 0; i < kLanes; ++i)
      src[i] = r0 + i < R ? query + ((r0 + i) / G) * q_tok_stride + ((r0 + i) % G) * q_head_stride : nullptr;
    for (int64_t d0 = 0; d0 < D; d0 += kLanes) {
      v16f block[kLanes];
      for (int64_t i = 0; i < kLanes; ++i) block[i] = src[i] != nullptr ? load16(src[i] + d0) * scale : v16f{};
      transpose16(block);
      for (int64_t j = 0; j < kLanes; ++j) store16(qt + (d0 + j) * kMaxRows + r0, block[j]);
    }
  }
  for (int64_t i = 0; i < kRows * D; ++i) acc[i] = 0.0f;
  // per row lane: running max, running sum, and the last key position the row may see (positions
  // are compared as floats: exact below 2^24 tokens)
  v16f m[kRV], l[kRV], last[kRV];
  for (int v = 0; v < kRV; ++v) {
    m[v] = v16f{} + kNegInf;
    l[v] = v16f{};
    for (int64_t i = 0; i < kLanes; ++i) {
      const int64_t r = v * kLanes + i;
      last[v][i] = r < R ? static_cast<float>(first + r / G) : std::numeric_limits<float>::max();
    }
  }
  const int64_t end = first + n_tok;  // keys [0, end)
  const int64_t num_pages = (end + B - 1) / B;
  for (int64_t p = 0; p < num_pages; ++p) {
    const T* kp = key_head + static_cast<int64_t>(table[p]) * B * D;
    const T* vp = value_head + static_cast<int64_t>(table[p]) * B * D;
    const int64_t n = std::min(B, end - p * B);
    for (int64_t t0 = 0; t0 < n; t0 += kKeys) {
      const int64_t keys = std::min(kKeys, n - t0);
      const int64_t k0 = p * B + t0;  // position of the step's first key
      const float* kf;
      if constexpr (std::is_same_v<T, float>) {
        kf = kp + t0 * D;
      } else {
        float* buf = scratch.keys.data();
        for (int64_t t = 0; t < keys; ++t)
          for (int64_t d = 0; d < D; d += kLanes) store16(buf + t * D + d, load16(kp + (t0 + t) * D + d));
        kf = buf;
      }
      // S^T[t][row lanes], 4 keys x kRV row vectors at a time (up to 16 accumulators)
      v16f s[kKeys][kRV];
      for (int64_t tb = 0; tb < keys; tb += 4) {
        const float* krow[4];
        for (int64_t i = 0; i < 4; ++i) krow[i] = tb + i < keys ? kf + (tb + i) * D : scratch.zeros.data();
        v16f a[4][kRV];
        for (int i = 0; i < 4; ++i)
          for (int v = 0; v < kRV; ++v) a[i][v] = v16f{};
        for (int64_t d = 0; d < D; ++d) {
          v16f qv[kRV];
          for (int v = 0; v < kRV; ++v) qv[v] = load16(qt + d * kMaxRows + v * kLanes);
          for (int i = 0; i < 4; ++i) {
            const float kd = krow[i][d];
            for (int v = 0; v < kRV; ++v) a[i][v] += kd * qv[v];
          }
        }
        for (int64_t i = 0; i < 4 && tb + i < keys; ++i)
          for (int v = 0; v < kRV; ++v) s[tb + i][v] = a[i][v];
      }
      const bool masked = k0 + keys - 1 > first;  // some key lies past some row's position
      for (int v = 0; v < kRV; ++v) {
        v16f mx = m[v];
        for (int64_t t = 0; t < keys; ++t) {
          if (masked) s[t][v] = static_cast<float>(k0 + t) > last[v] ? v16f{} + kNegInf : s[t][v];
          mx = s[t][v] > mx ? s[t][v] : mx;
        }
        // key 0 is visible to every row, so from the first step on every max is finite
        const v16f corr = exp_nonpositive(m[v] - mx);  // e^-inf = 0 at the first step
        v16f sum = v16f{};
        for (int64_t t = 0; t < keys; ++t) {
          const v16f e = exp_nonpositive(s[t][v] - mx);
          sum += e;
          store16(probs + t * kMaxRows + v * kLanes, e);
        }
        l[v] = l[v] * corr + sum;
        m[v] = mx;
        store16(rescale + v * kLanes, corr);
      }
      // acc[r] = acc[r] * rescale[r] + sum_t probs[t][r] * V[t]: 8 rows x a 16-wide slice of D at a time
      for (int64_t r0 = 0; r0 < kRows; r0 += 8) {
        for (int64_t d = 0; d < D; d += kLanes) {
          v16f a[8];
          for (int i = 0; i < 8; ++i) a[i] = load16(acc + (r0 + i) * D + d) * rescale[r0 + i];
          for (int64_t t = 0; t < keys; ++t) {
            const v16f vv = load16(vp + (t0 + t) * D + d);
            const float* pr = probs + t * kMaxRows + r0;
            for (int i = 0; i < 8; ++i) a[i] += pr[i] * vv;
          }
          for (int i = 0; i < 8; ++i) store16(acc + (r0 + i) * D + d, a[i]);
        }
      }
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    const float inv = 1.0f / l[r / kLanes][r % kLanes];
    T* o = out + (r / G) * out_tok_stride + (r % G) * out_head_stride;
    for (int64_t d = 0; d < D; d += kLanes) store16(o + d, load16(acc + r * D + d) * inv);
  }
}

template <typename T>
using TileFn = void (*)(const T*, int64_t, int64_t, const T*, const T*, const int32_t*, int64_t, int64_t, int64_t,
                        int64_t, int64_t, float, PrefillScratch&, T*, int64_t, int64_t);
template <typename T>
TileFn<T> tile_for_rows(int64_t rows) {
  switch ((rows + kLanes - 1) / kLanes) {
    case 1: return &prefill_tile<T, 1>;
    case 2: return &prefill_tile<T, 2>;
    case 3: return &prefill_tile<T, 3>;
    default: return &prefill_tile<T, 4>;
  }
}

}  // namespace

void paged_prefill_attention(torch::Tensor out, torch::Tensor query, torch::Tensor key_cache,
                             torch::Tensor value_cache, torch::Tensor block_tables, torch::Tensor query_start_loc,
                             torch::Tensor seq_lens, double scale) {
  check_paged_attention(query, out, key_cache, value_cache, block_tables, seq_lens);
  check(query_start_loc.scalar_type() == torch::kInt32 && query_start_loc.dim() == 1 &&
            query_start_loc.is_contiguous() && query_start_loc.size(0) == seq_lens.size(0) + 1,
        "query_start_loc must be a contiguous [P + 1] int32 tensor");
  const int64_t T = query.size(0), H = query.size(1), D = query.size(2);
  const int64_t KV = key_cache.size(0), N = key_cache.size(1), B = key_cache.size(2);
  const int64_t P = seq_lens.size(0), M = block_tables.size(1);
  check(H / KV <= kMaxRows, "at most 64 query heads per kv head");
  const int64_t G = H / KV;
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int32_t* starts = query_start_loc.data_ptr<int32_t>();
  check(starts[0] == 0 && starts[P] == T, "query_start_loc must run from 0 to the number of query tokens");
  const int64_t tile_tokens = kMaxRows / G;
  std::vector<int64_t> items;  // (sequence, first token of the tile) pairs; heads are the inner index
  for (int64_t s = 0; s < P; ++s) {
    const int64_t n_new = starts[s + 1] - starts[s];
    check(n_new >= 0 && n_new <= lens[s], "a chunk is longer than its context, or query_start_loc decreases");
    for (int64_t j = 0; j < n_new; j += tile_tokens) {
      items.push_back(s);
      items.push_back(j);
    }
  }
  const int64_t num_items = static_cast<int64_t>(items.size()) / 2;
  const int64_t q_tok = query.stride(0), q_head = query.stride(1);
  const int64_t o_tok = out.stride(0), o_head = out.stride(1);
  dispatch(query, [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* q = static_cast<const scalar_t*>(query.data_ptr());
    const scalar_t* kc = static_cast<const scalar_t*>(key_cache.data_ptr());
    const scalar_t* vc = static_cast<const scalar_t*>(value_cache.data_ptr());
    scalar_t* o = static_cast<scalar_t*>(out.data_ptr());
    at::parallel_for(0, num_items * KV, 1, [&](int64_t begin, int64_t end) {
      PrefillScratch scratch(D);
      for (int64_t w = begin; w < end; ++w) {
        const int64_t s = items[2 * (w / KV)], j0 = items[2 * (w / KV) + 1], h = w % KV;
        const int64_t n_new = starts[s + 1] - starts[s];
        const int64_t token = starts[s] + j0;  // row of query / out
        const int64_t n_tok = std::min(tile_tokens, n_new - j0);
        tile_for_rows<scalar_t>(n_tok * G)(q + token * q_tok + h * G * q_head, q_tok, q_head, kc + h * N * B * D,
                               vc + h * N * B * D, tables + s * M, B, D, lens[s] - n_new + j0,
                               n_tok, G, static_cast<float>(scale), scratch,
                               o + token * o_tok + h * G * o_head, o_tok, o_head);
      }
    });
  });
}
