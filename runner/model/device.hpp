#pragma once
// Which device a run uses, and how it is named in the log and in the results database.

#include <string>

#include <torch/types.h>

namespace ablate {

/// --device: "cpu", "cuda", "cuda:N" or "auto" (CUDA when there is one). "cuda" and "auto" become cuda:0,
/// where libtorch puts them, so tensors compare equal to the run's device. InputError for anything else, or
/// for CUDA on a machine without it.
torch::Device pick_device(const std::string& name);

/// The device with what decides its numbers: "cpu (AVX2)" names the vector instructions libtorch's CPU kernels
/// dispatched to (an AVX-512 machine sums in another order, so a run there is repeatable but not bit-identical
/// to one here); "cuda:0 (NVIDIA H100 80GB HBM3)" the GPU's model.
std::string describe_device(const torch::Device& device);

}  // namespace ablate
