// backbone/gpt2: the GPT-2 decoder as transformers' GPT2LMHeadModel computes it (llm-jp and other GPT-2-style
// LLMs): learned positions, pre-layernorm blocks, Conv1D projections (weights stored [in, out]), gelu_new,
// LM head tied to the token embeddings unless the config unties it. Parameter names are GPT2LMHeadModel's.

#include <cmath>

#include <torch/torch.h>

#include "ablate/sdk/checkpoint.hpp"
#include "ablate/sdk/linear.hpp"
#include "ablate/sdk/norms.hpp"
#include "ablate/sdk/plugin.hpp"
#include "ablate/sdk/weights.hpp"

namespace ablate::plugins {

namespace sdk = ablate::sdk;

/// GPT2Config's keys and defaults (those of openai-community/gpt2).
struct Gpt2Config {
  std::int64_t vocab_size = 50257;
  std::int64_t n_positions = 1024;
  std::int64_t n_embd = 768;
  std::int64_t n_layer = 12;
  std::int64_t n_head = 12;
  std::int64_t n_inner = 0;  // 0: 4 * n_embd (config.json writes null)
  std::string activation_function = "gelu_new";
  double resid_pdrop = 0.1, embd_pdrop = 0.1, attn_pdrop = 0.1;
  double layer_norm_epsilon = 1e-5;
  double initializer_range = 0.02;
  bool scale_attn_weights = true;
  bool scale_attn_by_inverse_layer_idx = false;
  bool reorder_and_upcast_attn = false;
  bool tie_word_embeddings = true;
  std::int64_t bos_token_id = 50256;
  std::vector<std::int64_t> eos_token_id{50256};

  static Gpt2Config from(sdk::Options& o) {
    Gpt2Config c;
    c.vocab_size = o.size("vocab_size", c.vocab_size);
    c.n_positions = o.size("n_positions", c.n_positions);
    c.n_embd = o.size("n_embd", c.n_embd);
    c.n_layer = o.size("n_layer", c.n_layer, 0);
    c.n_head = o.size("n_head", c.n_head);
    c.n_inner = o.nullable_size("n_inner").value_or(0);
    c.activation_function = o.get("activation_function", c.activation_function);
    c.resid_pdrop = o.probability("resid_pdrop", c.resid_pdrop);
    c.embd_pdrop = o.probability("embd_pdrop", c.embd_pdrop);
    c.attn_pdrop = o.probability("attn_pdrop", c.attn_pdrop);
    c.layer_norm_epsilon = o.non_negative("layer_norm_epsilon", c.layer_norm_epsilon);
    c.initializer_range = o.get("initializer_range", c.initializer_range);
    c.scale_attn_weights = o.get("scale_attn_weights", c.scale_attn_weights);
    c.scale_attn_by_inverse_layer_idx = o.get("scale_attn_by_inverse_layer_idx", c.scale_attn_by_inverse_layer_idx);
    c.reorder_and_upcast_attn = o.get("reorder_and_upcast_attn", c.reorder_and_upcast_attn);
    c.tie_word_embeddings = o.get("tie_word_embeddings", c.tie_word_embeddings);
    if (auto v = o.maybe<std::int64_t>("bos_token_id")) c.bos_token_id = *v;
    c.eos_token_id = sdk::eos_token_ids(o, c.eos_token_id.front());
    if (c.n_embd % c.n_head != 0) o.fail("n_head", "must divide n_embd");
    if (c.activation_function != "gelu_new" && c.activation_function != "gelu" &&
        c.activation_function != "gelu_pytorch_tanh" && c.activation_function != "relu") {
      o.fail("activation_function", "unsupported activation '" + c.activation_function + "'");
    }
    return c;
  }
  std::int64_t inner() const { return n_inner > 0 ? n_inner : 4 * n_embd; }

  sdk::Json to_json() const {
    return {{"architectures", {"GPT2LMHeadModel"}},
            {"model_type", "gpt2"},
            {"vocab_size", vocab_size},
            {"n_positions", n_positions},
            {"n_embd", n_embd},
            {"n_layer", n_layer},
            {"n_head", n_head},
            {"n_inner", n_inner > 0 ? sdk::Json(n_inner) : sdk::Json()},
            {"activation_function", activation_function},
            {"resid_pdrop", resid_pdrop},
            {"embd_pdrop", embd_pdrop},
            {"attn_pdrop", attn_pdrop},
            {"layer_norm_epsilon", layer_norm_epsilon},
            {"initializer_range", initializer_range},
            {"scale_attn_weights", scale_attn_weights},
            {"scale_attn_by_inverse_layer_idx", scale_attn_by_inverse_layer_idx},
            {"reorder_and_upcast_attn", reorder_and_upcast_attn},
            {"tie_word_embeddings", tie_word_embeddings},
            {"bos_token_id", bos_token_id},
            {"eos_token_id", sdk::eos_token_json(eos_token_id)},
            {"dtype", "float32"}};
  }
};

torch::Tensor gpt2_activation(const std::string& name, const torch::Tensor& x) {
  if (name == "gelu_new") {
    // transformers' NewGELUActivation, written out: its rounding differs slightly from the fused kernel.
    return 0.5 * x * (1.0 + torch::tanh(std::sqrt(2.0 / M_PI) * (x + 0.044715 * torch::pow(x, 3.0))));
  }
  if (name == "gelu_pytorch_tanh") return torch::gelu(x, "tanh");
  if (name == "relu") return torch::relu(x);
  return torch::gelu(x);
}

class Gpt2AttentionImpl : public torch::nn::Module {
 public:
  Gpt2AttentionImpl(const Gpt2Config& c, std::size_t index)
      : index_(index), heads_(c.n_head), head_dim_(c.n_embd / c.n_head), dropout_(c.attn_pdrop) {
    c_attn = register_module("c_attn", sdk::Linear(c.n_embd, 3 * c.n_embd, true, /*fan_in_fan_out=*/true));
    c_proj = register_module("c_proj", sdk::Linear(c.n_embd, c.n_embd, true, true));
    scale_ = c.scale_attn_weights ? 1.0 / std::sqrt(static_cast<double>(head_dim_)) : 1.0;
    if (c.scale_attn_by_inverse_layer_idx) scale_ /= static_cast<double>(index + 1);
  }
  torch::Tensor forward(const torch::Tensor& h, const sdk::AttentionMask& mask, sdk::KvCache* cache) {
    const auto b = h.size(0), t = h.size(1);
    auto qkv = c_attn(h).split(heads_ * head_dim_, -1);
    auto split = [&](const torch::Tensor& x) { return x.reshape({b, t, heads_, head_dim_}).transpose(1, 2); };
    auto q = split(qkv[0]), k = split(qkv[1]), v = split(qkv[2]);
    std::int64_t past = 0;
    if (cache) {
      past = cache->past_length(index_);
      std::tie(k, v) = cache->append(index_, k, v);
    }
    auto out = sdk::attend(q, k, v, mask, past, scale_, is_training() ? dropout_ : 0.0);
    return c_proj(out.transpose(1, 2).reshape({b, t, heads_ * head_dim_}));
  }
  sdk::Linear c_attn{nullptr}, c_proj{nullptr};

 private:
  std::size_t index_;
  std::int64_t heads_, head_dim_;
  double dropout_, scale_ = 1.0;
};
TORCH_MODULE(Gpt2Attention);

class Gpt2MlpImpl : public torch::nn::Module {
 public:
  explicit Gpt2MlpImpl(const Gpt2Config& c) : act_(c.activation_function), dropout_(c.resid_pdrop) {
    c_fc = register_module("c_fc", sdk::Linear(c.n_embd, c.inner(), true, true));
    c_proj = register_module("c_proj", sdk::Linear(c.inner(), c.n_embd, true, true));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    return torch::dropout(c_proj(gpt2_activation(act_, c_fc(x))), dropout_, is_training());
  }
  sdk::Linear c_fc{nullptr}, c_proj{nullptr};

 private:
  std::string act_;
  double dropout_;
};
TORCH_MODULE(Gpt2Mlp);

class Gpt2BlockImpl : public torch::nn::Module {
 public:
  Gpt2BlockImpl(const Gpt2Config& c, std::size_t index) : dropout_(c.resid_pdrop) {
    auto ln = [&] { return torch::nn::LayerNorm(torch::nn::LayerNormOptions({c.n_embd}).eps(c.layer_norm_epsilon)); };
    ln_1 = register_module("ln_1", ln());
    attn = register_module("attn", Gpt2Attention(c, index));
    ln_2 = register_module("ln_2", ln());
    mlp = register_module("mlp", Gpt2Mlp(c));
  }
  /// transformers' GPT2Block.forward: the hidden states after this block.
  torch::Tensor forward(torch::Tensor h, const sdk::AttentionMask& mask, sdk::KvCache* cache) {
    return step({std::move(h), {}}, mask, cache).hidden();
  }
  /// The same block as a link of the model's chain: its last residual add is left to the next block's ln_1
  /// (sdk::add_layer_norm: with --fused-norm on, the add and the norm are one pass).
  sdk::PreLnStream step(const sdk::PreLnStream& in, const sdk::AttentionMask& mask, sdk::KvCache* cache) {
    return sdk::pre_ln_block(
        in, *ln_1, [&](const torch::Tensor& x) { return torch::dropout(attn(x, mask, cache), dropout_, is_training()); },
        *ln_2, [&](const torch::Tensor& x) { return mlp(x); });
  }
  torch::nn::LayerNorm ln_1{nullptr}, ln_2{nullptr};
  Gpt2Attention attn{nullptr};
  Gpt2Mlp mlp{nullptr};

 private:
  double dropout_;
};
TORCH_MODULE(Gpt2Block);

class Gpt2ModelImpl : public torch::nn::Module {
 public:
  explicit Gpt2ModelImpl(const Gpt2Config& c) {
    wte = register_module("wte", torch::nn::Embedding(c.vocab_size, c.n_embd));
    wpe = register_module("wpe", torch::nn::Embedding(c.n_positions, c.n_embd));
    const double width = static_cast<double>(c.n_embd);
    sdk::check_layers_fit("n_layer", c.n_layer, 4 * width * width + 2 * width * static_cast<double>(c.inner()));
    h = register_module("h", torch::nn::ModuleList());
    for (std::int64_t i = 0; i < c.n_layer; ++i) h->push_back(Gpt2Block(c, static_cast<std::size_t>(i)));
    ln_f = register_module("ln_f", torch::nn::LayerNorm(torch::nn::LayerNormOptions({c.n_embd}).eps(c.layer_norm_epsilon)));
  }
  torch::nn::Embedding wte{nullptr}, wpe{nullptr};
  torch::nn::ModuleList h{nullptr};
  torch::nn::LayerNorm ln_f{nullptr};
};
TORCH_MODULE(Gpt2Model);

class Gpt2LMHeadModelImpl : public torch::nn::Module {
 public:
  explicit Gpt2LMHeadModelImpl(const Gpt2Config& c) {
    transformer = register_module("transformer", Gpt2Model(c));
    if (!c.tie_word_embeddings) lm_head = register_module("lm_head", sdk::Linear(c.n_embd, c.vocab_size, false));
  }
  Gpt2Model transformer{nullptr};
  sdk::Linear lm_head{nullptr};
};
TORCH_MODULE(Gpt2LMHeadModel);

struct Gpt2Options {
  std::string weights;  ///< Hugging Face folder (config.json, model.safetensors, tokenizer.json)

  static Gpt2Options parse(sdk::Options& o) {
    Gpt2Options x;
    x.weights = o.require<std::string>("weights");
    return x;
  }
};

class Gpt2 : public sdk::Backbone {
 public:
  using options_type = Gpt2Options;

  Gpt2(const Gpt2Options& o, const sdk::BuildContext& ctx) : dropout_(0.0) {
    const auto dir = sdk::resolve_path(ctx.base_dir, o.weights);
    auto cfg = sdk::read_json(dir / "config.json");
    auto view = sdk::Options::of_file(cfg, (dir / "config.json").string());
    config_ = Gpt2Config::from(view);
    dropout_ = config_.embd_pdrop;
    stop_ = sdk::GenerationStop::read(dir, config_.eos_token_id);
    tokenizer_ = sdk::Tokenizer::from_folder(dir);
    model_ = Gpt2LMHeadModel(config_);
    auto tensors = sdk::read_weights(dir);
    // Checkpoints saved from GPT2Model (no head) name the stack without "transformer.".
    if (!tensors.count("transformer.wte.weight") && tensors.count("wte.weight")) {
      sdk::TensorMap renamed;
      for (auto& [k, v] : tensors) renamed.emplace("transformer." + k, v);
      tensors = std::move(renamed);
    }
    std::vector<std::string> ignore{"*.attn.bias", "*.attn.masked_bias"};  // causal-mask buffers of old files
    if (config_.tie_word_embeddings) ignore.push_back("lm_head.weight");
    sdk::load_state(*model_, tensors, dir.string(), true, ignore);
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

  torch::Tensor embed(const torch::Tensor& ids) override { return model_->transformer->wte(ids); }

  torch::Tensor forward(const torch::Tensor& embeds, const torch::Tensor& positions, const sdk::AttentionMask& mask,
                        sdk::KvCache* cache) override {
    auto& t = *model_->transformer;
    auto has_pos = (positions >= 0).unsqueeze(-1).to(embeds.dtype());
    auto h = torch::dropout(embeds + t.wpe(positions.clamp_min(0)) * has_pos, dropout_, is_training());
    if (checkpointing_ && !cache) {
      // Each block recomputed in backward from its input alone: blocks as transformers' modules, h to h.
      for (const auto& block : *t.h) {
        auto* b = block->as<Gpt2BlockImpl>();
        h = sdk::maybe_checkpoint(true, *b, [b, mask](const torch::Tensor& x) { return b->forward(x, mask, nullptr); }, h);
      }
      return t.ln_f(h);
    }
    sdk::PreLnStream s{h, {}};
    for (const auto& block : *t.h) s = block->as<Gpt2BlockImpl>()->step(s, mask, cache);
    return t.ln_f(s.hidden());
  }

  torch::Tensor logits(const torch::Tensor& hidden) override {
    if (model_->lm_head) return model_->lm_head(hidden);
    return torch::nn::functional::linear(hidden, model_->transformer->wte->weight);
  }

  const sdk::Tokenizer& tokenizer() const override { return tokenizer_; }
  std::int64_t hidden_size() const override { return config_.n_embd; }
  std::int64_t vocab_size() const override { return config_.vocab_size; }
  std::int64_t max_positions() const override { return config_.n_positions; }
  std::string head_module() const override { return config_.tie_word_embeddings ? "transformer.wte" : "lm_head"; }

 private:
  bool is_training() const { return model_->is_training(); }

  Gpt2Config config_;
  bool checkpointing_ = false;
  sdk::Tokenizer tokenizer_;
  sdk::GenerationStop stop_;  ///< where generate() would stop (empty: built from scratch, the tokenizer's EOS)
  Gpt2LMHeadModel model_{nullptr};
  double dropout_;
};

}  // namespace ablate::plugins

namespace {
void register_plugin(ablate::sdk::Registry& registry) {
  registry.add<ablate::plugins::Gpt2>("gpt2", 1, "GPT-2 decoder (transformers' GPT2LMHeadModel)");
}
}  // namespace

ABLATE_PLUGIN(register_plugin)
