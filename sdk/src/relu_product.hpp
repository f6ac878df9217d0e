// Internal to libablate_sdk: the one ReLU-after-a-product that forward_shared (linear.cpp) and relu_mlp's
// fallback (relu_mlp.cpp) both run.
#pragma once

#include <torch/types.h>

namespace ablate::sdk::detail {

/// relu(bias + x2 @ right), `bias` undefined for none. On CUDA with a bias, one product with cuBLASLt's bias +
/// ReLU epilogue (at::_addmm_activation); else the product, then an in-place ReLU.
torch::Tensor relu_product(const torch::Tensor& bias, const torch::Tensor& x2, const torch::Tensor& right);

}  // namespace ablate::sdk::detail
