#pragma once
// What CLIP's and SigLIP's vision transformers share, with transformers' module names: the encoder layer
// (layer_norm1, self_attn.{q,k,v,out}_proj, layer_norm2, mlp.fc1/fc2), its activations, the options every
// ViT encoder takes, weight loading that accepts both key layouts, and image specs from
// preprocessor_config.json.

#include <algorithm>
#include <array>
#include <cmath>

#include <torch/torch.h>

#include "ablate/sdk/checkpoint.hpp"
#include "ablate/sdk/linear.hpp"
#include "ablate/sdk/norms.hpp"
#include "ablate/sdk/plugin.hpp"
#include "ablate/sdk/weights.hpp"

namespace ablate::plugins::vit {

namespace sdk = ablate::sdk;

/// The keys both CLIPVisionConfig and SiglipVisionConfig have. Defaults are passed in (they differ).
struct VitConfig {
  std::int64_t hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, num_channels, image_size, patch_size;
  std::string hidden_act;
  double layer_norm_eps, attention_dropout;

  void read(sdk::Options& o) {
    hidden_size = o.size("hidden_size", hidden_size);
    intermediate_size = o.size("intermediate_size", intermediate_size);
    num_hidden_layers = o.size("num_hidden_layers", num_hidden_layers, 0);
    num_attention_heads = o.size("num_attention_heads", num_attention_heads);
    num_channels = o.size("num_channels", num_channels);
    image_size = o.size("image_size", image_size);
    patch_size = o.size("patch_size", patch_size);
    hidden_act = o.get("hidden_act", hidden_act);
    layer_norm_eps = o.non_negative("layer_norm_eps", layer_norm_eps);
    attention_dropout = o.probability("attention_dropout", attention_dropout);
    if (hidden_size % num_attention_heads != 0) o.fail("num_attention_heads", "must divide hidden_size");
    if (image_size % patch_size != 0) o.fail("patch_size", "must divide image_size");
    // One position embedding per patch: (image_size / patch_size)^2 must not wrap around in 64 bits, where it
    // would build a table of a wrong (even zero) size and the message would blame the weights.
    if (grid() > 3037000499) {
      o.fail("image_size", "image_size / patch_size = " + std::to_string(grid()) + " patches a side: too many to count");
    }
    if (hidden_act != "quick_gelu" && hidden_act != "gelu" && hidden_act != "gelu_pytorch_tanh") {
      o.fail("hidden_act", "unsupported activation '" + hidden_act + "' (quick_gelu, gelu, gelu_pytorch_tanh)");
    }
  }
  sdk::Json to_json() const {
    return {{"hidden_size", hidden_size}, {"intermediate_size", intermediate_size}, {"num_hidden_layers", num_hidden_layers},
            {"num_attention_heads", num_attention_heads}, {"num_channels", num_channels}, {"image_size", image_size},
            {"patch_size", patch_size}, {"hidden_act", hidden_act}, {"layer_norm_eps", layer_norm_eps},
            {"attention_dropout", attention_dropout}, {"dtype", "float32"}};
  }
  std::int64_t grid() const { return image_size / patch_size; }
};

inline torch::Tensor activation(const std::string& name, const torch::Tensor& x) {
  if (name == "quick_gelu") return x * torch::sigmoid(1.702 * x);
  if (name == "gelu_pytorch_tanh") return torch::gelu(x, "tanh");
  return torch::gelu(x);
}

class AttentionImpl : public torch::nn::Module {
 public:
  explicit AttentionImpl(const VitConfig& c)
      : heads_(c.num_attention_heads), head_dim_(c.hidden_size / c.num_attention_heads), dropout_(c.attention_dropout) {
    k_proj = register_module("k_proj", sdk::Linear(c.hidden_size, c.hidden_size));
    v_proj = register_module("v_proj", sdk::Linear(c.hidden_size, c.hidden_size));
    q_proj = register_module("q_proj", sdk::Linear(c.hidden_size, c.hidden_size));
    out_proj = register_module("out_proj", sdk::Linear(c.hidden_size, c.hidden_size));
  }
  torch::Tensor forward(const torch::Tensor& h) {
    const auto b = h.size(0), t = h.size(1);
    auto split = [&](const torch::Tensor& x) { return x.view({b, t, heads_, head_dim_}).transpose(1, 2); };
    auto qkv = sdk::forward_shared({q_proj.get(), k_proj.get(), v_proj.get()}, h);
    auto out = sdk::attend(split(qkv[0]), split(qkv[1]), split(qkv[2]), sdk::AttentionMask::full(), 0,
                           1.0 / std::sqrt(static_cast<double>(head_dim_)), is_training() ? dropout_ : 0.0);
    return out_proj(out.transpose(1, 2).reshape({b, t, heads_ * head_dim_}));
  }
  sdk::Linear k_proj{nullptr}, v_proj{nullptr}, q_proj{nullptr}, out_proj{nullptr};

 private:
  std::int64_t heads_, head_dim_;
  double dropout_;
};
TORCH_MODULE(Attention);

class MlpImpl : public torch::nn::Module {
 public:
  explicit MlpImpl(const VitConfig& c) : act_(c.hidden_act) {
    fc1 = register_module("fc1", sdk::Linear(c.hidden_size, c.intermediate_size));
    fc2 = register_module("fc2", sdk::Linear(c.intermediate_size, c.hidden_size));
  }
  torch::Tensor forward(const torch::Tensor& x) { return fc2(activation(act_, fc1(x))); }
  sdk::Linear fc1{nullptr}, fc2{nullptr};

 private:
  std::string act_;
};
TORCH_MODULE(Mlp);

class EncoderLayerImpl : public torch::nn::Module {
 public:
  explicit EncoderLayerImpl(const VitConfig& c) {
    auto ln = [&] { return torch::nn::LayerNorm(torch::nn::LayerNormOptions({c.hidden_size}).eps(c.layer_norm_eps)); };
    self_attn = register_module("self_attn", Attention(c));
    layer_norm1 = register_module("layer_norm1", ln());
    mlp = register_module("mlp", Mlp(c));
    layer_norm2 = register_module("layer_norm2", ln());
  }
  /// transformers' CLIPEncoderLayer.forward (and SiglipEncoderLayer's): the hidden states after this layer.
  torch::Tensor forward(torch::Tensor h) { return step({std::move(h), {}}).hidden(); }
  /// The same layer as a link of the encoder's chain: its last residual add is left to the next layer's
  /// layer_norm1 (sdk::add_layer_norm: with --fused-norm on, the add and the norm are one pass).
  sdk::PreLnStream step(const sdk::PreLnStream& in) {
    return sdk::pre_ln_block(in, *layer_norm1, [&](const torch::Tensor& x) { return self_attn(x); }, *layer_norm2,
                             [&](const torch::Tensor& x) { return mlp(x); });
  }
  Attention self_attn{nullptr};
  torch::nn::LayerNorm layer_norm1{nullptr}, layer_norm2{nullptr};
  Mlp mlp{nullptr};
};
TORCH_MODULE(EncoderLayer);

class EncoderImpl : public torch::nn::Module {
 public:
  explicit EncoderImpl(const VitConfig& c) {
    const double h = static_cast<double>(c.hidden_size);
    sdk::check_layers_fit("num_hidden_layers", c.num_hidden_layers, 4 * h * h + 2 * h * static_cast<double>(c.intermediate_size));
    layers = register_module("layers", torch::nn::ModuleList());
    for (std::int64_t i = 0; i < c.num_hidden_layers; ++i) layers->push_back(EncoderLayer(c));
  }
  /// Runs the first `count` layers.
  torch::Tensor forward(torch::Tensor h, std::int64_t count) {
    if (checkpointing) {
      // Each layer recomputed in backward from its input alone: layers as transformers' modules, h to h.
      for (std::int64_t i = 0; i < count; ++i) {
        auto layer = layers->ptr<EncoderLayerImpl>(i);
        h = sdk::maybe_checkpoint(true, *layer, [layer](const torch::Tensor& x) { return layer->forward(x); }, h);
      }
      return h;
    }
    sdk::PreLnStream s{std::move(h), {}};
    for (std::int64_t i = 0; i < count; ++i) s = layers->ptr<EncoderLayerImpl>(i)->step(s);
    return s.hidden();
  }
  torch::nn::ModuleList layers{nullptr};
  bool checkpointing = false;  ///< gradient checkpointing, layer by layer
};
TORCH_MODULE(Encoder);

/// Options every ViT encoder plugin takes.
struct VitOptions {
  std::string weights;              ///< Hugging Face folder; empty: built from `config`
  sdk::Json config;                 ///< the model's config keys, for a model built from scratch
  std::int64_t feature_layer = -1;  ///< index into hidden_states; negative counts from the end (LLaVA: -2)
};

/// The features' layer as an index into hidden_states (0: embeddings, i: output of layer i).
inline std::int64_t feature_index(std::int64_t feature_layer, std::int64_t layers, const std::string& plugin) {
  const auto index = feature_layer < 0 ? layers + 1 + feature_layer : feature_layer;
  if (index < 0 || index > layers) {
    throw sdk::InputError(plugin + ": feature_layer " + std::to_string(feature_layer) + " is outside hidden_states (0.." +
                          std::to_string(layers) + ")");
  }
  return index;
}

/// The config.json of a weights folder, taking the vision part of a full (two-tower) checkpoint.
inline sdk::Json vision_config(const std::filesystem::path& dir) {
  auto cfg = sdk::read_json(dir / "config.json");
  return cfg.contains("vision_config") ? cfg["vision_config"] : cfg;
}

/// Loads a weights folder into a vision tower named as transformers 5 names CLIPVisionModel and
/// SiglipVisionModel ("embeddings.", "encoder.", ...), which is also what PEFT adapters for them key on.
/// Two-tower checkpoints (CLIPModel, SiglipModel) and transformers 4 put everything under "vision_model.";
/// that prefix is dropped. Parts of a two-tower checkpoint that the vision tower does not use are ignored,
/// as are the `ignored` extras.
inline void load_vision_weights(torch::nn::Module& module, const std::filesystem::path& dir,
                                std::vector<std::string> ignored = {}) {
  auto tensors = sdk::read_weights(dir);
  const std::string prefix = "vision_model.";
  if (tensors.count(prefix + "embeddings.patch_embedding.weight")) {
    sdk::TensorMap renamed;
    for (auto& [k, v] : tensors) renamed.emplace(k.rfind(prefix, 0) == 0 ? k.substr(prefix.size()) : k, v);
    tensors = std::move(renamed);
  }
  for (const char* p : {"text_model.", "visual_projection.", "text_projection.", "logit_scale", "logit_bias"}) ignored.push_back(p);
  sdk::load_state(module, tensors, dir.string(), true, ignored);
}

/// Overrides `spec` with what a Hugging Face preprocessor_config.json says. The images it makes must be the
/// encoder's `image_size` square (its position embeddings have one row per patch of that size).
inline void read_preprocessor(const std::filesystem::path& file, sdk::ImageSpec& spec, std::int64_t image_size) {
  auto j = sdk::read_json(file);
  if (!j.is_object()) throw sdk::InputError(file.string() + ": expected a JSON object");
  // A side of 1 to 65536 pixels (transformers refuses sizes of 0 or less; larger ones only exhaust memory).
  auto size_of = [&](const sdk::Json& v, const char* key) -> std::int64_t {
    const auto& n = v.is_object() && v.contains(key) ? v[key] : v;
    if (!n.is_number_integer() || n.get<std::int64_t>() < 1 || n.get<std::int64_t>() > 65536) {
      throw sdk::InputError(file.string() + ": " + key + ": expected an image side from 1 to 65536 pixels, got " + v.dump());
    }
    return n.get<std::int64_t>();
  };
  try {
    if (j.contains("size")) {
      const auto& size = j["size"];
      if (size.is_object() && size.contains("height")) {
        spec.shortest_edge = 0;  // resize straight to height x width
        spec.height = size_of(size, "height");
        spec.width = size_of(size, "width");
      } else {
        spec.shortest_edge = size_of(size, "shortest_edge");
      }
    }
    // A step whose do_* flag is false is skipped by transformers; one that is absent runs.
    auto flag = [&](const char* key) {
      if (!j.contains(key)) return true;
      if (!j[key].is_boolean()) throw sdk::InputError(file.string() + ": " + key + ": expected true or false, got " + j[key].dump());
      return j[key].get<bool>();
    };
    // The encoder takes one image size (image_size), so images reach it resized; a config that says not to
    // resize describes images already of that size, which this cannot know.
    if (!flag("do_resize")) {
      throw sdk::InputError(file.string() + ": do_resize is false, but images of every size must become the encoder's " +
                            std::to_string(image_size) + " x " + std::to_string(image_size) + " pixels (set it true)");
    }
    flag("do_convert_rgb");  // images are always decoded to RGB (transformers fails on grey ones without it)
    spec.center_crop = j.contains("do_center_crop") ? flag("do_center_crop") : spec.center_crop;
    if (spec.center_crop && j.contains("crop_size")) {
      spec.height = size_of(j["crop_size"], "height");
      spec.width = j["crop_size"].is_object() ? size_of(j["crop_size"], "width") : spec.height;
    }
    spec.resample = j.value("resample", spec.resample);
    spec.rescale_factor = j.value("rescale_factor", spec.rescale_factor);
    if (spec.resample < 0 || spec.resample > 5) {
      throw sdk::InputError(file.string() + ": resample: expected one of Pillow's filters 0 to 5, got " + std::to_string(spec.resample));
    }
    auto three = [&](const char* key) {
      const auto& v = j[key];
      if (!v.is_array() || v.size() != 3 || !std::all_of(v.begin(), v.end(), [](const auto& x) { return x.is_number(); })) {
        throw sdk::InputError(file.string() + ": " + key + ": expected three numbers (R, G, B), got " + v.dump());
      }
      return v.get<std::array<double, 3>>();
    };
    if (j.contains("image_mean")) spec.mean = three("image_mean");
    if (j.contains("image_std")) spec.std = three("image_std");
    // Skipped steps as the identity: a factor of 1 (pixels stay 0..255, as transformers leaves them), a mean
    // of 0 and a deviation of 1; both give the same floats as skipping.
    if (!flag("do_rescale")) spec.rescale_factor = 1.0;
    if (!flag("do_normalize")) {
      spec.mean = {0.0, 0.0, 0.0};
      spec.std = {1.0, 1.0, 1.0};
    }
    if (std::any_of(spec.std.begin(), spec.std.end(), [](double v) { return v == 0.0; })) {
      throw sdk::InputError(file.string() + ": image_std: a channel's deviation of 0 divides by zero, got " + j["image_std"].dump());
    }
  } catch (const sdk::InputError&) {
    throw;
  } catch (const std::exception& e) {
    throw sdk::InputError(file.string() + ": " + sdk::json_error_text(e));  // a field of another type
  }
  const auto side = std::to_string(image_size);
  if (!spec.center_crop && spec.shortest_edge > 0) {
    throw sdk::InputError(file.string() + ": do_center_crop is false, so images would keep their aspect ratio, but the encoder takes " +
                          side + " x " + side + " pixels (config.json's image_size)");
  }
  if (spec.height != image_size || spec.width != image_size) {
    throw sdk::InputError(file.string() + ": images of " + std::to_string(spec.height) + " x " + std::to_string(spec.width) +
                          " pixels, but the encoder takes " + side + " x " + side + " (config.json's image_size)");
  }
}

}  // namespace ablate::plugins::vit
