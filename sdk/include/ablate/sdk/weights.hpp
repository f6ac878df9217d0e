#pragma once
// Weights in Hugging Face layout: config.json plus safetensors, single file or sharded with
// model.safetensors.index.json; memory-mapped; float32, float16 and bfloat16. Loading into a module is one
// call by parameter name, strict about missing, unexpected and mis-shaped tensors.

#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>
#include <torch/nn/module.h>
#include <torch/types.h>

namespace ablate::sdk {

using TensorMap = std::map<std::string, torch::Tensor>;

/// Reads a JSON file; throws InputError "FILE: ..." if it is missing or malformed.
nlohmann::json read_json(const std::filesystem::path& file);
/// Throws InputError "FILE: ..." unless `file` is a regular file (after links): a folder, a FIFO or a device
/// would fail later without its name, block, or never end.
void require_regular_file(const std::filesystem::path& file);
/// `name` with each NUL character written as \0, for a message: a name read from JSON or TOML may hold one,
/// and the message, printed as a C string, would end there.
std::string show_nul(const std::string& name);
/// An exception's text for a user: nlohmann's "[json.exception.type_error.302] " tag is dropped.
std::string json_error_text(const std::exception& e);
/// Writes JSON with two-space indentation, atomically (temporary file, then rename).
void write_json(const std::filesystem::path& file, const nlohmann::json& value);

/// Tensors of one .safetensors file, memory-mapped: each tensor keeps the mapping alive. CPU, file dtype.
/// Throws InputError naming the file on a malformed header, unknown dtype or out-of-range offsets.
TensorMap read_safetensors(const std::filesystem::path& file);
/// Tensors of a weights folder: model.safetensors, or the shards listed in model.safetensors.index.json.
TensorMap read_weights(const std::filesystem::path& dir);
/// Writes tensors (any device; stored contiguous, in their dtype) to one .safetensors file, atomically.
void write_safetensors(const std::filesystem::path& file, const TensorMap& tensors,
                       const std::map<std::string, std::string>& metadata = {});

/// Parameters and persistent buffers of `module` by name (the state dict). With trainable_only, only
/// parameters with requires_grad.
TensorMap state_dict(const torch::nn::Module& module, bool trainable_only = false);

struct LoadReport {
  std::vector<std::string> missing;     ///< in the module, not in the file
  std::vector<std::string> unexpected;  ///< in the file, not in the module
  std::vector<std::string> mismatched;  ///< "name: file [a, b] vs module [c, d]"
};

/// Copies `tensors` into the module's parameters and buffers by name (converting dtype, keeping the
/// module's device). With strict, any missing, unexpected or mis-shaped tensor throws InputError listing
/// them all, naming `origin`. `ignore_unexpected` lists names that may be present and unused: prefixes (a
/// full CLIP checkpoint's "text_model." when only the vision tower is built) or, starting with '*',
/// suffixes ("*.attn.masked_bias", buffers old GPT-2 files carry).
LoadReport load_state(torch::nn::Module& module, const TensorMap& tensors, const std::string& origin,
                      bool strict = true, const std::vector<std::string>& ignore_unexpected = {});

/// Loads a module's weights from a safetensors file, or a folder holding model.safetensors (or shards), whose
/// names may carry one of `prefixes` (LLaVA's projector file says "model.mm_projector.0.weight"): the first
/// prefix that every tensor has is removed. Strict, as load_state.
void load_weights_with_prefix(torch::nn::Module& module, const std::filesystem::path& path,
                              const std::vector<std::string>& prefixes);

/// Writes a component in Hugging Face layout: model.safetensors and config.json (when config is not null).
void save_pretrained(const std::filesystem::path& dir, const torch::nn::Module& module, const nlohmann::json& config);

}  // namespace ablate::sdk
