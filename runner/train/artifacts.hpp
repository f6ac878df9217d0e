#pragma once
// What a run leaves on disk besides checkpoints: components exported in Hugging Face layout (LoRA
// merged), and the weights a stage changed, for the stages after it.

#include <filesystem>

#include <torch/nn/module.h>

#include "ablate/sdk/component.hpp"
#include "ablate/sdk/weights.hpp"

namespace ablate {

/// Writes `part` to `dir` as transformers' save_pretrained would: model.safetensors (every LoRA adapter
/// merged into the weight it adapts, adapter tensors left out), config.json and the plugin's extra files
/// (tokenizer, preprocessor_config.json). Merging is permanent for the model in memory.
void export_component(sdk::Component& part, const std::filesystem::path& dir);

/// The weights a stage changed, in the form the next stage starts from: every parameter it trained, and
/// each LoRA layer's weight with its adapter merged (as LLaVA merges before training further). Merges the
/// adapters of `model` in place.
sdk::TensorMap stage_changes(torch::nn::Module& model);

}  // namespace ablate
