#include "ablate/sdk/linear.hpp"

#include <cmath>
#include <functional>
#include <numeric>

#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/autograd.h>
#include <torch/nn/functional/linear.h>
#include <torch/nn/init.h>

#include "ablate/sdk/error.hpp"
#include "relu_product.hpp"

namespace ablate::sdk {

torch::Tensor detail::relu_product(const torch::Tensor& bias, const torch::Tensor& x2, const torch::Tensor& right) {
  if (bias.defined() && x2.is_cuda()) return at::_addmm_activation(bias, x2, right);
  return (bias.defined() ? torch::addmm(bias, x2, right) : torch::mm(x2, right)).relu_();
}

namespace {

// Whether layer `l` can take part in forward_shared() on input x.
bool can_share(const LinearImpl& l, const torch::Tensor& x) {
  if (!x.is_floating_point() || x.dim() == 0 || x.size(-1) != l.in_features) return false;
  // Each adapter with dropout would need its own dropped copy of x.
  return !l.has_lora() || l.merged() || l.lora_config().dropout == 0.0 || !l.lora_dropout->is_training();
}

}  // namespace

LinearImpl::LinearImpl(std::int64_t in, std::int64_t out, bool with_bias, bool fan_in_fan_out)
    : in_features(in), out_features(out), fan_in_fan_out(fan_in_fan_out) {
  weight = register_parameter("weight", fan_in_fan_out ? torch::empty({in, out}) : torch::empty({out, in}));
  if (with_bias) bias = register_parameter("bias", torch::empty({out}));
  reset_parameters();
}

LinearImpl::~LinearImpl() = default;

void LinearImpl::reset_parameters() {
  torch::NoGradGuard no_grad;
  // Kaiming-uniform with a = sqrt(5) is uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)) whatever the layout.
  const double bound = in_features > 0 ? 1.0 / std::sqrt(static_cast<double>(in_features)) : 0.0;
  if (fan_in_fan_out) {
    torch::nn::init::uniform_(weight, -bound, bound);
  } else {
    torch::nn::init::kaiming_uniform_(weight, std::sqrt(5.0));
  }
  if (bias.defined()) {
    torch::nn::init::uniform_(bias, -bound, bound);
  }
}

double LinearImpl::lora_scaling() const {
  if (!has_lora()) return 0.0;
  const double r = static_cast<double>(lora_.r);
  return lora_.rslora ? lora_.alpha / std::sqrt(r) : lora_.alpha / r;
}

torch::Tensor LinearImpl::forward(const torch::Tensor& x) {
  if (has_lora() && !merged_ && can_share(*this, x)) {
    return forward_shared({this}, x).front();
  }
  torch::Tensor y;
  if (fan_in_fan_out) {
    // As transformers' Conv1D: addmm over the flattened batch.
    auto shape = x.sizes().vec();
    shape.back() = out_features;
    auto flat = x.reshape({-1, in_features});
    y = (bias.defined() ? torch::addmm(bias, flat, weight) : torch::mm(flat, weight)).view(shape);
  } else {
    // ATen's linear, as torch.nn.functional.linear: a contiguous batch goes through one addmm with the bias
    // fused in. (torch::nn::functional::linear does a matmul and then a separate bias add for 3-D input: an
    // extra pass over the output forward and backward, and a different rounding from transformers'.)
    y = torch::linear(x, weight, bias);
  }
  if (has_lora() && !merged_) {
    // PEFT's order: result + lora_B(lora_A(dropout(x))) * scaling.
    y = y + lora_B(lora_A(lora_dropout(x))) * lora_scaling();
  }
  return y;
}

void LinearImpl::attach_lora(const LoraConfig& config) {
  if (has_lora()) throw InputError("a LoRA adapter is already attached to this layer");
  if (config.r <= 0) throw InputError("LoRA rank must be positive, got " + std::to_string(config.r));
  lora_ = config;
  const auto options = weight.options();
  lora_dropout = register_module("lora_dropout", torch::nn::Dropout(config.dropout));
  lora_A = register_module("lora_A", torch::nn::Linear(torch::nn::LinearOptions(in_features, config.r).bias(false)));
  lora_B = register_module("lora_B", torch::nn::Linear(torch::nn::LinearOptions(config.r, out_features).bias(false)));
  {
    torch::NoGradGuard no_grad;
    lora_A->weight.set_data(torch::empty({config.r, in_features}, options));
    lora_B->weight.set_data(torch::zeros({out_features, config.r}, options));
    torch::nn::init::kaiming_uniform_(lora_A->weight, std::sqrt(5.0));
  }
  lora_A->weight.set_requires_grad(true);
  lora_B->weight.set_requires_grad(true);
  weight.set_requires_grad(false);
  if (bias.defined()) bias.set_requires_grad(false);
  lora_dropout->train(is_training());
}

torch::Tensor LinearImpl::delta_weight() const {
  auto delta = torch::matmul(lora_B->weight, lora_A->weight) * lora_scaling();
  return (fan_in_fan_out ? delta.t() : delta).to(weight.dtype());
}

void LinearImpl::merge() {
  if (!has_lora() || merged_) return;
  torch::NoGradGuard no_grad;
  weight.add_(delta_weight());
  merged_ = true;
}

void LinearImpl::unmerge() {
  if (!has_lora() || !merged_) return;
  torch::NoGradGuard no_grad;
  weight.sub_(delta_weight());
  merged_ = false;
}

namespace {

// What forward_shared's autograd function needs to know besides the tensors. Tensors go in one list, x first:
// per layer its weight, its bias if any, then its adapter's A and B if it has an active one; the indices below
// point into that list (-1: none).
struct SharedPlan {
  struct Layer {
    std::int64_t weight = -1, bias = -1, lora_A = -1, lora_B = -1;
    std::int64_t rank = 0;  // adapter's rank; its columns of the joint A product start at a_offset
    std::int64_t a_offset = 0;
    double scaling = 0.0;
    bool fan_in_fan_out = false;
  };
  std::vector<Layer> layers;
  at::ScalarType dtype = at::kFloat;  // the compute type
  std::int64_t total_rank = 0;
  bool relu = false;  // every output = relu(product); the outputs are saved for backward's mask

  // Carried in the autograd context as two flat lists.
  std::vector<std::int64_t> ints() const {
    std::vector<std::int64_t> v{static_cast<std::int64_t>(dtype), total_rank, relu};
    for (const auto& l : layers) {
      v.insert(v.end(), {l.weight, l.bias, l.lora_A, l.lora_B, l.rank, l.a_offset, l.fan_in_fan_out});
    }
    return v;
  }
  std::vector<double> doubles() const {
    std::vector<double> v;
    for (const auto& l : layers) v.push_back(l.scaling);
    return v;
  }
  static SharedPlan from(const std::vector<std::int64_t>& ints, const std::vector<double>& doubles) {
    SharedPlan p;
    p.dtype = static_cast<at::ScalarType>(ints[0]);
    p.total_rank = ints[1];
    p.relu = ints[2] != 0;
    for (std::size_t i = 0; i < doubles.size(); ++i) {
      const auto* f = &ints[3 + 7 * i];
      p.layers.push_back({f[0], f[1], f[2], f[3], f[4], f[5], doubles[i], f[6] != 0});
    }
    return p;
  }
};

// Autocast stays out of the products: the plan's compute type is autocast's, and every cast is explicit.
using NoAutocast = c10::impl::ExcludeDispatchKeyGuard;

struct SharedProducts {
  std::vector<torch::Tensor> ys;  ///< each layer's output, shaped as x with its own last size
  torch::Tensor x2;               ///< x as [N, in] in the compute type
  torch::Tensor a;                ///< the joint LoRA A product [N, total_rank] (undefined without an adapter)
};

// Every adapter's A matrix stacked in the plan's order, [total_rank, in] in the compute type: the joint A
// product's right-hand side forward, and what x's gradient takes from all adapters at once backward.
torch::Tensor joint_lora_a(const SharedPlan& plan, at::TensorList tensors) {
  std::vector<torch::Tensor> as;
  for (const auto& l : plan.layers) {
    if (l.rank) as.push_back(tensors[l.lora_A]);
  }
  return (as.size() == 1 ? as.front() : torch::cat(as)).to(plan.dtype);
}

// The forward products; `tensors` is x followed by the parameters, as the plan's indices say.
SharedProducts shared_products(const SharedPlan& plan, at::TensorList tensors) {
  NoAutocast no_autocast(c10::autocast_dispatch_keyset);
  const auto c = plan.dtype;
  const auto& x = tensors.front();
  SharedProducts r;
  r.x2 = x.reshape({-1, x.size(-1)}).to(c);
  if (plan.total_rank > 0) r.a = torch::mm(r.x2, joint_lora_a(plan, tensors).t());
  auto shape = x.sizes().vec();
  for (const auto& l : plan.layers) {
    // x @ W^T, with W stored [out, in], or [in, out] for fan_in_fan_out.
    const auto w = tensors[l.weight].to(c);
    const auto right = l.fan_in_fan_out ? w : w.t();
    torch::Tensor y;
    if (plan.relu && !l.rank) {
      y = detail::relu_product(l.bias >= 0 ? tensors[l.bias].to(c) : torch::Tensor(), r.x2, right);
    } else if (l.rank) {
      // PEFT's base(x) + lora_B(lora_A(x)) * scaling, the adapter's rank-r product first: it only writes its
      // output (bias + scaling * a_l @ B^T), and the layer's own product then adds into it, reading it in its
      // epilogue. Adding the adapter second would be a pass of its own that reads and writes the output.
      const auto b = tensors[l.lora_B].to(c).t();
      const auto a = r.a.narrow(1, l.a_offset, l.rank);
      if (l.bias >= 0) {
        y = torch::addmm(tensors[l.bias].to(c), a, b, 1.0, l.scaling);
      } else {
        y = torch::empty({a.size(0), b.size(1)}, a.options()).addmm_(a, b, 0.0, l.scaling);  // beta 0: not read
      }
      y.addmm_(r.x2, right);
      if (plan.relu) y.relu_();
    } else {
      y = l.bias >= 0 ? torch::addmm(tensors[l.bias].to(c), r.x2, right) : torch::mm(r.x2, right);
    }
    shape.back() = y.size(1);
    r.ys.push_back(y.view(shape));
  }
  return r;
}

class SharedLinears : public torch::autograd::Function<SharedLinears> {
 public:
  // `tensors`: x, then the parameters, as the plan's indices say (so they are also the indices of the inputs'
  // gradients).
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, at::TensorList tensors,
                                                const SharedPlan& plan) {
    auto r = shared_products(plan, tensors);
    ctx->set_materialize_grads(false);  // an output nobody read costs nothing in backward
    ctx->saved_data["ints"] = plan.ints();
    ctx->saved_data["doubles"] = plan.doubles();
    ctx->saved_data["x_sizes"] = tensors.front().sizes().vec();
    // x2 is read in backward only for the gradients of weights and adapter A's. A frozen layer without an
    // adapter (OPT's fc1 under LoRA) needs only its weight for x's gradient: x2 is not kept then, as autograd's
    // own addmm keeps no input whose gradient partner is frozen. Under autocast x2 is a cast copy of x, so that
    // is one activation of the products' type per layer less held until backward.
    bool keep_x2 = false;
    for (const auto& l : plan.layers) {
      keep_x2 = keep_x2 || tensors[l.weight].requires_grad() || (l.rank && tensors[l.lora_A].requires_grad());
    }
    std::vector<torch::Tensor> saved{keep_x2 ? r.x2 : torch::Tensor(), r.a};
    saved.insert(saved.end(), tensors.begin() + 1, tensors.end());
    if (plan.relu) saved.insert(saved.end(), r.ys.begin(), r.ys.end());  // ReLU's mask: outputs are saved without a copy
    ctx->save_for_backward(saved);
    return r.ys;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    NoAutocast no_autocast(c10::autocast_dispatch_keyset);
    const auto plan = SharedPlan::from(ctx->saved_data["ints"].toIntVector(), ctx->saved_data["doubles"].toDoubleVector());
    const auto x_sizes = ctx->saved_data["x_sizes"].toIntVector();
    auto saved = ctx->get_saved_variables();
    const auto x2 = saved[0], a = saved[1];  // x2 undefined when no gradient reads it (see forward)
    // tensors[i] as in the plan: index 0 (x) is not needed here. With ReLU, the outputs come last.
    const auto outputs = plan.relu ? saved.end() - static_cast<std::ptrdiff_t>(plan.layers.size()) : saved.end();
    std::vector<torch::Tensor> tensors{torch::Tensor()};
    tensors.insert(tensors.end(), saved.begin() + 2, outputs);
    const auto c = plan.dtype;
    const auto n = std::accumulate(x_sizes.begin(), x_sizes.end() - 1, std::int64_t{1}, std::multiplies<>());  // x2's rows

    torch::autograd::variable_list out(tensors.size() + 1);  // x, every parameter, then the plan: no gradient
    const bool want_dx = ctx->needs_input_grad(0);
    torch::Tensor ga;  // gradient of the joint A product, [N, total_rank]
    std::vector<std::pair<torch::Tensor, torch::Tensor>> dx_terms;  // x's gradient: the sum of g @ W over layers
    for (std::size_t i = 0; i < plan.layers.size(); ++i) {
      const auto& l = plan.layers[i];
      if (!grads[i].defined()) continue;
      auto g = grads[i].reshape({n, -1}).to(c);
      if (plan.relu) g = torch::threshold_backward(g, outputs[static_cast<std::ptrdiff_t>(i)].reshape({n, -1}), 0);
      const auto w = tensors[l.weight].to(c);
      if (want_dx) dx_terms.emplace_back(g, l.fan_in_fan_out ? w.t() : w);
      if (ctx->needs_input_grad(l.weight)) {
        auto dw = torch::mm(g.t(), x2);  // [out, in]
        out[l.weight] = l.fan_in_fan_out ? dw.t() : dw;
      }
      if (l.bias >= 0 && ctx->needs_input_grad(l.bias)) out[l.bias] = g.sum(0);
      if (l.rank) {
        const auto b = tensors[l.lora_B].to(c);
        if (ctx->needs_input_grad(l.lora_B)) {
          out[l.lora_B] = torch::mm(g.t(), a.narrow(1, l.a_offset, l.rank)).mul_(l.scaling);
        }
        if (!ga.defined()) ga = torch::zeros({n, plan.total_rank}, g.options());
        ga.narrow(1, l.a_offset, l.rank).addmm_(g, b, 0.0, l.scaling);
      }
    }
    torch::Tensor dx;
    if (ga.defined()) {
      for (const auto& l : plan.layers) {
        if (l.rank && ctx->needs_input_grad(l.lora_A)) out[l.lora_A] = torch::mm(ga.narrow(1, l.a_offset, l.rank).t(), x2);
      }
      // Every adapter's share of x's gradient in one rank-sum product, first: it only writes dx, and each layer's
      // product below adds into dx in its epilogue. (Per adapter, and after them, each would be a pass that reads
      // and writes all of dx.)
      if (want_dx) dx = torch::mm(ga, joint_lora_a(plan, tensors));
    }
    for (const auto& [g, w] : dx_terms) {
      if (dx.defined()) dx.addmm_(g, w);
      else dx = torch::mm(g, w);
    }
    if (want_dx && dx.defined()) out[0] = dx.view(x_sizes);
    return out;
  }
};

}  // namespace

at::ScalarType compute_type(const torch::Tensor& x) {
  const auto type = x.device().type();
  return at::autocast::is_autocast_enabled(type) && x.scalar_type() != at::kDouble ? at::autocast::get_autocast_dtype(type)
                                                                                     : x.scalar_type();
}

std::vector<torch::Tensor> forward_shared(const std::vector<LinearImpl*>& layers, const torch::Tensor& x, bool relu) {
  if (layers.empty()) return {};
  bool share = true;
  for (const auto* l : layers) share = share && can_share(*l, x);
  if (!share) {
    std::vector<torch::Tensor> ys;
    for (auto* l : layers) ys.push_back(relu ? torch::relu(l->forward(x)) : l->forward(x));
    return ys;
  }
  SharedPlan plan;
  plan.relu = relu;
  plan.dtype = compute_type(x);
  std::vector<torch::Tensor> tensors{x};  // x, then every parameter the products read
  const auto index = [&](const torch::Tensor& t) {
    tensors.push_back(t);
    return static_cast<std::int64_t>(tensors.size() - 1);
  };
  for (const auto* l : layers) {
    SharedPlan::Layer p;
    p.fan_in_fan_out = l->fan_in_fan_out;
    p.weight = index(l->weight);
    if (l->bias.defined()) p.bias = index(l->bias);
    if (l->has_lora() && !l->merged()) {
      p.lora_A = index(l->lora_A->weight);
      p.lora_B = index(l->lora_B->weight);
      p.rank = l->lora_config().r;
      p.a_offset = plan.total_rank;
      p.scaling = l->lora_scaling();
      plan.total_rank += p.rank;
    }
    plan.layers.push_back(p);
  }
  bool needs_grad = false;
  for (const auto& t : tensors) needs_grad = needs_grad || t.requires_grad();
  if (!needs_grad || !torch::GradMode::is_enabled()) {
    // Nothing to differentiate (evaluation, decoding): the same products without an autograd record.
    return shared_products(plan, tensors).ys;
  }
  return SharedLinears::apply(at::TensorList(tensors), plan);
}

}  // namespace ablate::sdk
