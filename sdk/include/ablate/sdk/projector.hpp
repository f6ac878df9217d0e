#pragma once
// Projectors map encoder features into the backbone's embedding space.

#include <torch/types.h>

#include "ablate/sdk/component.hpp"

namespace ablate::sdk {

class Projector : public Component {
 public:
  ~Projector() override;
  /// features: [B, N, in_features] -> [B, N', out_features] (N' == N unless the projector reduces tokens).
  /// `features` may be the runner's cached encoder output (shared by later steps and cells): never write to it.
  virtual torch::Tensor project(const torch::Tensor& features) = 0;
  /// N' for N input tokens.
  virtual std::int64_t output_tokens(std::int64_t input_tokens) const { return input_tokens; }
};

}  // namespace ablate::sdk
