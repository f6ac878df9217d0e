#pragma once
// LoRA adapters in PEFT's format: adapter_config.json + adapter_model.safetensors, with PEFT's key names
// ("base_model.model.<module>.lora_A.weight", modules_to_save as "base_model.model.<module>.<param>"), and
// PEFT's rules for which modules a configuration targets. A component's module names are its Hugging Face
// model's, so an adapter written here loads with PeftModel.from_pretrained on that model, and one PEFT
// wrote loads here.

#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>
#include <torch/nn/module.h>

#include "ablate/sdk/linear.hpp"
#include "ablate/sdk/weights.hpp"

namespace ablate::sdk {

/// PEFT's matching of module `name` against `patterns` (target_modules, exclude_modules): a list matches
/// a name equal to one entry or ending with "." + an entry; a string is a regular expression the whole name
/// must match. "all-linear" is handled by the caller (it depends on the layer types).
bool peft_matches(const nlohmann::json& patterns, const std::string& name);

/// PEFT's default LoRA targets for a Hugging Face `model_type` (its TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
/// peft 0.21: "opt" and "llama" -> ["q_proj", "v_proj"], "gpt2" -> ["c_attn"]), or null where PEFT has none
/// and asks for target_modules (vision towers such as "clip_vision_model", projectors).
nlohmann::json peft_default_targets(const std::string& model_type);

/// What adapter_config.json says, restricted to what this runner honours (anything else it refuses).
struct PeftConfig {
  LoraConfig lora;
  nlohmann::json target_modules;   ///< a list of names, a regular expression, or "all-linear"
  nlohmann::json exclude_modules;  ///< null, a list or a regular expression
  std::vector<std::string> modules_to_save;
  std::map<std::string, std::int64_t> rank_pattern;  ///< PEFT's: key matched as the regex "(.*\.)?key$"
  std::map<std::string, double> alpha_pattern;
  /// The configuration for module `name`: rank and alpha from the patterns when one matches.
  LoraConfig for_module(const std::string& name) const;
};

/// Reads DIR/adapter_config.json. Throws InputError naming the file for anything it cannot honour
/// exactly: another peft_type, DoRA, bias other than "none", layers_to_transform, trainable tokens...
PeftConfig read_peft_config(const std::filesystem::path& dir);
/// Tensors of DIR/adapter_model.safetensors, keyed by name within the component ("base_model.model."
/// removed, as PEFT loads them).
TensorMap read_peft_weights(const std::filesystem::path& dir);

/// What an adapter of `component` holds: every layer carrying a LoRA adapter, and every other module
/// with a trainable parameter (PEFT's modules_to_save, saved whole). Throws InputError when the state
/// cannot be expressed as a PEFT adapter (a LoRA layer inside a module that also trains in full, or a
/// trainable parameter held by the component's root module).
struct AdapterPlan {
  std::vector<std::string> lora_modules;     ///< names within the component, sorted
  std::vector<std::string> modules_to_save;  ///< names within the component, sorted
  bool empty() const { return lora_modules.empty(); }
};
AdapterPlan plan_adapter(torch::nn::Module& component, const std::string& component_name);

/// Writes the adapter of `component` to DIR (created), atomically per file. `extra` is merged into
/// adapter_config.json (base_model_name_or_path, task_type). Throws if the plan is empty.
void write_peft_adapter(torch::nn::Module& component, const std::string& component_name, const std::filesystem::path& dir,
                        const nlohmann::json& extra);

}  // namespace ablate::sdk
