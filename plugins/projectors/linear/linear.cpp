// projector/linear: one linear map, as LLaVA's mm_projector_type = "linear" (parameters "weight", "bias").

#include <torch/torch.h>

#include "ablate/sdk/linear.hpp"
#include "ablate/sdk/plugin.hpp"
#include "ablate/sdk/weights.hpp"

namespace ablate::plugins {

namespace sdk = ablate::sdk;

/// Names LLaVA checkpoints give projector tensors.
const std::vector<std::string> kPrefixes{"model.mm_projector.", "mm_projector."};

struct LinearProjectorOptions {
  bool bias = true;
  std::string weights;  ///< a safetensors file or folder with this projector's tensors (prefixes such as mm_projector. allowed)
  static LinearProjectorOptions parse(sdk::Options& o) {
    LinearProjectorOptions x;
    x.bias = o.get("bias", x.bias);
    x.weights = o.get("weights", x.weights);
    return x;
  }
};

class LinearProjector : public sdk::Projector {
 public:
  using options_type = LinearProjectorOptions;
  LinearProjector(const LinearProjectorOptions& o, const sdk::BuildContext& ctx)
      : linear_(ctx.in_features, ctx.out_features, o.bias) {
    if (!o.weights.empty()) sdk::load_weights_with_prefix(*linear_, sdk::resolve_path(ctx.base_dir, o.weights), kPrefixes);
  }
  torch::nn::Module& module() override { return *linear_; }
  torch::Tensor project(const torch::Tensor& features) override { return linear_(features); }

 private:
  sdk::Linear linear_;
};

}  // namespace ablate::plugins

namespace {
void register_plugin(ablate::sdk::Registry& registry) {
  registry.add<ablate::plugins::LinearProjector>("linear", 1, "Linear map (LLaVA mm_projector_type = linear)");
}
}  // namespace

ABLATE_PLUGIN(register_plugin)
