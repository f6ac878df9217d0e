#pragma once
// LLM backbones: token embeddings, the decoder stack with any attention mask and a KV cache, the LM head,
// and the tokenizer the weights were trained with.

#include <filesystem>
#include <optional>
#include <vector>

#include <torch/types.h>

#include "ablate/sdk/attention.hpp"
#include "ablate/sdk/component.hpp"
#include "ablate/sdk/tokenizer.hpp"

namespace ablate::sdk {

class Backbone : public Component {
 public:
  ~Backbone() override;
  /// ids: [B, T] int64 -> [B, T, hidden_size()]: the inputs of the first decoder layer, before positions are
  /// added (for OPT: embed_tokens, scaled, then project_in).
  virtual torch::Tensor embed(const torch::Tensor& ids) = 0;
  /// embeds: [B, T, hidden_size()]; positions: [B, T] int64, -1 where a token gets no position (image tokens
  /// in the prefix layout; padding). With a cache, the new keys and values are appended to it and the
  /// queries are the last T positions. Returns hidden states [B, T, output_size()], the LM head's input.
  virtual torch::Tensor forward(const torch::Tensor& embeds, const torch::Tensor& positions,
                                const AttentionMask& mask, KvCache* cache) = 0;
  /// hidden: [..., output_size()] -> logits [..., vocab_size()].
  virtual torch::Tensor logits(const torch::Tensor& hidden) = 0;
  virtual const Tokenizer& tokenizer() const = 0;
  virtual std::int64_t hidden_size() const = 0;
  /// Width of forward()'s output (differs from hidden_size() where a model projects out, as opt-350m does).
  virtual std::int64_t output_size() const { return hidden_size(); }
  virtual std::int64_t vocab_size() const = 0;
  /// Positions the model has embeddings for (learned positions: OPT, GPT-2); -1 when there is no hard limit
  /// (rotary embeddings). The host checks sequence lengths against it before running the model.
  virtual std::int64_t max_positions() const { return -1; }
  /// Name (within module()) of the module that maps hidden states to logits, e.g. "lm_head". With tied
  /// embeddings this is the embedding module that holds the shared matrix.
  virtual std::string head_module() const = 0;
  /// Ids that end a generated answer besides the tokenizer's EOS (which the runner appends to every target):
  /// the eos_token_id transformers' generate() stops at (GenerationStop). Empty by default.
  virtual std::vector<std::int64_t> stop_ids() const { return {}; }
};

/// `eos_token_id` of a config as transformers reads it: one id, a list of ids (Llama 3.1's [128001, 128008,
/// 128009]), or null (none); absent: `fallback`, the config class's default. Anything else fails naming the
/// file and key.
std::vector<std::int64_t> eos_token_ids(Options& config, std::optional<std::int64_t> fallback);
/// The same ids written back as config.json holds them: null, one id, or a list.
nlohmann::json eos_token_json(const std::vector<std::int64_t>& ids);

/// Where transformers' generate() stops for the model folder `dir`: generation_config.json's eos_token_id when
/// the folder has that file (null or absent there: nowhere), else `config_ids` (config.json's). `file` is
/// that generation_config.json as read, for writing back on export (null: the folder has none).
struct GenerationStop {
  std::vector<std::int64_t> eos_ids;
  nlohmann::json file;
  static GenerationStop read(const std::filesystem::path& dir, std::vector<std::int64_t> config_ids);
  /// Writes `file` back into an exported folder, as save_pretrained writes generation_config.json.
  void save(const std::filesystem::path& dir) const;
};

}  // namespace ablate::sdk
