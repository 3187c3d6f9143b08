// Greedy sampling's argmax over rows of logits, vectorised (torch's reduction runs at about a third
// of the speed on the engine's [sequences, vocab] logits).

#include <ATen/Parallel.h>

#include "vec.h"

namespace {

// Index of the first maximum of x[0, V); a NaN counts as the maximum (its first index), as in
// torch.argmax.
ENGINE_MULTIVERSION int64_t argmax_row(const float* __restrict x, int64_t V) {
  const int64_t full = V / kLanes * kLanes;
  int64_t best_index = -1;
  float best = 0.0f;
  if (full > 0) {
    v16i lane;
    for (int i = 0; i < kLanes; ++i) lane[i] = i;
    v16f top = load16(x);
    v16i top_at = lane, at = lane, nan = top != top;
    for (int64_t i = kLanes; i < full; i += kLanes) {
      const v16f v = load16(x + i);
      at += static_cast<int32_t>(kLanes);
      const v16i greater = v > top;  // strictly: each lane keeps its first maximum
      top = greater ? v : top;
      top_at = greater ? at : top_at;
      nan |= v != v;
    }
    bool any_nan = false;
    for (int i = 0; i < kLanes; ++i) any_nan |= nan[i] != 0;
    if (any_nan)
      for (int64_t i = 0; i < full; ++i)
        if (x[i] != x[i]) return i;
    best = top[0];
    best_index = top_at[0];
    for (int i = 1; i < kLanes; ++i)  // the largest lane; among equal ones the first index
      if (top[i] > best || (top[i] == best && top_at[i] < best_index)) {
        best = top[i];
        best_index = top_at[i];
      }
  }
  for (int64_t i = full; i < V; ++i) {
    if (x[i] != x[i]) return i;  // the first NaN: there is none before `full`
    if (best_index < 0 || x[i] > best) {
      best = x[i];
      best_index = i;
    }
  }
  return best_index;
}

}  // namespace

// out [S] int64 = argmax of each row of logits [S, V] (float32, contiguous rows)
void argmax_rows(torch::Tensor out, torch::Tensor logits) {
  check_rows(logits, "logits");
  check(logits.scalar_type() == torch::kFloat32, "logits must be float32");
  check(logits.size(1) > 0, "logits must have at least one column");
  check(out.dim() == 1 && out.is_contiguous() && out.scalar_type() == torch::kInt64 && out.size(0) == logits.size(0),
        "out must be a contiguous [S] int64 tensor");
  const int64_t S = logits.size(0), V = logits.size(1), stride = logits.stride(0);
  const float* x = logits.data_ptr<float>();
  int64_t* o = out.data_ptr<int64_t>();
  at::parallel_for(0, S, 1, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) o[s] = argmax_row(x + s * stride, V);
  });
}
