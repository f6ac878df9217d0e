#pragma once
// The assembled model: encoder -> projector -> backbone, one torch module whose parameters are named
// encoder.*, projector.*, backbone.*. Three layouts place the image among the text:
//  - prefix (GIT): image tokens first, bidirectional among themselves; text causal over the image and earlier
//    text; positions for text only, starting at 0;
//  - inline (LLaVA): the image features take the place of the image token in the text (the start, after BOS,
//    when a prompt has none); causal over the whole sequence; positions over everything;
//  - prefix_lm (PaliGemma): image then text; bidirectional over the image and the prompt, causal over the
//    answer; positions over everything.

#include <memory>
#include <string>
#include <vector>

#include <ATen/core/Generator.h>
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

enum class Layout { prefix, inline_, prefix_lm };
Layout parse_layout(const std::string& name);

/// How generate() runs the one-token steps after the prompt (`runner --decode-graph`):
///  - automatic: on CUDA, with enough steps to pay for a capture, as `on`; elsewhere as `off`;
///  - on: a fixed-size KV cache, every step over the same tensors; on CUDA each step after the first is a
///    replayed CUDA graph (checked against the eager step once). On the CPU the same steps run eagerly;
///  - off: a KV cache that grows by one position a step, every step eager.
enum class DecodeGraphMode { automatic, on, off };

class DecodeSteps;  // model/vlm.cpp: the fixed-size decode steps, kept between the batches of an evaluation

/// What the backbone is given for one batch, once the layout has placed image and text.
struct Sequence {
  torch::Tensor embeds;     ///< [B, S, D]
  torch::Tensor positions;  ///< [B, S] int64, -1 where a token gets no position
  sdk::AttentionMask mask;
  torch::Tensor ids;        ///< [B, S] the text token at each position, -1 at image positions
};

/// The next token from scores [B, V] (float32): the argmax, or a sample after temperature, top-k and top-p,
/// applied in transformers' order (TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper).
torch::Tensor sample_next(const torch::Tensor& scores, const GenerateConfig& config, at::Generator& generator);

class VlmModel : public torch::nn::Module {
 public:
  /// `image_token`: the token id the inline layout replaces (-1: none; the image then goes after BOS).
  VlmModel(Part<sdk::Encoder> encoder, Part<sdk::Projector> projector, Part<sdk::Backbone> backbone,
           Layout layout = Layout::prefix, std::int64_t image_token = -1);
  ~VlmModel() override;

  /// Places image and text for the backbone. ids/valid: [B, T], right-padded for training (with prompt_len) or
  /// left-padded for generation (prompt_len undefined). Which positions carry loss: loss_inputs().
  /// `features`: the encoder's output for these images when the feature cache has it (pixels are then not used).
  /// `index`: the inline layout's placement from loss_inputs(); computed from ids on the host when undefined.
  Sequence assemble(const torch::Tensor& pixels, const torch::Tensor& ids, const torch::Tensor& valid,
                    const torch::Tensor& prompt_len, const torch::Tensor& features = {},
                    const torch::Tensor& index = {});

  /// The host's part of the loss for a training batch (safe on the data threads). `text_width` > 0 pads the
  /// text to that many columns and `loss_slots` > 0 the loss positions to that many slots, so that batches of
  /// different lengths give tensors of one shape; the loss is the same.
  LossInputs loss_inputs(const TrainBatch& batch, std::int64_t text_width = 0, std::int64_t loss_slots = 0) const;
  /// Sum of the cross-entropy over the batch's loss tokens (divide by the step's loss-token count). Reads the
  /// inputs on the device, with no wait for it: a CUDA graph can hold it.
  torch::Tensor loss_sum(const LossInputs& inputs);
  /// The same from a collated batch. Throws if the batch has no loss token.
  torch::Tensor loss_sum(const TrainBatch& batch);
  /// The most text columns a training batch may be padded to: the backbone's positions less the image's.
  std::int64_t max_text_width() const;
  /// Logits at every position of an assembled sequence: [B, S, V].
  torch::Tensor logits(const Sequence& sequence);

  struct Generated {
    std::vector<std::vector<std::int64_t>> ids;  ///< new tokens per row, EOS excluded
    std::vector<std::string> text;               ///< decoded, cut at the first stop string, trimmed
    std::int64_t new_tokens = 0;                 ///< tokens sampled for unfinished rows, EOS included
    double first_token_s = 0;                    ///< from the call to the first new tokens on the host
    double total_s = 0;                          ///< the whole call
    /// How the steps ran, as the evaluation line shows it: "growing KV cache", "fixed-size KV cache" or
    /// "CUDA graph", then ", no CUDA graph: <why>" once a capture failed.
    std::string decoding;
  };
  /// Greedy or sampled generation with a KV cache; `seed` seeds sampling.
  Generated generate(const GenerationBatch& batch, const GenerateConfig& config, std::uint64_t seed);

  void set_decode_graph(DecodeGraphMode mode) { decode_graph_ = mode; }
  /// Lets go of the fixed-size KV cache and CUDA graph that generate() keeps for the next batch (call when an
  /// evaluation ends: the memory then goes back to training).
  void release_decode_steps();

  /// Call after strategies changed what trains: frozen components then run without autograd.
  void refresh_frozen();
  /// Nothing in the encoder trains (as of the last refresh_frozen()).
  bool encoder_frozen() const { return encoder_frozen_; }
  /// The encoder alone: features [B, N, D] of prepared pixels (moved to the model's device).
  torch::Tensor encode(const torch::Tensor& pixels);

  Layout layout() const { return layout_; }
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
  /// Image tokens in the backbone's space: [B, N', D], from cached features when given, else from pixels.
  torch::Tensor image_embeddings(const torch::Tensor& pixels, const torch::Tensor& features);
  torch::Device device() const;
  /// Throws InputError when a sequence needs more positions than the backbone has.
  void check_length(std::int64_t positions) const;

  Part<sdk::Encoder> encoder_;
  Part<sdk::Projector> projector_;
  Part<sdk::Backbone> backbone_;
  Layout layout_;
  std::int64_t image_token_;
  std::int64_t image_tokens_ = 0;
  bool encoder_frozen_ = false, projector_frozen_ = false;
  DecodeGraphMode decode_graph_ = DecodeGraphMode::automatic;
  /// Why a decode step could not be a CUDA graph, once that was found: not tried again for this model.
  std::string graph_refused_;
  std::unique_ptr<DecodeSteps> decode_steps_;
};

}  // namespace ablate
