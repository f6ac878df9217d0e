// projector/mlp2x_gelu: LLaVA-1.5's projector, Linear -> GELU -> Linear, named as LLaVA's mm_projector
// Sequential ("0.weight", "2.weight").

#include <torch/torch.h>

#include "ablate/sdk/linear.hpp"
#include "ablate/sdk/plugin.hpp"
#include "ablate/sdk/weights.hpp"

namespace ablate::plugins {

namespace sdk = ablate::sdk;

struct Mlp2xGeluOptions {
  std::string weights;  ///< a safetensors file or folder: LLaVA's mm_projector (model.mm_projector.0.weight ...)
  static Mlp2xGeluOptions parse(sdk::Options& o) {
    Mlp2xGeluOptions x;
    x.weights = o.get("weights", x.weights);
    return x;
  }
};

class Mlp2xGelu : public sdk::Projector {
 public:
  using options_type = Mlp2xGeluOptions;
  Mlp2xGelu(const Mlp2xGeluOptions& o, const sdk::BuildContext& ctx) {
    mlp_->push_back(sdk::Linear(ctx.in_features, ctx.out_features));
    mlp_->push_back(torch::nn::GELU());
    mlp_->push_back(sdk::Linear(ctx.out_features, ctx.out_features));
    if (!o.weights.empty()) {
      sdk::load_weights_with_prefix(*mlp_, sdk::resolve_path(ctx.base_dir, o.weights), {"model.mm_projector.", "mm_projector."});
    }
  }
  torch::nn::Module& module() override { return *mlp_; }
  torch::Tensor project(const torch::Tensor& features) override { return mlp_->forward(features); }

 private:
  torch::nn::Sequential mlp_;
};

}  // namespace ablate::plugins

namespace {
void register_plugin(ablate::sdk::Registry& registry) {
  registry.add<ablate::plugins::Mlp2xGelu>("mlp2x_gelu", 1, "LLaVA-1.5 projector: Linear, GELU, Linear");
}
}  // namespace

ABLATE_PLUGIN(register_plugin)
