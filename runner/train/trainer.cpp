#include "train/trainer.hpp"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <mutex>
#include <optional>
#include <set>
#include <sstream>

#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include "ablate/sdk/adapters.hpp"
#include "ablate/sdk/hash.hpp"
#include "ablate/sdk/image.hpp"
#include "ablate/sdk/linear.hpp"
#include "ablate/sdk/random.hpp"
#include "ablate/sdk/weights.hpp"
#include "data/batches.hpp"
#include "data/sources.hpp"
#include "eval/scoring.hpp"
#include "host/plugin_host.hpp"
#include "model/feature_cache.hpp"
#include "model/vlm.hpp"
#include "train/artifacts.hpp"
#include "train/op_profile.hpp"
#include "train/optimizer.hpp"
#include "train/precision.hpp"
#include "train/strategies.hpp"
#include "train/train_steps.hpp"

namespace ablate {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

namespace {

std::string human_count(std::int64_t n) {
  char buf[32];
  if (n >= 1000000000) std::snprintf(buf, sizeof buf, "%.2fB", n / 1e9);
  else if (n >= 1000000) std::snprintf(buf, sizeof buf, "%.2fM", n / 1e6);
  else if (n >= 1000) std::snprintf(buf, sizeof buf, "%.1fk", n / 1e3);
  else std::snprintf(buf, sizeof buf, "%lld", static_cast<long long>(n));
  return buf;
}

std::string human_seconds(double s) {
  char buf[32];
  if (s >= 3600) std::snprintf(buf, sizeof buf, "%dh%02dm", static_cast<int>(s / 3600), static_cast<int>(s / 60) % 60);
  else if (s >= 60) std::snprintf(buf, sizeof buf, "%dm%02ds", static_cast<int>(s / 60), static_cast<int>(s) % 60);
  else std::snprintf(buf, sizeof buf, "%.0fs", s);
  return buf;
}

// Every module that owns parameters, with full / lora / frozen / partial, its parameter counts and the
// optimizer settings of what trains in it. An adapted linear layer is one row ("lora") that counts its
// adapter too.
std::vector<store::TrainableRow> trainables(torch::nn::Module& root, const std::map<const void*, std::size_t>& groups,
                                            const std::vector<GroupSetting>& settings) {
  std::vector<store::TrainableRow> rows;
  auto note_group = [&](store::TrainableRow& row, const torch::Tensor& p) {
    if (!p.requires_grad() || row.lr) return;
    const auto it = groups.find(p.unsafeGetTensorImpl());
    const auto& g = settings[it == groups.end() ? 0 : it->second];
    row.lr = g.lr;
    row.weight_decay = g.weight_decay;
  };
  std::string skip;  // children of an adapted layer are counted with it
  for (const auto& item : root.named_modules("", false)) {
    const auto& name = item.key();
    if (!skip.empty() && name.compare(0, skip.size(), skip) == 0) continue;
    auto* module = item.value().get();
    store::TrainableRow row{name, "frozen", 0, 0, std::nullopt, std::nullopt};
    if (auto* linear = dynamic_cast<sdk::LinearImpl*>(module); linear && linear->has_lora()) {
      for (const auto& p : module->parameters(true)) {
        row.params += p.numel();
        if (p.requires_grad()) row.trainable += p.numel();
        note_group(row, p);
      }
      row.mode = "lora";
      rows.push_back(row);
      skip = name + ".";
      continue;
    }
    auto own = module->named_parameters(/*recurse=*/false);
    if (own.is_empty()) continue;
    for (const auto& p : own) {
      row.params += p.value().numel();
      if (p.value().requires_grad()) row.trainable += p.value().numel();
      note_group(row, p.value());
    }
    row.mode = row.trainable == 0 ? "frozen" : (row.trainable == row.params ? "full" : "partial");
    rows.push_back(row);
  }
  return rows;
}

void print_trainables(const std::vector<store::TrainableRow>& rows, std::ostream& out) {
  struct Sum {
    std::int64_t params = 0, trainable = 0;
    std::map<std::string, std::int64_t> modes;
    std::set<double> lrs;
  };
  std::map<std::string, Sum> parts;
  std::vector<std::string> order;
  std::int64_t total = 0, trainable = 0;
  for (const auto& r : rows) {
    const auto part = r.module.substr(0, r.module.find('.'));
    if (!parts.count(part)) order.push_back(part);
    auto& s = parts[part];
    s.params += r.params;
    s.trainable += r.trainable;
    s.modes[r.mode] += 1;
    if (r.lr) s.lrs.insert(*r.lr);
    total += r.params;
    trainable += r.trainable;
  }
  out << "  what trains:\n";
  for (const auto& part : order) {
    const auto& s = parts[part];
    std::string modes;
    for (const auto& [mode, n] : s.modes) modes += (modes.empty() ? "" : ", ") + std::to_string(n) + " " + mode;
    std::string lrs;
    for (double lr : s.lrs) {
      char b[32];
      std::snprintf(b, sizeof b, "%.3g", lr);
      lrs += (lrs.empty() ? "  lr " : ", ") + std::string(b);
    }
    char line[320];
    std::snprintf(line, sizeof line, "    %-10s %9s params, %9s trainable  (%s modules)%s\n", part.c_str(),
                  human_count(s.params).c_str(), human_count(s.trainable).c_str(), modes.c_str(), lrs.c_str());
    out << line;
  }
  char line[160];
  std::snprintf(line, sizeof line, "    total      %9s params, %9s trainable (%.2f%%)\n", human_count(total).c_str(),
                human_count(trainable).c_str(), total ? 100.0 * static_cast<double>(trainable) / static_cast<double>(total) : 0.0);
  out << line;
}

std::string sanitize(const std::string& s) {
  std::string out;
  for (char c : s) out += (std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_') ? c : '_';
  return out;
}

struct PendingStep {
  std::int64_t step;
  torch::Tensor loss;  // mean over the step's loss tokens
  double lr;
  torch::Tensor grad_norm;
  std::int64_t samples, tokens, loss_tokens;
  bool skipped;  // fp16: gradients not finite, no update
};

sdk::Component& component(VlmModel& model, const std::string& part) {
  if (part == "encoder") return model.encoder();
  if (part == "projector") return model.projector();
  return model.backbone();
}

}  // namespace

namespace {

// Copies the trainable parameters saved in checkpoint folder `dir` into `model` (the strategies already
// applied, so that LoRA layers exist).
void load_trainable(VlmModel& model, const fs::path& dir) {
  auto saved = sdk::read_safetensors(dir / "trainable.safetensors");
  torch::NoGradGuard no_grad;
  for (auto& p : model.named_parameters()) {
    if (!p.value().requires_grad()) continue;
    auto it = saved.find(p.key());
    if (it == saved.end()) throw std::runtime_error(dir.string() + ": checkpoint lacks " + p.key());
    p.value().copy_(it->second);
  }
}

// [eval] postprocess, in order.
std::string postprocess(std::string text, const std::vector<std::string>& steps) {
  for (const auto& step : steps) {
    if (step == "first_line") {
      text = text.substr(0, text.find('\n'));
    } else if (step == "strip") {
      const auto b = text.find_first_not_of(" \t\r\n\v\f");
      const auto e = text.find_last_not_of(" \t\r\n\v\f");
      text = b == std::string::npos ? "" : text.substr(b, e - b + 1);
    } else if (step == "lowercase") {
      for (auto& c : text) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    }
  }
  return text;
}

// The feature cache's tables for one cell (model/feature_cache.hpp): one per training dataset (all or none) and
// one for the evaluation set, each built once per process and shared by the cells that agree on its key.
struct CellFeatures {
  std::vector<std::shared_ptr<const FeatureTable>> train;  ///< per training dataset, or empty
  std::shared_ptr<const FeatureTable> eval;

  /// A training batch's features: its (dataset, index) rows gathered from each dataset's table.
  torch::Tensor gather(const std::vector<std::pair<std::size_t, std::size_t>>& rows, const torch::Device& device) const {
    std::map<std::size_t, std::pair<std::vector<std::int64_t>, std::vector<std::int64_t>>> by_source;  // positions, indices
    for (std::size_t j = 0; j < rows.size(); ++j) {
      by_source[rows[j].first].first.push_back(static_cast<std::int64_t>(j));
      by_source[rows[j].first].second.push_back(static_cast<std::int64_t>(rows[j].second));
    }
    if (by_source.size() == 1) return train[by_source.begin()->first]->rows(torch::tensor(by_source.begin()->second.second), device);
    const auto& any = train.front()->features;
    auto out = torch::empty({static_cast<std::int64_t>(rows.size()), any.size(1), any.size(2)}, any.options().device(device));
    for (const auto& [source, pick] : by_source) {
      out.index_copy_(0, to_device_async(torch::tensor(pick.first), device), train[source]->rows(torch::tensor(pick.second), device));
    }
    return out;
  }
};

CellFeatures cell_features(const Experiment& experiment, const Cell& cell, RunContext& ctx, VlmModel& model, sdk::Encoder& encoder,
                           DataSources& train_set, const DrawOrder& order, const std::vector<Example>& eval_examples,
                           const Collator& collator, std::ostream& out) {
  CellFeatures features;
  const TrainConfig& tc = cell.train;
  if (!ctx.features) return features;
  auto make_room = [&](const std::set<std::string>& keys) {
    if (const int moved = ctx.features->make_room(keys)) {
      out << "  feature cache: " << moved << " table(s) moved to disk for this cell, kept for later cells\n";
    }
  };
  if (ctx.features->mode() == FeatureCacheMode::off || !model.encoder_frozen()) {
    make_room({});  // this cell uses none: the memory is its own
    return features;
  }
  // Everything the encoder's output depends on: plugin and version, its options (feature_layer, tokens...),
  // weights, preprocessing, precision, TF32 and device; and the dataset (below).
  const auto spec = encoder.image_spec();
  const sdk::Json base = {
      {"encoder", cell.encoder.qualified() + "@" + std::to_string(cell.encoder.version)},
      {"options", cell.resolved.at(sdk::Json::json_pointer(cell.encoder.pointer))},
      {"tokens", encoder.num_tokens()}, {"weights", module_fingerprint(encoder.module())},
      {"spec", {spec.height, spec.width, spec.shortest_edge, spec.center_crop, spec.resample, spec.rescale_factor, spec.mean, spec.std}},
      {"precision", tc.precision}, {"tf32", tc.tf32 && ctx.device.is_cuda()}, {"device", ctx.device.str()},
      {"base_dir", experiment.base_dir.string()}};
  auto key_of = [&](const std::string& role, const std::vector<DataSource>& sources) {
    auto k = base;
    k["role"] = role;
    for (const auto& src : sources) {
      k["data"].push_back({cell.resolved.at(sdk::Json::json_pointer(src.plugin.pointer)), src.limit, src.on_bad_sample});
    }
    return sdk::sha256_hex(k.dump());
  };
  auto encode = [&](const torch::Tensor& pixels) {
    AutocastGuard autocast(ctx.device, tc.precision);
    return model.encode(pixels);  // in training mode, as the training steps would run it
  };
  std::string refused;
  auto obtain = [&](const std::string& what, const std::string& key, std::int64_t count,
                    const std::function<torch::Tensor(std::int64_t, std::int64_t)>& load) -> std::shared_ptr<const FeatureTable> {
    if (!refused.empty()) return nullptr;
    auto table = ctx.features->find(key, ctx.device);
    const bool reused = table != nullptr;
    if (!table) table = ctx.features->build(key, count, ctx.workers, ctx.device, load, encode, refused);
    if (!table) {
      if (!refused.empty()) out << "  feature cache: not used: " << refused << "\n";
      return nullptr;
    }
    char secs[32];
    std::snprintf(secs, sizeof secs, "%.2fs", table->seconds);
    out << "  feature cache: " << what << ": " << table->describe() << (reused ? ", reused" : ", encoded in " + std::string(secs)) << "\n";
    return table;
  };
  // Training: where the run passes over each dataset at least once (or --feature-cache on); decided from the
  // cell alone, so that its numbers do not depend on what ran before it.
  bool worth = !cell.decode_only;
  std::vector<std::string> train_keys;
  for (std::size_t s = 0; s < train_set.sources(); ++s) {
    worth = worth && (ctx.features->mode() == FeatureCacheMode::on || order.drawn()[s] >= train_set.count(s));
    train_keys.push_back(key_of("train", {cell.train_data.sources[s]}));
  }
  const auto eval_key = key_of("eval", cell.eval_data.sources);
  std::set<std::string> used{eval_key};
  if (worth) used.insert(train_keys.begin(), train_keys.end());
  make_room(used);  // tables of earlier cells that this one does not use make room
  for (std::size_t s = 0; worth && s < train_set.sources(); ++s) {
    auto table = obtain(cell.train_data.sources[s].plugin.display, train_keys[s],
                        static_cast<std::int64_t>(train_set.count(s)), [&, s](std::int64_t first, std::int64_t n) {
                          std::vector<torch::Tensor> pixels;
                          for (auto i = first; i < first + n; ++i) {
                            // A sample that cannot be made gets blank features: training never draws it (it takes
                            // the next one that can be made), and "fail" stops the run when it is drawn.
                            std::optional<sdk::Sample> sample;
                            try {
                              sample = train_set.get(s, static_cast<std::size_t>(i));
                            } catch (const sdk::InputError&) {
                            }
                            pixels.push_back(collator.pixels(sample ? sample->image : sdk::Image()));
                          }
                          return torch::stack(pixels);
                        });
    if (!table) {
      features.train.clear();  // a mixture has every table or none
      break;
    }
    features.train.push_back(table);
  }
  if (!eval_examples.empty()) {
    features.eval = obtain(cell.eval_data.display(), eval_key,
                           static_cast<std::int64_t>(eval_examples.size()), [&](std::int64_t first, std::int64_t n) {
                             std::vector<torch::Tensor> pixels;
                             for (auto i = first; i < first + n; ++i) pixels.push_back(eval_examples[static_cast<std::size_t>(i)].pixels);
                             return torch::stack(pixels);
                           });
  }
  return features;
}

}  // namespace

Outcome run_cell(const Experiment& experiment, const Cell& cell, std::int64_t run_id, RunContext& ctx,
                 const std::vector<std::filesystem::path>& earlier_stages, const fs::path& checkpoint_dir) {
  auto& out = std::cerr;
  const auto& host = ctx.host;
  const TrainConfig& tc = cell.train;
  const EvalConfig& ec = cell.eval;

  sdk::BuildContext bctx;
  bctx.base_dir = experiment.base_dir;
  bctx.seed = cell.seed;

  // ---- data
  auto make_dataset = [&](const DataSource& src) {
    auto o = cell.options(src.plugin);
    return host.create_dataset(src.plugin.id, o, bctx);
  };
  DataSources train_set(cell.train_data, make_dataset, out), eval_set(cell.eval_data, make_dataset, out);
  // Both messages start at the experiment's line for the dataset table: the file to look at, with its options.
  auto data_where = [&](std::size_t source) {
    return sdk::locate(*cell.where, cell.train_data.sources[source].plugin.pointer, experiment.file.string());
  };
  if (train_set.size() == 0) throw sdk::InputError(data_where(0) + ": " + cell.train_data.display() + ": the training set is empty");
  bctx.vocabulary = train_set.vocabulary();
  const std::int64_t per_step = tc.batch_size * tc.grad_accum;
  // Each stage draws its own order (stage 0's is the unstaged order).
  DrawOrder order(train_set, cell.seed + 0x51ed27ULL * static_cast<std::uint64_t>(cell.stage_index),
                  static_cast<std::uint64_t>(tc.steps * per_step));
  // What building the datasets decided (samples dropped, how targets were chosen, a mixture's draws): shown and kept.
  sdk::Json data_report = sdk::Json::object();
  for (auto [role, set] : {std::pair<const char*, DataSources*>{"train", &train_set}, {"eval", &eval_set}}) {
    auto r = set->report(set == &train_set);
    if (!r.empty()) data_report[role] = r;
  }
  if (cell.train_data.mixture()) {
    for (std::size_t s = 0; s < train_set.sources(); ++s) {
      data_report["train"][cell.train_data.sources[s].name]["drawn"] = order.drawn()[s];
    }
  }
  if (!data_report.empty()) {
    out << "  data: " << data_report.dump() << "\n";
    ctx.store.set_data_report(run_id, data_report);
  }

  // ---- model. Each part is built from its own seed, so adding a part never shifts another's initialisation.
  auto build = [&](const PluginRef& ref, std::uint64_t salt, auto create) {
    torch::manual_seed(cell.seed * 1000 + salt);
    auto o = cell.options(ref);
    return create(ref.id, o);
  };
  auto encoder = build(cell.encoder, 1, [&](const std::string& id, sdk::Options& o) { return host.create_encoder(id, o, bctx); });
  auto backbone = build(cell.backbone, 2, [&](const std::string& id, sdk::Options& o) { return host.create_backbone(id, o, bctx); });
  bctx.in_features = encoder->hidden_size();
  bctx.out_features = backbone->hidden_size();
  auto projector = build(cell.projector, 3, [&](const std::string& id, sdk::Options& o) { return host.create_projector(id, o, bctx); });
  const auto layout = parse_layout(cell.layout);
  const auto image_token = layout == Layout::inline_ ? backbone->tokenizer().token_to_id(cell.image_token) : -1;
  auto model = std::make_shared<VlmModel>(Part<sdk::Encoder>{encoder, cell.encoder.qualified()},
                                          Part<sdk::Projector>{projector, cell.projector.qualified()},
                                          Part<sdk::Backbone>{backbone, cell.backbone.qualified()}, layout, image_token);

  // ---- earlier stages: the weights each changed, applied in order.
  for (const auto& file : earlier_stages) {
    const auto report = sdk::load_state(*model, sdk::read_safetensors(file), file.string(), /*strict=*/false);
    if (!report.unexpected.empty() || !report.mismatched.empty()) {
      throw std::runtime_error(file.string() + ": does not fit this model (" +
                               (report.unexpected.empty() ? report.mismatched.front() : report.unexpected.front()) + ")");
    }
  }

  // ---- what trains: everything frozen, then each strategy of the list in order.
  std::vector<StrategyStep> strategy_steps;
  for (std::size_t i = 0; i < cell.strategies.size(); ++i) {
    const auto& ref = cell.strategies[i];
    auto o = cell.options(ref);
    strategy_steps.push_back({host.create_strategy(ref.id, o, bctx), ref.id, ref.display,
                              sdk::locate(*cell.where, ref.pointer, experiment.file.string()), ref.qualified(),
                              cell.strategy_groups[i]});
  }
  const auto applied = apply_strategies(
      *model, model->head(), strategy_steps, tc,
      model_types_of({{"encoder", &model->encoder()}, {"projector", &model->projector()}, {"backbone", &model->backbone()}}));
  const auto& settings = applied.settings;
  const auto& groups = applied.groups;
  for (const auto& part : tc.gradient_checkpointing) {
    if (!component(*model, part).set_gradient_checkpointing(true)) {
      throw sdk::InputError(sdk::locate(*cell.where, "/train/gradient_checkpointing", experiment.file.string()) +
                            ": train.gradient_checkpointing: the " + part + " plugin does not support gradient checkpointing");
    }
  }
  if (tc.precision == "fp16" && !ctx.device.is_cuda()) {
    throw sdk::InputError(sdk::locate(*cell.where, "/train/precision", experiment.file.string()) +
                          ": train.precision: fp16 needs a CUDA device (use bf16 on the CPU)");
  }
  model->to(ctx.device);
  model->refresh_frozen();
  model->set_decode_graph(ctx.decode_graph);
  FrozenInLowPrecision frozen_low(*model, tc.precision);
  if (frozen_low.count() > 0) {
    out << "  frozen linear weights held in " << tc.precision << ": " << frozen_low.count() << " tensors ("
        << frozen_low.originals() << " with a float32 original kept, the others exact in " << tc.precision << ")\n";
  }
  const auto rows = trainables(*model, groups, settings);
  const auto params = trainable_parameters(*model, groups);
  if (params.empty()) {
    std::string names;
    for (const auto& r : cell.strategies) names += (names.empty() ? "" : ", ") + r.id;
    throw sdk::InputError(experiment.file.string() + ": strategy [" + names + "] trains nothing in this model");
  }
  // Adapters that [export] asks for must be expressible in PEFT's format: find out now, not after training.
  std::map<std::string, bool> adapters;  // component -> its adapter can be written
  for (const char* part : {"encoder", "projector", "backbone"}) {
    try {
      adapters[part] = !sdk::plan_adapter(component(*model, part).module(), part).empty();
    } catch (const sdk::InputError&) {
      adapters[part] = false;
      if (cell.export_adapters.contains(part)) throw;
    }
    if (cell.export_adapters.contains(part) && !adapters[part]) {
      throw sdk::InputError(sdk::locate(*cell.where, std::string("/export/") + part + "_adapter", experiment.file.string()) +
                            ": export." + part + "_adapter: the " + part + " carries no LoRA adapter in this cell");
    }
  }
  // The folder a component's weights were read from (empty when it was built from a config).
  auto weights_folder = [&](const PluginRef& ref) {
    const auto& table = cell.resolved.at(sdk::Json::json_pointer(ref.pointer));
    if (!table.contains("weights") || !table["weights"].is_string() || table["weights"].get<std::string>().empty()) return std::string();
    return sdk::resolve_path(experiment.base_dir, table["weights"].get<std::string>()).string();
  };
  // adapter_config.json's task_type and base_model_name_or_path, as PEFT writes them.
  auto adapter_extra = [&](const std::string& part) {
    sdk::Json extra = {{"task_type", part == "backbone" ? sdk::Json("CAUSAL_LM") : sdk::Json(nullptr)}};
    const auto folder = weights_folder(part == "encoder" ? cell.encoder : part == "projector" ? cell.projector : cell.backbone);
    if (!folder.empty()) extra["base_model_name_or_path"] = folder;
    return extra;
  };
  if (!cell.decode_only) {
    ctx.store.record_trainables(run_id, rows);
    print_trainables(rows, out);
  }

  TrainOptimizer optimizer(params, settings, tc);
  const bool loss_on_text = tc.loss_on == "text";
  const auto backbone_weights = weights_folder(cell.backbone);
  Collator collator(backbone->tokenizer(), encoder->image_spec(), tc.max_text_tokens, loss_on_text, backbone->vocab_size(),
                    backbone_weights.empty() ? experiment.file.string() : backbone_weights, image_token);

  // ---- resume from the last checkpoint whose files are intact
  std::int64_t start = 0;
  auto saved_checkpoints = ctx.store.checkpoints(run_id);
  for (auto ck_it = saved_checkpoints.rbegin(); ck_it != saved_checkpoints.rend() && start == 0; ++ck_it) {
    const auto& ck = *ck_it;
    const fs::path dir(ck.path);
    if (!fs::exists(dir / "trainable.safetensors") || sdk::sha256_file(dir / "trainable.safetensors") != ck.sha256) {
      out << "  checkpoint at step " << ck.step << " is missing or damaged; not resuming from it\n";
      continue;
    }
    start = ck.step;
    load_trainable(*model, dir);
    torch::load(optimizer.adamw(), (dir / "optimizer.pt").string());
    auto state = sdk::read_safetensors(dir / "rng.safetensors");
    sdk::set_rng_state(ctx.device, {state.at("cpu").clone(), state.count("device") ? state.at("device").clone() : torch::Tensor()});
    if (auto* scaler = optimizer.scaler(); scaler && state.count("scale")) scaler->load(state.at("scale"), state.at("growth_tracker"));
  }
  ctx.store.truncate_after(run_id, start == 0 ? -1 : start);
  if (start > 0) out << "  resuming from the checkpoint at step " << start << "\n";
  ctx.store.start_run(run_id, ctx.device_label.empty() ? ctx.device.str() : ctx.device_label, ctx.hostname, ctx.revision, model->image_tokens());

  // ---- evaluation
  std::vector<Example> eval_examples;
  for (std::size_t i = 0; i < eval_set.size(); ++i) {
    if (auto sample = eval_set.get(i)) eval_examples.push_back(collator.prepare(std::move(*sample)));
  }
  if (const auto renamed = make_sample_ids_unique(eval_examples); !renamed.empty()) out << "  eval: " << renamed << "\n";
  // [train] tf32: float32 matrix products on TF32 tensor cores on CUDA during this run (its feature cache and
  // evaluations included), as torch.backends.cuda.matmul.allow_tf32 = True (cuDNN's convolutions use TF32 by
  // torch's default already); the previous setting comes back when the run ends.
  struct Tf32Scope {
    bool before = at::globalContext().allowTF32CuBLAS();
    explicit Tf32Scope(bool on) { at::globalContext().setAllowTF32CuBLAS(on); }
    ~Tf32Scope() { at::globalContext().setAllowTF32CuBLAS(before); }
  } tf32_scope(tc.tf32 && ctx.device.is_cuda());

  // ---- frozen-encoder feature cache (model/feature_cache.hpp)
  const auto features = cell_features(experiment, cell, ctx, *model, *encoder, train_set, order, eval_examples, collator, out);

  Metrics metrics;
  for (const auto& ref : ec.metrics) {
    auto o = cell.options(ref);
    metrics.emplace_back(ref, host.create_metric(ref.id, o, bctx));
  }
  const auto run_start = Clock::now();
  auto evaluate = [&](std::int64_t step) {
    const auto t0 = Clock::now();
    model->eval();
    torch::NoGradGuard no_grad;
    AutocastGuard autocast(ctx.device, tc.precision);
    // generate() keeps its decode steps (a fixed KV cache, a CUDA graph) from one batch to the next: they end with
    // the evaluation, returned or thrown, and their memory goes back to training.
    struct ReleaseDecodeSteps {
      VlmModel& model;
      ~ReleaseDecodeSteps() { model.release_decode_steps(); }
    } release_decode_steps{*model};
    double loss_sum = 0;
    std::int64_t tokens = 0, loss_tokens = 0;
    std::vector<std::string> predictions, raw;  // raw: before [eval] postprocess
    double gen_first_token_s = 0, gen_seconds = 0;  // generation speed, added up over the batches
    std::int64_t gen_tokens = 0, gen_batches = 0;
    std::set<std::string> decodings;  // how the batches ran their decode steps (VlmModel::Generated::decoding)
    std::vector<std::vector<std::string>> references;
    const auto bs = static_cast<std::size_t>(ec.batch_size);
    for (std::size_t i = 0; i < eval_examples.size(); i += bs) {
      std::vector<Example> chunk(eval_examples.begin() + static_cast<std::ptrdiff_t>(i),
                                 eval_examples.begin() + static_cast<std::ptrdiff_t>(std::min(eval_examples.size(), i + bs)));
      auto batch = collator.train_batch(chunk);
      if (features.eval) batch.features = features.eval->slice(static_cast<std::int64_t>(i), static_cast<std::int64_t>(chunk.size()), ctx.device);
      if (batch.loss_tokens > 0) {
        loss_sum += model->loss_sum(batch).item<double>();
        loss_tokens += batch.loss_tokens;
        tokens += batch.text_tokens;
      }
      auto prompts = collator.generation_batch(chunk);
      prompts.features = batch.features;
      auto gen = model->generate(prompts, ec.generate, cell.seed + static_cast<std::uint64_t>(step));
      gen_first_token_s += gen.first_token_s;
      gen_seconds += gen.total_s;
      gen_tokens += gen.new_tokens;
      ++gen_batches;
      if (gen.decoding != "growing KV cache") decodings.insert(gen.decoding);
      for (std::size_t j = 0; j < chunk.size(); ++j) {
        raw.push_back(gen.text[j]);
        predictions.push_back(postprocess(gen.text[j], ec.postprocess));
        references.push_back(chunk[j].sample.references.empty() ? std::vector<std::string>{chunk[j].sample.target}
                                                               : chunk[j].sample.references);
      }
    }
    model->train();
    std::vector<std::string> group_of;  // each prediction's value of [eval] group_by
    if (!ec.group_by.empty()) {
      for (const auto& e : eval_examples) {
        const auto it = e.sample.metadata.find(ec.group_by);
        group_of.push_back(it == e.sample.metadata.end() ? "" : it->is_string() ? it->get<std::string>() : it->dump());
      }
    }
    auto [values, per_sample] = score(metrics, predictions, references, ec.group_by, group_of);
    std::vector<store::SampleRow> samples;
    std::vector<store::ImageRow> images;
    auto decoding = ec.generate.to_json();
    if (!ec.postprocess.empty()) decoding["postprocess"] = ec.postprocess;
    const auto stored = ec.samples < 0 ? predictions.size() : std::min(predictions.size(), static_cast<std::size_t>(ec.samples));
    for (std::size_t j = 0; j < stored; ++j) {
      const auto& s = eval_examples[j].sample;
      store::SampleRow row;
      row.step = step;
      row.decoding = decoding;
      row.sample_id = s.id;
      row.prompt = s.prompt;
      row.output = predictions[j];
      row.references = references[j];
      if (raw[j] != predictions[j]) row.raw_output = raw[j];
      for (const auto& [name, scores] : per_sample) row.scores[name] = scores[j];
      if (!per_sample.empty()) row.score = per_sample.front().second[j];
      if (s.image.size() > 0) {
        store::ImageRow im;
        im.bytes = sdk::encode_png(s.image);
        im.sha256 = sdk::sha256_hex(std::string_view(reinterpret_cast<const char*>(im.bytes.data()), im.bytes.size()));
        im.format = "png";
        im.height = static_cast<std::int64_t>(s.image.shape(0));
        im.width = static_cast<std::int64_t>(s.image.shape(1));
        row.image_sha256 = im.sha256;
        images.push_back(std::move(im));
      }
      samples.push_back(std::move(row));
    }
    const double loss = loss_tokens ? loss_sum / static_cast<double>(loss_tokens) : 0.0;
    store::StepRow row;
    row.step = step;
    row.split = "eval";
    row.loss = loss;
    row.tokens = tokens;
    row.loss_tokens = loss_tokens;
    row.elapsed_s = std::chrono::duration<double>(Clock::now() - run_start).count();
    if (gen_batches > 0) row.gen_first_token_s = gen_first_token_s / static_cast<double>(gen_batches);
    if (gen_seconds > 0) row.gen_tokens_per_s = static_cast<double>(gen_tokens) / gen_seconds;
    if (!std::isfinite(loss)) throw std::runtime_error("eval loss is not finite at step " + std::to_string(step));
    ctx.store.record_eval(run_id, row, values, samples, images);
    std::ostringstream line;
    line << ctx.progress_prefix << " eval step " << step << ": loss " << loss;
    for (const auto& [name, value] : values) {
      if (name.find('[') == std::string::npos) line << ", " << name << " " << value;
    }
    line << " (" << human_seconds(std::chrono::duration<double>(Clock::now() - t0).count());
    if (row.gen_tokens_per_s) {
      char g[96];
      std::snprintf(g, sizeof g, "; generation %.1f ms to first token, %.0f tok/s", 1e3 * row.gen_first_token_s.value_or(0),
                    *row.gen_tokens_per_s);
      line << g;
    }
    for (const auto& d : decodings) line << "; decode steps: " << d;
    line << ")";
    out << (ctx.interactive ? "\r\033[K" : "") << line.str() << "\n";
  };

  // ---- checkpoints: trainable parameters, optimizer and generator state; written to a temporary folder,
  // renamed into place, then recorded. Older ones beyond keep_checkpoints are removed after the record.
  const fs::path ck_root = ctx.results_dir / "checkpoints" / sanitize(experiment.name) / cell.key.substr(0, 16);
  auto checkpoint = [&](std::int64_t step) {
    char name[32];
    std::snprintf(name, sizeof name, "step-%07lld", static_cast<long long>(step));
    const fs::path dir = ck_root / name;
    fs::path tmp = dir;
    tmp += ".tmp";
    fs::remove_all(tmp);
    fs::create_directories(tmp);
    sdk::write_safetensors(tmp / "trainable.safetensors", sdk::state_dict(*model, /*trainable_only=*/true),
                           {{"format", "pt"}, {"step", std::to_string(step)}});
    torch::save(optimizer.adamw(), (tmp / "optimizer.pt").string());
    const auto rng = sdk::get_rng_state(ctx.device);
    sdk::TensorMap state{{"cpu", rng.cpu}};
    if (rng.device.defined()) state["device"] = rng.device;
    if (auto* scaler = optimizer.scaler()) {
      for (const auto& [k, v] : scaler->state()) state[k] = v.cpu();
    }
    sdk::write_safetensors(tmp / "rng.safetensors", state);
    // Every checkpoint of a LoRA run is also a PEFT adapter, per component.
    for (const auto& [part, writable] : adapters) {
      if (writable) sdk::write_peft_adapter(component(*model, part).module(), part, tmp / "adapters" / part, adapter_extra(part));
    }
    sdk::write_json(tmp / "state.json", {{"step", step}, {"experiment", experiment.name}, {"cell_key", cell.key}});
    fs::remove_all(dir);
    fs::rename(tmp, dir);
    const auto sha = sdk::sha256_file(dir / "trainable.safetensors");
    auto existing = ctx.store.checkpoints(run_id);
    std::vector<std::string> dropped;
    const auto keep = static_cast<std::size_t>(tc.keep_checkpoints);
    if (existing.size() + 1 > keep) {
      for (std::size_t i = 0; i + keep < existing.size() + 1; ++i) {
        if (existing[i].path != dir.string()) dropped.push_back(existing[i].path);
      }
    }
    ctx.store.record_checkpoint(run_id, {step, "main", dir.string(), sha}, dropped);
    for (const auto& p : dropped) fs::remove_all(p);
  };

  // ---- a decoding sweep: the training run's final weights, evaluated once with this cell's decoding.
  if (cell.decode_only) {
    load_trainable(*model, checkpoint_dir);
    out << "  evaluating " << checkpoint_dir.string() << " with " << ec.generate.to_json().dump()
        << (ec.postprocess.empty() ? "" : ", postprocess " + sdk::Json(ec.postprocess).dump()) << "\n";
    evaluate(tc.steps);
    ctx.store.set_status(run_id, store::Status::done);
    return Outcome::done;
  }
  if (start == 0 && ec.at_start) evaluate(0);

  // ---- the loop
  TrainSteps steps(*model, optimizer.params(), tc, ctx.device, ctx.train_graph);
  if (steps.fixed_shapes()) out << "  training steps: " << steps.describe() << "\n";
  struct StepBatches {
    std::vector<TrainBatch> micro;
    std::vector<LossInputs> inputs;  // as the loss reads them (TrainSteps::prepare)
  };
  std::mutex order_mu;
  auto produce = [&](std::int64_t step) {
    std::vector<std::pair<std::size_t, std::size_t>> idx;  // (dataset, index)
    {
      std::lock_guard<std::mutex> lock(order_mu);
      for (std::int64_t j = 0; j < per_step; ++j) idx.push_back(order.at(static_cast<std::uint64_t>((step - 1) * per_step + j)));
    }
    std::vector<TrainBatch> micro;
    for (std::int64_t m = 0; m < tc.grad_accum; ++m) {
      std::vector<Example> examples;
      std::vector<std::pair<std::size_t, std::size_t>> rows;  // (dataset, index) of each sample taken
      for (std::int64_t j = 0; j < tc.batch_size; ++j) {
        const auto [source, i] = idx[static_cast<std::size_t>(m * tc.batch_size + j)];
        // A sample that cannot be made (on_bad_sample = "skip") is replaced by the next one in its dataset
        // that can: deterministic, so a resumed run draws the same batches.
        const auto count = train_set.count(source);
        std::optional<sdk::Sample> sample;
        std::size_t k = 0;
        for (; k < count && !sample; ++k) sample = train_set.get(source, (i + k) % count);
        if (!sample) {
          throw sdk::InputError(data_where(source) + ": " + cell.train_data.sources[source].plugin.display +
                                ": no sample of the training set can be made (each was skipped: on_bad_sample = \"skip\")");
        }
        rows.emplace_back(source, (i + k - 1) % count);
        examples.push_back(collator.prepare(std::move(*sample), /*with_pixels=*/features.train.empty()));
      }
      auto b = collator.train_batch(examples);
      if (!features.train.empty()) b.rows = std::move(rows);  // features gathered when the step runs
      micro.push_back(std::move(b));
    }
    auto inputs = steps.prepare(micro);
    for (auto& b : micro) b.pixels = torch::Tensor();  // the inputs hold them (pinned on CUDA): not twice
    StepBatches batches{std::move(micro), std::move(inputs)};
    if (ctx.device.is_cuda()) {
      // Pinned, the step's copies to the device are queued without waiting for the device (VlmModel::assemble).
      for (auto& in : batches.inputs) {
        for (auto* t : in.tensors()) {
          if (t->defined()) *t = t->pin_memory();
        }
      }
    }
    return batches;
  };
  Prefetcher<StepBatches> stream(start + 1, tc.steps + 1, ctx.workers, 4, produce);


  model->train();
  std::vector<PendingStep> pending;
  auto interval_start = Clock::now();
  const auto loop_start = Clock::now();
  std::int64_t steps_done = 0;
  Outcome outcome = Outcome::done;
  std::string diverged_at;

  auto flush = [&](std::int64_t step) -> bool {
    // The values first: reading them waits for the device, so the interval (and the samples/s and tokens/s
    // stored) covers the device's work on these steps, not only the host's queuing of it, which is all of a
    // step's host time with a CUDA graph (about a millisecond) and ends before the device is done in any case.
    std::vector<std::pair<double, double>> values;  // (loss, gradient norm) of each pending step
    for (const auto& p : pending) values.emplace_back(p.loss.item<double>(), p.grad_norm.item<double>());
    const double secs = std::chrono::duration<double>(Clock::now() - interval_start).count();
    std::int64_t samples = 0, tokens = 0;
    for (const auto& p : pending) {
      samples += p.samples;
      tokens += p.tokens;
    }
    std::vector<store::StepRow> rows;
    double last_loss = 0;
    bool finite = true;
    const double elapsed = std::chrono::duration<double>(Clock::now() - run_start).count();
    for (std::size_t i = 0; i < pending.size(); ++i) {
      const auto& p = pending[i];
      const auto [loss, grad_norm] = values[i];
      if (!std::isfinite(loss)) {
        finite = false;
        diverged_at = "loss became " + std::string(std::isnan(loss) ? "nan" : "inf") + " at step " + std::to_string(p.step);
        break;
      }
      if (!std::isfinite(grad_norm) && !p.skipped) {
        finite = false;
        diverged_at = "gradient norm became " + std::string(std::isnan(grad_norm) ? "nan" : "inf") + " at step " + std::to_string(p.step);
        break;
      }
      store::StepRow r;
      r.step = p.step;
      r.split = "train";
      r.loss = loss;
      r.lr = p.lr;
      if (std::isfinite(grad_norm)) r.grad_norm = grad_norm;  // an fp16 step skipped for overflow has none
      r.tokens = p.tokens;
      r.loss_tokens = p.loss_tokens;
      r.samples_per_s = secs > 0 ? samples / secs : 0;
      r.tokens_per_s = secs > 0 ? tokens / secs : 0;
      r.elapsed_s = elapsed;
      rows.push_back(r);
      last_loss = loss;
    }
    ctx.store.record_steps(run_id, rows);
    if (!rows.empty()) {
      const double per = std::chrono::duration<double>(Clock::now() - loop_start).count() / static_cast<double>(steps_done);
      char line[320];
      std::snprintf(line, sizeof line, "%s step %lld/%lld  loss %.4f  lr %.2e  %.1f samples/s  %.0f tok/s  eta %s",
                    ctx.progress_prefix.c_str(), static_cast<long long>(step), static_cast<long long>(tc.steps), last_loss,
                    rows.back().lr.value_or(0), rows.back().samples_per_s.value_or(0), rows.back().tokens_per_s.value_or(0),
                    human_seconds(per * static_cast<double>(tc.steps - step)).c_str());
      std::string grid;
      if (ctx.grid.planned > 0 && ctx.grid.done > 0) {
        const double secs_per = std::chrono::duration<double>(Clock::now() - ctx.grid.start).count() / static_cast<double>(ctx.grid.done);
        const auto left = std::max<std::int64_t>(0, ctx.grid.planned - ctx.grid.done);
        char g[96];
        std::snprintf(g, sizeof g, "  | grid %.0f%% eta %s", 100.0 * static_cast<double>(std::min(ctx.grid.done, ctx.grid.planned)) / static_cast<double>(ctx.grid.planned),
                      human_seconds(secs_per * static_cast<double>(left)).c_str());
        grid = g;
      }
      out << (ctx.interactive ? "\r\033[K" : "") << line << grid << (ctx.interactive ? "" : "\n") << std::flush;
    }
    pending.clear();
    interval_start = Clock::now();
    return finite;
  };

  const auto op_profile = OpProfile::from_env();
  for (std::int64_t step = start + 1; step <= tc.steps; ++step) {
    if (ctx.interrupted && ctx.interrupted->load()) {
      flush(step - 1);
      outcome = Outcome::interrupted;
      break;
    }
    auto batches = stream.next();
    const auto& micro = batches.micro;
    std::int64_t loss_tokens = 0, tokens = 0, samples = 0;
    for (const auto& b : micro) {
      loss_tokens += b.loss_tokens;
      tokens += b.text_tokens;
      samples += b.samples;
    }
    // A sample whose every target token max_text_tokens cuts would train on nothing, silently.
    for (const auto& b : micro) {
      if (!b.no_loss.empty()) {
        throw sdk::InputError(sdk::locate(*cell.where, "/train/max_text_tokens", experiment.file.string()) +
                              ": train.max_text_tokens = " + std::to_string(tc.max_text_tokens) + " leaves sample " +
                              b.no_loss.front() + " (step " + std::to_string(step) + ") without a single loss token");
      }
    }
    if (loss_tokens == 0) {
      throw sdk::InputError(cell.train_data.display() + ": the batch of step " + std::to_string(step) +
                            " has no loss tokens (train.max_text_tokens = " + std::to_string(tc.max_text_tokens) +
                            " truncates every target)");
    }
    // Cached features are gathered here, not on the data threads: prefetched batches hold no device memory.
    if (!features.train.empty()) {
      for (std::size_t m = 0; m < micro.size(); ++m) batches.inputs[m].features = features.gather(micro[m].rows, ctx.device);
    }
    if (op_profile) op_profile->before_step(step);
    const auto step_loss = steps.run(batches.inputs, loss_tokens, optimizer.scaler(), out);
    const auto result = optimizer.step(step - 1);
    if (op_profile) {
      step_loss.item<double>();  // the step's work done (a device synchronisation, only when profiling)
      op_profile->after_step(step, out);
    }
    pending.push_back({step, step_loss, result.lr, result.grad_norm, samples, tokens, loss_tokens, result.skipped});
    ++steps_done;
    ++ctx.grid.done;

    const bool last = step == tc.steps;
    const bool do_eval = last || (ec.every > 0 && step % ec.every == 0);
    const bool do_ckpt = last || (tc.checkpoint_every > 0 && step % tc.checkpoint_every == 0);
    if (last || do_eval || do_ckpt || step % tc.log_every == 0) {
      if (!flush(step)) {
        outcome = Outcome::diverged;
        break;
      }
    }
    if (do_eval) evaluate(step);
    if (do_ckpt) checkpoint(step);
    if (do_eval || do_ckpt) interval_start = Clock::now();  // samples/s measures training steps alone
  }

  if (outcome == Outcome::diverged) {
    out << (ctx.interactive ? "\n" : "") << ctx.progress_prefix << " diverged: " << diverged_at << "\n";
    ctx.store.set_status(run_id, store::Status::diverged, diverged_at);
    return outcome;
  }
  if (outcome == Outcome::interrupted) {
    ctx.store.set_status(run_id, store::Status::interrupted, "interrupted by a signal");
    return outcome;
  }

  // ---- from here on weights are merged and written: the frozen ones as they were loaded, in float32.
  frozen_low.restore();
  // ---- PEFT adapters, before anything is merged.
  for (auto it = cell.export_adapters.begin(); it != cell.export_adapters.end(); ++it) {
    const auto dir = sdk::resolve_path(experiment.base_dir, it.value().get<std::string>());
    sdk::write_peft_adapter(component(*model, it.key()).module(), it.key(), dir, adapter_extra(it.key()));
    out << "  exported the " << it.key() << "'s adapter to " << dir.string() << "\n";
  }
  // ---- a stage leaves what it changed (LoRA merged) for the stages after it.
  if (cell.stage_count > 1) {
    const fs::path file = ck_root / "final.safetensors";
    sdk::write_safetensors(file, stage_changes(*model), {{"format", "pt"}, {"stage", cell.stage_name}});
    ctx.store.set_final(run_id, file.string(), sdk::sha256_file(file));
  }
  // ---- export in Hugging Face layout, adapters merged into the weights they adapt.
  for (auto it = cell.export_dirs.begin(); it != cell.export_dirs.end(); ++it) {
    const auto dir = sdk::resolve_path(experiment.base_dir, it.value().get<std::string>());
    export_component(component(*model, it.key()), dir);
    out << "  exported " << it.key() << " to " << dir.string() << "\n";
  }
  ctx.store.set_status(run_id, store::Status::done);
  return outcome;
}

}  // namespace ablate
