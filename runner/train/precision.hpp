#pragma once
// Mixed precision as transformers' Trainer does it with bf16=True / fp16=True: parameters stay float32,
// the forward pass runs under autocast (matrix products in the lower precision, reductions and losses in
// float32). fp16 adds loss scaling (train/optimizer.hpp).

#include <string>

#include <ATen/autocast_mode.h>
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

}  // namespace ablate
