#pragma once
// The random generators' states: what a run's checkpoint keeps, and what gradient checkpointing's
// recomputation, a feature-cache build or a CUDA graph's check set aside and put back, so that the run's
// random stream does not move.

#include <torch/types.h>

namespace ablate::sdk {

/// The CPU generator's state and, for a device other than the CPU, that device's default generator's.
struct RngState {
  torch::Tensor cpu;     ///< undefined: leave the CPU generator alone
  torch::Tensor device;  ///< undefined on the CPU, or to leave the device's generator alone
};

RngState get_rng_state(const torch::Device& device);
/// Sets each state `state` holds; an undefined one leaves its generator as it is.
void set_rng_state(const torch::Device& device, const RngState& state);

/// Keeps the generators' states at construction and puts them back when it goes.
class RngRestore {
 public:
  explicit RngRestore(const torch::Device& device) : device_(device), saved_(get_rng_state(device)) {}
  ~RngRestore() { set_rng_state(device_, saved_); }
  RngRestore(const RngRestore&) = delete;
  RngRestore& operator=(const RngRestore&) = delete;

 private:
  torch::Device device_;
  RngState saved_;
};

}  // namespace ablate::sdk
