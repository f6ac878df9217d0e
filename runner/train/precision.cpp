#include "train/precision.hpp"

#include <torch/torch.h>

#include "ablate/sdk/linear.hpp"

namespace ablate {

FrozenInLowPrecision::FrozenInLowPrecision(torch::nn::Module& model, const std::string& precision) {
  if (precision == "fp32") return;
  const auto low = precision == "bf16" ? torch::kBFloat16 : torch::kHalf;
  torch::NoGradGuard no_grad;
  for (const auto& m : model.modules(/*include_self=*/true)) {
    // Only sdk::Linear: its forward passes weight and bias to linear / addmm / mm alone, which autocast casts
    // to `low` anyway. Elsewhere (norms, embeddings) a weight may meet float32 math that autocast leaves alone.
    auto* linear = dynamic_cast<sdk::LinearImpl*>(m.get());
    if (!linear) continue;
    for (auto* p : {&linear->weight, &linear->bias}) {
      if (!p->defined() || p->requires_grad() || p->scalar_type() != torch::kFloat32) continue;
      auto original = p->data();
      if (original.is_cuda()) original = original.to(torch::kCPU);  // the device keeps only the low-precision copy
      p->set_data(p->data().to(low));
      kept_.emplace_back(*p, std::move(original));
    }
  }
}

void FrozenInLowPrecision::restore() {
  torch::NoGradGuard no_grad;
  for (auto& [param, original] : kept_) param.set_data(original.to(param.device()));
  kept_.clear();
}

}  // namespace ablate
