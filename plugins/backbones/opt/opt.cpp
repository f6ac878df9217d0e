// backbone/opt: Meta's OPT decoder as transformers' OPTForCausalLM computes it: learned positions (offset 2),
// pre- or post-layernorm (opt-350m is post), project_in / project_out when word_embed_proj_dim differs from
// hidden_size, ReLU MLP, tied or untied LM head. Parameter names are OPTForCausalLM's state-dict keys.

#include <cmath>
#include <utility>

#include <torch/torch.h>

#include "ablate/sdk/checkpoint.hpp"
#include "ablate/sdk/linear.hpp"
#include "ablate/sdk/norms.hpp"
#include "ablate/sdk/plugin.hpp"
#include "ablate/sdk/weights.hpp"

namespace ablate::plugins {

namespace sdk = ablate::sdk;

/// OPTConfig's keys and defaults (those of facebook/opt-125m).
struct OptConfig {
  std::int64_t vocab_size = 50272;
  std::int64_t hidden_size = 768;
  std::int64_t num_hidden_layers = 12;
  std::int64_t ffn_dim = 3072;
  std::int64_t max_position_embeddings = 2048;
  bool do_layer_norm_before = true;
  bool remove_final_layer_norm = false;  // "_remove_final_layer_norm"
  std::int64_t word_embed_proj_dim = 0;  // 0: hidden_size
  double dropout = 0.1;
  double attention_dropout = 0.0;
  std::int64_t num_attention_heads = 12;
  std::string activation_function = "relu";
  double init_std = 0.02;
  bool enable_bias = true;
  bool layer_norm_elementwise_affine = true;
  bool tie_word_embeddings = true;
  std::int64_t pad_token_id = 1, bos_token_id = 2;
  std::vector<std::int64_t> eos_token_id{2};

  static OptConfig from(sdk::Options& o) {
    OptConfig c;
    c.vocab_size = o.size("vocab_size", c.vocab_size);
    c.hidden_size = o.size("hidden_size", c.hidden_size);
    c.num_hidden_layers = o.size("num_hidden_layers", c.num_hidden_layers, 0);
    c.ffn_dim = o.size("ffn_dim", c.ffn_dim);
    c.max_position_embeddings = o.size("max_position_embeddings", c.max_position_embeddings);
    c.do_layer_norm_before = o.get("do_layer_norm_before", c.do_layer_norm_before);
    c.remove_final_layer_norm = o.get("_remove_final_layer_norm", c.remove_final_layer_norm);
    c.word_embed_proj_dim = o.size("word_embed_proj_dim", c.hidden_size);
    c.dropout = o.probability("dropout", c.dropout);
    c.attention_dropout = o.probability("attention_dropout", c.attention_dropout);
    c.num_attention_heads = o.size("num_attention_heads", c.num_attention_heads);
    c.activation_function = o.get("activation_function", c.activation_function);
    c.init_std = o.get("init_std", c.init_std);
    c.enable_bias = o.get("enable_bias", c.enable_bias);
    c.layer_norm_elementwise_affine = o.get("layer_norm_elementwise_affine", c.layer_norm_elementwise_affine);
    c.tie_word_embeddings = o.get("tie_word_embeddings", c.tie_word_embeddings);
    c.pad_token_id = o.get("pad_token_id", c.pad_token_id);
    c.bos_token_id = o.get("bos_token_id", c.bos_token_id);
    c.eos_token_id = sdk::eos_token_ids(o, c.eos_token_id.front());
    if (c.hidden_size % c.num_attention_heads != 0) o.fail("num_attention_heads", "must divide hidden_size");
    if (c.activation_function != "relu" && c.activation_function != "gelu") {
      o.fail("activation_function", "unsupported activation '" + c.activation_function + "' (relu, gelu)");
    }
    if (!c.layer_norm_elementwise_affine) o.fail("layer_norm_elementwise_affine", "false is not supported");
    return c;
  }

  sdk::Json to_json() const {
    return {{"architectures", {"OPTForCausalLM"}},
            {"model_type", "opt"},
            {"vocab_size", vocab_size},
            {"hidden_size", hidden_size},
            {"num_hidden_layers", num_hidden_layers},
            {"ffn_dim", ffn_dim},
            {"max_position_embeddings", max_position_embeddings},
            {"do_layer_norm_before", do_layer_norm_before},
            {"_remove_final_layer_norm", remove_final_layer_norm},
            {"word_embed_proj_dim", word_embed_proj_dim},
            {"dropout", dropout},
            {"attention_dropout", attention_dropout},
            {"num_attention_heads", num_attention_heads},
            {"activation_function", activation_function},
            {"init_std", init_std},
            {"enable_bias", enable_bias},
            {"layer_norm_elementwise_affine", layer_norm_elementwise_affine},
            {"tie_word_embeddings", tie_word_embeddings},
            {"pad_token_id", pad_token_id},
            {"bos_token_id", bos_token_id},
            {"eos_token_id", sdk::eos_token_json(eos_token_id)},
            {"layerdrop", 0.0},
            {"use_cache", true},
            {"dtype", "float32"}};
  }
};

class OptAttentionImpl : public torch::nn::Module {
 public:
  OptAttentionImpl(const OptConfig& c, std::size_t index)
      : index_(index), heads_(c.num_attention_heads), head_dim_(c.hidden_size / c.num_attention_heads),
        dropout_(c.attention_dropout) {
    k_proj = register_module("k_proj", sdk::Linear(c.hidden_size, c.hidden_size, c.enable_bias));
    v_proj = register_module("v_proj", sdk::Linear(c.hidden_size, c.hidden_size, c.enable_bias));
    q_proj = register_module("q_proj", sdk::Linear(c.hidden_size, c.hidden_size, c.enable_bias));
    out_proj = register_module("out_proj", sdk::Linear(c.hidden_size, c.hidden_size, c.enable_bias));
  }
  /// `h` may already be in the products' type (the block's norm hands it so; see OptStream).
  torch::Tensor forward(const torch::Tensor& h, const sdk::AttentionMask& mask, sdk::KvCache* cache) {
    const auto b = h.size(0), t = h.size(1);
    auto split = [&](const torch::Tensor& x) { return x.view({b, t, heads_, head_dim_}).transpose(1, 2); };
    // One read of h for the three projections (and their adapters): one cast, one input gradient.
    auto qkv = sdk::forward_shared({q_proj.get(), k_proj.get(), v_proj.get()}, h);
    auto q = split(qkv[0]), k = split(qkv[1]), v = split(qkv[2]);
    std::int64_t past = 0;
    if (cache) {
      past = cache->past_length(index_);
      std::tie(k, v) = cache->append(index_, k, v);
    }
    auto out = sdk::attend(q, k, v, mask, past, 1.0 / std::sqrt(static_cast<double>(head_dim_)),
                           is_training() ? dropout_ : 0.0);
    return out_proj(out.transpose(1, 2).reshape({b, t, heads_ * head_dim_}));
  }
  sdk::Linear k_proj{nullptr}, v_proj{nullptr}, q_proj{nullptr}, out_proj{nullptr};

 private:
  std::size_t index_;
  std::int64_t heads_, head_dim_;
  double dropout_;
};
TORCH_MODULE(OptAttention);

/// What passes from one decoder layer to the next. `h` is the residual stream (float32 under autocast, as in
/// transformers). `side` spares a pass over it at the next layer's start:
///  - post-LN (OPT-350m): h in the products' type, as the layer's last norm wrote it (the next layer's q/k/v
///    read that rather than casting h again);
///  - pre-LN: the layer's last branch (fc2's output), not yet added to h: the next layer adds it inside its
///    first norm.
/// Undefined: nothing to spare (the first layer's input).
struct OptStream {
  torch::Tensor h, side;
  /// The hidden states it stands for: pre-LN adds the pending branch.
  torch::Tensor hidden(bool pre_ln) const { return pre_ln && side.defined() ? h + side : h; }
};

class OptDecoderLayerImpl : public torch::nn::Module {
 public:
  OptDecoderLayerImpl(const OptConfig& c, std::size_t index)
      : before_(c.do_layer_norm_before), dropout_(c.dropout), act_(c.activation_function) {
    auto ln = [&] { return torch::nn::LayerNorm(torch::nn::LayerNormOptions({c.hidden_size})); };
    self_attn = register_module("self_attn", OptAttention(c, index));
    self_attn_layer_norm = register_module("self_attn_layer_norm", ln());
    fc1 = register_module("fc1", sdk::Linear(c.hidden_size, c.ffn_dim, c.enable_bias));
    fc2 = register_module("fc2", sdk::Linear(c.ffn_dim, c.hidden_size, c.enable_bias));
    final_layer_norm = register_module("final_layer_norm", ln());
  }
  /// transformers' OPTDecoderLayer.forward: the hidden states after this layer.
  torch::Tensor forward(torch::Tensor h, const sdk::AttentionMask& mask, sdk::KvCache* cache) {
    return step({std::move(h), {}}, mask, cache).hidden(before_);
  }
  /// The same layer as a link of the decoder's chain: each residual add runs inside the norm after it
  /// (sdk::add_layer_norm), across layers for pre-LN, where a layer ends with an add and the next starts
  /// with its norm.
  OptStream step(const OptStream& in, const sdk::AttentionMask& mask, sdk::KvCache* cache) {
    const double p = is_training() ? dropout_ : 0.0;
    const auto attn = [&](const torch::Tensor& x) { return torch::dropout(self_attn(x, mask, cache), p, is_training()); };
    const auto mlp = [&](const torch::Tensor& x) {
      // ReLU inside the products (sdk::relu_mlp): on CUDA fc1's epilogue applies it, and with --fused-relu
      // fc2's backward product applies its mask.
      auto y = act_ == "relu" ? sdk::relu_mlp(*fc1, *fc2, x) : fc2(torch::gelu(fc1(x)));
      return torch::dropout(y, p, is_training());
    };
    if (before_) {
      auto s = sdk::pre_ln_block({in.h, in.side}, *self_attn_layer_norm, attn, *final_layer_norm, mlp);
      return {s.h, s.pending};
    }
    // Post-LN: the stream is the norm's output, and the products read it in their type (in.side, if handed on).
    sdk::NormStep n{in.h, in.side.defined() ? in.side : in.h};
    n = sdk::add_layer_norm(n.stream, attn(n.normed), *self_attn_layer_norm, /*post=*/true);
    n = sdk::add_layer_norm(n.stream, mlp(n.normed), *final_layer_norm, /*post=*/true);
    return {n.stream, n.normed};
  }
  OptAttention self_attn{nullptr};
  torch::nn::LayerNorm self_attn_layer_norm{nullptr}, final_layer_norm{nullptr};
  sdk::Linear fc1{nullptr}, fc2{nullptr};

 private:
  bool before_;
  double dropout_;
  std::string act_;
};
TORCH_MODULE(OptDecoderLayer);

class OptDecoderImpl : public torch::nn::Module {
 public:
  explicit OptDecoderImpl(const OptConfig& c) {
    embed_tokens = register_module("embed_tokens", torch::nn::Embedding(c.vocab_size, c.word_embed_proj_dim));
    // OPTLearnedPositionalEmbedding: two extra rows, positions are looked up at +2.
    embed_positions = register_module("embed_positions", torch::nn::Embedding(c.max_position_embeddings + 2, c.hidden_size));
    if (c.word_embed_proj_dim != c.hidden_size) {
      project_out = register_module("project_out", sdk::Linear(c.hidden_size, c.word_embed_proj_dim, false));
      project_in = register_module("project_in", sdk::Linear(c.word_embed_proj_dim, c.hidden_size, false));
    }
    if (c.do_layer_norm_before && !c.remove_final_layer_norm) {
      final_layer_norm = register_module("final_layer_norm", torch::nn::LayerNorm(torch::nn::LayerNormOptions({c.hidden_size})));
    }
    const double h = static_cast<double>(c.hidden_size);
    sdk::check_layers_fit("num_hidden_layers", c.num_hidden_layers, 4 * h * h + 2 * h * static_cast<double>(c.ffn_dim));
    layers = register_module("layers", torch::nn::ModuleList());
    for (std::int64_t i = 0; i < c.num_hidden_layers; ++i) layers->push_back(OptDecoderLayer(c, static_cast<std::size_t>(i)));
  }
  torch::nn::Embedding embed_tokens{nullptr}, embed_positions{nullptr};
  sdk::Linear project_in{nullptr}, project_out{nullptr};
  torch::nn::LayerNorm final_layer_norm{nullptr};
  torch::nn::ModuleList layers{nullptr};
};
TORCH_MODULE(OptDecoder);

class OptModelImpl : public torch::nn::Module {
 public:
  explicit OptModelImpl(const OptConfig& c) { decoder = register_module("decoder", OptDecoder(c)); }
  OptDecoder decoder{nullptr};
};
TORCH_MODULE(OptModel);

class OptForCausalLMImpl : public torch::nn::Module {
 public:
  explicit OptForCausalLMImpl(const OptConfig& c) {
    model = register_module("model", OptModel(c));
    // Tied: the head is the embedding matrix itself, so no second parameter is registered.
    if (!c.tie_word_embeddings) lm_head = register_module("lm_head", sdk::Linear(c.word_embed_proj_dim, c.vocab_size, false));
  }
  OptModel model{nullptr};
  sdk::Linear lm_head{nullptr};
};
TORCH_MODULE(OptForCausalLM);

struct OptOptions {
  std::string weights;     ///< Hugging Face folder; empty: build from `config`
  sdk::Json config;        ///< OPTConfig keys for a model built from scratch
  std::string tokenizer;   ///< from scratch: "word_level" (from the training data's vocabulary)

  static OptOptions parse(sdk::Options& o) {
    OptOptions x;
    x.weights = o.get("weights", x.weights);
    if (x.weights.empty()) {
      auto cfg = o.table("config");
      (void)OptConfig::from(cfg);
      x.config = cfg.resolved();
      x.tokenizer = o.get("tokenizer", "word_level");
      if (x.tokenizer != "word_level") o.fail("tokenizer", "a model built from scratch supports \"word_level\" only");
    } else {
      if (o.has("config")) o.fail("config", "give either weights or config, not both");
      if (o.has("tokenizer")) o.fail("tokenizer", "the tokenizer comes from the weights folder's tokenizer.json");
    }
    return x;
  }
};

class Opt : public sdk::Backbone {
 public:
  using options_type = OptOptions;

  Opt(const OptOptions& o, const sdk::BuildContext& ctx) {
    if (o.weights.empty()) {
      if (ctx.vocabulary.empty()) {
        throw sdk::InputError("backbone opt: tokenizer = \"word_level\" needs a training dataset with a closed vocabulary");
      }
      tokenizer_ = sdk::Tokenizer::word_level(ctx.vocabulary);
      sdk::Json cfg = o.config;
      cfg["vocab_size"] = tokenizer_.vocab_size();
      cfg["pad_token_id"] = tokenizer_.pad_id();
      cfg["bos_token_id"] = tokenizer_.bos_id();
      cfg["eos_token_id"] = tokenizer_.eos_id();
      auto view = sdk::Options::of_file(cfg, "opt config");
      config_ = OptConfig::from(view);
      model_ = OptForCausalLM(config_);
      init_weights();
    } else {
      const auto dir = sdk::resolve_path(ctx.base_dir, o.weights);
      auto cfg = sdk::read_json(dir / "config.json");
      auto view = sdk::Options::of_file(cfg, (dir / "config.json").string());
      config_ = OptConfig::from(view);
      stop_ = sdk::GenerationStop::read(dir, config_.eos_token_id);
      tokenizer_ = sdk::Tokenizer::from_folder(dir);
      model_ = OptForCausalLM(config_);
      auto tensors = sdk::read_weights(dir);
      // Older OPT checkpoints name the decoder without the "model." prefix.
      if (!tensors.count("model.decoder.embed_tokens.weight") && tensors.count("decoder.embed_tokens.weight")) {
        sdk::TensorMap renamed;
        for (auto& [k, v] : tensors) renamed.emplace(k.rfind("decoder.", 0) == 0 ? "model." + k : k, v);
        tensors = std::move(renamed);
      }
      std::vector<std::string> ignore;
      if (config_.tie_word_embeddings) ignore.push_back("lm_head.weight");  // a tied copy some files carry
      sdk::load_state(*model_, tensors, dir.string(), true, ignore);
    }
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

  torch::Tensor embed(const torch::Tensor& ids) override {
    auto& d = *model_->model->decoder;
    auto x = d.embed_tokens(ids);
    return d.project_in ? d.project_in(x) : x;
  }

  torch::Tensor forward(const torch::Tensor& embeds, const torch::Tensor& positions, const sdk::AttentionMask& mask,
                        sdk::KvCache* cache) override {
    auto& d = *model_->model->decoder;
    // Tokens without a position (image tokens, padding) get no position embedding.
    auto has_pos = (positions >= 0).unsqueeze(-1).to(embeds.dtype());
    auto pos = d.embed_positions(positions.clamp_min(0) + 2) * has_pos;
    auto h = embeds + pos;
    if (checkpointing_ && !cache) {
      // Each layer recomputed in backward from its input alone: layers as transformers' modules, h to h.
      for (const auto& layer : *d.layers) {
        auto* l = layer->as<OptDecoderLayerImpl>();
        h = sdk::maybe_checkpoint(true, *l, [l, mask](const torch::Tensor& x) { return l->forward(x, mask, nullptr); }, h);
      }
    } else {
      OptStream s{h, {}};
      for (const auto& layer : *d.layers) s = layer->as<OptDecoderLayerImpl>()->step(s, mask, cache);
      h = s.hidden(config_.do_layer_norm_before);
    }
    if (d.final_layer_norm) h = d.final_layer_norm(h);
    if (d.project_out) h = d.project_out(h);
    return h;
  }

  torch::Tensor logits(const torch::Tensor& hidden) override {
    if (model_->lm_head) return model_->lm_head(hidden);
    return torch::nn::functional::linear(hidden, model_->model->decoder->embed_tokens->weight);
  }

  const sdk::Tokenizer& tokenizer() const override { return tokenizer_; }
  std::int64_t hidden_size() const override { return config_.hidden_size; }
  std::int64_t output_size() const override { return config_.word_embed_proj_dim; }
  std::int64_t vocab_size() const override { return config_.vocab_size; }
  std::int64_t max_positions() const override { return config_.max_position_embeddings; }
  std::string head_module() const override {
    return config_.tie_word_embeddings ? "model.decoder.embed_tokens" : "lm_head";
  }

 private:
  // transformers' OPTPreTrainedModel._init_weights: normal(0, init_std), zero biases, zero padding row.
  void init_weights() {
    torch::NoGradGuard no_grad;
    for (auto& p : model_->named_parameters()) {
      const auto& name = p.key();
      const bool is_norm = name.find("layer_norm") != std::string::npos;
      const bool is_bias = name.size() > 5 && name.compare(name.size() - 5, 5, ".bias") == 0;
      if (is_norm) {
        if (is_bias) p.value().zero_();
        else p.value().fill_(1.0);
      } else if (is_bias) {
        p.value().zero_();
      } else {
        p.value().normal_(0.0, config_.init_std);
      }
    }
    if (config_.pad_token_id >= 0 && config_.pad_token_id < config_.vocab_size) {
      model_->model->decoder->embed_tokens->weight[config_.pad_token_id].zero_();
    }
  }

  OptConfig config_;
  bool checkpointing_ = false;
  sdk::Tokenizer tokenizer_;
  sdk::GenerationStop stop_;  ///< where generate() would stop (empty: built from scratch, the tokenizer's EOS)
  OptForCausalLM model_{nullptr};
};

}  // namespace ablate::plugins

namespace {
void register_plugin(ablate::sdk::Registry& registry) {
  registry.add<ablate::plugins::Opt>("opt", 1, "OPT decoder (transformers' OPTForCausalLM)");
}
}  // namespace

ABLATE_PLUGIN(register_plugin)
