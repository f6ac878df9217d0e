#pragma once
// Gradient checkpointing: a layer's activations are not kept for backward but recomputed there, trading
// one more forward per layer for memory (transformers' gradient_checkpointing_enable()).

#include <functional>
#include <vector>

#include <torch/nn/module.h>
#include <torch/types.h>

namespace ablate::sdk {

/// Runs `layer(x)` without keeping its activations; the backward pass runs it again, with the random
/// generator state and autocast settings it had, and differentiates with respect to `x` and `params` (the
/// layer's parameters: gradients reach them even when `x` needs none, as with a frozen embedding and
/// LoRA). `layer` may capture other tensors that need no gradient (masks, rotary tables) by value.
/// Use it only when training with gradients enabled and no KV cache.
torch::Tensor checkpoint(std::function<torch::Tensor(const torch::Tensor&)> layer, const torch::Tensor& x,
                         const std::vector<torch::Tensor>& params);

/// One layer of a stack: through checkpoint() when `enabled`, the layer is training and gradients are on
/// (as transformers does it), else `fn(x)` directly. Pass enabled = false when decoding with a KV cache.
torch::Tensor maybe_checkpoint(bool enabled, torch::nn::Module& layer, std::function<torch::Tensor(const torch::Tensor&)> fn,
                               const torch::Tensor& x);

}  // namespace ablate::sdk
