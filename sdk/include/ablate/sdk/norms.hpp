#pragma once
// Normalisation layers with Hugging Face parameter names.

#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

namespace ablate::sdk {

/// RMSNorm as transformers' LlamaRMSNorm: weight * (x / sqrt(mean(x^2) + eps)), computed in float32 and cast
/// back before the weight multiplies. Parameter: "weight".
class RMSNormImpl : public torch::nn::Module {
 public:
  explicit RMSNormImpl(std::int64_t size, double eps = 1e-6);
  ~RMSNormImpl() override;
  torch::Tensor forward(const torch::Tensor& x);
  torch::Tensor weight;
  double eps;
};
TORCH_MODULE(RMSNorm);

}  // namespace ablate::sdk
