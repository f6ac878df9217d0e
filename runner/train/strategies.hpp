#pragma once
// What trains: every parameter frozen, then each strategy of a cell's list applied in order, each putting
// what it trains into the optimizer group its own lr / weight_decay call for. Shared by the trainer and by
// the tools that check it against PEFT and torch.optim.

#include <map>
#include <memory>
#include <string>
#include <vector>

#include <torch/nn/module.h>

#include "ablate/sdk/component.hpp"
#include "ablate/sdk/strategy.hpp"
#include "grid/experiment.hpp"
#include "train/optimizer.hpp"

namespace ablate {

struct StrategyStep {
  std::shared_ptr<sdk::Strategy> strategy;
  std::string id;       ///< "lora"
  std::string name;     ///< for messages: "strategy[1]"
  std::string where;    ///< "FILE:LINE" of its table
  std::string plugin;   ///< "strategy/lora", for guarded()
  StrategyGroup group;  ///< its own lr / weight_decay, if any
};

struct AppliedStrategies {
  std::vector<GroupSetting> settings;             ///< [0] is [train]'s
  std::map<const void*, std::size_t> groups;      ///< parameter (TensorImpl) -> index into settings
};

/// Freezes every parameter of `root` (whose children are encoder / projector / backbone), then applies
/// the strategies in order. Throws InputError when a strategy adds nothing to train and sets no group
/// of its own (["full", "head"]: the head already trains). `model_types`: each child's Hugging Face
/// model_type (model_types_of), for strategies whose defaults depend on it as PEFT's do.
AppliedStrategies apply_strategies(torch::nn::Module& root, const std::string& head, const std::vector<StrategyStep>& steps,
                                   const TrainConfig& train, const std::map<std::string, std::string>& model_types);

/// {name -> the `model_type` of its hf_config()} for the components that have one.
std::map<std::string, std::string> model_types_of(const std::map<std::string, const sdk::Component*>& components);

}  // namespace ablate
