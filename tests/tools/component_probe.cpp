// component_probe: runs one plugin component on tensors read from a safetensors file and writes its outputs
// to another, so that Python tests can compare ablate with Hugging Face transformers on the same weights.
//
//   component_probe encoder  ID WEIGHTS_DIR IN OUT [OPTIONS_JSON]   IN: pixels [B,3,H,W]     OUT: features
//   component_probe backbone ID WEIGHTS_DIR IN OUT [OPTIONS_JSON]   IN: input_ids, attention_mask [B,T]
//                                                                   OUT: hidden, logits
//   component_probe tokenize TOKENIZER_JSON IN.json OUT.json         IN: a JSON array of strings
//                                                                   OUT: {"ids": [[...]], "decoded": [...]}
// The backbone sees a left- or right-padded batch the way transformers does: positions count real tokens
// from 0, padding is never attended to. Plugins are found as the runner finds them (ABLATE_PLUGIN_PATH and
// the build tree).

#include <iostream>

#include <torch/torch.h>

#include "ablate/sdk/tokenizer.hpp"
#include "ablate/sdk/weights.hpp"
#include "host/plugin_host.hpp"

using namespace ablate;

int main(int argc, char** argv) {
  if (argc == 5 && std::string(argv[1]) == "tokenize") {
    try {
      auto tok = sdk::Tokenizer::from_file(argv[2]);
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
    auto in = sdk::read_safetensors(argv[4]);
    sdk::TensorMap out;
    torch::NoGradGuard no_grad;
    if (kind == "encoder") {
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
