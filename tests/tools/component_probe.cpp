// component_probe: runs one plugin component on tensors read from a safetensors file and writes its outputs
// to another, so that Python tests can compare ablate with Hugging Face transformers on the same weights.
//
//   component_probe encoder  ID WEIGHTS_DIR IN OUT [OPTIONS_JSON]   IN: pixels [B,3,H,W]     OUT: features
//   component_probe backbone ID WEIGHTS_DIR IN OUT [OPTIONS_JSON [GENERATE_JSON]]
//                                                                   IN: input_ids, attention_mask [B,T]
//                                                                   OUT: hidden, logits; with GENERATE_JSON
//                                                                   ({"max_new_tokens", "do_sample",
//                                                                   "temperature", "top_k", "top_p", "seed"})
//                                                                   also generated [B,N]: text-only decoding
//                                                                   with a KV cache
//   component_probe pixels   ID WEIGHTS_DIR IMAGE OUT                IMAGE: a PNG or JPEG file, or a folder
//                                                                   OUT: pixels [3,H,W], as the encoder's
//                                                                   preprocessor_config.json says
//   component_probe vlm SPEC.json IN OUT                              SPEC: {"encoder": {"plugin", ...options},
//                                                                   "projector": {...}, "backbone": {...},
//                                                                   "layout", "generate": N}
//                                                                   IN: pixels, input_ids, attention_mask
//                                                                   (left-padded; one image token per row)
//                                                                   OUT: logits [B,S,V] of the assembled
//                                                                   sequence; generated [B,N] greedy ids
//   component_probe tokenize TOKENIZER IN.json OUT.json              TOKENIZER: a tokenizer.json, or a model
//                                                                   folder (tokenizer_config.json honoured)
//                                                                   IN: a JSON array of strings
//                                                                   OUT: {"ids": [[...]], "decoded": [...]}
// The backbone sees a left- or right-padded batch the way transformers does: positions count real tokens
// from 0, padding is never attended to. Plugins are found as the runner finds them (ABLATE_PLUGIN_PATH and
// the build tree).

#include <iostream>

#include <torch/torch.h>

#include "ablate/sdk/image.hpp"
#include "ablate/sdk/tokenizer.hpp"
#include "ablate/sdk/weights.hpp"
#include "host/plugin_host.hpp"
#include "model/vlm.hpp"

using namespace ablate;

namespace {

// Greedy or sampled decoding of a text-only batch with a KV cache: the runner's loop (VlmModel::generate)
// minus the image, kept here so that backbones can be checked against transformers' generate() alone.
torch::Tensor generate_text(sdk::Backbone& bb, const torch::Tensor& ids, const torch::Tensor& valid, const GenerateConfig& cfg,
                            std::uint64_t seed) {
  auto positions = valid.to(torch::kLong).cumsum(1) - 1;
  positions = torch::where(valid, positions, torch::full_like(positions, -1));
  sdk::AttentionMask mask;
  mask.key_valid = valid;
  sdk::KvCache cache;
  auto gen = at::detail::createCPUGenerator(seed);
  auto hidden = bb.forward(bb.embed(ids), positions, mask, &cache);
  auto last = hidden.select(1, hidden.size(1) - 1);
  auto next_pos = std::get<0>(positions.max(1)) + 1;
  std::vector<torch::Tensor> steps;
  for (std::int64_t step = 0; step < cfg.max_new_tokens; ++step) {
    auto next = sample_next(bb.logits(last).to(torch::kFloat32), cfg, gen);
    steps.push_back(next);
    mask.key_valid = torch::cat({mask.key_valid, torch::ones({ids.size(0), 1}, torch::kBool)}, 1);
    hidden = bb.forward(bb.embed(next.unsqueeze(1)), next_pos.unsqueeze(1), mask, &cache);
    next_pos = next_pos + 1;
    last = hidden.select(1, 0);
  }
  return torch::stack(steps, 1);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 5 && std::string(argv[1]) == "tokenize") {
    try {
      const std::filesystem::path source(argv[2]);
      auto tok = std::filesystem::is_directory(source) ? sdk::Tokenizer::from_folder(source) : sdk::Tokenizer::from_file(source);
      sdk::Json out = {{"ids", sdk::Json::array()}, {"decoded", sdk::Json::array()}};
      for (const auto& text : sdk::read_json(argv[3])) {
        auto ids = tok.encode(text.get<std::string>(), /*add_special_tokens=*/true);
        out["ids"].push_back(ids);
        out["decoded"].push_back(tok.decode(ids, /*skip_special_tokens=*/true));
      }
      sdk::write_json(argv[4], out);
      return 0;
    } catch (const std::exception& e) {
      std::cerr << "component_probe: " << e.what() << "\n";
      return 1;
    }
  }
  if (argc == 5 && std::string(argv[1]) == "vlm") {
    try {
      PluginHost host;
      host.discover(PluginHost::search_path(std::filesystem::read_symlink("/proc/self/exe"), {}), std::cerr);
      auto spec = sdk::read_json(argv[2]);
      sdk::BuildContext ctx;
      auto options = [&](const char* part) {
        auto& table = spec[part];
        return sdk::Options(table, std::string("/") + part, part, nullptr, "probe");
      };
      auto eo = options("encoder"), bo = options("backbone");
      auto encoder = host.create_encoder(spec["encoder"]["plugin"], eo, ctx);
      auto backbone = host.create_backbone(spec["backbone"]["plugin"], bo, ctx);
      ctx.in_features = encoder->hidden_size();
      ctx.out_features = backbone->hidden_size();
      auto po = options("projector");
      auto projector = host.create_projector(spec["projector"]["plugin"], po, ctx);
      const auto layout = parse_layout(spec.value("layout", "inline"));
      VlmModel model(Part<sdk::Encoder>{encoder, "encoder"}, Part<sdk::Projector>{projector, "projector"},
                     Part<sdk::Backbone>{backbone, "backbone"}, layout, backbone->tokenizer().token_to_id(spec.value("image_token", "<image>")));
      model.eval();
      model.refresh_frozen();
      torch::NoGradGuard no_grad;
      auto in = sdk::read_safetensors(argv[3]);
      auto valid = in.at("attention_mask").to(torch::kBool);
      auto seq = model.assemble(in.at("pixels").to(torch::kFloat32), in.at("input_ids").to(torch::kLong), valid, {}, {});
      sdk::TensorMap out{{"logits", model.logits(seq).contiguous()}};
      if (const auto n = spec.value("generate", 0); n > 0) {
        GenerationBatch batch;
        batch.pixels = in.at("pixels").to(torch::kFloat32);
        batch.ids = in.at("input_ids").to(torch::kLong);
        batch.valid = valid;
        GenerateConfig cfg;
        cfg.max_new_tokens = n;
        auto generated = model.generate(batch, cfg, 0);
        auto ids = torch::full({batch.ids.size(0), n}, -1, torch::kLong);
        for (std::size_t r = 0; r < generated.ids.size(); ++r) {
          for (std::size_t k = 0; k < generated.ids[r].size(); ++k) ids[static_cast<std::int64_t>(r)][static_cast<std::int64_t>(k)] = generated.ids[r][k];
        }
        out["generated"] = ids;
      }
      sdk::write_safetensors(argv[4], out);
      return 0;
    } catch (const std::exception& e) {
      std::cerr << "component_probe: " << describe_exception(e) << "\n";
      return 1;
    }
  }
  if (argc < 6) {
    std::cerr << "usage: component_probe encoder|backbone ID WEIGHTS_DIR IN.safetensors OUT.safetensors [OPTIONS_JSON]\n";
    return 2;
  }
  try {
    const std::string kind = argv[1], id = argv[2];
    PluginHost host;
    host.discover(PluginHost::search_path(std::filesystem::read_symlink("/proc/self/exe"), {}), std::cerr);
    sdk::Json table = argc > 6 ? sdk::Json::parse(argv[6]) : sdk::Json::object();
    table["weights"] = argv[3];
    sdk::Options options(table, "", kind, nullptr, "probe");
    sdk::BuildContext ctx;
    sdk::TensorMap in;
    if (kind != "pixels") in = sdk::read_safetensors(argv[4]);
    sdk::TensorMap out;
    torch::NoGradGuard no_grad;
    if (kind == "pixels") {
      // IMAGE may be a folder: every file in it, each under its own name.
      auto enc = host.create_encoder(id, options, ctx);
      const std::filesystem::path image(argv[4]);
      if (std::filesystem::is_directory(image)) {
        for (const auto& e : std::filesystem::directory_iterator(image)) {
          out[e.path().filename().string()] = sdk::prepare_image(sdk::read_image(e.path()), enc->image_spec());
        }
      } else {
        out["pixels"] = sdk::prepare_image(sdk::read_image(image), enc->image_spec());
      }
    } else if (kind == "encoder") {
      auto enc = host.create_encoder(id, options, ctx);
      enc->module().eval();
      out["features"] = enc->encode(in.at("pixels").to(torch::kFloat32)).contiguous();
    } else if (kind == "backbone") {
      auto bb = host.create_backbone(id, options, ctx);
      bb->module().eval();
      auto ids = in.at("input_ids").to(torch::kLong);
      auto valid = in.at("attention_mask").to(torch::kBool);
      auto pos = valid.to(torch::kLong).cumsum(1) - 1;
      pos = torch::where(valid, pos, torch::full_like(pos, -1));
      sdk::AttentionMask mask;
      mask.key_valid = valid;
      auto hidden = bb->forward(bb->embed(ids), pos, mask, nullptr);
      out["hidden"] = hidden.contiguous();
      out["logits"] = bb->logits(hidden).contiguous();
      if (argc > 7) {
        // Text only, through the same decoding loop the runner uses: a VLM whose image part is never read.
        auto g = sdk::Json::parse(argv[7]);
        GenerateConfig cfg;
        cfg.max_new_tokens = g.value("max_new_tokens", 20);
        cfg.do_sample = g.value("do_sample", false);
        cfg.temperature = g.value("temperature", 1.0);
        cfg.top_k = g.value("top_k", std::int64_t{0});
        cfg.top_p = g.value("top_p", 1.0);
        out["generated"] = generate_text(*bb, ids, valid, cfg, g.value("seed", std::uint64_t{0}));
      }
    } else {
      std::cerr << "component_probe: unknown kind " << kind << "\n";
      return 2;
    }
    sdk::write_safetensors(argv[5], out);
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "component_probe: " << describe_exception(e) << "\n";
    return 1;
  }
}
