#pragma once
// Mixed precision as transformers' Trainer does it with bf16=True / fp16=True: parameters stay float32,
// the forward pass runs under autocast (matrix products in the lower precision, reductions and losses in
// float32). fp16 adds loss scaling (train/optimizer.hpp).

#include <string>
#include <utility>
#include <vector>

#include <ATen/autocast_mode.h>
#include <torch/nn/module.h>
#include <torch/types.h>

namespace ablate {

/// Autocast for `device` while alive when `precision` is "bf16" or "fp16"; nothing for "fp32".
class AutocastGuard {
 public:
  AutocastGuard(torch::Device device, const std::string& precision) : type_(device.type()) {
    if (precision == "fp32") return;
    active_ = true;
    was_enabled_ = at::autocast::is_autocast_enabled(type_);
    was_dtype_ = at::autocast::get_autocast_dtype(type_);
    at::autocast::set_autocast_enabled(type_, true);
    at::autocast::set_autocast_dtype(type_, precision == "bf16" ? at::kBFloat16 : at::kHalf);
    at::autocast::increment_nesting();
  }
  ~AutocastGuard() {
    if (!active_) return;
    // The cast cache holds lower-precision copies of the weights; it must not outlive the step.
    if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
    at::autocast::set_autocast_enabled(type_, was_enabled_);
    at::autocast::set_autocast_dtype(type_, was_dtype_);
  }
  AutocastGuard(const AutocastGuard&) = delete;
  AutocastGuard& operator=(const AutocastGuard&) = delete;

 private:
  c10::DeviceType type_;
  bool active_ = false;
  bool was_enabled_ = false;
  at::ScalarType was_dtype_ = at::kFloat;
};

/// Under bf16 / fp16 autocast, the frozen weights and biases of sdk::Linear layers are held in that type.
/// Autocast would otherwise cast them at every use (it caches the casts of trainable leaves only): one more
/// kernel and a pass over the weight per layer per forward pass, every training step and every decoded token.
/// The cast is the one autocast makes (round to nearest even), so no number changes. restore() puts the float32
/// weights back before anything merges or writes weights (exports, a stage's hand-over), which then see the
/// exact weights they would have seen: a tensor the cast leaves exact (a bf16 or fp16 checkpoint, loaded into
/// float32) is cast back up; only the others keep their float32 original (on the host for a CUDA model), so a
/// half-precision checkpoint costs no second copy of its weights.
class FrozenInLowPrecision {
 public:
  FrozenInLowPrecision(torch::nn::Module& model, const std::string& precision);
  ~FrozenInLowPrecision() = default;
  FrozenInLowPrecision(const FrozenInLowPrecision&) = delete;
  FrozenInLowPrecision& operator=(const FrozenInLowPrecision&) = delete;

  /// The float32 originals back in place (once; later calls do nothing).
  void restore();
  /// Tensors held in low precision now.
  std::size_t count() const { return kept_.size(); }
  /// Of those, the ones whose float32 original is kept (the cast changed them).
  std::size_t originals() const;

 private:
  std::vector<std::pair<torch::Tensor, torch::Tensor>> kept_;  ///< (parameter, its float32 data or undefined: exact)
};

}  // namespace ablate
