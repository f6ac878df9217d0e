#include "ablate/sdk/norms.hpp"

#include <atomic>
#include <cmath>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <ATen/ops/rms_norm.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/cuda/CUDAStream.h>  // the stream's handle only: libablate_sdk.so calls no CUDA runtime itself
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/autograd.h>

#include "ablate/sdk/linear.hpp"
#include "cuda/add_layer_norm.hpp"

namespace ablate::sdk {

RMSNormImpl::RMSNormImpl(std::int64_t size, double eps_) : eps(eps_) { weight = register_parameter("weight", torch::ones({size})); }
RMSNormImpl::~RMSNormImpl() = default;

torch::Tensor RMSNormImpl::forward(const torch::Tensor& x) {
  if (x.scalar_type() == torch::kFloat32 && weight.scalar_type() == torch::kFloat32) {
    // The residual stream (float32, under autocast too): torch's rms_norm, one fused kernel each way on CUDA
    // instead of the five passes below and their backward. On the CPU it decomposes into the ops below: the same
    // values and gradients as transformers' LlamaRMSNorm, bit for bit (the LLaMA parity tests are unchanged).
    return at::rms_norm(x, {weight.size(0)}, weight, eps);
  }
  auto h = x.to(torch::kFloat32);
  auto variance = h.pow(2).mean(-1, /*keepdim=*/true);
  h = h * torch::rsqrt(variance + eps);
  return weight * h.to(x.scalar_type());
}

namespace {

std::atomic<bool> g_fused{false};

using cuda::BackwardArgs;
using cuda::DType;
using cuda::ForwardArgs;
using NoAutocast = c10::impl::ExcludeDispatchKeyGuard;

std::optional<DType> kernel_type(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::f32;
    case at::kBFloat16: return DType::bf16;
    case at::kHalf: return DType::f16;
    default: return std::nullopt;
  }
}

// ---- the CPU's fused path: the kernels' algorithm as a loop over rows (each row as one CUDA block computes it,
// the mean first, then the variance around it), run by the unit tests and by a CPU run with --fused-norm on.

template <class T>
float load(const void* p, std::int64_t i) {
  return static_cast<float>(static_cast<const T*>(p)[i]);
}
template <class T>
void store(void* p, std::int64_t i, float v) {
  static_cast<T*>(p)[i] = static_cast<T>(v);  // c10's BFloat16 and Half round to nearest even, as CUDA's do
}

template <class F>
void with_type(DType t, F&& f) {
  switch (t) {
    case DType::f32: return f(float{});
    case DType::bf16: return f(c10::BFloat16{});
    case DType::f16: return f(c10::Half{});
  }
}

/// Calls f(B{}, Y{}, begin, end), with the C++ types of the branch's and the output's DTypes, over ranges of
/// the rows on libtorch's intra-op threads.
template <class F>
void over_rows(DType b, DType y, std::int64_t rows, F&& f) {
  with_type(b, [&](auto bt) {
    with_type(y, [&](auto yt) {
      at::parallel_for(0, rows, 1, [&](std::int64_t begin, std::int64_t end) { f(bt, yt, begin, end); });
    });
  });
}

void forward_cpu(const ForwardArgs& a) {
  over_rows(a.branch_type, a.y_type, a.rows, [&](auto b_, auto y_, std::int64_t begin, std::int64_t end) {
    using B = decltype(b_);
    using Y = decltype(y_);
    const auto h = a.hidden;
    std::vector<float> x(static_cast<std::size_t>(h));
    for (std::int64_t r = begin; r < end; ++r) {
      const std::int64_t base = r * h;
      float total = 0.f;
      for (std::int64_t c = 0; c < h; ++c) {
        float v = a.residual[base + c];
        if (a.branch) {
          v += load<B>(a.branch, base + c);
          a.sum[base + c] = v;
        }
        x[static_cast<std::size_t>(c)] = v;
        total += v;
      }
      const float mean = a.rms ? 0.f : total / static_cast<float>(h);  // RMSNorm: no mean subtracted
      float sq = 0.f;
      for (float v : x) sq += (v - mean) * (v - mean);
      const float rstd = 1.f / std::sqrt(sq / static_cast<float>(h) + a.eps);
      for (std::int64_t c = 0; c < h; ++c) {
        const float normed = (x[static_cast<std::size_t>(c)] - mean) * rstd * a.weight[c];
        const float out = a.bias ? normed + a.bias[c] : normed;
        store<Y>(a.y, base + c, out);
        if (a.y_float) a.y_float[base + c] = out;
      }
      if (a.mean) a.mean[r] = mean;
      a.rstd[r] = rstd;
    }
  });
}

void backward_cpu(const BackwardArgs& a) {
  over_rows(a.branch_type, a.dy_type, a.rows, [&](auto b_, auto y_, std::int64_t begin, std::int64_t end) {
    using B = decltype(b_);
    using Y = decltype(y_);
    const auto h = a.hidden;
    std::vector<float> xhat(static_cast<std::size_t>(h)), g(static_cast<std::size_t>(h));
    for (std::int64_t r = begin; r < end; ++r) {
      const std::int64_t base = r * h;
      const float mean = a.rms ? 0.f : a.mean[r], rstd = a.rstd[r];
      float sum_g = 0.f, sum_gx = 0.f;
      for (std::int64_t c = 0; c < h; ++c) {
        const auto i = static_cast<std::size_t>(c);
        xhat[i] = (a.sum[base + c] - mean) * rstd;
        const float d = (a.dy ? load<Y>(a.dy, base + c) : 0.f) + (a.dy_float ? a.dy_float[base + c] : 0.f);
        g[i] = d * a.weight[c];
        sum_g += g[i];
        sum_gx += g[i] * xhat[i];
      }
      const float n = static_cast<float>(h), mean_g = a.rms ? 0.f : sum_g / n, mean_gx = sum_gx / n;
      for (std::int64_t c = 0; c < h; ++c) {
        const auto i = static_cast<std::size_t>(c);
        float d = rstd * (g[i] - mean_g - xhat[i] * mean_gx);
        if (a.d_sum) d += a.d_sum[base + c];
        a.d_residual[base + c] = d;
        if (a.d_branch) store<B>(a.d_branch, base + c, d);
      }
    }
  });
}

using Values = std::vector<c10::IValue>;

// One pass of the fused path on `like`'s device: the CUDA kernel on torch's current stream, or the CPU's loop.
// It is recorded as an operator named `name`, as ATen's own are: profilers (the runner's ABLATE_OP_PROFILE,
// torch.profiler) see it under its name, with the tensors it reads and writes (`tensors()`: a pair of Values,
// defined or not; called only while a profiler listens), instead of folding it into its caller.
template <class Args, class Tensors>
void run(const char* name, Tensors&& tensors, const torch::Tensor& like, const Args& a,
         int (*on_cuda)(const Args&, void*), void (*on_cpu)(const Args&)) {
  at::RecordFunction record(at::RecordScope::FUNCTION);
  if (record.isActive()) {
    auto [args, results] = tensors();
    if (record.needsInputs()) {
      record.before(name, c10::ArrayRef<const c10::IValue>(args.data(), args.size()));
    } else {
      record.before(name);
    }
    if (record.needsOutputs()) record.setOutputs(std::move(results));
  }
  if (!like.is_cuda()) return on_cpu(a);
  const c10::DeviceGuard guard(like.device());
  const int error = on_cuda(a, c10::cuda::getCurrentCUDAStream(like.device().index()).stream());
  if (error != 0) throw std::runtime_error(std::string("add_layer_norm: CUDA kernel: ") + cuda::error_string(error));
}

float* f32(const torch::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }
void* raw(const torch::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

// Outputs, in order: pre-LN: the sum (with a branch), then the norm's output in the low type; post-LN: the
// norm's output in float32 (when the low type is not float32), then in the low type. A post-LN block's sum is
// written for the backward pass alone. `rms`: an RMSNorm, whose `bias` is an empty tensor (autograd takes no
// undefined input), and which keeps no mean.
class FusedAddLayerNorm : public torch::autograd::Function<FusedAddLayerNorm> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& residual,
                                                const torch::Tensor& branch, const torch::Tensor& weight,
                                                const torch::Tensor& bias, double eps, bool post, at::ScalarType low,
                                                bool rms) {
    NoAutocast no_autocast(c10::autocast_dispatch_keyset);
    const auto h = residual.size(-1), rows = residual.numel() / h;
    const bool add = branch.numel() > 0;  // empty: no branch (autograd takes no undefined input)
    const auto sum = add ? torch::empty_like(residual) : residual;
    const auto y = torch::empty(residual.sizes(), residual.options().dtype(low));
    const auto y32 = post && low != at::kFloat ? torch::empty_like(residual) : torch::Tensor();
    const auto mean = rms ? torch::Tensor() : torch::empty({rows}, residual.options());
    const auto rstd = torch::empty({rows}, residual.options());
    ForwardArgs a{f32(residual), add ? raw(branch) : nullptr, add ? *kernel_type(branch.scalar_type()) : DType::f32,
                  f32(weight), rms ? nullptr : f32(bias), add ? f32(sum) : nullptr, raw(y), *kernel_type(low),
                  f32(y32), f32(mean), f32(rstd), rows, h, static_cast<float>(eps), rms};
    const auto tensors = [&] {
      return std::pair{Values{residual, branch, weight, bias}, Values{add ? sum : torch::Tensor(), y, y32, mean, rstd}};
    };
    run("ablate::add_layer_norm", tensors, residual, a, cuda::add_layer_norm_forward, forward_cpu);
    ctx->set_materialize_grads(false);  // an output nobody read costs nothing in backward
    ctx->save_for_backward({sum, mean, rstd, weight});
    ctx->saved_data["post"] = post;
    ctx->saved_data["rms"] = rms;
    ctx->saved_data["low"] = static_cast<std::int64_t>(low);
    ctx->saved_data["branch"] = add ? static_cast<std::int64_t>(branch.scalar_type()) : std::int64_t{-1};
    if (post) return y32.defined() ? torch::autograd::variable_list{y32, y} : torch::autograd::variable_list{y};
    return add ? torch::autograd::variable_list{sum, y} : torch::autograd::variable_list{y};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    NoAutocast no_autocast(c10::autocast_dispatch_keyset);
    const auto saved = ctx->get_saved_variables();
    const auto& sum = saved[0];
    const auto& mean = saved[1];
    const auto& rstd = saved[2];
    const auto& weight = saved[3];
    const bool post = ctx->saved_data["post"].toBool();
    const bool rms = ctx->saved_data["rms"].toBool();
    const auto low = static_cast<at::ScalarType>(ctx->saved_data["low"].toInt());
    const auto branch_code = ctx->saved_data["branch"].toInt();
    const bool add = branch_code >= 0;
    const auto branch_type = static_cast<at::ScalarType>(add ? branch_code : static_cast<std::int64_t>(at::kFloat));
    // Which output each gradient belongs to (see the outputs above).
    torch::Tensor d_sum, dy32, dy;
    if (grads.size() == 2) (post ? dy32 : d_sum) = grads[0];
    dy = grads.back();
    for (auto* g : {&d_sum, &dy32, &dy}) {
      if (g->defined()) *g = g->contiguous();
    }
    if (dy.defined() && dy.scalar_type() != low) dy = dy.to(low);

    const auto h = sum.size(-1), rows = sum.numel() / h;
    const bool want_branch = add && ctx->needs_input_grad(1);
    torch::Tensor d_residual, d_branch;
    if (!dy.defined() && !dy32.defined()) {
      d_residual = d_sum;  // nothing reached the norm: the sum's gradient is all there is
      if (want_branch && d_sum.defined()) d_branch = d_sum.to(branch_type);
    } else {
      d_residual = torch::empty_like(sum);
      if (want_branch) d_branch = torch::empty(sum.sizes(), sum.options().dtype(branch_type));
      BackwardArgs a{f32(sum), raw(dy), *kernel_type(low), f32(dy32), f32(d_sum), f32(mean), f32(rstd), f32(weight),
                     f32(d_residual), raw(d_branch), *kernel_type(branch_type), rows, h, rms};
      const auto tensors = [&] {
        return std::pair{Values{sum, dy, dy32, d_sum, mean, rstd, weight}, Values{d_residual, d_branch}};
      };
      run("ablate::add_layer_norm_backward", tensors, sum, a, cuda::add_layer_norm_backward, backward_cpu);
    }
    torch::Tensor d_weight, d_bias;
    if ((ctx->needs_input_grad(2) || ctx->needs_input_grad(3)) && (dy.defined() || dy32.defined())) {
      // The parameters' gradients (full finetuning; an adapter run leaves the norms frozen): torch's ops.
      auto d = dy.defined() ? dy.to(at::kFloat) : torch::zeros_like(sum);
      if (dy32.defined()) d = d + dy32;
      d = d.reshape({rows, h});
      const auto centred = rms ? sum.reshape({rows, h}) : sum.reshape({rows, h}) - mean.unsqueeze(1);
      const auto xhat = centred * rstd.unsqueeze(1);
      if (ctx->needs_input_grad(2)) d_weight = (d * xhat).sum(0);
      if (ctx->needs_input_grad(3) && !rms) d_bias = d.sum(0);
    }
    return {ctx->needs_input_grad(0) ? d_residual : torch::Tensor(), d_branch, d_weight, d_bias,
            torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

// Whether the fused path can take these tensors (bias undefined: an RMSNorm's); otherwise torch's ops do.
bool fusable(const torch::Tensor& residual, const torch::Tensor& branch, const torch::Tensor& weight,
             const torch::Tensor& bias, at::ScalarType low) {
  if (residual.scalar_type() != at::kFloat || residual.dim() == 0 || residual.numel() == 0) return false;
  const auto h = residual.size(-1);
  for (const auto* p : {&weight, &bias}) {
    if (p == &bias && !bias.defined()) continue;
    if (!p->defined() || p->scalar_type() != at::kFloat || p->numel() != h || p->device() != residual.device()) {
      return false;
    }
  }
  if (branch.defined() && (branch.sizes() != residual.sizes() || branch.device() != residual.device() ||
                           !kernel_type(branch.scalar_type()))) {
    return false;
  }
  if (!kernel_type(low)) return false;
  if (residual.is_cuda()) return h <= cuda::max_hidden();
  return residual.is_cpu();
}

// add_layer_norm for either norm: the fused pass when `norm` is one the kernels compute and they can take the
// tensors, else the add, `norm`'s own forward and autocast's cast. `bias` undefined: an RMSNorm.
template <class Norm>
NormStep add_norm(const torch::Tensor& residual, const torch::Tensor& branch, Norm& norm, const torch::Tensor& bias,
                  double eps, bool post, bool kernels_fit) {
  const auto low = compute_type(residual);
  const bool rms = !bias.defined();
  if (kernels_fit && fused_norm() && fusable(residual, branch, norm.weight, bias, low)) {
    const auto b = branch.defined() ? branch.contiguous() : torch::empty({0}, residual.options());
    auto out = FusedAddLayerNorm::apply(residual.contiguous(), b, norm.weight.contiguous(),
                                        rms ? torch::empty({0}, residual.options()) : bias.contiguous(), eps, post,
                                        low, rms);
    if (post) return {out.front(), out.back()};
    return {branch.defined() ? out.front() : residual, out.back()};
  }
  auto stream = branch.defined() ? residual + branch : residual;
  auto y = norm.forward(stream);
  return {post ? y : stream, y.to(low)};
}

}  // namespace

void set_fused_norm(bool on) { g_fused = on; }
bool fused_norm() { return g_fused; }

NormStep add_layer_norm(const torch::Tensor& residual, const torch::Tensor& branch, torch::nn::LayerNormImpl& ln,
                        bool post) {
  // The LayerNorm the kernels compute: over the last dimension, with a weight and a bias.
  const bool kernels_fit = ln.options.normalized_shape().size() == 1 && ln.weight.defined() && ln.bias.defined();
  return add_norm(residual, branch, ln, ln.bias, ln.options.eps(), post, kernels_fit);
}

NormStep add_layer_norm(const torch::Tensor& residual, const torch::Tensor& branch, RMSNormImpl& norm, bool post) {
  return add_norm(residual, branch, norm, torch::Tensor(), norm.eps, post, /*kernels_fit=*/true);
}

}  // namespace ablate::sdk
