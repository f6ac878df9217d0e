#pragma once
// The assembled model: encoder -> projector -> backbone, one torch module whose parameters are named
// encoder.*, projector.*, backbone.*. Layout "prefix" (GIT): image tokens first, bidirectional among
// themselves; text causal over the image and earlier text; positions for text only, starting at 0.

#include <memory>
#include <string>
#include <vector>

#include <torch/nn/module.h>

#include "ablate/sdk/backbone.hpp"
#include "ablate/sdk/encoder.hpp"
#include "ablate/sdk/projector.hpp"
#include "data/batches.hpp"
#include "grid/experiment.hpp"

namespace ablate {

/// A plugin object and the name it goes by in messages ("encoder/clip_vit").
template <class T>
struct Part {
  std::shared_ptr<T> object;
  std::string plugin;
};

class VlmModel : public torch::nn::Module {
 public:
  VlmModel(Part<sdk::Encoder> encoder, Part<sdk::Projector> projector, Part<sdk::Backbone> backbone);

  /// Sum of the cross-entropy over the batch's loss tokens (divide by the step's loss-token count).
  /// Throws if the batch has no loss token.
  torch::Tensor loss_sum(const TrainBatch& batch);

  struct Generated {
    std::vector<std::vector<std::int64_t>> ids;  ///< new tokens per row, EOS excluded
    std::vector<std::string> text;               ///< decoded, cut at the first stop string, trimmed
  };
  /// Greedy or sampled generation with a KV cache. `generator` seeds sampling.
  Generated generate(const GenerationBatch& batch, const GenerateConfig& config, std::uint64_t seed);

  /// Call after strategies changed what trains: frozen components then run without autograd.
  void refresh_frozen();

  std::int64_t image_tokens() const { return image_tokens_; }
  /// Qualified name of the LM head ("backbone.lm_head").
  std::string head() const;
  sdk::Encoder& encoder() { return *encoder_.object; }
  sdk::Projector& projector() { return *projector_.object; }
  sdk::Backbone& backbone() { return *backbone_.object; }
  const Part<sdk::Encoder>& encoder_part() const { return encoder_; }
  const Part<sdk::Projector>& projector_part() const { return projector_; }
  const Part<sdk::Backbone>& backbone_part() const { return backbone_; }

 private:
  /// Image tokens in the backbone's space: [B, N', D].
  torch::Tensor image_embeddings(const torch::Tensor& pixels);

  Part<sdk::Encoder> encoder_;
  Part<sdk::Projector> projector_;
  Part<sdk::Backbone> backbone_;
  std::int64_t image_tokens_ = 0;
  bool encoder_frozen_ = false, projector_frozen_ = false;
};

}  // namespace ablate
