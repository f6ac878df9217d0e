#pragma once
// Finetuning strategies: given the assembled model, mark what trains and attach adapters.

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include <torch/nn/module.h>

#include "ablate/sdk/options.hpp"

namespace ablate::sdk {

/// The assembled model as a strategy sees it. The root's children are "encoder", "projector" and
/// "backbone"; every parameter is frozen when the first strategy of a list is applied, and strategies of a
/// list are applied in order, so their effects add up. Each strategy's table may carry `lr` and
/// `weight_decay` (LLaVA's mm_projector_lr): the host reads them, and every parameter a strategy trains goes
/// into that strategy's optimizer group (a parameter trained by two strategies belongs to the later one).
/// Not thread-safe; valid during Strategy::apply only.
class TrainTarget {
 public:
  /// `model_types`: each component's Hugging Face `model_type` ("backbone" -> "gpt2"), as its hf_config() says.
  TrainTarget(torch::nn::Module& root, std::string head, std::map<std::string, std::string> model_types = {});
  ~TrainTarget();

  /// Every module below the root with its qualified name ("backbone.model.decoder.layers.0.fc1"), in
  /// registration order, as it was before any strategy ran. Pointers are owned by the model.
  const std::vector<std::pair<std::string, torch::nn::Module*>>& modules() const { return modules_; }
  /// The module called `name`, or null.
  torch::nn::Module* find(const std::string& name) const;
  /// Makes every parameter under module `name` trainable ("" = the whole model). Returns how many
  /// parameter tensors that covers; throws InputError if `name` does not exist or holds no parameters.
  std::int64_t train(const std::string& name);
  /// Makes every parameter of `module` trainable (for modules a strategy created, such as adapters).
  std::int64_t train(torch::nn::Module& module);
  /// Qualified name of the LM head module ("backbone.lm_head").
  const std::string& head() const { return head_; }
  /// The Hugging Face `model_type` of component `name` ("opt", "gpt2", "clip_vision_model"), or "" when it
  /// has none (a projector). PEFT picks its default LoRA targets by it.
  std::string model_type(const std::string& name) const;

  // ---- for the host
  /// Parameters trained from now on go into optimizer group `group`.
  void set_group(std::size_t group) {
    group_ = group;
    newly_trained_ = 0;
  }
  /// How many parameter tensors the calls since the last set_group() made trainable that were not
  /// trainable before.
  std::int64_t newly_trained() const { return newly_trained_; }
  /// The group of every parameter a strategy trained, by TensorImpl.
  const std::map<const void*, std::size_t>& groups() const { return groups_; }

 private:
  std::int64_t train_parameters(const std::vector<torch::Tensor>& params);
  torch::nn::Module& root_;
  std::string head_;
  std::map<std::string, std::string> model_types_;
  std::vector<std::pair<std::string, torch::nn::Module*>> modules_;
  std::map<const void*, std::size_t> groups_;
  std::size_t group_ = 0;
  std::int64_t newly_trained_ = 0;
};

class Strategy {
 public:
  virtual ~Strategy();
  /// Marks what trains (through `target`, so that the host knows each parameter's group) and attaches
  /// adapters. Throws InputError when it would train nothing (a LoRA target matching no module, say).
  virtual void apply(TrainTarget& target) = 0;
};

}  // namespace ablate::sdk
