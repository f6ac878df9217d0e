#include "model/device.hpp"

#include <ATen/Version.h>
#include <torch/cuda.h>

#include "ablate/sdk/error.hpp"

#ifdef ABLATE_WITH_CUDA_PROPERTIES
#include <ATen/cuda/CUDAContext.h>
#endif

namespace ablate {

torch::Device pick_device(const std::string& name) {
  if (name == "auto") return torch::cuda::is_available() ? torch::Device(torch::kCUDA, 0) : torch::Device(torch::kCPU);
  try {
    torch::Device d(name);
    if (d.is_cuda() && !torch::cuda::is_available()) throw sdk::InputError("--device " + name + ": no CUDA device is available");
    if (d.is_cuda() && !d.has_index()) d = torch::Device(torch::kCUDA, 0);
    return d;
  } catch (const c10::Error&) {
    throw sdk::InputError("--device " + name + ": not a device (cpu, cuda, cuda:N, auto)");
  }
}

std::string describe_device(const torch::Device& device) {
  if (device.is_cpu()) return device.str() + " (" + at::get_cpu_capability() + ")";
#ifdef ABLATE_WITH_CUDA_PROPERTIES
  if (device.is_cuda()) return device.str() + " (" + at::cuda::getDeviceProperties(device.index())->name + ")";
#endif
  return device.str();
}

}  // namespace ablate
