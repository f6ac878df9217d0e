// backbone/llama: the LLaMA decoder as transformers' LlamaForCausalLM computes it (Llama-2 / Vicuna /
// TinyLlama / SmolLM2 / Llama-3 shapes): RMSNorm, rotary embeddings with the config's rope scaling,
// grouped-query attention, SwiGLU MLP, tied or untied head. Parameter names are LlamaForCausalLM's.

#include <cmath>

#include <torch/torch.h>

#include "ablate/sdk/checkpoint.hpp"
#include "ablate/sdk/linear.hpp"
#include "ablate/sdk/norms.hpp"
#include "ablate/sdk/plugin.hpp"
#include "ablate/sdk/rope.hpp"
#include "ablate/sdk/weights.hpp"

namespace ablate::plugins {

namespace sdk = ablate::sdk;

/// LlamaConfig's keys and defaults (transformers 5.17).
struct LlamaConfig {
  std::int64_t vocab_size = 32000;
  std::int64_t hidden_size = 4096;
  std::int64_t intermediate_size = 11008;
  std::int64_t num_hidden_layers = 32;
  std::int64_t num_attention_heads = 32;
  std::int64_t num_key_value_heads = 0;  // 0: num_attention_heads
  std::int64_t head_dim = 0;             // 0: hidden_size / num_attention_heads
  std::string hidden_act = "silu";
  std::int64_t max_position_embeddings = 2048;
  double rms_norm_eps = 1e-6;
  double initializer_range = 0.02;
  bool tie_word_embeddings = false;
  bool attention_bias = false;
  bool mlp_bias = false;
  double attention_dropout = 0.0;
  sdk::RopeConfig rope;
  std::int64_t bos_token_id = 1, pad_token_id = -1;
  std::vector<std::int64_t> eos_token_id{2};

  static LlamaConfig from(sdk::Options& o) {
    LlamaConfig c;
    c.vocab_size = o.size("vocab_size", c.vocab_size);
    c.hidden_size = o.size("hidden_size", c.hidden_size);
    c.intermediate_size = o.size("intermediate_size", c.intermediate_size);
    c.num_hidden_layers = o.size("num_hidden_layers", c.num_hidden_layers, 0);
    c.num_attention_heads = o.size("num_attention_heads", c.num_attention_heads);
    c.num_key_value_heads = o.nullable_size("num_key_value_heads").value_or(c.num_attention_heads);
    c.head_dim = o.nullable_size("head_dim").value_or(c.hidden_size / c.num_attention_heads);
    c.hidden_act = o.get("hidden_act", c.hidden_act);
    c.max_position_embeddings = o.size("max_position_embeddings", c.max_position_embeddings);
    c.rms_norm_eps = o.non_negative("rms_norm_eps", c.rms_norm_eps);
    c.initializer_range = o.get("initializer_range", c.initializer_range);
    c.tie_word_embeddings = o.get("tie_word_embeddings", c.tie_word_embeddings);
    c.attention_bias = o.get("attention_bias", c.attention_bias);
    c.mlp_bias = o.get("mlp_bias", c.mlp_bias);
    c.attention_dropout = o.probability("attention_dropout", c.attention_dropout);
    c.rope = sdk::RopeConfig::from_hf(o);
    // bos and pad: an integer, or absent / null; eos also a list (Llama 3.1 stops at three), every one of
    // which ends a generated answer, as in generate().
    auto id = [&](const char* key, std::int64_t fallback) {
      const auto& v = o.raw(key);
      if (v.is_null()) return fallback;
      if (!v.is_number_integer()) o.fail(key, "expected a token id or null, got " + v.dump());
      return v.get<std::int64_t>();
    };
    c.bos_token_id = id("bos_token_id", c.bos_token_id);
    c.eos_token_id = sdk::eos_token_ids(o, c.eos_token_id.front());
    c.pad_token_id = id("pad_token_id", c.pad_token_id);
    if (c.head_dim < 1) o.fail("num_attention_heads", "must not exceed hidden_size (head_dim would be 0)");
    if (c.num_attention_heads % c.num_key_value_heads != 0) o.fail("num_key_value_heads", "must divide num_attention_heads");
    if (c.hidden_act != "silu") o.fail("hidden_act", "unsupported activation '" + c.hidden_act + "' (silu)");
    return c;
  }

  sdk::Json to_json() const {
    return {{"architectures", {"LlamaForCausalLM"}},
            {"model_type", "llama"},
            {"vocab_size", vocab_size},
            {"hidden_size", hidden_size},
            {"intermediate_size", intermediate_size},
            {"num_hidden_layers", num_hidden_layers},
            {"num_attention_heads", num_attention_heads},
            {"num_key_value_heads", num_key_value_heads},
            {"head_dim", head_dim},
            {"hidden_act", hidden_act},
            {"max_position_embeddings", max_position_embeddings},
            {"rms_norm_eps", rms_norm_eps},
            {"initializer_range", initializer_range},
            {"tie_word_embeddings", tie_word_embeddings},
            {"attention_bias", attention_bias},
            {"mlp_bias", mlp_bias},
            {"attention_dropout", attention_dropout},
            {"rope_parameters", rope.to_json()},
            {"bos_token_id", bos_token_id},
            {"eos_token_id", sdk::eos_token_json(eos_token_id)},
            {"pad_token_id", pad_token_id >= 0 ? sdk::Json(pad_token_id) : sdk::Json()},
            {"dtype", "float32"}};
  }
};

class LlamaAttentionImpl : public torch::nn::Module {
 public:
  LlamaAttentionImpl(const LlamaConfig& c, std::size_t index)
      : index_(index), heads_(c.num_attention_heads), kv_heads_(c.num_key_value_heads), head_dim_(c.head_dim),
        dropout_(c.attention_dropout) {
    q_proj = register_module("q_proj", sdk::Linear(c.hidden_size, heads_ * head_dim_, c.attention_bias));
    k_proj = register_module("k_proj", sdk::Linear(c.hidden_size, kv_heads_ * head_dim_, c.attention_bias));
    v_proj = register_module("v_proj", sdk::Linear(c.hidden_size, kv_heads_ * head_dim_, c.attention_bias));
    o_proj = register_module("o_proj", sdk::Linear(heads_ * head_dim_, c.hidden_size, c.attention_bias));
  }
  torch::Tensor forward(const torch::Tensor& h, const torch::Tensor& cos, const torch::Tensor& sin,
                        const sdk::AttentionMask& mask, sdk::KvCache* cache) {
    const auto b = h.size(0), t = h.size(1);
    // One read of h for the three projections (and their adapters): one cast, one input gradient.
    auto qkv = sdk::forward_shared({q_proj.get(), k_proj.get(), v_proj.get()}, h);
    auto q = qkv[0].view({b, t, heads_, head_dim_}).transpose(1, 2);
    auto k = qkv[1].view({b, t, kv_heads_, head_dim_}).transpose(1, 2);
    auto v = qkv[2].view({b, t, kv_heads_, head_dim_}).transpose(1, 2);
    q = sdk::Rotary::apply(q, cos, sin);
    k = sdk::Rotary::apply(k, cos, sin);  // before the cache: cached keys keep their rotation
    std::int64_t past = 0;
    if (cache) {
      past = cache->past_length(index_);
      std::tie(k, v) = cache->append(index_, k, v);
    }
    auto out = sdk::attend(q, k, v, mask, past, 1.0 / std::sqrt(static_cast<double>(head_dim_)), is_training() ? dropout_ : 0.0);
    return o_proj(out.transpose(1, 2).reshape({b, t, heads_ * head_dim_}));
  }
  sdk::Linear q_proj{nullptr}, k_proj{nullptr}, v_proj{nullptr}, o_proj{nullptr};

 private:
  std::size_t index_;
  std::int64_t heads_, kv_heads_, head_dim_;
  double dropout_;
};
TORCH_MODULE(LlamaAttention);

class LlamaMlpImpl : public torch::nn::Module {
 public:
  explicit LlamaMlpImpl(const LlamaConfig& c) {
    gate_proj = register_module("gate_proj", sdk::Linear(c.hidden_size, c.intermediate_size, c.mlp_bias));
    up_proj = register_module("up_proj", sdk::Linear(c.hidden_size, c.intermediate_size, c.mlp_bias));
    down_proj = register_module("down_proj", sdk::Linear(c.intermediate_size, c.hidden_size, c.mlp_bias));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    auto gate_up = sdk::forward_shared({gate_proj.get(), up_proj.get()}, x);
    return down_proj(torch::silu(gate_up[0]) * gate_up[1]);
  }
  sdk::Linear gate_proj{nullptr}, up_proj{nullptr}, down_proj{nullptr};
};
TORCH_MODULE(LlamaMlp);

class LlamaDecoderLayerImpl : public torch::nn::Module {
 public:
  LlamaDecoderLayerImpl(const LlamaConfig& c, std::size_t index) {
    self_attn = register_module("self_attn", LlamaAttention(c, index));
    mlp = register_module("mlp", LlamaMlp(c));
    input_layernorm = register_module("input_layernorm", sdk::RMSNorm(c.hidden_size, c.rms_norm_eps));
    post_attention_layernorm = register_module("post_attention_layernorm", sdk::RMSNorm(c.hidden_size, c.rms_norm_eps));
  }
  /// transformers' LlamaDecoderLayer.forward: h + attn(norm(h)), then h + mlp(norm(h)).
  torch::Tensor forward(torch::Tensor h, const torch::Tensor& cos, const torch::Tensor& sin, const sdk::AttentionMask& mask,
                        sdk::KvCache* cache) {
    return step({std::move(h), {}}, cos, sin, mask, cache).hidden();
  }
  /// The same layer as a link of the model's chain: its last residual add is left to the next layer's
  /// input_layernorm (sdk::add_layer_norm: with --fused-norm on, the add and the RMSNorm are one pass).
  sdk::PreLnStream step(const sdk::PreLnStream& in, const torch::Tensor& cos, const torch::Tensor& sin,
                        const sdk::AttentionMask& mask, sdk::KvCache* cache) {
    return sdk::pre_ln_block(
        in, *input_layernorm, [&](const torch::Tensor& x) { return self_attn(x, cos, sin, mask, cache); },
        *post_attention_layernorm, [&](const torch::Tensor& x) { return mlp(x); });
  }
  LlamaAttention self_attn{nullptr};
  LlamaMlp mlp{nullptr};
  sdk::RMSNorm input_layernorm{nullptr}, post_attention_layernorm{nullptr};
};
TORCH_MODULE(LlamaDecoderLayer);

class LlamaModelImpl : public torch::nn::Module {
 public:
  explicit LlamaModelImpl(const LlamaConfig& c) {
    embed_tokens = register_module("embed_tokens", torch::nn::Embedding(c.vocab_size, c.hidden_size));
    const double h = static_cast<double>(c.hidden_size), hd = static_cast<double>(c.head_dim);
    sdk::check_layers_fit("num_hidden_layers", c.num_hidden_layers,
                          2 * h * hd * static_cast<double>(c.num_attention_heads + c.num_key_value_heads) +
                              3 * h * static_cast<double>(c.intermediate_size));
    layers = register_module("layers", torch::nn::ModuleList());
    for (std::int64_t i = 0; i < c.num_hidden_layers; ++i) layers->push_back(LlamaDecoderLayer(c, static_cast<std::size_t>(i)));
    norm = register_module("norm", sdk::RMSNorm(c.hidden_size, c.rms_norm_eps));
  }
  torch::nn::Embedding embed_tokens{nullptr};
  torch::nn::ModuleList layers{nullptr};
  sdk::RMSNorm norm{nullptr};
};
TORCH_MODULE(LlamaModel);

class LlamaForCausalLMImpl : public torch::nn::Module {
 public:
  explicit LlamaForCausalLMImpl(const LlamaConfig& c) {
    model = register_module("model", LlamaModel(c));
    if (!c.tie_word_embeddings) lm_head = register_module("lm_head", sdk::Linear(c.hidden_size, c.vocab_size, false));
  }
  LlamaModel model{nullptr};
  sdk::Linear lm_head{nullptr};
};
TORCH_MODULE(LlamaForCausalLM);

struct LlamaOptions {
  std::string weights;  ///< Hugging Face folder (config.json, safetensors, tokenizer.json or tokenizer.model)

  static LlamaOptions parse(sdk::Options& o) {
    LlamaOptions x;
    x.weights = o.require<std::string>("weights");
    return x;
  }
};

class Llama : public sdk::Backbone {
 public:
  using options_type = LlamaOptions;

  Llama(const LlamaOptions& o, const sdk::BuildContext& ctx) {
    const auto dir = sdk::resolve_path(ctx.base_dir, o.weights);
    auto cfg = sdk::read_json(dir / "config.json");
    if (cfg.contains("text_config")) cfg = cfg["text_config"];  // a multimodal checkpoint's language model
    auto view = sdk::Options::of_file(cfg, (dir / "config.json").string());
    config_ = LlamaConfig::from(view);
    stop_ = sdk::GenerationStop::read(dir, config_.eos_token_id);
    tokenizer_ = sdk::Tokenizer::from_folder(dir);
    model_ = LlamaForCausalLM(config_);
    rotary_ = std::make_unique<sdk::Rotary>(config_.rope, config_.head_dim, config_.max_position_embeddings);
    std::vector<std::string> ignore{"*.rotary_emb.inv_freq"};  // a buffer older files carry
    if (config_.tie_word_embeddings) ignore.push_back("lm_head.weight");
    sdk::load_state(*model_, sdk::read_weights(dir), dir.string(), true, ignore);
  }

  torch::nn::Module& module() override { return *model_; }
  sdk::Json hf_config() const override { return config_.to_json(); }
  void save_extras(const std::filesystem::path& dir) const override {
    tokenizer_.save_folder(dir);
    stop_.save(dir);
  }
  std::vector<std::int64_t> stop_ids() const override { return stop_.eos_ids; }
  bool set_gradient_checkpointing(bool on) override {
    checkpointing_ = on;
    return true;
  }

  torch::Tensor embed(const torch::Tensor& ids) override { return model_->model->embed_tokens(ids); }

  torch::Tensor forward(const torch::Tensor& embeds, const torch::Tensor& positions, const sdk::AttentionMask& mask,
                        sdk::KvCache* cache) override {
    auto [cos, sin] = rotary_->cos_sin(positions);
    cos = cos.to(embeds.dtype());
    sin = sin.to(embeds.dtype());
    auto h = embeds;
    if (checkpointing_ && !cache) {
      // Each layer recomputed in backward from its input alone: layers as transformers' modules, h to h.
      for (const auto& layer : *model_->model->layers) {
        auto* l = layer->as<LlamaDecoderLayerImpl>();
        h = sdk::maybe_checkpoint(true, *l, [l, cos, sin, mask](const torch::Tensor& x) {
          return l->forward(x, cos, sin, mask, nullptr);
        }, h);
      }
      return model_->model->norm(h);
    }
    sdk::PreLnStream s{h, {}};
    for (const auto& layer : *model_->model->layers) s = layer->as<LlamaDecoderLayerImpl>()->step(s, cos, sin, mask, cache);
    return model_->model->norm(s.hidden());
  }

  torch::Tensor logits(const torch::Tensor& hidden) override {
    if (model_->lm_head) return model_->lm_head(hidden);
    return torch::nn::functional::linear(hidden, model_->model->embed_tokens->weight);
  }

  const sdk::Tokenizer& tokenizer() const override { return tokenizer_; }
  std::int64_t hidden_size() const override { return config_.hidden_size; }
  std::int64_t vocab_size() const override { return config_.vocab_size; }
  std::string head_module() const override { return config_.tie_word_embeddings ? "model.embed_tokens" : "lm_head"; }

 private:
  LlamaConfig config_;
  bool checkpointing_ = false;
  sdk::Tokenizer tokenizer_;
  sdk::GenerationStop stop_;  ///< where generate() would stop (empty: built from scratch, the tokenizer's EOS)
  LlamaForCausalLM model_{nullptr};
  std::unique_ptr<sdk::Rotary> rotary_;
};

}  // namespace ablate::plugins

namespace {
void register_plugin(ablate::sdk::Registry& registry) {
  registry.add<ablate::plugins::Llama>("llama", 1, "LLaMA decoder (transformers' LlamaForCausalLM)");
}
}  // namespace

ABLATE_PLUGIN(register_plugin)
