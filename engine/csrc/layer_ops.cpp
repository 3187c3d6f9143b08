// The decoder layer's element-wise ops, each fused into one pass (several torch ops and
// temporaries otherwise): RMSNorm (optionally after the residual add), SiLU-and-multiply of the
// fused gate/up projection, and the rotary embedding in place.

#include <ATen/Parallel.h>

#include <cmath>

#include "vec.h"

namespace {

// out = weight * (x * rsqrt(mean(x^2) + eps)), in transformers' order (x * r rounded to the
// dtype, then the weight); with `add`, x = residual += add first (the residual stream, in place).
// Whole vectors of 16, then the row's tail one by one; the sum of squares in two vector
// accumulators (a scalar running sum cannot be vectorised without -ffast-math).
template <typename T>
ENGINE_MULTIVERSION void rms_norm_rows(T* __restrict out, int64_t out_stride, T* __restrict x, int64_t x_stride,
                                       const T* __restrict add, int64_t add_stride, const T* __restrict weight,
                                       int64_t begin, int64_t end, int64_t H, float eps) {
  const int64_t full = H / kLanes * kLanes;
  for (int64_t t = begin; t < end; ++t) {
    T* xr = x + t * x_stride;
    if (add != nullptr) {
      const T* ar = add + t * add_stride;
      for (int64_t i = 0; i < full; i += kLanes) store16(xr + i, load16(xr + i) + load16(ar + i));
      for (int64_t i = full; i < H; ++i) xr[i] = static_cast<T>(to_float(xr[i]) + to_float(ar[i]));
    }
    v16f ss0 = v16f{}, ss1 = v16f{};
    int64_t i = 0;
    for (; i + 2 * kLanes <= full; i += 2 * kLanes) {
      const v16f a = load16(xr + i), b = load16(xr + i + kLanes);
      ss0 += a * a;
      ss1 += b * b;
    }
    if (i < full) {
      const v16f a = load16(xr + i);
      ss0 += a * a;
    }
    float ss = hsum(ss0 + ss1);
    for (int64_t j = full; j < H; ++j) ss += to_float(xr[j]) * to_float(xr[j]);
    const float r = 1.0f / std::sqrt(ss / static_cast<float>(H) + eps);
    T* o = out + t * out_stride;
    for (int64_t j = 0; j < full; j += kLanes)
      store16(o + j, load16(weight + j) * round_as(T{}, load16(xr + j) * r));
    for (int64_t j = full; j < H; ++j) o[j] = static_cast<T>(to_float(weight[j]) * to_float(static_cast<T>(to_float(xr[j]) * r)));
  }
}

// out[t, i] = silu(gate_up[t, i]) * gate_up[t, I + i]
template <typename T>
ENGINE_MULTIVERSION void silu_mul_rows(T* __restrict out, const T* __restrict gate_up, int64_t in_stride,
                                       int64_t begin, int64_t end, int64_t I) {
  const int64_t full = I / kLanes * kLanes;
  for (int64_t t = begin; t < end; ++t) {
    const T* g = gate_up + t * in_stride;
    const T* u = g + I;
    T* o = out + t * I;
    for (int64_t i = 0; i < full; i += kLanes) {
      const v16f x = load16(g + i);
      const v16f ax = x < 0.0f ? -x : x;
      const v16f e = exp_nonpositive(-ax);  // e^-|x|: sigmoid without overflow either side
      const v16f d = 1.0f / (1.0f + e);     // one division: sigmoid(|x|)
      const v16f sig = x < 0.0f ? e * d : d;
      store16(o + i, round_as(T{}, x * sig) * load16(u + i));  // silu(gate) in T, then * up, as torch
    }
    for (int64_t i = full; i < I; ++i) {
      const float x = to_float(g[i]);
      o[i] = static_cast<T>(x / (1.0f + std::exp(-x)) * to_float(u[i]));
    }
  }
}

// x[t, h] = x * cos + roll(x, D/2) * sin_signed, in place (both halves read before either is written)
template <typename T>
ENGINE_MULTIVERSION void rotary_rows(T* __restrict x, int64_t row_stride, int64_t head_stride, int64_t heads,
                                     const T* __restrict cos, const T* __restrict sin, int64_t begin, int64_t end,
                                     int64_t D) {
  const int64_t half = D / 2;
  for (int64_t t = begin; t < end; ++t) {
    const T* c = cos + t * D;
    const T* s = sin + t * D;
    for (int64_t h = 0; h < heads; ++h) {
      T* v = x + t * row_stride + h * head_stride;
      for (int64_t i = 0; i < half; ++i) {
        const float a = to_float(v[i]), b = to_float(v[i + half]);
        const T lo = static_cast<T>(a * to_float(c[i]) + b * to_float(s[i]));
        const T hi = static_cast<T>(b * to_float(c[i + half]) + a * to_float(s[i + half]));
        v[i] = lo;
        v[i + half] = hi;
      }
    }
  }
}

}  // namespace

// out [T, H] = rms_norm(x) (x [T, H]); with `add` given, x += add first, in place.
void rms_norm(torch::Tensor out, torch::Tensor x, c10::optional<torch::Tensor> add, torch::Tensor weight,
              double eps) {
  check_rows(out, "out");
  check_rows(x, "x");
  check(out.sizes() == x.sizes() && weight.dim() == 1 && weight.size(0) == x.size(1) && weight.is_contiguous(),
        "out, x and weight must be [T, H], [T, H] and [H]");
  check(out.scalar_type() == x.scalar_type() && weight.scalar_type() == x.scalar_type(),
        "out, x and weight must share one dtype");
  if (add.has_value()) {
    check_rows(*add, "add");
    check(add->sizes() == x.sizes() && add->scalar_type() == x.scalar_type(), "add must be like x");
  }
  const int64_t T = x.size(0), H = x.size(1);
  dispatch(x, [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* a = add.has_value() ? static_cast<const scalar_t*>(add->data_ptr()) : nullptr;
    const int64_t a_stride = add.has_value() ? add->stride(0) : 0;
    at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
      rms_norm_rows<scalar_t>(static_cast<scalar_t*>(out.data_ptr()), out.stride(0),
                              static_cast<scalar_t*>(x.data_ptr()), x.stride(0), a, a_stride,
                              static_cast<const scalar_t*>(weight.data_ptr()), begin, end, H,
                              static_cast<float>(eps));
    });
  });
}

// out [T, I] = silu(gate_up[:, :I]) * gate_up[:, I:]
void silu_and_mul(torch::Tensor out, torch::Tensor gate_up) {
  check_rows(gate_up, "gate_up");
  check(out.dim() == 2 && out.is_contiguous() && gate_up.size(1) == 2 * out.size(1) && out.size(0) == gate_up.size(0),
        "out must be a contiguous [T, I] for gate_up [T, 2 I]");
  check(out.scalar_type() == gate_up.scalar_type(), "out and gate_up must share one dtype");
  const int64_t T = out.size(0), I = out.size(1);
  dispatch(out, [&](auto tag) {
    using scalar_t = decltype(tag);
    at::parallel_for(0, T, 8, [&](int64_t begin, int64_t end) {
      silu_mul_rows<scalar_t>(static_cast<scalar_t*>(out.data_ptr()),
                              static_cast<const scalar_t*>(gate_up.data_ptr()), gate_up.stride(0), begin, end, I);
    });
  });
}

// x [T, heads, D] rotated in place by cos / sin_signed [T, D] (RotaryEmbedding's tables).
void rotary_(torch::Tensor x, torch::Tensor cos, torch::Tensor sin_signed) {
  check(x.dim() == 3 && x.stride(2) == 1, "x must be [T, heads, D] with a contiguous last dimension");
  const int64_t T = x.size(0), heads = x.size(1), D = x.size(2);
  check(D % 2 == 0, "head_dim must be even");
  check(cos.dim() == 2 && cos.is_contiguous() && sin_signed.is_contiguous() && cos.sizes() == sin_signed.sizes() &&
            cos.size(0) == T && cos.size(1) == D,
        "cos and sin must be contiguous [T, D]");
  check(cos.scalar_type() == x.scalar_type() && sin_signed.scalar_type() == x.scalar_type(),
        "x, cos and sin must share one dtype");
  dispatch(x, [&](auto tag) {
    using scalar_t = decltype(tag);
    at::parallel_for(0, T, 8, [&](int64_t begin, int64_t end) {
      rotary_rows<scalar_t>(static_cast<scalar_t*>(x.data_ptr()), x.stride(0), x.stride(1), heads,
                            static_cast<const scalar_t*>(cos.data_ptr()),
                            static_cast<const scalar_t*>(sin_signed.data_ptr()), begin, end, D);
    });
  });
}
