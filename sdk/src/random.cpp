#include "ablate/sdk/random.hpp"

#include <mutex>

#include <ATen/Context.h>
#include <ATen/core/Generator.h>

namespace ablate::sdk {

namespace {

// Generators are shared by every thread: their states are read and written under their own mutex.
torch::Tensor state_of(at::Generator gen) {
  std::lock_guard<std::mutex> lock(gen.mutex());
  return gen.get_state();
}

void set_state(at::Generator gen, const torch::Tensor& state) {
  std::lock_guard<std::mutex> lock(gen.mutex());
  gen.set_state(state);
}

}  // namespace

RngState get_rng_state(const torch::Device& device) {
  RngState s;
  s.cpu = state_of(at::detail::getDefaultCPUGenerator());
  if (!device.is_cpu()) s.device = state_of(at::globalContext().defaultGenerator(device));
  return s;
}

void set_rng_state(const torch::Device& device, const RngState& state) {
  if (state.cpu.defined()) set_state(at::detail::getDefaultCPUGenerator(), state.cpu);
  if (state.device.defined() && !device.is_cpu()) set_state(at::globalContext().defaultGenerator(device), state.device);
}

}  // namespace ablate::sdk
