#pragma once
// The kernels of sdk::add_layer_norm and how a launch maps ForwardArgs / BackwardArgs onto them, apart from the
// launch itself: add_layer_norm.cu launches them on the GPU, and tests/cuda_on_host runs this same source
// on the host (threads as CUDA threads, barriers for __syncthreads and the warp shuffles), where no GPU is.
//
// One block of kThreads threads per row; each thread keeps its columns (c = thread + i * kThreads) in registers,
// so the mean and the variance take two reductions over values already loaded, the variance around the mean as
// torch's layer norm computes it (biased, eps inside the square root). An RMSNorm (`rms`) skips the mean: its
// variance is the mean of the squares, as transformers' LlamaRMSNorm computes it, and it has no bias.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "add_layer_norm.hpp"

namespace ablate::sdk::cuda::kernels {

inline constexpr int kThreads = 256;
inline constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ float load(const float* p, std::int64_t i) { return p[i]; }
__device__ __forceinline__ float load(const __nv_bfloat16* p, std::int64_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ float load(const __half* p, std::int64_t i) { return __half2float(p[i]); }
__device__ __forceinline__ void store(float* p, std::int64_t i, float v) { p[i] = v; }
// Round to nearest even, as torch's casts do.
__device__ __forceinline__ void store(__nv_bfloat16* p, std::int64_t i, float v) { p[i] = __float2bfloat16_rn(v); }
__device__ __forceinline__ void store(__half* p, std::int64_t i, float v) { p[i] = __float2half_rn(v); }

/// Sum of `v` over the block's threads, in every thread. `shared` holds kWarps floats per reduced value;
/// the barrier at the start lets a block call it twice in a row with the same `shared`.
template <int N>
__device__ __forceinline__ void block_sum(float (&v)[N], float (*shared)[kWarps]) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int k = 0; k < N; ++k) {
#pragma unroll
    for (int o = 16; o > 0; o /= 2) v[k] += __shfl_xor_sync(0xffffffffu, v[k], o);
  }
  __syncthreads();
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < N; ++k) shared[k][warp] = v[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < N; ++k) {
    float t = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) t += shared[k][w];
    v[k] = t;
  }
}

/// s = residual + branch (branch may be null: s is residual and is not written), y = LayerNorm(s) (or RMSNorm)
/// in Y and, when y_float is not null, in float32 too; mean (not with rms) and rstd per row for the backward
/// pass. V: columns per thread, at least ceil(hidden / kThreads).
template <class B, class Y, int V>
__global__ void __launch_bounds__(kThreads) forward_kernel(const float* __restrict__ residual, const B* __restrict__ branch,
                                                          const float* __restrict__ weight, const float* __restrict__ bias,
                                                          float* __restrict__ sum, Y* __restrict__ y,
                                                          float* __restrict__ y_float, float* __restrict__ mean_out,
                                                          float* __restrict__ rstd_out, std::int64_t hidden, float eps,
                                                          bool rms) {
  __shared__ float shared[1][kWarps];
  const std::int64_t base = static_cast<std::int64_t>(blockIdx.x) * hidden;
  float x[V];
  float acc[1] = {0.f};
#pragma unroll
  for (int i = 0; i < V; ++i) {
    const std::int64_t c = threadIdx.x + static_cast<std::int64_t>(i) * kThreads;
    x[i] = 0.f;
    if (c < hidden) {
      x[i] = residual[base + c];
      if (branch) {
        x[i] += load(branch, base + c);
        sum[base + c] = x[i];
      }
      acc[0] += x[i];
    }
  }
  float mean = 0.f;
  if (!rms) {  // the same for every thread of the block: block_sum's barriers are met by all or none
    block_sum(acc, shared);
    mean = acc[0] / static_cast<float>(hidden);
  }
  acc[0] = 0.f;
#pragma unroll
  for (int i = 0; i < V; ++i) {
    const std::int64_t c = threadIdx.x + static_cast<std::int64_t>(i) * kThreads;
    if (c < hidden) acc[0] += (x[i] - mean) * (x[i] - mean);
  }
  block_sum(acc, shared);
  const float rstd = rsqrtf(acc[0] / static_cast<float>(hidden) + eps);
#pragma unroll
  for (int i = 0; i < V; ++i) {
    const std::int64_t c = threadIdx.x + static_cast<std::int64_t>(i) * kThreads;
    if (c < hidden) {
      const float normed = (x[i] - mean) * rstd * weight[c];
      const float out = bias ? normed + bias[c] : normed;
      store(y, base + c, out);
      if (y_float) y_float[base + c] = out;
    }
  }
  if (threadIdx.x == 0) {
    if (mean_out) mean_out[blockIdx.x] = mean;
    rstd_out[blockIdx.x] = rstd;
  }
}

/// The gradient of s: LayerNorm's (or RMSNorm's) backward, with the saved mean and rstd, of y's gradient, dy + dy_float
/// (either may be null: no gradient), plus s's own gradient ds (null: none); written as float32 (d_residual)
/// and, when d_branch is not null, in the branch's type too. The weight's and bias's gradients are not
/// computed here (norms.cpp does them when they are needed).
template <class B, class Y, int V>
__global__ void __launch_bounds__(kThreads) backward_kernel(const float* __restrict__ s, const Y* __restrict__ dy,
                                                           const float* __restrict__ dy_float,
                                                           const float* __restrict__ ds, const float* __restrict__ mean_in,
                                                           const float* __restrict__ rstd_in, const float* __restrict__ weight,
                                                           float* __restrict__ d_residual, B* __restrict__ d_branch,
                                                           std::int64_t hidden, bool rms) {
  __shared__ float shared[2][kWarps];
  const std::int64_t base = static_cast<std::int64_t>(blockIdx.x) * hidden;
  const float mean = rms ? 0.f : mean_in[blockIdx.x], rstd = rstd_in[blockIdx.x];
  float xhat[V], g[V];
  float acc[2] = {0.f, 0.f};  // sum of g, sum of g * xhat
#pragma unroll
  for (int i = 0; i < V; ++i) {
    const std::int64_t c = threadIdx.x + static_cast<std::int64_t>(i) * kThreads;
    xhat[i] = g[i] = 0.f;
    if (c < hidden) {
      xhat[i] = (s[base + c] - mean) * rstd;
      const float d = (dy ? load(dy, base + c) : 0.f) + (dy_float ? dy_float[base + c] : 0.f);
      g[i] = d * weight[c];
      acc[0] += g[i];
      acc[1] += g[i] * xhat[i];
    }
  }
  block_sum(acc, shared);
  const float n = static_cast<float>(hidden);
  // RMSNorm subtracted no mean, so its gradient has no mean term: rstd * (g - xhat * mean(g * xhat)).
  const float mean_g = rms ? 0.f : acc[0] / n, mean_gx = acc[1] / n;
#pragma unroll
  for (int i = 0; i < V; ++i) {
    const std::int64_t c = threadIdx.x + static_cast<std::int64_t>(i) * kThreads;
    if (c < hidden) {
      float d = rstd * (g[i] - mean_g - xhat[i] * mean_gx);
      if (ds) d += ds[base + c];
      d_residual[base + c] = d;
      if (d_branch) store(d_branch, base + c, d);
    }
  }
}

/// Calls f(T{}) with the C++ type of a DType.
template <class F>
cudaError_t with_type(DType t, F&& f) {
  switch (t) {
    case DType::f32: return f(float{});
    case DType::bf16: return f(__nv_bfloat16{});
    case DType::f16: return f(__half{});
  }
  return cudaErrorInvalidValue;
}

/// Calls f(B{}, Y{}, std::integral_constant<int, V>{}) with the C++ types of two DTypes and the smallest V of
/// 1, 2, 4, 8, 16, 32 that covers `hidden`: the kernels' template arguments.
template <class F>
cudaError_t dispatch(DType b, DType y, std::int64_t hidden, F&& f) {
  return with_type(b, [&](auto bt) {
    return with_type(y, [&](auto yt) -> cudaError_t {
      const std::int64_t v = (hidden + kThreads - 1) / kThreads;
      if (v <= 1) return f(bt, yt, std::integral_constant<int, 1>{});
      if (v <= 2) return f(bt, yt, std::integral_constant<int, 2>{});
      if (v <= 4) return f(bt, yt, std::integral_constant<int, 4>{});
      if (v <= 8) return f(bt, yt, std::integral_constant<int, 8>{});
      if (v <= 16) return f(bt, yt, std::integral_constant<int, 16>{});
      if (v <= 32) return f(bt, yt, std::integral_constant<int, 32>{});
      return cudaErrorInvalidValue;
    });
  });
}

/// Maps `a` onto forward_kernel's template and value arguments and calls
/// launch(kernel, blocks, threads, arguments...), which returns a cudaError_t.
template <class Launch>
cudaError_t launch_forward(const ForwardArgs& a, Launch&& launch) {
  if (a.rows == 0) return cudaSuccess;
  return dispatch(a.branch_type, a.y_type, a.hidden, [&](auto b, auto y, auto v) {
    using B = decltype(b);
    using Y = decltype(y);
    return launch(forward_kernel<B, Y, decltype(v)::value>, static_cast<unsigned>(a.rows), kThreads, a.residual,
                  static_cast<const B*>(a.branch), a.weight, a.bias, a.sum, static_cast<Y*>(a.y), a.y_float, a.mean,
                  a.rstd, a.hidden, a.eps, a.rms);
  });
}

/// The same for backward_kernel.
template <class Launch>
cudaError_t launch_backward(const BackwardArgs& a, Launch&& launch) {
  if (a.rows == 0) return cudaSuccess;
  return dispatch(a.branch_type, a.dy_type, a.hidden, [&](auto b, auto y, auto v) {
    using B = decltype(b);
    using Y = decltype(y);
    return launch(backward_kernel<B, Y, decltype(v)::value>, static_cast<unsigned>(a.rows), kThreads, a.sum,
                  static_cast<const Y*>(a.dy), a.dy_float, a.d_sum, a.mean, a.rstd, a.weight, a.d_residual,
                  static_cast<B*>(a.d_branch), a.hidden, a.rms);
  });
}

}  // namespace ablate::sdk::cuda::kernels
