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
//                                                                   "layout", "generate": N,
//                                                                   "decode_graph": auto|on|off}
//                                                                   IN: pixels, input_ids, attention_mask
//                                                                   (left-padded; one image token per row)
//                                                                   OUT: logits [B,S,V] of the assembled
//                                                                   sequence; generated [B,N] greedy ids
//   component_probe tokenize TOKENIZER IN.json OUT.json              TOKENIZER: a tokenizer.json, or a model
//                                                                   folder (tokenizer_config.json honoured)
//                                                                   IN: a JSON array of strings
//                                                                   OUT: {"ids": [[...]], "decoded": [...]}
//   component_probe metric ID OPTIONS.json IN.json OUT.json          IN: {"predictions": [...], "references":
//                                                                   [[...], ...]}; OUT: the metric's evaluate()
//                                                                   as [{"name", "value", "per_sample"}]
//   component_probe train KIND ID WEIGHTS_DIR IN OUT SPEC.json     KIND: encoder or backbone. SPEC:
//                                                                   {"strategy": [tables], "train": {[train]
//                                                                   keys}, "steps": N, "grads": bool,
//                                                                   "save_adapter": DIR, "export": DIR,
//                                                                   "device": "cpu"|"cuda", "precision":
//                                                                   fp32|bf16|fp16 (autocast, frozen linears held
//                                                                   low, as the runner trains), "fused_norm":
//                                                                   bool (the runner's --fused-norm), "fused_relu": bool (its --fused-relu)}
//                                                                   IN: input_ids, attention_mask, labels
//                                                                   (-100: no loss; the loss is transformers'
//                                                                   causal-LM mean) or pixels + probe (loss =
//                                                                   sum(features * probe)). Applies the
//                                                                   strategies as the runner does, takes N
//                                                                   optimizer steps on IN, then writes
//                                                                   losses [N], logits or features, and with
//                                                                   grads "grad:NAME" for every trainable
//                                                                   parameter, and "param:NAME" (names within
//                                                                   the component)
//   component_probe dataset ID OPTIONS.json OUT.json                 OPTIONS: the dataset's table (relative paths
//                                                                   resolve against its folder). OUT: {"size",
//                                                                   "report", "samples": [{"id", "prompt",
//                                                                   "target", "references", "metadata", "image":
//                                                                   {"shape", "sha256"}} or {"index", "error":
//                                                                   {"sample_id", "message"}}]}. Exit status 2
//                                                                   on an InputError, as the runner does
// The backbone sees a left- or right-padded batch the way transformers does: positions count real tokens
// from 0, padding is never attended to. Plugins are found as the runner finds them (ABLATE_PLUGIN_PATH and
// the build tree).

#include <iostream>

#include <torch/torch.h>

#include "ablate/sdk/image.hpp"
#include "ablate/sdk/tokenizer.hpp"
#include "ablate/sdk/weights.hpp"
#include "host/plugin_host.hpp"
#include "ablate/sdk/adapters.hpp"
#include "ablate/sdk/hash.hpp"
#include "ablate/sdk/norms.hpp"
#include "cli/commands.hpp"
#include "model/vlm.hpp"
#include "train/artifacts.hpp"
#include "train/optimizer.hpp"
#include "train/precision.hpp"
#include "train/strategies.hpp"

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

// `train` mode: the runner's strategy, optimizer and export code on one component, so that tests can hold
// them against PEFT and torch.optim.
int train_probe(const std::string& kind, const std::string& id, const std::string& weights, const std::string& in_file,
                const std::string& out_file, const std::string& spec_file) {
  PluginHost host;
  host.discover(PluginHost::search_path(std::filesystem::read_symlink("/proc/self/exe"), {}), std::cerr);
  auto spec = sdk::read_json(spec_file);
  sdk::Json table = spec.value("options", sdk::Json::object());
  table["weights"] = weights;
  sdk::Options options(table, "", kind, nullptr, "probe");
  sdk::BuildContext ctx;
  std::shared_ptr<sdk::Component> part;
  std::shared_ptr<sdk::Encoder> encoder;
  std::shared_ptr<sdk::Backbone> backbone;
  std::string head;
  if (kind == "encoder") {
    encoder = host.create_encoder(id, options, ctx);
    part = encoder;
  } else {
    backbone = host.create_backbone(id, options, ctx);
    part = backbone;
    head = kind + "." + backbone->head_module();
  }
  // The component under a root, named as in the assembled model, so that strategies see the same names.
  auto root = std::make_shared<torch::nn::Module>();
  root->register_module(kind, std::shared_ptr<torch::nn::Module>(&part->module(), [](torch::nn::Module*) {}));

  sdk::Json train_table = spec.value("train", sdk::Json::object());
  sdk::Options train_options(train_table, "/train", "train", nullptr, "probe");
  const auto tc = parse_train_config(train_options);
  sdk::Json strategies = spec.value("strategy", sdk::Json::array());
  std::vector<StrategyStep> steps;
  for (std::size_t i = 0; i < strategies.size(); ++i) {
    if (strategies[i].is_string()) strategies[i] = sdk::Json{{"plugin", strategies[i]}};
    sdk::Options o(strategies[i], "/strategy/" + std::to_string(i), "strategy[" + std::to_string(i) + "]", nullptr, "probe");
    StrategyGroup g;
    g.lr = o.maybe<double>("lr");
    g.weight_decay = o.maybe<double>("weight_decay");
    const auto sid = o.require<std::string>("plugin");
    steps.push_back({host.create_strategy(sid, o, ctx), sid, "strategy[" + std::to_string(i) + "]", "probe", "strategy/" + sid, g});
  }
  const auto applied = apply_strategies(*root, head, steps, tc, model_types_of({{kind, part.get()}}));
  const torch::Device device(spec.value("device", std::string("cpu")));
  const auto precision = spec.value("precision", std::string("fp32"));
  sdk::set_fused_norm(spec.value("fused_norm", false));
  sdk::set_fused_relu(spec.value("fused_relu", false));
  root->to(device);
  FrozenInLowPrecision frozen_low(*root, precision);
  for (const auto& p : tc.gradient_checkpointing) {
    if (p == kind && !part->set_gradient_checkpointing(true)) throw std::runtime_error(id + " has no gradient checkpointing");
  }
  // Training mode (gradient checkpointing applies only there); the reference models have no dropout.
  root->train();

  auto in = sdk::read_safetensors(in_file);
  for (auto& [name, t] : in) t = t.to(device);
  auto loss_of = [&](sdk::TensorMap& out) {
    AutocastGuard autocast(device, precision);
    if (encoder) {
      auto features = encoder->encode(in.at("pixels").to(torch::kFloat32));
      out["features"] = features.detach().to(torch::kCPU, torch::kFloat32).contiguous();
      return (features * in.at("probe").to(torch::kFloat32)).sum();
    }
    auto ids = in.at("input_ids").to(torch::kLong);
    auto valid = in.at("attention_mask").to(torch::kBool);
    auto pos = valid.to(torch::kLong).cumsum(1) - 1;
    pos = torch::where(valid, pos, torch::full_like(pos, -1));
    sdk::AttentionMask mask;
    mask.key_valid = valid;
    auto logits = backbone->logits(backbone->forward(backbone->embed(ids), pos, mask, nullptr));
    out["logits"] = logits.detach().to(torch::kCPU, torch::kFloat32).contiguous();
    // transformers' ForCausalLMLoss: labels shifted left, mean over those that are not -100.
    auto labels = in.at("labels").to(torch::kLong);
    auto shifted = logits.slice(1, 0, -1).reshape({-1, logits.size(-1)});
    return torch::nn::functional::cross_entropy(shifted.to(torch::kFloat32), labels.slice(1, 1).reshape({-1}),
                                                torch::nn::functional::CrossEntropyFuncOptions().ignore_index(-100));
  };
  TrainOptimizer optimizer(trainable_parameters(*root, applied.groups), applied.settings, tc);
  const auto n = spec.value("steps", 0);
  std::vector<double> losses;
  for (int s = 0; s < n; ++s) {
    sdk::TensorMap scratch;
    auto loss = loss_of(scratch);
    loss.backward();
    losses.push_back(loss.item<double>());
    optimizer.step(s);
  }
  sdk::TensorMap out;
  auto loss = loss_of(out);
  out["loss"] = loss.detach().to(torch::kCPU).reshape({1});
  if (!losses.empty()) out["losses"] = torch::tensor(losses, torch::kFloat64);
  if (spec.value("grads", false)) {
    loss.backward();
    const std::string prefix = kind + ".";
    for (const auto& p : root->named_parameters()) {
      if (!p.value().requires_grad()) continue;
      const auto name = p.key().substr(prefix.size());
      out["param:" + name] = p.value().detach().to(torch::kCPU).contiguous();
      if (p.value().grad().defined()) out["grad:" + name] = p.value().grad().to(torch::kCPU).contiguous();
    }
  }
  frozen_low.restore();  // exports see the float32 weights, as the runner's do
  if (spec.contains("save_adapter")) sdk::write_peft_adapter(part->module(), kind, spec["save_adapter"].get<std::string>(),
                                                             {{"task_type", kind == "backbone" ? sdk::Json("CAUSAL_LM") : sdk::Json()}});
  if (spec.contains("export")) export_component(*part, spec["export"].get<std::string>());
  sdk::write_safetensors(out_file, out);
  return 0;
}

// `metric` mode: a metric plugin's evaluate() on a whole set, as the runner calls it, so that tests can hold
// metrics against the official Python scorers.
int metric_probe(const std::string& id, const std::string& options_file, const std::string& in_file, const std::string& out_file) {
  PluginHost host;
  host.discover(PluginHost::search_path(std::filesystem::read_symlink("/proc/self/exe"), {}), std::cerr);
  const auto table = sdk::read_json(options_file);
  sdk::Options options(table, "", "metric", nullptr, options_file);
  auto metric = host.create_metric(id, options, sdk::BuildContext{});
  options.finish();
  const auto in = sdk::read_json(in_file);
  const auto predictions = in.at("predictions").get<std::vector<std::string>>();
  const auto references = in.at("references").get<std::vector<std::vector<std::string>>>();
  if (predictions.size() != references.size()) throw sdk::InputError(in_file + ": predictions and references differ in length");
  sdk::Json out = sdk::Json::array();
  for (const auto& v : metric->evaluate(predictions, references)) {
    out.push_back({{"name", v.name.empty() ? id : v.name}, {"value", v.value}, {"per_sample", v.per_sample}});
  }
  sdk::write_json(out_file, out);
  return 0;
}

// `dataset` mode: builds a dataset as the runner does and writes every sample, or the SampleError its get()
// threw, with the dataset's report, so that tests can hold dataset plugins against Python reading the same files.
int dataset_probe(const std::string& id, const std::string& options_file, const std::string& out_file) {
  PluginHost host;
  host.discover(PluginHost::search_path(std::filesystem::read_symlink("/proc/self/exe"), {}), std::cerr);
  const auto table = sdk::read_json(options_file);
  sdk::Options options(table, "", "dataset", nullptr, options_file);
  sdk::BuildContext ctx;
  ctx.base_dir = std::filesystem::absolute(options_file).parent_path();
  auto dataset = host.create_dataset(id, options, ctx);
  options.finish();
  sdk::Json samples = sdk::Json::array();
  for (std::size_t i = 0; i < dataset->size(); ++i) {
    try {
      const auto s = dataset->get(i);
      const auto& im = s.image;
      sdk::Json shape = sdk::Json::array();
      for (auto d : im.shape()) shape.push_back(d);
      samples.push_back({{"id", s.id}, {"prompt", s.prompt}, {"target", s.target}, {"references", s.references},
                         {"metadata", s.metadata},
                         {"image", {{"shape", shape}, {"sha256", sdk::Sha256().update(im.data(), im.size()).hex()}}}});
    } catch (const sdk::SampleError& e) {
      samples.push_back({{"index", i}, {"error", {{"sample_id", e.sample_id()}, {"message", e.what()}}}});
    }
  }
  sdk::write_json(out_file, {{"size", dataset->size()}, {"report", dataset->report()}, {"samples", samples}});
  return 0;
}

int main(int argc, char** argv) {
  if (argc == 5 && std::string(argv[1]) == "dataset") {
    try {
      return dataset_probe(argv[2], argv[3], argv[4]);
    } catch (const sdk::InputError& e) {
      std::cerr << "component_probe: " << e.what() << "\n";
      return 2;
    } catch (const std::exception& e) {
      std::cerr << "component_probe: " << describe_exception(e) << "\n";
      return 1;
    }
  }
  if (argc == 6 && std::string(argv[1]) == "metric") {
    try {
      return metric_probe(argv[2], argv[3], argv[4], argv[5]);
    } catch (const std::exception& e) {
      std::cerr << "component_probe: " << describe_exception(e) << "\n";
      return 1;
    }
  }
  if (argc == 8 && std::string(argv[1]) == "train") {
    try {
      return train_probe(argv[2], argv[3], argv[4], argv[5], argv[6], argv[7]);
    } catch (const std::exception& e) {
      std::cerr << "component_probe: " << describe_exception(e) << "\n";
      return 1;
    }
  }
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
        model.set_decode_graph(cli::parse_auto_on_off<DecodeGraphMode>("decode_graph", spec.value("decode_graph", "auto")));
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
