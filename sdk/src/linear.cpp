#include "ablate/sdk/linear.hpp"

#include <cmath>

#include <torch/nn/functional/linear.h>
#include <torch/nn/init.h>

#include "ablate/sdk/error.hpp"

namespace ablate::sdk {

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

}  // namespace ablate::sdk
