#pragma once
// Finetuning strategies: given the assembled model, mark what trains and attach adapters.

#include <string>
#include <utility>
#include <vector>

#include <torch/nn/module.h>

#include "ablate/sdk/options.hpp"

namespace ablate::sdk {

/// The assembled model as a strategy sees it. The root's children are "encoder", "projector" and
/// "backbone"; every parameter is frozen when the first strategy of a list is applied, and strategies of a
/// list are applied in order, so their effects add up. Not thread-safe; valid during Strategy::apply only.
class TrainTarget {
 public:
  TrainTarget(torch::nn::Module& root, std::string head);
  ~TrainTarget();

  /// Every module below the root with its qualified name ("backbone.model.decoder.layers.0.fc1"), in
  /// registration order. Pointers are owned by the model.
  const std::vector<std::pair<std::string, torch::nn::Module*>>& modules() const { return modules_; }
  /// The module called `name`, or null.
  torch::nn::Module* find(const std::string& name) const;
  /// Makes every parameter under module `name` trainable ("" = the whole model). Returns how many
  /// parameter tensors that covers; throws if `name` does not exist or holds no parameters.
  std::int64_t train(const std::string& name);
  /// Qualified name of the LM head module ("backbone.lm_head").
  const std::string& head() const { return head_; }

 private:
  torch::nn::Module& root_;
  std::string head_;
  std::vector<std::pair<std::string, torch::nn::Module*>> modules_;
};

class Strategy {
 public:
  virtual ~Strategy();
  /// Marks what trains (requires_grad) and attaches adapters. Throws OptionError-like InputError when it
  /// would train nothing (a LoRA target matching no module, say).
  virtual void apply(TrainTarget& target) = 0;
};

}  // namespace ablate::sdk
