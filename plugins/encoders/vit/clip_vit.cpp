// encoder/clip_vit: the CLIP vision transformer, as transformers' CLIPVisionModel computes it (pre-layernorm,
// quick_gelu, class embedding), with its parameter names. Features come from a selectable layer of
// hidden_states, with the CLS token kept (GIT) or dropped (LLaVA's "patch" features).

#include "vit.hpp"

namespace ablate::plugins::vit {

/// CLIPVisionConfig's keys and defaults (those of openai/clip-vit-base-patch32).
struct ClipVisionConfig : VitConfig {
  std::int64_t projection_dim = 512;
  double initializer_range = 0.02;
  double initializer_factor = 1.0;

  ClipVisionConfig() : VitConfig{768, 3072, 12, 12, 3, 224, 32, "quick_gelu", 1e-5, 0.0} {}

  static ClipVisionConfig from(sdk::Options& o) {
    ClipVisionConfig c;
    c.read(o);
    c.projection_dim = o.get("projection_dim", c.projection_dim);
    c.initializer_range = o.get("initializer_range", c.initializer_range);
    c.initializer_factor = o.get("initializer_factor", c.initializer_factor);
    return c;
  }

  sdk::Json to_json() const {
    auto j = VitConfig::to_json();
    j["architectures"] = {"CLIPVisionModel"};
    j["model_type"] = "clip_vision_model";
    j["projection_dim"] = projection_dim;
    j["initializer_range"] = initializer_range;
    j["initializer_factor"] = initializer_factor;
    return j;
  }
};

class ClipEmbeddingsImpl : public torch::nn::Module {
 public:
  explicit ClipEmbeddingsImpl(const ClipVisionConfig& c) {
    const auto positions = c.grid() * c.grid() + 1;
    class_embedding = register_parameter("class_embedding", torch::randn({c.hidden_size}));
    patch_embedding = register_module(
        "patch_embedding",
        torch::nn::Conv2d(torch::nn::Conv2dOptions(c.num_channels, c.hidden_size, c.patch_size).stride(c.patch_size).bias(false)));
    position_embedding = register_module("position_embedding", torch::nn::Embedding(positions, c.hidden_size));
  }
  torch::Tensor forward(const torch::Tensor& pixels) {
    const auto b = pixels.size(0);
    auto patches = patch_embedding(pixels.to(patch_embedding->weight.dtype())).flatten(2).transpose(1, 2);
    auto cls = class_embedding.view({1, 1, -1}).expand({b, 1, class_embedding.size(0)});
    return torch::cat({cls, patches}, 1) + position_embedding->weight.unsqueeze(0);
  }
  torch::Tensor class_embedding;
  torch::nn::Conv2d patch_embedding{nullptr};
  torch::nn::Embedding position_embedding{nullptr};
};
TORCH_MODULE(ClipEmbeddings);

class ClipVisionTransformerImpl : public torch::nn::Module {
 public:
  explicit ClipVisionTransformerImpl(const ClipVisionConfig& c) {
    auto ln = [&] { return torch::nn::LayerNorm(torch::nn::LayerNormOptions({c.hidden_size}).eps(c.layer_norm_eps)); };
    embeddings = register_module("embeddings", ClipEmbeddings(c));
    pre_layrnorm = register_module("pre_layrnorm", ln());  // sic: Hugging Face's name
    encoder = register_module("encoder", Encoder(c));
    post_layernorm = register_module("post_layernorm", ln());  // for the pooled output only, unused here
  }
  ClipEmbeddings embeddings{nullptr};
  torch::nn::LayerNorm pre_layrnorm{nullptr}, post_layernorm{nullptr};
  Encoder encoder{nullptr};
};
TORCH_MODULE(ClipVisionTransformer);

struct ClipVitOptions : VitOptions {
  std::string tokens = "all";  ///< "all": CLS + patches (GIT); "patches": drop CLS (LLaVA)
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
      x.position_init_std = o.get("position_init_std", x.position_init_std);
    } else if (o.has("config")) {
      o.fail("config", "give either weights or config, not both");
    }
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
      cfg_json = vision_config(dir);
    }
    auto view = sdk::Options::of_file(cfg_json, origin);
    config_ = ClipVisionConfig::from(view);
    model_ = ClipVisionTransformer(config_);
    if (dir.empty()) {
      init_weights();
    } else {
      load_vision_weights(*model_, dir);
    }
    spec_.height = spec_.width = spec_.shortest_edge = config_.image_size;  // CLIP's defaults, mean and std
    if (!dir.empty() && std::filesystem::exists(dir / "preprocessor_config.json")) read_preprocessor(dir / "preprocessor_config.json", spec_, config_.image_size);
    layer_ = feature_index(o.feature_layer, config_.num_hidden_layers, "clip_vit");
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
    auto& vm = *model_;
    auto h = vm.encoder->forward(vm.pre_layrnorm(vm.embeddings(pixels)), layer_);
    return options_.tokens == "patches" ? h.slice(1, 1) : h;
  }
  sdk::ImageSpec image_spec() const override { return spec_; }
  bool set_gradient_checkpointing(bool on) override {
    model_->encoder->checkpointing = on;
    return true;
  }
  std::int64_t hidden_size() const override { return config_.hidden_size; }
  std::int64_t num_tokens() const override { return config_.grid() * config_.grid() + (options_.tokens == "patches" ? 0 : 1); }

 private:
  // transformers' CLIPPreTrainedModel._init_weights, for models trained from scratch.
  void init_weights() {
    torch::NoGradGuard no_grad;
    const double f = config_.initializer_factor, d = static_cast<double>(config_.hidden_size);
    auto& vm = *model_;
    vm.embeddings->class_embedding.normal_(0.0, std::pow(d, -0.5) * f);
    vm.embeddings->patch_embedding->weight.normal_(0.0, config_.initializer_range * f);
    const double pos_std = options_.position_init_std > 0 ? options_.position_init_std : config_.initializer_range * f;
    vm.embeddings->position_embedding->weight.normal_(0.0, pos_std);
    const double in_std = std::pow(d, -0.5) * std::pow(2.0 * config_.num_hidden_layers, -0.5) * f;
    const double out_std = std::pow(d, -0.5) * f;
    const double fc_std = std::pow(2.0 * d, -0.5) * f;
    for (const auto& layer : *vm.encoder->layers) {
      auto* l = layer->as<EncoderLayerImpl>();
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
  ClipVisionTransformer model_{nullptr};
  sdk::ImageSpec spec_;
  std::int64_t layer_ = 0;
};

void register_clip(sdk::Registry& registry) {
  registry.add<ClipVit>("clip_vit", 1, "CLIP vision transformer (transformers' CLIPVisionModel)");
}

}  // namespace ablate::plugins::vit
