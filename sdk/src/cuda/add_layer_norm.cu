// CUDA kernels of sdk::add_layer_norm (sdk/src/norms.cpp): a residual add, LayerNorm and the cast of its output
// to the matrix products' type in one pass over the rows, and the backward pass in one more.
//
// Why: at batch 256 on an H100 (bench/results/h100/b256-kernel-profile-nograph.txt) the block's residual adds,
// layer norms and the casts around them were separate passes over [batch * tokens, hidden] float32 activations,
// a quarter of the step. Here each row is read once and written once each way.
//
// The kernels are in add_layer_norm_kernels.cuh; this file launches them. Plain C++ at the boundary: no torch
// headers here (they make nvcc slow), norms.cpp passes pointers, sizes and the stream.

#include "add_layer_norm_kernels.cuh"

namespace ablate::sdk::cuda {

namespace {

// launch_forward / launch_backward's launcher: the kernel on `stream`, and whether the launch took.
struct OnStream {
  cudaStream_t stream;
  template <class... Params, class... Args>
  cudaError_t operator()(void (*kernel)(Params...), unsigned blocks, int threads, Args... args) const {
    kernel<<<blocks, threads, 0, stream>>>(args...);
    return cudaGetLastError();
  }
};

}  // namespace

std::int64_t max_hidden() { return 32 * kernels::kThreads; }

const char* error_string(int error) { return cudaGetErrorString(static_cast<cudaError_t>(error)); }

int add_layer_norm_forward(const ForwardArgs& a, void* stream) {
  return kernels::launch_forward(a, OnStream{static_cast<cudaStream_t>(stream)});
}

int add_layer_norm_backward(const BackwardArgs& a, void* stream) {
  return kernels::launch_backward(a, OnStream{static_cast<cudaStream_t>(stream)});
}

}  // namespace ablate::sdk::cuda
