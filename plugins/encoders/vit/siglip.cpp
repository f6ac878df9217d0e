// encoder/siglip: SigLIP's vision transformer, as transformers' SiglipVisionModel computes it: patch embedding
// with a bias, no class token, post-layernorm on the last hidden state. Its attention-pooling head (only for
// the pooled output, which VLMs do not use) is not built; its weights are accepted and left unused.

#include "vit.hpp"

namespace ablate::plugins::vit {

/// SiglipVisionConfig's keys and defaults (those of google/siglip-base-patch16-224).
struct SiglipVisionConfig : VitConfig {
  bool vision_use_head = true;
  SiglipVisionConfig() : VitConfig{768, 3072, 12, 12, 3, 224, 16, "gelu_pytorch_tanh", 1e-6, 0.0} {}

  static SiglipVisionConfig from(sdk::Options& o) {
    SiglipVisionConfig c;
    c.read(o);
    c.vision_use_head = o.get("vision_use_head", c.vision_use_head);
    return c;
  }
  sdk::Json to_json() const {
    auto j = VitConfig::to_json();
    j["architectures"] = {"SiglipVisionModel"};
    j["model_type"] = "siglip_vision_model";
    j["vision_use_head"] = false;  // the head is not exported
    return j;
  }
};

class SiglipEmbeddingsImpl : public torch::nn::Module {
 public:
  explicit SiglipEmbeddingsImpl(const SiglipVisionConfig& c) {
    patch_embedding = register_module(
        "patch_embedding", torch::nn::Conv2d(torch::nn::Conv2dOptions(c.num_channels, c.hidden_size, c.patch_size).stride(c.patch_size)));
    position_embedding = register_module("position_embedding", torch::nn::Embedding(c.grid() * c.grid(), c.hidden_size));
  }
  torch::Tensor forward(const torch::Tensor& pixels) {
    auto patches = patch_embedding(pixels.to(patch_embedding->weight.dtype())).flatten(2).transpose(1, 2);
    return patches + position_embedding->weight.unsqueeze(0);
  }
  torch::nn::Conv2d patch_embedding{nullptr};
  torch::nn::Embedding position_embedding{nullptr};
};
TORCH_MODULE(SiglipEmbeddings);

class SiglipVisionTransformerImpl : public torch::nn::Module {
 public:
  explicit SiglipVisionTransformerImpl(const SiglipVisionConfig& c) {
    embeddings = register_module("embeddings", SiglipEmbeddings(c));
    encoder = register_module("encoder", Encoder(c));
    post_layernorm = register_module("post_layernorm",
                                     torch::nn::LayerNorm(torch::nn::LayerNormOptions({c.hidden_size}).eps(c.layer_norm_eps)));
  }
  SiglipEmbeddings embeddings{nullptr};
  Encoder encoder{nullptr};
  torch::nn::LayerNorm post_layernorm{nullptr};
};
TORCH_MODULE(SiglipVisionTransformer);

struct SiglipOptions : VitOptions {
  static SiglipOptions parse(sdk::Options& o) {
    SiglipOptions x;
    x.weights = o.require<std::string>("weights");
    x.feature_layer = o.get("feature_layer", x.feature_layer);
    return x;
  }
};

class Siglip : public sdk::Encoder {
 public:
  using options_type = SiglipOptions;

  Siglip(const SiglipOptions& o, const sdk::BuildContext& ctx) {
    const auto dir = sdk::resolve_path(ctx.base_dir, o.weights);
    auto cfg_json = vision_config(dir);
    auto view = sdk::Options::of_file(cfg_json, (dir / "config.json").string());
    config_ = SiglipVisionConfig::from(view);
    model_ = SiglipVisionTransformer(config_);
    load_vision_weights(*model_, dir, {"head."});
    // SiglipImageProcessor: straight resize to a square, bicubic, no crop, mean and std 0.5.
    spec_.height = spec_.width = config_.image_size;
    spec_.shortest_edge = 0;
    spec_.center_crop = false;
    spec_.mean = {0.5, 0.5, 0.5};
    spec_.std = {0.5, 0.5, 0.5};
    if (std::filesystem::exists(dir / "preprocessor_config.json")) read_preprocessor(dir / "preprocessor_config.json", spec_, config_.image_size);
    layer_ = feature_index(o.feature_layer, config_.num_hidden_layers, "siglip");
  }

  torch::nn::Module& module() override { return *model_; }
  sdk::Json hf_config() const override { return config_.to_json(); }
  void save_extras(const std::filesystem::path& dir) const override {
    sdk::write_json(dir / "preprocessor_config.json",
                    {{"image_processor_type", "SiglipImageProcessor"},
                     {"do_resize", true},
                     {"size", {{"height", spec_.height}, {"width", spec_.width}}},
                     {"resample", spec_.resample},
                     {"do_rescale", true},
                     {"rescale_factor", spec_.rescale_factor},
                     {"do_normalize", true},
                     {"image_mean", spec_.mean},
                     {"image_std", spec_.std}});
  }

  /// hidden_states[feature_layer]; the last layer's output gets post_layernorm, as last_hidden_state does.
  torch::Tensor encode(const torch::Tensor& pixels) override {
    auto& vm = *model_;
    auto h = vm.encoder->forward(vm.embeddings(pixels), layer_);
    return layer_ == config_.num_hidden_layers ? vm.post_layernorm(h) : h;
  }
  sdk::ImageSpec image_spec() const override { return spec_; }
  bool set_gradient_checkpointing(bool on) override {
    model_->encoder->checkpointing = on;
    return true;
  }
  std::int64_t hidden_size() const override { return config_.hidden_size; }
  std::int64_t num_tokens() const override { return config_.grid() * config_.grid(); }

 private:
  SiglipVisionConfig config_;
  SiglipVisionTransformer model_{nullptr};
  sdk::ImageSpec spec_;
  std::int64_t layer_ = 0;
};

void register_siglip(sdk::Registry& registry) {
  registry.add<Siglip>("siglip", 1, "SigLIP vision transformer (transformers' SiglipVisionModel)");
}

}  // namespace ablate::plugins::vit
