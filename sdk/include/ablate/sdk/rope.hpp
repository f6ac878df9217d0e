#pragma once
// Rotary position embeddings as transformers computes them, for every rope_type a LLaMA-family config.json
// can name: default, linear, dynamic (NTK), yarn, llama3. Read from either form of the config: transformers
// 5's "rope_parameters" or the older "rope_scaling" with a top-level "rope_theta".

#include <optional>
#include <string>
#include <utility>

#include <torch/types.h>

#include "ablate/sdk/options.hpp"

namespace ablate::sdk {

struct RopeConfig {
  std::string type = "default";
  double theta = 10000.0;
  double factor = 1.0;
  double partial_rotary_factor = 1.0;
  std::int64_t original_max_position_embeddings = 0;  ///< 0: max_position_embeddings
  double low_freq_factor = 1.0, high_freq_factor = 4.0;  ///< llama3
  std::optional<double> attention_factor, mscale, mscale_all_dim;  ///< yarn
  double beta_fast = 32.0, beta_slow = 1.0;  ///< yarn
  bool truncate = true;  ///< yarn

  /// Reads the rope keys of a config.json view: "rope_parameters" or the older "rope_scaling" (which wins,
  /// as in transformers 5) and "rope_theta"; "type" stands for "rope_type".
  static RopeConfig from_hf(Options& config);
  /// The "rope_parameters" object transformers 5 writes.
  Json to_json() const;
};

/// The cos / sin tables of a model. Not thread-safe: dynamic NTK scaling grows its frequencies with the
/// longest position seen, and keeps them, as transformers does.
class Rotary {
 public:
  Rotary(const RopeConfig& config, std::int64_t head_dim, std::int64_t max_position_embeddings);

  /// cos and sin [B, T, head_dim] (float32) for positions [B, T] (int64, -1 allowed: treated as 0).
  std::pair<torch::Tensor, torch::Tensor> cos_sin(const torch::Tensor& positions);
  /// x * cos + rotate_half(x) * sin, for x [B, H, T, head_dim] and cos / sin [B, T, head_dim].
  static torch::Tensor apply(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin);

 private:
  torch::Tensor inv_freq_for(const torch::Tensor& seq_len) const;

  RopeConfig config_;
  std::int64_t dim_, max_positions_;
  torch::Tensor inv_freq_, original_inv_freq_;
  // inv_freq_ on the positions' device, copied once: a copy from host memory at every step would wait for the
  // device, and cannot be captured in a CUDA graph.
  torch::Tensor inv_freq_on_device_;
  double attention_scaling_ = 1.0;
  std::int64_t max_seq_len_cached_;
};

}  // namespace ablate::sdk
