#include "train/strategies.hpp"

#include "ablate/sdk/error.hpp"
#include "host/plugin_host.hpp"

namespace ablate {

AppliedStrategies apply_strategies(torch::nn::Module& root, const std::string& head, const std::vector<StrategyStep>& steps,
                                   const TrainConfig& train) {
  for (auto& p : root.parameters()) p.set_requires_grad(false);
  AppliedStrategies out;
  out.settings.push_back({"train", train.lr, train.weight_decay});
  sdk::TrainTarget target(root, head);
  for (const auto& s : steps) {
    std::size_t group = 0;
    if (s.group.lr || s.group.weight_decay) {
      out.settings.push_back({s.name + " " + s.id, s.group.lr.value_or(train.lr), s.group.weight_decay.value_or(train.weight_decay)});
      group = out.settings.size() - 1;
    }
    target.set_group(group);
    guarded(s.plugin, "apply", [&] { s.strategy->apply(target); });
    if (target.newly_trained() == 0 && group == 0) {
      throw sdk::InputError(s.where + ": " + s.name + ": strategy '" + s.id +
                            "' trains nothing that the strategies before it do not already train");
    }
  }
  out.groups = target.groups();
  return out;
}

}  // namespace ablate
