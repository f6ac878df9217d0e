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
      auto held = p->data().to(low);
      torch::Tensor original;  // undefined: the low-precision copy holds every value exactly
      if (!torch::equal(held.to(torch::kFloat32), p->data())) {
        original = p->data().is_cuda() ? p->data().to(torch::kCPU) : p->data();  // the device keeps only `held`
      }
      p->set_data(held);
      kept_.emplace_back(*p, std::move(original));
    }
  }
}

void FrozenInLowPrecision::restore() {
  torch::NoGradGuard no_grad;
  for (auto& [param, original] : kept_) {
    param.set_data(original.defined() ? original.to(param.device()) : param.data().to(torch::kFloat32));
  }
  kept_.clear();
}

std::size_t FrozenInLowPrecision::originals() const {
  std::size_t n = 0;
  for (const auto& kept : kept_) n += kept.second.defined();
  return n;
}

}  // namespace ablate
