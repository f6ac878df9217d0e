// encoder/clip_vit: the CLIP vision transformer, as transformers' CLIPVisionModel computes it (pre-layernorm,
// quick_gelu, class embedding), with its parameter names. Features come from a selectable layer of
// hidden_states, with the CLS token kept (GIT) or dropped (LLaVA's "patch" features).

#include <cmath>

#include <torch/torch.h>

#include "ablate/sdk/linear.hpp"
#include "ablate/sdk/plugin.hpp"
#include "ablate/sdk/weights.hpp"

namespace ablate::plugins {

namespace sdk = ablate::sdk;

/// CLIPVisionConfig's keys and defaults (those of openai/clip-vit-base-patch32).
struct ClipVisionConfig {
  std::int64_t hidden_size = 768;
  std::int64_t intermediate_size = 3072;
  std::int64_t projection_dim = 512;
  std::int64_t num_hidden_layers = 12;
  std::int64_t num_attention_heads = 12;
  std::int64_t num_channels = 3;
  std::int64_t image_size = 224;
  std::int64_t patch_size = 32;
  std::string hidden_act = "quick_gelu";
  double layer_norm_eps = 1e-5;
  double attention_dropout = 0.0;
  double initializer_range = 0.02;
  double initializer_factor = 1.0;

  static ClipVisionConfig from(sdk::Options& o) {
    ClipVisionConfig c;
    c.hidden_size = o.get("hidden_size", c.hidden_size);
    c.intermediate_size = o.get("intermediate_size", c.intermediate_size);
    c.projection_dim = o.get("projection_dim", c.projection_dim);
    c.num_hidden_layers = o.get("num_hidden_layers", c.num_hidden_layers);
    c.num_attention_heads = o.get("num_attention_heads", c.num_attention_heads);
    c.num_channels = o.get("num_channels", c.num_channels);
    c.image_size = o.get("image_size", c.image_size);
    c.patch_size = o.get("patch_size", c.patch_size);
    c.hidden_act = o.get("hidden_act", c.hidden_act);
    c.layer_norm_eps = o.get("layer_norm_eps", c.layer_norm_eps);
    c.attention_dropout = o.get("attention_dropout", c.attention_dropout);
    c.initializer_range = o.get("initializer_range", c.initializer_range);
    c.initializer_factor = o.get("initializer_factor", c.initializer_factor);
    if (c.hidden_size % c.num_attention_heads != 0) o.fail("num_attention_heads", "must divide hidden_size");
    if (c.image_size % c.patch_size != 0) o.fail("patch_size", "must divide image_size");
    if (c.hidden_act != "quick_gelu" && c.hidden_act != "gelu" && c.hidden_act != "gelu_pytorch_tanh") {
      o.fail("hidden_act", "unsupported activation '" + c.hidden_act + "' (quick_gelu, gelu, gelu_pytorch_tanh)");
    }
    return c;
  }

  sdk::Json to_json() const {
    return {{"architectures", {"CLIPVisionModel"}},
            {"model_type", "clip_vision_model"},
            {"hidden_size", hidden_size},
            {"intermediate_size", intermediate_size},
            {"projection_dim", projection_dim},
            {"num_hidden_layers", num_hidden_layers},
            {"num_attention_heads", num_attention_heads},
            {"num_channels", num_channels},
            {"image_size", image_size},
            {"patch_size", patch_size},
            {"hidden_act", hidden_act},
            {"layer_norm_eps", layer_norm_eps},
            {"attention_dropout", attention_dropout},
            {"initializer_range", initializer_range},
            {"initializer_factor", initializer_factor},
            {"dtype", "float32"}};
  }
};

torch::Tensor activation(const std::string& name, const torch::Tensor& x) {
  if (name == "quick_gelu") return x * torch::sigmoid(1.702 * x);
  if (name == "gelu_pytorch_tanh") return torch::gelu(x, "tanh");
  return torch::gelu(x);
}

class ClipAttentionImpl : public torch::nn::Module {
 public:
  explicit ClipAttentionImpl(const ClipVisionConfig& c)
      : heads_(c.num_attention_heads), head_dim_(c.hidden_size / c.num_attention_heads), dropout_(c.attention_dropout) {
    k_proj = register_module("k_proj", sdk::Linear(c.hidden_size, c.hidden_size));
    v_proj = register_module("v_proj", sdk::Linear(c.hidden_size, c.hidden_size));
    q_proj = register_module("q_proj", sdk::Linear(c.hidden_size, c.hidden_size));
    out_proj = register_module("out_proj", sdk::Linear(c.hidden_size, c.hidden_size));
  }
  torch::Tensor forward(const torch::Tensor& h) {
    const auto b = h.size(0), t = h.size(1);
    auto split = [&](const torch::Tensor& x) { return x.view({b, t, heads_, head_dim_}).transpose(1, 2); };
    auto out = sdk::attend(split(q_proj(h)), split(k_proj(h)), split(v_proj(h)), sdk::AttentionMask::full(), 0,
                           1.0 / std::sqrt(static_cast<double>(head_dim_)), is_training() ? dropout_ : 0.0);
    return out_proj(out.transpose(1, 2).reshape({b, t, heads_ * head_dim_}));
  }
  sdk::Linear k_proj{nullptr}, v_proj{nullptr}, q_proj{nullptr}, out_proj{nullptr};

 private:
  std::int64_t heads_, head_dim_;
  double dropout_;
};
TORCH_MODULE(ClipAttention);

class ClipMlpImpl : public torch::nn::Module {
 public:
  explicit ClipMlpImpl(const ClipVisionConfig& c) : act_(c.hidden_act) {
    fc1 = register_module("fc1", sdk::Linear(c.hidden_size, c.intermediate_size));
    fc2 = register_module("fc2", sdk::Linear(c.intermediate_size, c.hidden_size));
  }
  torch::Tensor forward(const torch::Tensor& x) { return fc2(activation(act_, fc1(x))); }
  sdk::Linear fc1{nullptr}, fc2{nullptr};

 private:
  std::string act_;
};
TORCH_MODULE(ClipMlp);

class ClipEncoderLayerImpl : public torch::nn::Module {
 public:
  explicit ClipEncoderLayerImpl(const ClipVisionConfig& c) {
    auto ln = [&] { return torch::nn::LayerNorm(torch::nn::LayerNormOptions({c.hidden_size}).eps(c.layer_norm_eps)); };
    self_attn = register_module("self_attn", ClipAttention(c));
    layer_norm1 = register_module("layer_norm1", ln());
    mlp = register_module("mlp", ClipMlp(c));
    layer_norm2 = register_module("layer_norm2", ln());
  }
  torch::Tensor forward(torch::Tensor h) {
    h = h + self_attn(layer_norm1(h));
    return h + mlp(layer_norm2(h));
  }
  ClipAttention self_attn{nullptr};
  torch::nn::LayerNorm layer_norm1{nullptr}, layer_norm2{nullptr};
  ClipMlp mlp{nullptr};
};
TORCH_MODULE(ClipEncoderLayer);

class ClipEmbeddingsImpl : public torch::nn::Module {
 public:
  explicit ClipEmbeddingsImpl(const ClipVisionConfig& c) : patch_(c.patch_size) {
    num_positions_ = (c.image_size / c.patch_size) * (c.image_size / c.patch_size) + 1;
    class_embedding = register_parameter("class_embedding", torch::randn({c.hidden_size}));
    patch_embedding = register_module(
        "patch_embedding",
        torch::nn::Conv2d(torch::nn::Conv2dOptions(c.num_channels, c.hidden_size, c.patch_size).stride(c.patch_size).bias(false)));
    position_embedding = register_module("position_embedding", torch::nn::Embedding(num_positions_, c.hidden_size));
  }
  torch::Tensor forward(const torch::Tensor& pixels) {
    const auto b = pixels.size(0);
    auto patches = patch_embedding(pixels.to(patch_embedding->weight.dtype())).flatten(2).transpose(1, 2);
    auto cls = class_embedding.view({1, 1, -1}).expand({b, 1, class_embedding.size(0)});
    return torch::cat({cls, patches}, 1) + position_embedding->weight.unsqueeze(0);
  }
  std::int64_t num_positions() const { return num_positions_; }
  torch::Tensor class_embedding;
  torch::nn::Conv2d patch_embedding{nullptr};
  torch::nn::Embedding position_embedding{nullptr};

 private:
  std::int64_t patch_, num_positions_;
};
TORCH_MODULE(ClipEmbeddings);

class ClipEncoderImpl : public torch::nn::Module {
 public:
  explicit ClipEncoderImpl(const ClipVisionConfig& c) {
    layers = register_module("layers", torch::nn::ModuleList());
    for (std::int64_t i = 0; i < c.num_hidden_layers; ++i) layers->push_back(ClipEncoderLayer(c));
  }
  torch::nn::ModuleList layers{nullptr};
};
TORCH_MODULE(ClipEncoder);

class ClipVisionTransformerImpl : public torch::nn::Module {
 public:
  explicit ClipVisionTransformerImpl(const ClipVisionConfig& c) {
    auto ln = [&] { return torch::nn::LayerNorm(torch::nn::LayerNormOptions({c.hidden_size}).eps(c.layer_norm_eps)); };
    embeddings = register_module("embeddings", ClipEmbeddings(c));
    pre_layrnorm = register_module("pre_layrnorm", ln());  // sic: Hugging Face's name
    encoder = register_module("encoder", ClipEncoder(c));
    post_layernorm = register_module("post_layernorm", ln());
  }
  /// hidden_states[index] in transformers' numbering: 0 is the embeddings (after pre_layrnorm), i the output
  /// of layer i. Layers past the one asked for are not run.
  torch::Tensor hidden_state(const torch::Tensor& pixels, std::int64_t index) {
    auto h = pre_layrnorm(embeddings(pixels));
    for (std::int64_t i = 0; i < index; ++i) h = encoder->layers->ptr<ClipEncoderLayerImpl>(i)->forward(h);
    return h;
  }
  ClipEmbeddings embeddings{nullptr};
  torch::nn::LayerNorm pre_layrnorm{nullptr}, post_layernorm{nullptr};
  ClipEncoder encoder{nullptr};
};
TORCH_MODULE(ClipVisionTransformer);

class ClipVisionModelImpl : public torch::nn::Module {
 public:
  explicit ClipVisionModelImpl(const ClipVisionConfig& c) {
    vision_model = register_module("vision_model", ClipVisionTransformer(c));
  }
  ClipVisionTransformer vision_model{nullptr};
};
TORCH_MODULE(ClipVisionModel);

struct ClipVitOptions {
  std::string weights;            ///< Hugging Face folder (config.json, model.safetensors); empty: from `config`
  sdk::Json config;               ///< CLIPVisionConfig keys, for a model built from scratch
  std::int64_t feature_layer = -1;  ///< index into hidden_states; negative counts from the end (LLaVA: -2)
  std::string tokens = "all";     ///< "all": CLS + patches (GIT); "patches": drop CLS (LLaVA)
  /// From scratch only: standard deviation of the initial position embeddings (default: transformers'
  /// initializer_range * initializer_factor). Tiny encoders trained briefly never learn where things are
  /// when positions start 20x weaker than patch contents; a larger value avoids that plateau.
  double position_init_std = -1;

  static ClipVitOptions parse(sdk::Options& o) {
    ClipVitOptions x;
    x.weights = o.get("weights", x.weights);
    if (x.weights.empty()) {
      auto cfg = o.table("config");
      (void)ClipVisionConfig::from(cfg);  // checks the keys now, before anything runs
      x.config = cfg.resolved();
    } else if (o.has("config")) {
      o.fail("config", "give either weights or config, not both");
    }
    if (x.weights.empty()) x.position_init_std = o.get("position_init_std", x.position_init_std);
    x.feature_layer = o.get("feature_layer", x.feature_layer);
    x.tokens = o.get("tokens", x.tokens);
    if (x.tokens != "all" && x.tokens != "patches") o.fail("tokens", "must be \"all\" or \"patches\"");
    return x;
  }
};

class ClipVit : public sdk::Encoder {
 public:
  using options_type = ClipVitOptions;

  ClipVit(const ClipVitOptions& o, const sdk::BuildContext& ctx) : options_(o) {
    std::filesystem::path dir;
    sdk::Json cfg_json = o.config.is_null() ? sdk::Json::object() : o.config;
    std::string origin = "clip_vit config";
    if (!o.weights.empty()) {
      dir = sdk::resolve_path(ctx.base_dir, o.weights);
      origin = (dir / "config.json").string();
      cfg_json = sdk::read_json(dir / "config.json");
      // A full CLIPModel checkpoint keeps the vision tower's settings under vision_config.
      if (cfg_json.contains("vision_config")) cfg_json = cfg_json["vision_config"];
    }
    auto view = sdk::Options::of_file(cfg_json, origin);
    config_ = ClipVisionConfig::from(view);
    model_ = ClipVisionModel(config_);
    if (dir.empty()) {
      init_weights();
    } else {
      auto tensors = sdk::read_weights(dir);
      // transformers 5 saves CLIPVisionModel without the "vision_model." prefix that CLIPModel checkpoints
      // (and earlier versions) use; both load.
      if (!tensors.count("vision_model.embeddings.class_embedding") && tensors.count("embeddings.class_embedding")) {
        sdk::TensorMap renamed;
        for (auto& [k, v] : tensors) renamed.emplace("vision_model." + k, v);
        tensors = std::move(renamed);
      }
      sdk::load_state(*model_, tensors, dir.string(), true,
                      {"text_model.", "visual_projection.", "text_projection.", "logit_scale"});
    }
    spec_ = default_spec();
    if (!dir.empty() && std::filesystem::exists(dir / "preprocessor_config.json")) read_preprocessor(dir / "preprocessor_config.json");
    const std::int64_t n = config_.num_hidden_layers;
    layer_ = o.feature_layer < 0 ? n + 1 + o.feature_layer : o.feature_layer;
    if (layer_ < 0 || layer_ > n) {
      throw sdk::InputError("clip_vit: feature_layer " + std::to_string(o.feature_layer) + " is outside hidden_states (0.." +
                            std::to_string(n) + ")");
    }
  }

  torch::nn::Module& module() override { return *model_; }
  sdk::Json hf_config() const override { return config_.to_json(); }
  void save_extras(const std::filesystem::path& dir) const override {
    sdk::write_json(dir / "preprocessor_config.json",
                    {{"image_processor_type", "CLIPImageProcessor"},
                     {"do_resize", true},
                     {"size", {{"shortest_edge", spec_.shortest_edge}}},
                     {"resample", spec_.resample},
                     {"do_center_crop", spec_.center_crop},
                     {"crop_size", {{"height", spec_.height}, {"width", spec_.width}}},
                     {"do_rescale", true},
                     {"rescale_factor", spec_.rescale_factor},
                     {"do_normalize", true},
                     {"image_mean", spec_.mean},
                     {"image_std", spec_.std},
                     {"do_convert_rgb", true}});
  }

  torch::Tensor encode(const torch::Tensor& pixels) override {
    auto h = model_->vision_model->hidden_state(pixels, layer_);
    return options_.tokens == "patches" ? h.slice(1, 1) : h;
  }
  sdk::ImageSpec image_spec() const override { return spec_; }
  std::int64_t hidden_size() const override { return config_.hidden_size; }
  std::int64_t num_tokens() const override {
    const auto g = config_.image_size / config_.patch_size;
    return g * g + (options_.tokens == "patches" ? 0 : 1);
  }

 private:
  sdk::ImageSpec default_spec() const {
    sdk::ImageSpec s;
    s.height = s.width = s.shortest_edge = config_.image_size;
    return s;
  }

  void read_preprocessor(const std::filesystem::path& file) {
    auto j = sdk::read_json(file);
    auto size_of = [&](const sdk::Json& v, const char* key) -> std::int64_t {
      if (v.is_number_integer()) return v.get<std::int64_t>();
      if (v.is_object() && v.contains(key)) return v[key].get<std::int64_t>();
      throw sdk::InputError(file.string() + ": cannot read '" + key + "' from " + v.dump());
    };
    if (j.contains("size")) {
      const auto& size = j["size"];
      if (size.is_object() && size.contains("height")) {
        spec_.shortest_edge = 0;  // resize straight to height x width
      } else {
        spec_.shortest_edge = size_of(size, "shortest_edge");
      }
    }
    spec_.center_crop = j.value("do_center_crop", spec_.center_crop);
    if (j.contains("crop_size")) {
      spec_.height = size_of(j["crop_size"], "height");
      spec_.width = j["crop_size"].is_object() ? size_of(j["crop_size"], "width") : spec_.height;
    }
    spec_.resample = j.value("resample", spec_.resample);
    spec_.rescale_factor = j.value("rescale_factor", spec_.rescale_factor);
    if (j.contains("image_mean")) spec_.mean = j["image_mean"].get<std::array<double, 3>>();
    if (j.contains("image_std")) spec_.std = j["image_std"].get<std::array<double, 3>>();
  }

  // transformers' CLIPPreTrainedModel._init_weights, for models trained from scratch.
  void init_weights() {
    torch::NoGradGuard no_grad;
    const double f = config_.initializer_factor, d = static_cast<double>(config_.hidden_size);
    auto& vm = *model_->vision_model;
    vm.embeddings->class_embedding.normal_(0.0, std::pow(d, -0.5) * f);
    vm.embeddings->patch_embedding->weight.normal_(0.0, config_.initializer_range * f);
    const double pos_std = options_.position_init_std > 0 ? options_.position_init_std : config_.initializer_range * f;
    vm.embeddings->position_embedding->weight.normal_(0.0, pos_std);
    const double in_std = std::pow(d, -0.5) * std::pow(2.0 * config_.num_hidden_layers, -0.5) * f;
    const double out_std = std::pow(d, -0.5) * f;
    const double fc_std = std::pow(2.0 * d, -0.5) * f;
    for (const auto& layer : *vm.encoder->layers) {
      auto* l = layer->as<ClipEncoderLayerImpl>();
      for (auto* lin : {l->self_attn->q_proj.get(), l->self_attn->k_proj.get(), l->self_attn->v_proj.get()}) lin->weight.normal_(0.0, in_std);
      l->self_attn->out_proj->weight.normal_(0.0, out_std);
      l->mlp->fc1->weight.normal_(0.0, fc_std);
      l->mlp->fc2->weight.normal_(0.0, in_std);
    }
    for (auto& p : model_->named_parameters()) {
      const auto& name = p.key();
      if (name.size() > 5 && name.compare(name.size() - 5, 5, ".bias") == 0) p.value().zero_();
    }
  }

  ClipVitOptions options_;
  ClipVisionConfig config_;
  ClipVisionModel model_{nullptr};
  sdk::ImageSpec spec_;
  std::int64_t layer_ = 0;
};

}  // namespace ablate::plugins

namespace {
void register_plugin(ablate::sdk::Registry& registry) {
  registry.add<ablate::plugins::ClipVit>("clip_vit", 1, "CLIP vision transformer (transformers' CLIPVisionModel)");
}
}  // namespace

ABLATE_PLUGIN(register_plugin)
