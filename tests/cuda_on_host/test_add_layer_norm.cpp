// sdk/src/cuda/add_layer_norm_kernels.cuh run on the host (simt.hpp) against a float64 reference: the
// kernels' arithmetic and indexing for every row width class (one to 32 columns per thread, rows that do not
// fill the last one), each type the arguments take, each optional pointer left out, LayerNorm and RMSNorm. The GPU run of the
// same kernels is tests/gpu/test_cuda_lora_parity.py; this one needs no GPU and runs in CI.

// clang-format off
#include "simt.hpp"  // first: it sets up the CUDA built-ins the kernels use
// clang-format on
#include "add_layer_norm_kernels.cuh"

#include <catch2/catch.hpp>

#include <cmath>
#include <random>
#include <string>
#include <vector>

namespace {

using ablate::sdk::cuda::BackwardArgs;
using ablate::sdk::cuda::DType;
using ablate::sdk::cuda::ForwardArgs;
namespace kernels = ablate::sdk::cuda::kernels;

const char* name(DType t) { return t == DType::f32 ? "f32" : t == DType::bf16 ? "bf16" : "f16"; }

/// A row-major [rows, hidden] buffer in one of the kernels' types, read and written as floats.
struct Buffer {
  DType type;
  std::vector<float> f32;
  std::vector<__nv_bfloat16> bf16;
  std::vector<__half> f16;

  Buffer(DType t, std::size_t n) : type(t) {
    if (t == DType::f32) f32.assign(n, 0.f);
    if (t == DType::bf16) bf16.assign(n, __float2bfloat16_rn(0.f));
    if (t == DType::f16) f16.assign(n, __float2half_rn(0.f));
  }
  void* data() {
    return type == DType::f32 ? static_cast<void*>(f32.data()) : type == DType::bf16 ? static_cast<void*>(bf16.data())
                                                                                      : static_cast<void*>(f16.data());
  }
  float get(std::size_t i) const {
    return type == DType::f32 ? f32[i] : type == DType::bf16 ? __bfloat162float(bf16[i]) : __half2float(f16[i]);
  }
  /// Stores v rounded to the type (round to nearest even, as the kernels and torch's casts do).
  void set(std::size_t i, float v) {
    if (type == DType::f32) f32[i] = v;
    if (type == DType::bf16) bf16[i] = __float2bfloat16_rn(v);
    if (type == DType::f16) f16[i] = __float2half_rn(v);
  }
  /// v as this type would hold it.
  float rounded(float v) const {
    return type == DType::f32 ? v : type == DType::bf16 ? __bfloat162float(__float2bfloat16_rn(v)) : __half2float(__float2half_rn(v));
  }
};

std::vector<float> normal(std::size_t n, float scale, float shift, std::mt19937& gen) {
  std::normal_distribution<float> d(shift, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = d(gen);
  return v;
}

struct Case {
  std::int64_t rows, hidden;
  bool branch;
  DType branch_type, y_type;
  bool y_float;
  bool rms = false;  ///< RMSNorm (LLaMA's): no mean, no bias
};

std::string describe(const Case& c) {
  return "rows " + std::to_string(c.rows) + ", hidden " + std::to_string(c.hidden) + ", branch " +
         (c.branch ? name(c.branch_type) : "none") + ", y " + name(c.y_type) + (c.y_float ? " + f32" : "") +
         (c.rms ? ", RMSNorm" : "");
}

}  // namespace

TEST_CASE("add_layer_norm's CUDA kernels, run on the host, compute LayerNorm(residual + branch) and its gradient",
          "[cuda_on_host]") {
  // hidden: V = 1 with idle threads (64), V = 2 not filled (300), V = 4 with a ragged tail (1000) and full
  // (1024, OPT-350m), the widest (8192, V = 32); RMSNorm at LLaMA widths (2048, 4096) and a ragged one.
  const std::vector<Case> cases{
      {3, 1024, true, DType::bf16, DType::bf16, true},  // post-LN: the stream in f32 and the products' bf16 copy
      {2, 1000, false, DType::bf16, DType::bf16, false},
      {4, 64, true, DType::f32, DType::f32, false},
      {2, 300, true, DType::f16, DType::f16, true},
      {1, 8192, true, DType::bf16, DType::bf16, false},
      {3, 4096, true, DType::bf16, DType::bf16, false, true},
      {2, 2048, false, DType::f32, DType::f32, false, true},
      {2, 300, true, DType::f16, DType::f16, true, true},
  };
  std::mt19937 gen(7);
  std::normal_distribution<float> unit(0.f, 1.f);
  for (const auto& c : cases) {
    INFO(describe(c));
    const auto rows = static_cast<std::size_t>(c.rows), hidden = static_cast<std::size_t>(c.hidden), n = rows * hidden;
    const float eps = 1e-5f;
    // A mean far from zero and a small spread: the two-pass variance has to get it right.
    auto residual = normal(n, 0.5f, 3.f, gen);
    Buffer branch(c.branch_type, n);
    for (std::size_t i = 0; i < n; ++i) branch.set(i, unit(gen));
    auto weight = normal(hidden, 0.2f, 1.f, gen), bias = normal(hidden, 0.1f, 0.f, gen);

    std::vector<float> sum(n, -1.f), y_float(n, -1.f), mean(rows), rstd(rows);
    Buffer y(c.y_type, n);
    // An RMSNorm takes no bias and keeps no mean: null pointers, which the kernels must not touch.
    ForwardArgs f{residual.data(), c.branch ? branch.data() : nullptr, c.branch_type, weight.data(),
                  c.rms ? nullptr : bias.data(), sum.data(), y.data(), c.y_type, c.y_float ? y_float.data() : nullptr,
                  c.rms ? nullptr : mean.data(), rstd.data(), c.rows, c.hidden, eps, c.rms};
    REQUIRE(kernels::launch_forward(f, [](auto... a) { return ablate::simt::launch(a...); }) == cudaSuccess);

    // The float64 reference, from the same float32 sum the kernel forms (one float add per element).
    std::vector<double> ref_y(n), xhat(n), ref_mean(rows), ref_rstd(rows);
    for (std::size_t r = 0; r < rows; ++r) {
      double m = 0, v = 0;
      for (std::size_t j = 0; j < hidden; ++j) {
        const auto i = r * hidden + j;
        const float s = c.branch ? residual[i] + branch.get(i) : residual[i];
        if (c.branch) REQUIRE(sum[i] == s);
        m += s;
      }
      m = c.rms ? 0.0 : m / static_cast<double>(hidden);  // RMSNorm: the mean of the squares around zero
      for (std::size_t j = 0; j < hidden; ++j) {
        const auto i = r * hidden + j;
        const double d = (c.branch ? residual[i] + branch.get(i) : residual[i]) - m;
        v += d * d;
      }
      ref_mean[r] = m;
      ref_rstd[r] = 1.0 / std::sqrt(v / static_cast<double>(hidden) + eps);
      if (!c.rms) CHECK(mean[r] == Approx(m).epsilon(1e-6));
      CHECK(rstd[r] == Approx(ref_rstd[r]).epsilon(1e-5));
      for (std::size_t j = 0; j < hidden; ++j) {
        const auto i = r * hidden + j;
        xhat[i] = ((c.branch ? residual[i] + branch.get(i) : residual[i]) - m) * ref_rstd[r];
        ref_y[i] = xhat[i] * weight[j] + (c.rms ? 0.0 : bias[j]);
      }
    }
    if (!c.branch) CHECK(sum[0] == -1.f);  // no branch: the sum is the residual and is not written
    std::size_t off = 0;
    for (std::size_t i = 0; i < n; ++i) {
      // y within the rounding of its type around a float32 result that is itself within 1e-5 of the truth.
      const double tolerance = 1e-5 * (1 + std::abs(ref_y[i])) + std::abs(y.rounded(static_cast<float>(ref_y[i])) - ref_y[i]);
      if (std::abs(y.get(i) - ref_y[i]) > tolerance) ++off;
      if (c.y_float) {
        CHECK(std::abs(y_float[i] - ref_y[i]) <= 1e-5 * (1 + std::abs(ref_y[i])));
        CHECK(y.get(i) == y.rounded(y_float[i]));  // the two outputs are one value written twice
      }
    }
    CHECK(off == 0);
    if (!c.y_float) CHECK(y_float[0] == -1.f);

    // Backward: y's gradient in its type, y_float's and the sum's own in float32, each optional.
    for (const bool with_dy : {true, false}) {
      const bool with_dy_float = c.y_float || !with_dy, with_ds = c.hidden != 1000, with_d_branch = c.branch;
      INFO("backward: dy " << with_dy << ", dy_float " << with_dy_float << ", d_sum " << with_ds);
      Buffer dy(c.y_type, n);
      for (std::size_t i = 0; i < n; ++i) dy.set(i, unit(gen));
      auto dy_float = normal(n, 1.f, 0.f, gen), ds = normal(n, 0.5f, 0.f, gen);
      std::vector<float> d_residual(n, -1.f);
      Buffer d_branch(c.branch_type, n);
      BackwardArgs b{c.branch ? sum.data() : residual.data(), with_dy ? dy.data() : nullptr, c.y_type,
                     with_dy_float ? dy_float.data() : nullptr, with_ds ? ds.data() : nullptr,
                     c.rms ? nullptr : mean.data(), rstd.data(), weight.data(), d_residual.data(),
                     with_d_branch ? d_branch.data() : nullptr, c.branch_type, c.rows, c.hidden, c.rms};
      REQUIRE(kernels::launch_backward(b, [](auto... a) { return ablate::simt::launch(a...); }) == cudaSuccess);
      std::size_t wrong = 0, wrong_branch = 0;
      for (std::size_t r = 0; r < rows; ++r) {
        std::vector<double> g(hidden);
        double mg = 0, mgx = 0;
        for (std::size_t j = 0; j < hidden; ++j) {
          const auto i = r * hidden + j;
          g[j] = ((with_dy ? dy.get(i) : 0.0) + (with_dy_float ? dy_float[i] : 0.0)) * weight[j];
          mg += g[j];
          mgx += g[j] * xhat[i];
        }
        mg = c.rms ? 0.0 : mg / static_cast<double>(hidden);  // RMSNorm's gradient has no mean term
        mgx /= static_cast<double>(hidden);
        for (std::size_t j = 0; j < hidden; ++j) {
          const auto i = r * hidden + j;
          const double want = ref_rstd[r] * (g[j] - mg - xhat[i] * mgx) + (with_ds ? ds[i] : 0.0);
          if (std::abs(d_residual[i] - want) > 2e-5 * (1 + std::abs(want))) ++wrong;
          if (with_d_branch && d_branch.get(i) != d_branch.rounded(d_residual[i])) ++wrong_branch;
        }
      }
      CHECK(wrong == 0);
      CHECK(wrong_branch == 0);
    }
  }
}

TEST_CASE("add_layer_norm's CUDA launchers: nothing to do for no rows, an error for rows wider than the kernels take",
          "[cuda_on_host]") {
  std::vector<float> row(kernels::kThreads * 33, 1.f), stats(1);
  ForwardArgs f{row.data(), nullptr, DType::bf16, row.data(), row.data(), row.data(), row.data(), DType::f32, nullptr,
                stats.data(), stats.data(), 0, 1024, 1e-5f, false};
  auto never = [](auto...) { return cudaErrorUnknown; };  // a launch that must not happen
  CHECK(kernels::launch_forward(f, never) == cudaSuccess);
  f.rows = 1;
  f.hidden = static_cast<std::int64_t>(row.size());  // 33 columns per thread: beyond the widest template
  CHECK(kernels::launch_forward(f, never) == cudaErrorInvalidValue);
  BackwardArgs b{row.data(), nullptr, DType::f32, row.data(), nullptr, stats.data(), stats.data(), row.data(),
                 row.data(), nullptr, DType::f32, 0, 1024, false};
  CHECK(kernels::launch_backward(b, never) == cudaSuccess);
  b.rows = 1;
  b.hidden = f.hidden;
  CHECK(kernels::launch_backward(b, never) == cudaErrorInvalidValue);
}
