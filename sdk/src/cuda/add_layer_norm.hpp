#pragma once
// The boundary between norms.cpp (torch) and add_layer_norm.cu (CUDA): raw pointers, sizes and a stream,
// so that neither side includes the other's headers. Every tensor is contiguous, [rows, hidden] or [hidden]
// (weight, bias) or [rows] (mean, rstd); float pointers are float32. With `rms` the norm is an RMSNorm
// (LLaMA's): no mean is subtracted (mean is neither written nor read and may be null) and there is no bias.

#include <cstdint>

namespace ablate::sdk::cuda {

enum class DType { f32, bf16, f16 };

struct ForwardArgs {
  const float* residual;
  const void* branch;  ///< null: no add; sum is then not written
  DType branch_type;
  const float* weight;
  const float* bias;  ///< null with rms
  float* sum;  ///< residual + branch
  void* y;     ///< LayerNorm(sum)
  DType y_type;
  float* y_float;  ///< LayerNorm(sum) in float32 as well, or null
  float* mean;
  float* rstd;
  std::int64_t rows, hidden;
  float eps;
  bool rms;
};

struct BackwardArgs {
  const float* sum;  ///< the forward pass's sum (its residual without a branch)
  const void* dy;  ///< y's gradient, or null
  DType dy_type;
  const float* dy_float;  ///< y_float's gradient, or null
  const float* d_sum;  ///< the sum's own gradient, or null
  const float* mean;
  const float* rstd;
  const float* weight;
  float* d_residual;
  void* d_branch;  ///< null: not wanted
  DType branch_type;
  std::int64_t rows, hidden;
  bool rms;
};

/// The widest row the kernels take (columns held in registers); wider rows go through torch's ops.
std::int64_t max_hidden();
/// Both return a cudaError_t value: 0 when the kernel was launched on `stream` (a cudaStream_t).
int add_layer_norm_forward(const ForwardArgs& args, void* stream);
int add_layer_norm_backward(const BackwardArgs& args, void* stream);
const char* error_string(int error);

}  // namespace ablate::sdk::cuda
