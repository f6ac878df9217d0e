#include "grid/experiment.hpp"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <set>
#include <sstream>

#include <toml++/toml.h>

#include "ablate/sdk/adapters.hpp"
#include "ablate/sdk/hash.hpp"
#include "ablate/sdk/weights.hpp"
#include "host/plugin_host.hpp"

namespace ablate {

namespace fs = std::filesystem;

namespace {

// TOML -> JSON, remembering the line of every value by its JSON pointer.
Json to_json(const toml::node& node, const std::string& pointer, const std::string& file, sdk::SourceMap& where) {
  where[pointer] = {file, static_cast<int>(node.source().begin.line)};
  if (const auto* t = node.as_table()) {
    Json out = Json::object();
    for (const auto& [k, v] : *t) {
      const std::string key(k.str());
      out[key] = to_json(v, pointer + "/" + sdk::pointer_token(key), file, where);
    }
    return out;
  }
  if (const auto* a = node.as_array()) {
    Json out = Json::array();
    std::size_t i = 0;
    for (const auto& v : *a) out.push_back(to_json(v, pointer + "/" + std::to_string(i++), file, where));
    return out;
  }
  if (const auto* s = node.as_string()) return s->get();
  if (const auto* i = node.as_integer()) return i->get();
  if (const auto* f = node.as_floating_point()) return f->get();
  if (const auto* b = node.as_boolean()) return b->get();
  std::ostringstream os;  // dates and times: kept as their TOML text
  if (const auto* d = node.as_date()) os << d->get();
  else if (const auto* t = node.as_time()) os << t->get();
  else if (const auto* dt = node.as_date_time()) os << dt->get();
  return os.str();
}

std::string format_number(double v) {
  std::ostringstream os;
  os.precision(6);
  os << v;
  return os.str();
}

// Strings in lists of plugin tables are shorthand for { plugin = "..." }.
void normalise_plugin_list(Json& list) {
  if (!list.is_array()) return;
  for (auto& item : list) {
    if (item.is_string()) item = Json{{"plugin", item.get<std::string>()}};
  }
}

// Keys that do not change what a run computes; left out of the cell key so changing them reruns nothing.
const std::vector<std::string> kUnhashed = {"/experiment/name", "/experiment/description", "/experiment/requires",
                                            "/train/log_every", "/train/checkpoint_every", "/train/keep_checkpoints"};

}  // namespace

Json GenerateConfig::to_json() const {
  Json j = {{"max_new_tokens", max_new_tokens}, {"do_sample", do_sample}, {"stop", stop}};
  if (do_sample) {
    j["temperature"] = temperature;
    j["top_p"] = top_p;
    j["top_k"] = top_k;
  }
  return j;
}

std::string value_label(const Json& v) {
  if (v.is_string()) return v.get<std::string>();
  if (v.is_number_float()) return format_number(v.get<double>());
  if (v.is_array()) {
    std::string out;
    for (const auto& item : v) out += (out.empty() ? "" : "+") + value_label(item);
    return out;
  }
  if (v.is_object()) {
    std::string out = v.contains("plugin") ? value_label(v["plugin"]) : std::string();
    std::string args;
    for (auto it = v.begin(); it != v.end(); ++it) {
      if (it.key() == "plugin") continue;
      args += (args.empty() ? "" : ",") + it.key() + "=" + value_label(it.value());
    }
    return args.empty() ? out : out + "(" + args + ")";
  }
  return v.dump();
}

TrainConfig parse_train_config(sdk::Options& t) {
  TrainConfig c;
  c.steps = t.get("steps", c.steps);
  c.batch_size = t.get("batch_size", c.batch_size);
  c.grad_accum = t.get("grad_accum", c.grad_accum);
  c.lr = t.get("lr", c.lr);
  c.weight_decay = t.get("weight_decay", c.weight_decay);
  auto betas = t.get("betas", std::vector<double>{c.beta1, c.beta2});
  if (betas.size() != 2) t.fail("betas", "must hold two numbers");
  c.beta1 = betas[0];
  c.beta2 = betas[1];
  c.eps = t.get("eps", c.eps);
  c.max_grad_norm = t.get("max_grad_norm", c.max_grad_norm);
  auto s = t.table("schedule");
  c.schedule.kind = s.get("kind", c.schedule.kind);
  c.schedule.warmup_ratio = s.get("warmup_ratio", c.schedule.warmup_ratio);
  c.schedule.warmup_steps = s.get("warmup_steps", c.schedule.warmup_steps);
  c.checkpoint_every = t.get("checkpoint_every", c.checkpoint_every);
  c.keep_checkpoints = t.get("keep_checkpoints", c.keep_checkpoints);
  c.log_every = t.get("log_every", c.log_every);
  c.max_text_tokens = t.get("max_text_tokens", c.max_text_tokens);
  c.loss_on = t.get("loss_on", c.loss_on);
  c.precision = t.get("precision", c.precision);
  c.tf32 = t.get("tf32", c.tf32);
  // gradient_checkpointing = true (every component that has a layer stack) or a list of components.
  const Json gc = t.get("gradient_checkpointing", Json(false));
  if (gc.is_boolean()) {
    if (gc.get<bool>()) c.gradient_checkpointing = {"encoder", "backbone"};
  } else if (gc.is_array() && std::all_of(gc.begin(), gc.end(), [](const Json& v) { return v.is_string(); })) {
    for (const auto& v : gc) {
      const auto part = v.get<std::string>();
      if (part != "encoder" && part != "projector" && part != "backbone") {
        t.fail("gradient_checkpointing", "'" + part + "' is not a component (encoder, projector, backbone)");
      }
      c.gradient_checkpointing.push_back(part);
    }
  } else {
    t.fail("gradient_checkpointing", "must be true, false or a list of components ([\"encoder\", \"backbone\"])");
  }
  // Upper bounds: far beyond any run, and what keeps a typo from a step loop or a batch that cannot be held.
  if (c.steps <= 0 || c.steps > 1'000'000'000) t.fail("steps", "must be from 1 to 1000000000");
  if (c.batch_size <= 0 || c.batch_size > 65536) t.fail("batch_size", "must be from 1 to 65536");
  if (c.grad_accum <= 0 || c.grad_accum > 65536) t.fail("grad_accum", "must be from 1 to 65536");
  if (!(c.lr > 0) || !std::isfinite(c.lr)) t.fail("lr", "must be positive and finite");
  if (!(c.weight_decay >= 0) || !std::isfinite(c.weight_decay)) t.fail("weight_decay", "must be finite and not negative");
  if (!(c.beta1 >= 0 && c.beta1 < 1 && c.beta2 >= 0 && c.beta2 < 1)) t.fail("betas", "each must be in [0, 1)");
  if (!(c.eps >= 0) || !std::isfinite(c.eps)) t.fail("eps", "must be finite and not negative");
  if (std::isnan(c.max_grad_norm)) t.fail("max_grad_norm", "must be a number (0 or less: no clipping)");
  if (c.schedule.warmup_steps < -1) s.fail("warmup_steps", "must not be negative");
  if (c.schedule.kind != "constant" && c.schedule.kind != "linear" && c.schedule.kind != "cosine") {
    s.fail("kind", "must be \"constant\", \"linear\" or \"cosine\"");
  }
  if (c.schedule.warmup_ratio < 0 || c.schedule.warmup_ratio >= 1) s.fail("warmup_ratio", "must be in [0, 1)");
  if (c.checkpoint_every < 0) t.fail("checkpoint_every", "must be 0 (only at the end) or positive");
  if (c.keep_checkpoints < 1) t.fail("keep_checkpoints", "must be at least 1");
  if (c.log_every <= 0) t.fail("log_every", "must be positive");
  if (c.max_text_tokens < 2) t.fail("max_text_tokens", "must be at least 2");
  if (c.loss_on != "target" && c.loss_on != "text") t.fail("loss_on", "must be \"target\" or \"text\"");
  if (c.precision != "fp32" && c.precision != "bf16" && c.precision != "fp16") {
    t.fail("precision", "must be \"fp32\", \"bf16\" or \"fp16\"");
  }
  return c;
}

std::string DataRef::display() const {
  const auto& d = sources.front().plugin.display;
  return mixture() ? d.substr(0, d.rfind('[')) : d;
}

std::vector<const PluginRef*> Cell::plugins() const {
  std::vector<const PluginRef*> out = {&encoder, &projector, &backbone};
  for (const auto* data : {&train_data, &eval_data}) {
    for (const auto& s : data->sources) out.push_back(&s.plugin);
  }
  for (const auto& r : strategies) out.push_back(&r);
  for (const auto& r : eval.metrics) out.push_back(&r);
  return out;
}

sdk::Options Cell::options(const PluginRef& ref) const {
  return sdk::Options(config.at(Json::json_pointer(ref.pointer)), ref.pointer, ref.display, where);
}

namespace {

PluginRef plugin_ref(sdk::Options& table, sdk::Kind kind, const std::string& pointer, const PluginHost& host) {
  PluginRef ref;
  ref.kind = kind;
  ref.pointer = pointer;
  ref.display = table.display();
  ref.id = table.require<std::string>("plugin");
  ref.version = host.require(kind, ref.id, table.where("plugin") + ": " + table.display() + ".plugin").version;
  // Plugins read an empty weights path as none and would build a default-sized model from scratch.
  if (table.has("weights") && table.require<std::string>("weights").empty()) {
    table.fail("weights", "an empty path (leave weights out to build the model from its config)");
  }
  host.parse(kind, ref.id, table);
  return ref;
}

PluginRef component(sdk::Options& model, const char* name, sdk::Kind kind, const PluginHost& host) {
  if (!model.has(name)) model.fail(name, "missing (a table with at least plugin = \"...\")");
  auto t = model.table(name);
  return plugin_ref(t, kind, std::string("/model/") + name, host);
}

DataSource data_source(sdk::Options& t, const std::string& pointer, const PluginHost& host) {
  DataSource src;
  src.limit = t.get("limit", std::int64_t{0});
  if (src.limit < 0) t.fail("limit", "must be 0 (all) or positive");
  src.on_bad_sample = t.get("on_bad_sample", src.on_bad_sample);
  if (src.on_bad_sample != "fail" && src.on_bad_sample != "skip") t.fail("on_bad_sample", "must be \"fail\" or \"skip\"");
  src.plugin = plugin_ref(t, sdk::Kind::dataset, pointer, host);
  return src;
}

// [data] train / eval: a table (one dataset) or an array of tables (a mixture, each with `weight` and `name`).
DataRef data_ref(sdk::Options& data, const char* name, const PluginHost& host) {
  if (!data.has(name)) data.fail(name, "missing (a table with at least plugin = \"...\", or an array of such tables)");
  DataRef ref;
  const std::string pointer = std::string("/data/") + name;
  if (!data.is_list(name)) {
    auto t = data.table(name);
    ref.sources.push_back(data_source(t, pointer, host));
    ref.sources.back().name = ref.sources.back().plugin.id;
    return ref;
  }
  auto tables = data.list(name);
  if (tables.empty()) data.fail(name, "an empty mixture (give at least one dataset table)");
  std::set<std::string> names;
  for (std::size_t i = 0; i < tables.size(); ++i) {
    auto& t = tables[i];
    auto src = data_source(t, pointer + "/" + std::to_string(i), host);
    src.weight = t.get("weight", src.weight);
    if (!(src.weight > 0) || !std::isfinite(src.weight)) t.fail("weight", "must be a positive number");
    src.name = t.get("name", src.plugin.id);
    if (src.name.empty() || src.name.find('/') != std::string::npos) t.fail("name", "must be non-empty and contain no '/'");
    if (!names.insert(src.name).second) {
      t.fail(t.has("name") ? "name" : "plugin", "'" + src.name + "' names two datasets of the mixture (set name = \"...\" to tell them apart)");
    }
    ref.sources.push_back(std::move(src));
  }
  return ref;
}

EvalConfig eval_config(sdk::Options& e, const PluginHost& host) {
  EvalConfig c;
  c.every = e.get("every", c.every);
  c.at_start = e.get("at_start", c.at_start);
  if (e.raw("samples").is_string()) {  // "all": every evaluated sample is stored (what `runner ensemble` votes on)
    if (e.raw("samples") != "all") e.fail("samples", "must be a count or \"all\"");
    c.samples = -1;
  } else {
    c.samples = e.get("samples", c.samples);
  }
  c.batch_size = e.get("batch_size", c.batch_size);
  auto g = e.table("generate");
  c.generate.max_new_tokens = g.get("max_new_tokens", c.generate.max_new_tokens);
  c.generate.do_sample = g.get("do_sample", c.generate.do_sample);
  c.generate.temperature = g.get("temperature", c.generate.temperature);
  c.generate.top_p = g.get("top_p", c.generate.top_p);
  c.generate.top_k = g.get("top_k", c.generate.top_k);
  c.generate.stop = g.get("stop", c.generate.stop);
  c.group_by = e.get("group_by", c.group_by);
  c.postprocess = e.get("postprocess", c.postprocess);
  for (const auto& step : c.postprocess) {
    if (step != "first_line" && step != "strip" && step != "lowercase") {
      e.fail("postprocess", "'" + step + "' is not one of first_line, strip, lowercase");
    }
  }
  if (c.every < 0) e.fail("every", "must be 0 (only at the end) or positive");
  if (c.samples < -1) e.fail("samples", "must not be negative (or \"all\")");
  if (c.batch_size <= 0 || c.batch_size > 65536) e.fail("batch_size", "must be from 1 to 65536");
  if (c.generate.max_new_tokens <= 0) g.fail("max_new_tokens", "must be positive");
  if (!(c.generate.temperature > 0)) g.fail("temperature", "must be positive");
  if (!(c.generate.top_p > 0 && c.generate.top_p <= 1)) g.fail("top_p", "must be in (0, 1]");
  if (c.generate.top_k < 0) g.fail("top_k", "must not be negative");
  auto metrics = e.list("metrics");
  for (std::size_t i = 0; i < metrics.size(); ++i) {
    c.metrics.push_back(plugin_ref(metrics[i], sdk::Kind::metric, "/eval/metrics/" + std::to_string(i), host));
  }
  return c;
}

void resolve(Cell& cell, const std::string& file, const PluginHost& host) {
  normalise_plugin_list(cell.config["strategy"]);
  if (cell.config.contains("eval") && cell.config["eval"].is_object() && cell.config["eval"].contains("metrics")) {
    normalise_plugin_list(cell.config["eval"]["metrics"]);
  }
  if (!cell.config.contains("strategy") || cell.config["strategy"].empty()) cell.config.erase("strategy");

  sdk::Options root(cell.config, "", "", cell.where, file);
  auto ex = root.table("experiment");
  cell.name = ex.require<std::string>("name");
  cell.seed = static_cast<std::uint64_t>(ex.get("seed", std::int64_t{0}));
  (void)ex.get("description", std::string());
  (void)ex.get("requires", std::vector<std::string>());

  auto strategies = root.list("strategy");
  if (strategies.empty()) {
    root.fail("strategy", "missing: say what trains, e.g. strategy = [\"projector\"] (before the first table, or in [grid])");
  }
  for (std::size_t i = 0; i < strategies.size(); ++i) {
    // lr and weight_decay belong to the host: the parameters this strategy trains form their own group.
    StrategyGroup g;
    g.lr = strategies[i].maybe<double>("lr");
    g.weight_decay = strategies[i].maybe<double>("weight_decay");
    if (g.lr && !(*g.lr > 0)) strategies[i].fail("lr", "must be positive");
    if (g.weight_decay && *g.weight_decay < 0) strategies[i].fail("weight_decay", "must not be negative");
    cell.strategy_groups.push_back(g);
    cell.strategies.push_back(plugin_ref(strategies[i], sdk::Kind::strategy, "/strategy/" + std::to_string(i), host));
  }

  auto model = root.table("model");
  cell.layout = model.get("layout", cell.layout);
  if (cell.layout != "prefix" && cell.layout != "inline" && cell.layout != "prefix_lm") {
    model.fail("layout", "must be \"prefix\" (GIT), \"inline\" (LLaVA) or \"prefix_lm\" (PaliGemma)");
  }
  if (cell.layout == "inline") cell.image_token = model.get("image_token", cell.image_token);
  cell.encoder = component(model, "encoder", sdk::Kind::encoder, host);
  cell.projector = component(model, "projector", sdk::Kind::projector, host);
  cell.backbone = component(model, "backbone", sdk::Kind::backbone, host);

  auto data = root.table("data");
  cell.train_data = data_ref(data, "train", host);
  cell.eval_data = data_ref(data, "eval", host);

  auto train = root.table("train");
  cell.train = parse_train_config(train);
  auto eval = root.table("eval");
  cell.eval = eval_config(eval, host);

  auto exp = root.table("export");
  for (const char* part : {"encoder", "projector", "backbone"}) {
    if (auto dir = exp.maybe<std::string>(part)) cell.export_dirs[part] = *dir;
    if (auto dir = exp.maybe<std::string>(std::string(part) + "_adapter")) cell.export_adapters[part] = *dir;
  }
  root.finish();
  cell.resolved = root.resolved();
}

// One grid axis's value in a cell, and the stage it sets (-1: the whole cell).
struct AxisValue {
  std::string name;
  Json value;
  std::int64_t stage = -1;
};

// A stage's configuration is the file's with the stage's tables merged over it: tables merge key by key,
// except that a table naming another plugin replaces the file's (its options would not fit); anything else
// (values, lists such as strategy) replaces.
Json merge_over(const Json& base, const Json& over) {
  if (!base.is_object() || !over.is_object()) return over;
  if (base.contains("plugin") && over.contains("plugin") && base["plugin"] != over["plugin"]) return over;
  Json out = base;
  for (auto it = over.begin(); it != over.end(); ++it) out[it.key()] = out.contains(it.key()) ? merge_over(out[it.key()], *it) : *it;
  return out;
}

// [[stages]]: the cell becomes its last stage, with the earlier ones resolved in cell.before.
void expand_stages(Cell& cell, const std::vector<AxisValue>& axes, const std::string& file, const PluginHost& host) {
  const auto& where = *cell.where;
  auto at = [&](const std::string& ptr) { return sdk::locate(where, ptr, file); };
  const Json stages = cell.config["stages"];
  if (!stages.is_array() || stages.empty() ||
      !std::all_of(stages.begin(), stages.end(), [](const Json& st) { return st.is_object(); })) {
    throw sdk::InputError(at("/stages") + ": stages: expected one or more [[stages]] tables");
  }
  Json base = cell.config;
  base.erase("stages");
  const auto n = static_cast<std::int64_t>(stages.size());
  static const std::set<std::string> allowed = {"name", "strategy", "data", "train", "eval"};
  std::vector<Cell> built;
  std::set<std::string> names;
  for (std::int64_t i = 0; i < n; ++i) {
    const Json& st = stages[static_cast<std::size_t>(i)];
    const std::string ptr = "/stages/" + std::to_string(i);
    std::string name = "stage-" + std::to_string(i + 1);
    if (st.contains("name")) {
      if (!st["name"].is_string() || st["name"].get<std::string>().empty()) {
        throw sdk::InputError(at(ptr + "/name") + ": stages.name: must be a non-empty string");
      }
      name = st["name"].get<std::string>();
    }
    if (!names.insert(name).second) throw sdk::InputError(at(ptr) + ": stages: two stages are called '" + name + "'");
    Json over = st;
    over.erase("name");
    for (auto it = over.begin(); it != over.end(); ++it) {
      if (!allowed.count(it.key())) {
        throw sdk::InputError(at(ptr + "/" + sdk::pointer_token(it.key())) + ": stages." + name + "." + it.key() +
                              ": a stage sets strategy, data, train and eval; the model and export belong to the whole cell");
      }
    }
    Cell sc;
    sc.index = cell.index;
    sc.config = merge_over(base, over);
    if (i + 1 < n) sc.config.erase("export");  // the last stage exports the cell's result
    // The stage's values are now the configuration's: move their positions there.
    auto map = std::make_shared<sdk::SourceMap>(where);
    for (auto it = where.lower_bound(ptr + "/"); it != where.end() && it->first.compare(0, ptr.size() + 1, ptr + "/") == 0; ++it) {
      (*map)[it->first.substr(ptr.size())] = it->second;
    }
    sc.where = map;
    sc.stage_name = name;
    sc.stage_index = i;
    sc.stage_count = n;
    resolve(sc, file, host);
    // Only the axes that reach this stage describe it: those of the whole cell and of stages up to it.
    std::string label;
    for (const auto& a : axes) {
      if (a.stage > i) continue;
      sc.axes[a.name] = a.value;
      label += (label.empty() ? "" : ", ") + a.name + "=" + value_label(a.value);
    }
    sc.label = "stage " + std::to_string(i + 1) + "/" + std::to_string(n) + " " + name + (label.empty() ? "" : ": " + label);
    built.push_back(std::move(sc));
  }
  Cell last = std::move(built.back());
  built.pop_back();
  last.label = cell.label;
  last.axes = cell.axes;
  last.before = std::move(built);
  cell = std::move(last);
}

}  // namespace

Experiment load_experiment(const fs::path& file, const PluginHost& host) {
  Experiment ex;
  ex.file = file;
  ex.base_dir = fs::absolute(file).parent_path();
  {
    std::ifstream in(file, std::ios::binary);
    if (!in) throw sdk::InputError(file.string() + ": cannot open experiment (missing or unreadable)");
    std::ostringstream ss;
    ss << in.rdbuf();
    ex.text = ss.str();
  }
  ex.text_sha256 = sdk::sha256_hex(ex.text);
  toml::table doc;
  try {
    doc = toml::parse(ex.text, file.string());
  } catch (const toml::parse_error& e) {
    std::ostringstream os;
    os << file.string() << ":" << e.source().begin.line << ": " << e.description();
    throw sdk::InputError(os.str());
  }
  auto where = std::make_shared<sdk::SourceMap>();
  Json base = to_json(doc, "", file.string(), *where);

  // [grid]: each key addresses the configuration (dotted keys for nested tables); values are arrays.
  struct Axis {
    std::string name;
    std::vector<std::string> path;
    Json values;
    int line;
  };
  std::vector<Axis> axes;
  if (base.contains("grid")) {
    if (!base["grid"].is_object()) throw sdk::InputError(sdk::locate(*where, "/grid", file.string()) + ": grid: must be a table");
    for (auto it = base["grid"].begin(); it != base["grid"].end(); ++it) {
      const std::string ptr = "/grid/" + sdk::pointer_token(it.key());
      if (!it->is_array() || it->empty()) {
        throw sdk::InputError(sdk::locate(*where, ptr, file.string()) + ": grid." + it.key() + ": expected a non-empty array of values");
      }
      Axis a{it.key(), {}, *it, (*where)[ptr].line};
      std::stringstream ss(it.key());
      for (std::string part; std::getline(ss, part, '.');) {
        if (part.empty()) throw sdk::InputError(sdk::locate(*where, ptr, file.string()) + ": grid." + it.key() + ": empty key segment");
        a.path.push_back(part);
      }
      if (a.path.front() == "grid") throw sdk::InputError(sdk::locate(*where, ptr, file.string()) + ": grid: an axis cannot address grid");
      axes.push_back(std::move(a));
    }
    base.erase("grid");
    std::sort(axes.begin(), axes.end(), [](const Axis& a, const Axis& b) { return a.line < b.line; });
  }
  for (const auto& a : axes) ex.axes.push_back(a.name);

  // The cartesian product, first axis slowest.
  std::size_t total = 1;
  for (const auto& a : axes) total *= a.values.size();
  // Decoding axes (eval.generate..., eval.postprocess) change only what evaluation does: see Cell::decode_only.
  auto is_decoding = [](const Axis& a) {
    return a.path.size() >= 2 && a.path[0] == "eval" && (a.path[1] == "generate" || a.path[1] == "postprocess");
  };
  const bool sweeps = std::any_of(axes.begin(), axes.end(), is_decoding);
  // Cell n of the product; without_decoding: the decoding axes left at the file's values.
  auto make_cell = [&](std::size_t n, bool without_decoding) {
    Cell cell;
    cell.index = static_cast<std::int64_t>(n);
    cell.config = base;
    auto cell_where = std::make_shared<sdk::SourceMap>(*where);
    std::size_t rest = n;
    std::vector<std::size_t> pick(axes.size());
    for (std::size_t i = axes.size(); i-- > 0;) {
      pick[i] = rest % axes[i].values.size();
      rest /= axes[i].values.size();
    }
    std::string label;
    std::vector<std::int64_t> axis_stage(axes.size(), -1);  // the stage an axis sets, or -1 for the whole cell
    for (std::size_t i = 0; i < axes.size(); ++i) {
      const auto& a = axes[i];
      if (without_decoding && is_decoding(a)) continue;
      const Json& value = a.values[pick[i]];
      auto bad = [&](const std::string& why) {
        return sdk::InputError(file.string() + ":" + std::to_string(a.line) + ": grid." + a.name + ": " + why);
      };
      // Tables by key; arrays of tables ([[stages]]) by index or by their `name`.
      Json* node = &cell.config;
      std::string target;
      for (std::size_t k = 0; k < a.path.size(); ++k) {
        std::string segment = a.path[k];
        if (node->is_array()) {
          std::size_t index = node->size();
          if (!segment.empty() && std::all_of(segment.begin(), segment.end(), ::isdigit)) index = std::stoul(segment);
          for (std::size_t e = 0; e < node->size() && index == node->size(); ++e) {
            if ((*node)[e].is_object() && (*node)[e].value("name", Json()) == segment) index = e;
          }
          if (index >= node->size()) throw bad("'" + segment + "' is neither an index nor the name of an entry of " + a.path[k - 1]);
          if (k == 1 && a.path[0] == "stages") axis_stage[i] = static_cast<std::int64_t>(index);
          target += "/" + std::to_string(index);
          if (k + 1 == a.path.size()) {
            (*node)[index] = value;
          } else {
            node = &(*node)[index];
          }
          continue;
        }
        if (!node->is_object()) throw bad("'" + a.path[k - 1] + "' is not a table");
        target += "/" + sdk::pointer_token(segment);
        if (k + 1 == a.path.size()) {
          (*node)[segment] = value;
        } else {
          if (!node->contains(segment)) (*node)[segment] = Json::object();
          node = &(*node)[segment];
        }
      }
      // Positions of the grid value now describe the cell's value.
      const std::string from = "/grid/" + sdk::pointer_token(a.name) + "/" + std::to_string(pick[i]);
      for (auto it = where->lower_bound(from); it != where->end() && it->first.compare(0, from.size(), from) == 0; ++it) {
        (*cell_where)[target + it->first.substr(from.size())] = it->second;
      }
      cell.axes[a.name] = value;
      label += (label.empty() ? "" : ", ") + a.name + "=" + value_label(value);
    }
    cell.label = label;
    cell.where = cell_where;
    if (cell.config.contains("stages")) {
      std::vector<AxisValue> chosen;
      for (std::size_t i = 0; i < axes.size(); ++i) {
        if (!(without_decoding && is_decoding(axes[i]))) chosen.push_back({axes[i].name, axes[i].values[pick[i]], axis_stage[i]});
      }
      expand_stages(cell, chosen, file.string(), host);
    } else {
      resolve(cell, file.string(), host);
    }
    if (cell.label.empty()) cell.label = cell.name;
    return cell;
  };
  for (std::size_t n = 0; n < total; ++n) {
    if (!sweeps) {
      ex.cells.push_back(make_cell(n, false));
      continue;
    }
    // The training (its stages, if any) without the decoding axes, then a decode-only run after it.
    Cell training = make_cell(n, true);
    Cell decode = make_cell(n, false);
    decode.before = std::move(training.before);
    training.before.clear();
    decode.before.push_back(std::move(training));
    decode.decode_only = true;
    decode.stage_name = "decode";
    decode.stage_index = decode.before.back().stage_count;
    decode.stage_count = decode.stage_index + 1;
    ex.cells.push_back(std::move(decode));
  }

  ex.name = ex.cells.front().name;
  if (ex.cells.size() > 1 && !ex.cells.front().export_dirs.empty()) {
    throw sdk::InputError(sdk::locate(*where, "/export", file.string()) +
                          ": export: a grid of several cells cannot export to one folder");
  }
  Json requires = base.contains("experiment") ? base["experiment"].value("requires", Json::array()) : Json::array();
  for (const auto& r : requires) ex.requires.push_back(sdk::resolve_path(ex.base_dir, r.get<std::string>()));
  return ex;
}

std::string fingerprint_folder(const fs::path& dir) {
  std::vector<fs::path> files;
  for (const auto& entry : fs::recursive_directory_iterator(dir)) {
    if (entry.is_regular_file()) files.push_back(entry.path());
  }
  std::sort(files.begin(), files.end());
  sdk::Sha256 all;
  constexpr std::uintmax_t kWhole = 64ull << 20, kChunk = 4ull << 20;
  std::vector<char> buf(kChunk);
  for (const auto& f : files) {
    const auto size = fs::file_size(f);
    all.update(fs::relative(f, dir).generic_string()).update(std::to_string(size));
    std::ifstream in(f, std::ios::binary);
    auto take = [&](std::uintmax_t offset, std::uintmax_t n) {
      in.seekg(static_cast<std::streamoff>(offset));
      while (n > 0 && in) {
        const auto chunk = std::min<std::uintmax_t>(n, buf.size());
        in.read(buf.data(), static_cast<std::streamsize>(chunk));
        all.update(buf.data(), static_cast<std::size_t>(in.gcount()));
        n -= chunk;
      }
    };
    if (size <= kWhole) {
      take(0, size);
    } else {
      take(0, kChunk);
      take(size / 2, kChunk);
      take(size - kChunk, kChunk);
    }
  }
  return all.hex();
}

namespace {

// The key of one cell (or stage) on its own: its resolved configuration without the keys that do not change
// what a run computes, the plugin versions, and a fingerprint of every folder of weights it reads.
std::string own_key(const Experiment& ex, const Cell& cell) {
  Json hashed = cell.resolved;
  for (const auto& p : kUnhashed) {
    Json::json_pointer jp(p);
    if (hashed.contains(jp)) hashed[jp.parent_pointer()].erase(jp.back());
  }
  // Keys added after runs were recorded count only when they differ from their default, so that adding them
  // left every existing cell's key as it was.
  const Json::json_pointer tf32("/train/tf32");
  if (hashed.contains(tf32) && hashed[tf32] == Json(false)) hashed["train"].erase("tf32");
  Json plugins = Json::object();
  for (const PluginRef* r : cell.plugins()) plugins[r->pointer] = r->qualified() + "@" + std::to_string(r->version);

  // Every `weights` folder the cell reads, fingerprinted: retrained weights make a new cell.
  Json weights = Json::object();
  std::vector<const PluginRef*> readers = {&cell.encoder, &cell.projector, &cell.backbone};
  for (const auto& r : cell.strategies) readers.push_back(&r);
  for (const PluginRef* r : readers) {
    const Json& table = cell.resolved.at(Json::json_pointer(r->pointer));
    if (!table.contains("weights") || !table["weights"].is_string() || table["weights"].get<std::string>().empty()) continue;
    const auto dir = sdk::resolve_path(ex.base_dir, table["weights"].get<std::string>());
    if (!fs::exists(dir)) {
      throw sdk::InputError(sdk::locate(*cell.where, r->pointer + "/weights", ex.file.string()) + ": " + r->display +
                            ".weights: no " + dir.string() +
                            (ex.requires.empty() ? "" : " (should an experiment in [experiment] requires make it?)"));
    }
    // Malformed files are bad input too: find them now, before anything is recorded. Only the JSON and
    // the safetensors headers are read (tensors are memory-mapped, not loaded).
    if (r->kind == sdk::Kind::strategy) {
      (void)sdk::read_peft_config(dir);
      (void)sdk::read_peft_weights(dir);
    } else if (fs::is_directory(dir)) {
      if (fs::exists(dir / "config.json")) (void)sdk::read_json(dir / "config.json");
      (void)sdk::read_weights(dir);
    } else {
      (void)sdk::read_safetensors(dir);
    }
    weights[r->pointer] = fs::is_directory(dir) ? fingerprint_folder(dir) : sdk::sha256_file(dir);
  }
  return sdk::sha256_hex(Json{{"config", hashed}, {"plugins", plugins}, {"weights", weights}}.dump());
}

}  // namespace

void compute_keys(Experiment& ex) {
  for (auto& cell : ex.cells) {
    if (cell.before.empty()) {
      cell.key = own_key(ex, cell);
      continue;
    }
    // A stage's key chains the keys of every stage up to it: equal keys mean equal training so far. An
    // unstaged training run before a decode-only run keeps the key it has on its own.
    std::string chain;
    auto link = [&](Cell& stage) {
      if (stage.decode_only) {
        chain = sdk::sha256_hex(Json{{"after", chain}, {"decode", own_key(ex, stage)}}.dump());
      } else if (stage.stage_count == 1) {
        chain = own_key(ex, stage);
      } else {
        chain = sdk::sha256_hex(Json{{"after", chain}, {"stage", own_key(ex, stage)}}.dump());
      }
      stage.key = chain;
    };
    for (auto& stage : cell.before) link(stage);
    link(cell);
  }
}

}  // namespace ablate
