// projector/git: GIT's visual projection, Linear then LayerNorm, named as transformers' GitProjection
// ("visual_projection.0", "visual_projection.1"). GIT-LLM trains it in every experiment.

#include <torch/torch.h>

#include "ablate/sdk/linear.hpp"
#include "ablate/sdk/plugin.hpp"
#include "ablate/sdk/weights.hpp"

namespace ablate::plugins {

namespace sdk = ablate::sdk;

struct GitProjectorOptions {
  double layer_norm_eps = 1e-5;
  std::string weights;  ///< a safetensors file or folder with this projector's tensors (GIT's git.visual_projection. allowed)
  static GitProjectorOptions parse(sdk::Options& o) {
    GitProjectorOptions x;
    x.layer_norm_eps = o.non_negative("layer_norm_eps", x.layer_norm_eps);
    x.weights = o.get("weights", x.weights);
    return x;
  }
};

class GitProjectionImpl : public torch::nn::Module {
 public:
  GitProjectionImpl(std::int64_t in, std::int64_t out, double eps) {
    visual_projection = register_module("visual_projection", torch::nn::Sequential());
    visual_projection->push_back(sdk::Linear(in, out));
    visual_projection->push_back(torch::nn::LayerNorm(torch::nn::LayerNormOptions({out}).eps(eps)));
  }
  torch::Tensor forward(const torch::Tensor& x) { return visual_projection->forward(x); }
  torch::nn::Sequential visual_projection{nullptr};
};
TORCH_MODULE(GitProjection);

class GitProjector : public sdk::Projector {
 public:
  using options_type = GitProjectorOptions;
  GitProjector(const GitProjectorOptions& o, const sdk::BuildContext& ctx)
      : projection_(ctx.in_features, ctx.out_features, o.layer_norm_eps) {
    if (!o.weights.empty()) sdk::load_weights_with_prefix(*projection_, sdk::resolve_path(ctx.base_dir, o.weights), {"git."});
  }
  torch::nn::Module& module() override { return *projection_; }
  torch::Tensor project(const torch::Tensor& features) override { return projection_(features); }

 private:
  GitProjection projection_;
};

}  // namespace ablate::plugins

namespace {
void register_plugin(ablate::sdk::Registry& registry) {
  registry.add<ablate::plugins::GitProjector>("git", 1, "GIT projection: Linear + LayerNorm");
}
}  // namespace

ABLATE_PLUGIN(register_plugin)
