#pragma once
// What encoders, projectors and backbones have in common: a torch module whose parameter names are the
// Hugging Face state-dict keys, and a way to be written back out in Hugging Face layout.

#include <filesystem>
#include <string>

#include <torch/nn/module.h>

#include "ablate/sdk/options.hpp"

namespace ablate::sdk {

/// Where and how the host builds a component. Passed by const reference to factories; valid only during
/// the call.
struct BuildContext {
  /// Relative paths in options (weights = "...") resolve against this folder (the experiment file's).
  std::filesystem::path base_dir;
  /// Initialisation seed. The host also seeds libtorch's default generator with it before each build.
  std::uint64_t seed = 0;
  /// Projectors: input width (encoder hidden size) and output width (backbone hidden size).
  std::int64_t in_features = 0;
  std::int64_t out_features = 0;
  /// Backbones built from scratch with a word-level tokenizer: the words the training data can produce
  /// (Dataset::vocabulary()); empty otherwise.
  std::vector<std::string> vocabulary;
};

/// Base of every model part. Not thread-safe. Objects are created by plugin factories and owned by the host
/// through a shared_ptr that also keeps the plugin library loaded.
class Component {
 public:
  virtual ~Component();
  /// The module that holds every parameter and buffer, named exactly as the Hugging Face model class
  /// names them (for example "encoder.layers.0.self_attn.q_proj.weight" in transformers 5's
  /// CLIPVisionModel), so that checkpoints and PEFT adapters need no renaming. Owned by the component;
  /// valid for its lifetime.
  virtual torch::nn::Module& module() = 0;
  /// config.json contents for writing this component in Hugging Face layout (null: it has none).
  virtual Json hf_config() const;
  /// Writes further files of the Hugging Face layout into `dir` (tokenizer.json, preprocessor_config.json).
  /// The host has already written model.safetensors and config.json there.
  virtual void save_extras(const std::filesystem::path& dir) const;
  /// Turns gradient checkpointing of the component's layer stack on or off (sdk/checkpoint.hpp). Returns
  /// false when the component does not support it, and the host refuses the experiment.
  virtual bool set_gradient_checkpointing(bool on);
};

/// Resolves `path` against `base` unless it is absolute.
std::filesystem::path resolve_path(const std::filesystem::path& base, const std::string& path);

/// Throws std::runtime_error (the run fails, the grid goes on) before a layer stack is built when `layers`
/// layers of at least `per_layer` float32 parameters each would not fit in this machine's memory. Sizes that
/// large fail at once on their first allocation; a count that large (num_hidden_layers = 10000000, a typo)
/// would otherwise build small layer after small layer for minutes before memory runs out. `key` names the
/// count in config.json.
void check_layers_fit(const std::string& key, std::int64_t layers, double per_layer);

}  // namespace ablate::sdk
