// projector/avgpool: averages each run of `pool` image tokens, then maps them with one linear layer, so the
// backbone sees ceil(N / pool) image tokens instead of N. An example of a plugin written out of tree.

#include <torch/torch.h>

#include "ablate/sdk/linear.hpp"
#include "ablate/sdk/plugin.hpp"

namespace {

namespace sdk = ablate::sdk;

struct AvgPoolOptions {
  std::int64_t pool = 2;
  static AvgPoolOptions parse(sdk::Options& o) {
    AvgPoolOptions x;
    x.pool = o.get("pool", x.pool);
    if (x.pool < 1) o.fail("pool", "must be at least 1");
    return x;
  }
};

class AvgPoolProjector : public sdk::Projector {
 public:
  using options_type = AvgPoolOptions;
  AvgPoolProjector(const AvgPoolOptions& o, const sdk::BuildContext& ctx) : pool_(o.pool), linear_(ctx.in_features, ctx.out_features) {}

  torch::nn::Module& module() override { return *linear_; }

  torch::Tensor project(const torch::Tensor& features) override {
    const auto n = features.size(1);
    const auto groups = (n + pool_ - 1) / pool_;
    // Pad with the last token so every group holds `pool` tokens, then average each group.
    auto padded = features;
    if (groups * pool_ != n) {
      padded = torch::cat({features, features.slice(1, n - 1).expand({-1, groups * pool_ - n, -1})}, 1);
    }
    auto pooled = padded.view({features.size(0), groups, pool_, features.size(2)}).mean(2);
    return linear_(pooled);
  }

  std::int64_t output_tokens(std::int64_t input_tokens) const override { return (input_tokens + pool_ - 1) / pool_; }

 private:
  std::int64_t pool_;
  sdk::Linear linear_;
};

void register_plugin(sdk::Registry& registry) {
  registry.add<AvgPoolProjector>("avgpool", 1, "Average-pool runs of image tokens, then a linear map");
}

}  // namespace

ABLATE_PLUGIN(register_plugin)
