#pragma once
// The boundary between relu_mlp.cpp (torch) and relu_gemm.cpp (cuBLASLt): raw pointers, sizes and a stream, as
// add_layer_norm.hpp. Two matrix products of an MLP whose activation is ReLU (OPT's fc1 -> ReLU -> fc2), with
// cuBLASLt's epilogues doing the ReLU's work:
//  - forward:  h = relu(x @ w1^T + b1), and the ReLU's mask as bits (h > 0), written by the same product;
//  - backward: dpre = (dy @ w2) * mask, the mask applied by fc2's input-gradient product itself, and with a
//    bias on fc1 its gradient, dpre summed over rows, from the same product (DRELU_BGRAD: the form of the
//    epilogue that fused-MLP code (Apex, OneFlow, flash-attention) uses, so the one cuBLASLt covers best).
// That spares the ReLU backward's pass (read the gradient and h, write the gradient: 3 bytes of traffic per
// element and per byte of the type), and the mask held until backward is 1 bit per element instead of h.
// Every matrix is row-major and contiguous, of type `type` (bf16 or f16; products accumulate in float32).

#include <cstdint>

namespace ablate::sdk::cuda {

enum class GemmType { bf16, f16 };

struct ReluForwardArgs {
  const void* x;   ///< [rows, in]
  const void* w1;  ///< [features, in]
  const void* b1;  ///< [features], or null
  void* h;         ///< [rows, features]: relu(x @ w1^T + b1)
  void* mask;      ///< relu_mask_bytes(rows, features) bytes
  std::int64_t rows, in, features;
  GemmType type;
  void* workspace;
  std::int64_t workspace_bytes;
  int device;
};

struct ReluBackwardArgs {
  const void* dy;    ///< [rows, out]: the gradient of fc2's output
  const void* w2;    ///< [out, features]: fc2's weight
  const void* mask;  ///< from relu_linear_forward with the same rows and features
  void* dpre;        ///< [rows, features]: the gradient of fc1's output before the ReLU
  void* db1;         ///< [features]: dpre summed over rows (fc1's bias gradient), or null without a bias
  std::int64_t rows, out, features;
  GemmType type;
  void* workspace;
  std::int64_t workspace_bytes;
  int device;
};

/// The mask's stride in bits between rows of h: cuBLASLt wants a multiple of 128.
constexpr std::int64_t relu_mask_ld(std::int64_t features) { return (features + 127) / 128 * 128; }
/// Bytes of the mask.
constexpr std::int64_t relu_mask_bytes(std::int64_t rows, std::int64_t features) {
  return relu_mask_ld(features) / 8 * rows;
}
/// Whether cuBLASLt is there to call: torch's own libcublasLt, already loaded in the process (no second copy
/// is ever loaded beside it), with every function these products call.
bool relu_gemm_available();
/// Both return 0 when the product was launched on `stream` (a cudaStream_t); otherwise a cublasStatus_t, or
/// kNoAlgorithm when cuBLASLt has no kernel for the case (the caller then takes torch's ops).
int relu_linear_forward(const ReluForwardArgs& args, void* stream);
int relu_grad_backward(const ReluBackwardArgs& args, void* stream);
/// Whether relu_grad_backward will find a kernel for these sizes (0), asked before the forward product writes
/// a mask that only it can read. Matrices at least 16-byte aligned; `bias`: with db1. On the current device.
int relu_grad_check(std::int64_t rows, std::int64_t out, std::int64_t features, bool bias, GemmType type,
                    std::int64_t workspace_bytes, int device);
/// The descriptors of both products, built and dropped without a GPU (no handle, no launch): every attribute
/// cuBLASLt accepts, or the status of the first it refused. For tests on machines without a GPU.
int relu_gemm_describe(std::int64_t rows, std::int64_t in, std::int64_t features, GemmType type);
constexpr int kNoAlgorithm = 1000;
constexpr int kNoLibrary = 1001;
const char* relu_gemm_error(int status);

}  // namespace ablate::sdk::cuda
