// sdk::relu_mlp (linear.hpp): fc1 -> ReLU -> fc2 as one autograd node, with cuBLASLt's ReLU epilogues on CUDA
// (cuda/relu_gemm.hpp).
#include <atomic>
#include <iostream>
#include <optional>

#include <ATen/autocast_mode.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/cuda/CUDAStream.h>  // the stream's handle only: libablate_sdk.so calls no CUDA runtime itself
#include <torch/autograd.h>

#include "ablate/sdk/linear.hpp"
#include "cuda/relu_gemm.hpp"
#include "relu_product.hpp"

namespace ablate::sdk {

namespace {

std::atomic<bool> g_fused_relu{false};

// Autocast stays out of the products: the compute type is autocast's, and every cast is explicit.
using NoAutocast = c10::impl::ExcludeDispatchKeyGuard;

// cuBLASLt's scratch space for one product. torch's caching allocator hands the same block back call after call
// (and, inside a CUDA graph's capture, from the graph's pool).
constexpr std::int64_t kWorkspaceBytes = std::int64_t{32} << 20;

cuda::GemmType gemm_type(at::ScalarType c) { return c == at::kHalf ? cuda::GemmType::f16 : cuda::GemmType::bf16; }

torch::Tensor workspace(const torch::Tensor& like) {
  return torch::empty({kWorkspaceBytes}, like.options().dtype(torch::kUInt8));
}

void* stream_of(const torch::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()).stream(); }

// A matrix cuBLASLt reads: contiguous and at least 16-byte aligned (what relu_grad_check assumed), copied if not.
torch::Tensor aligned(const torch::Tensor& t) {
  auto c = t.contiguous();
  return reinterpret_cast<std::uintptr_t>(c.data_ptr()) % 16 == 0 ? c : c.clone();
}

void say_once(std::atomic<bool>& said, const std::string& line) {
  if (!said.exchange(true)) std::cerr << line << "\n";
}

// How fc2's input-gradient product applies the ReLU's mask (none: torch's ops, and no mask is written).
enum class MaskProduct { none, drelu_bgrad, drelu };

// Whether the products go through cuBLASLt's epilogues, and which backward form: CUDA, a 16-bit compute type,
// rows of whole 16-byte vectors, and a kernel for the backward product (asked first: the forward one writes a
// mask only it reads). With a bias on fc1, DRELU_BGRAD (the product also sums fc1's bias gradient) is asked
// first; where cuBLASLt has no kernel for it at these sizes (its bias reduction needs workspace that grows with
// the rows), plain DRELU, the bias gradient then summed by torch. On x's device, current: cuBLASLt's handle and
// heuristic take the current device's properties.
MaskProduct lt_case(const torch::Tensor& x, at::ScalarType c, std::int64_t rows, std::int64_t in, std::int64_t features,
                    std::int64_t out, bool bias) {
  if (!x.is_cuda() || (c != at::kBFloat16 && c != at::kHalf) || !cuda::relu_gemm_available()) return MaskProduct::none;
  if (in % 8 || features % 8 || out % 8 || rows == 0) return MaskProduct::none;
  const auto check = [&](bool with_bias) {
    return cuda::relu_grad_check(rows, out, features, with_bias, gemm_type(c), kWorkspaceBytes, x.device().index());
  };
  // Only for the fallback lines: this runs in every training step's forward pass.
  const auto sizes = [&] { return std::to_string(rows) + " rows x " + std::to_string(features) + " features"; };
  int s = 0;
  if (bias) {
    s = check(true);
    if (s == 0) return MaskProduct::drelu_bgrad;
    static std::atomic<bool> said{false};
    say_once(said, "relu_mlp: no cuBLASLt DRELU_BGRAD kernel for " + sizes() + " (" + cuda::relu_gemm_error(s) +
                       "): trying DRELU, fc1's bias gradient summed separately");
  }
  s = check(false);
  if (s == 0) return MaskProduct::drelu;
  static std::atomic<bool> said{false};
  say_once(said, "relu_mlp: no cuBLASLt ReLU-gradient kernel for " + sizes() + " (" + cuda::relu_gemm_error(s) +
                     "): the MLP's ReLU takes torch's ops");
  return MaskProduct::none;
}

struct Forward {
  torch::Tensor x2;    ///< x as [rows, in] in the compute type
  torch::Tensor h;     ///< relu(fc1(x)) [rows, features]
  torch::Tensor mask;  ///< cuBLASLt's bits of h > 0, or undefined (torch's ops: h is the mask)
  MaskProduct backward = MaskProduct::none;  ///< the product backward applies the mask with
  torch::Tensor y;     ///< fc2(h), shaped as x with fc2's width
};

// Biases are empty tensors where a layer has none (autograd takes no undefined input).
Forward mlp_forward(const torch::Tensor& x, const torch::Tensor& w1, const torch::Tensor& b1, const torch::Tensor& w2,
                    const torch::Tensor& b2, at::ScalarType c, bool want_mask) {
  Forward f;
  const auto in = x.size(-1), features = w1.size(0), out = w2.size(0);
  f.x2 = x.reshape({-1, in}).to(c);
  const auto rows = f.x2.size(0);
  const auto w1c = w1.to(c), w2c = w2.to(c);
  const auto b1c = b1.numel() ? b1.to(c) : torch::Tensor();
  const c10::OptionalDeviceGuard guard(x.is_cuda() ? std::optional<c10::Device>(x.device()) : std::nullopt);
  const auto form = want_mask ? lt_case(x, c, rows, in, features, out, b1c.defined()) : MaskProduct::none;
  if (form != MaskProduct::none) {
    f.x2 = aligned(f.x2);
    const auto w1a = aligned(w1c);
    const auto b1a = b1c.defined() ? aligned(b1c) : b1c;
    f.h = torch::empty({rows, features}, f.x2.options());
    f.mask = torch::empty({cuda::relu_mask_bytes(rows, features)}, f.x2.options().dtype(torch::kUInt8));
    auto ws = workspace(f.x2);
    const int s = cuda::relu_linear_forward({f.x2.data_ptr(), w1a.data_ptr(), b1a.defined() ? b1a.data_ptr() : nullptr,
                                             f.h.data_ptr(), f.mask.data_ptr(), rows, in, features, gemm_type(c),
                                             ws.data_ptr(), kWorkspaceBytes, x.device().index()},
                                            stream_of(x));
    if (s == cuda::kNoAlgorithm) {
      static std::atomic<bool> said{false};
      say_once(said, "relu_mlp: no cuBLASLt ReLU-mask kernel for fc1's product at " + std::to_string(rows) + " rows x " +
                         std::to_string(features) + " features: the MLP's ReLU takes torch's ops");
      f.h = torch::Tensor();
      f.mask = torch::Tensor();
    } else if (s != 0) {
      throw std::runtime_error(std::string("relu_mlp: cuBLASLt forward product: ") + cuda::relu_gemm_error(s));
    } else {
      f.backward = form;
      static std::atomic<bool> said{false};  // once, so that a log (and the GPU test) shows which path ran
      say_once(said, "relu_mlp: cuBLASLt epilogues: fc1's product writes the ReLU's mask as bits, fc2's backward "
                     "product applies it");
    }
  }
  if (!f.h.defined()) {
    f.h = detail::relu_product(b1c, f.x2, w1c.t());  // torch's ops, as forward_shared(relu) runs them
  }
  auto y = b2.numel() ? torch::addmm(b2.to(c), f.h, w2c.t()) : torch::mm(f.h, w2c.t());
  auto shape = x.sizes().vec();
  shape.back() = out;
  f.y = y.view(shape);
  return f;
}

// Differentiable once: the backward pass's cuBLASLt product records no autograd graph of its own (nothing in
// the runner differentiates twice, as SharedLinears and the fused norm's node).
class ReluMlp : public torch::autograd::Function<ReluMlp> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x, const torch::Tensor& w1,
                               const torch::Tensor& b1, const torch::Tensor& w2, const torch::Tensor& b2,
                               at::ScalarType c) {
    NoAutocast no_autocast(c10::autocast_dispatch_keyset);
    auto f = mlp_forward(x, w1, b1, w2, b2, c, /*want_mask=*/true);
    ctx->saved_data["c"] = static_cast<std::int64_t>(c);
    ctx->saved_data["x_sizes"] = x.sizes().vec();
    ctx->saved_data["bgrad"] = f.backward == MaskProduct::drelu_bgrad;
    // Kept until backward: x2 for fc1's weight gradient only; h for fc2's weight gradient, or as the mask when
    // torch's ops ran (with cuBLASLt's bits, a frozen fc2 lets h go as soon as fc2 has read it).
    const bool keep_h = w2.requires_grad() || !f.mask.defined();
    ctx->save_for_backward({w1.requires_grad() ? f.x2 : torch::Tensor(), keep_h ? f.h : torch::Tensor(), f.mask, w1, w2});
    return f.y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    NoAutocast no_autocast(c10::autocast_dispatch_keyset);
    torch::autograd::variable_list out(6);  // x, w1, b1, w2, b2, the compute type
    if (!grads[0].defined()) return out;
    const auto c = static_cast<at::ScalarType>(ctx->saved_data["c"].toInt());
    const auto x_sizes = ctx->saved_data["x_sizes"].toIntVector();
    const auto saved = ctx->get_saved_variables();
    const auto &x2 = saved[0], h = saved[1], mask = saved[2];
    const auto w1c = saved[3].to(c), w2c = saved[4].to(c);
    const auto features = w1c.size(0), width = w2c.size(0);
    const auto dy = grads[0].reshape({-1, width}).to(c);
    const auto rows = dy.size(0);
    torch::Tensor dpre, db1;
    if (mask.defined()) {
      const c10::DeviceGuard guard(dy.device());
      const auto dya = aligned(dy), w2a = aligned(w2c);
      dpre = torch::empty({rows, features}, dya.options());
      // DRELU_BGRAD also sums dpre into fc1's bias gradient, wanted or not: the form lt_case found a kernel for,
      // at the cost of a reduction inside the product's epilogue.
      if (ctx->saved_data["bgrad"].toBool()) db1 = torch::empty({features}, dya.options());
      auto ws = workspace(dya);
      const int s = cuda::relu_grad_backward({dya.data_ptr(), w2a.data_ptr(), mask.data_ptr(), dpre.data_ptr(),
                                              db1.defined() ? db1.data_ptr() : nullptr, rows, width, features,
                                              gemm_type(c), ws.data_ptr(), kWorkspaceBytes, dy.device().index()},
                                             stream_of(dy));
      if (s != 0) throw std::runtime_error(std::string("relu_mlp: cuBLASLt backward product: ") + cuda::relu_gemm_error(s));
    } else {
      dpre = torch::threshold_backward(torch::mm(dy, w2c), h, 0);
    }
    if (ctx->needs_input_grad(0)) out[0] = torch::mm(dpre, w1c).view(x_sizes);
    if (ctx->needs_input_grad(1)) out[1] = torch::mm(dpre.t(), x2);
    if (ctx->needs_input_grad(2)) out[2] = db1.defined() ? db1 : dpre.sum(0);
    if (ctx->needs_input_grad(3)) out[3] = torch::mm(dy.t(), h);
    if (ctx->needs_input_grad(4)) out[4] = dy.sum(0);
    return out;
  }
};

bool plain(const LinearImpl& l) { return !(l.has_lora() && !l.merged()) && !l.fan_in_fan_out; }

}  // namespace

torch::Tensor relu_mlp(LinearImpl& fc1, LinearImpl& fc2, const torch::Tensor& x) {
  if (!fused_relu() || !plain(fc1) || !plain(fc2) || !x.is_floating_point() || x.dim() == 0 ||
      x.size(-1) != fc1.in_features || fc2.in_features != fc1.out_features) {
    return fc2.forward(forward_shared({&fc1}, x, /*relu=*/true).front());
  }
  const auto c = compute_type(x);
  const auto bias = [](const LinearImpl& l) { return l.bias.defined() ? l.bias : torch::empty({0}, l.weight.options()); };
  const auto b1 = bias(fc1), b2 = bias(fc2);
  const bool needs_grad = x.requires_grad() || fc1.weight.requires_grad() || b1.requires_grad() ||
                          fc2.weight.requires_grad() || b2.requires_grad();
  if (!needs_grad || !torch::GradMode::is_enabled()) {
    // Nothing to differentiate (evaluation, decoding): torch's ops, no mask.
    NoAutocast no_autocast(c10::autocast_dispatch_keyset);
    return mlp_forward(x, fc1.weight, b1, fc2.weight, b2, c, /*want_mask=*/false).y;
  }
  return ReluMlp::apply(x, fc1.weight, b1, fc2.weight, b2, c);
}

void set_fused_relu(bool on) { g_fused_relu = on; }
bool fused_relu() { return g_fused_relu; }

}  // namespace ablate::sdk
