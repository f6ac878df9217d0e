#include "train/strategies.hpp"

#include "ablate/sdk/error.hpp"
#include "host/plugin_host.hpp"

namespace ablate {

AppliedStrategies apply_strategies(torch::nn::Module& root, const std::string& head, const std::vector<StrategyStep>& steps,
                                   const TrainConfig& train, const std::map<std::string, std::string>& model_types) {
  for (auto& p : root.parameters()) p.set_requires_grad(false);
  AppliedStrategies out;
  out.settings.push_back({"train", train.lr, train.weight_decay});
  sdk::TrainTarget target(root, head, model_types);
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

std::map<std::string, std::string> model_types_of(const std::map<std::string, const sdk::Component*>& components) {
  std::map<std::string, std::string> out;
  for (const auto& [name, component] : components) {
    const auto config = component->hf_config();
    if (config.is_object() && config.contains("model_type") && config["model_type"].is_string()) {
      out[name] = config["model_type"].get<std::string>();
    }
  }
  return out;
}

}  // namespace ablate
