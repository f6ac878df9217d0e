// Key functions of the SDK's interfaces. Defining them here puts every vtable and type_info in
// libablate_sdk.so, so that dynamic_cast and exceptions work the same in the host and in every plugin.

#include <unistd.h>

#include <iomanip>
#include <sstream>

#include <torch/nn/module.h>

#include "ablate/sdk/registry.hpp"
#include "ablate/sdk/weights.hpp"

namespace ablate::sdk {

Component::~Component() = default;
Json Component::hf_config() const { return nullptr; }
void Component::save_extras(const std::filesystem::path&) const {}
bool Component::set_gradient_checkpointing(bool on) { return !on; }
Encoder::~Encoder() = default;
Projector::~Projector() = default;
Backbone::~Backbone() = default;

std::vector<std::int64_t> eos_token_ids(Options& config, std::optional<std::int64_t> fallback) {
  std::vector<std::int64_t> ids;
  if (!config.has("eos_token_id")) {
    if (fallback) ids.push_back(*fallback);
    return ids;
  }
  const auto& v = config.raw("eos_token_id");
  if (v.is_null()) return ids;
  if (v.is_number_integer()) return {v.get<std::int64_t>()};
  if (v.is_array()) {
    for (const auto& id : v) {
      if (!id.is_number_integer()) break;
      ids.push_back(id.get<std::int64_t>());
    }
    if (ids.size() == v.size()) return ids;
  }
  config.fail("eos_token_id", "expected a token id or a list of token ids, got " + v.dump());
}

GenerationStop GenerationStop::read(const std::filesystem::path& dir, std::vector<std::int64_t> config_ids) {
  const auto file = dir / "generation_config.json";
  if (!std::filesystem::exists(file)) return {std::move(config_ids), nullptr};
  auto doc = read_json(file);
  if (!doc.is_object()) throw InputError(file.string() + ": expected a JSON object");
  auto view = Options::of_file(doc, file.string());
  return {eos_token_ids(view, std::nullopt), std::move(doc)};
}

Json eos_token_json(const std::vector<std::int64_t>& ids) {
  if (ids.empty()) return nullptr;
  return ids.size() == 1 ? Json(ids.front()) : Json(ids);
}

void GenerationStop::save(const std::filesystem::path& dir) const {
  if (!file.is_null()) write_json(dir / "generation_config.json", file);
}

Strategy::~Strategy() = default;
Dataset::~Dataset() = default;
std::vector<std::string> Dataset::vocabulary() const { return {}; }
Json Dataset::report() const { return Json::object(); }
SampleError::~SampleError() = default;
Metric::~Metric() = default;
double Metric::aggregate(const std::vector<double>& scores) const {
  if (scores.empty()) return 0.0;
  double sum = 0.0;
  for (double s : scores) sum += s;
  return sum / static_cast<double>(scores.size());
}
std::vector<MetricValue> Metric::evaluate(const std::vector<std::string>& predictions,
                                          const std::vector<std::vector<std::string>>& references) const {
  MetricValue v;
  v.per_sample = score(predictions, references);
  v.value = aggregate(v.per_sample);
  return {v};
}
Registry::~Registry() = default;

const char* kind_name(Kind kind) {
  switch (kind) {
    case Kind::encoder: return "encoder";
    case Kind::projector: return "projector";
    case Kind::backbone: return "backbone";
    case Kind::strategy: return "strategy";
    case Kind::dataset: return "dataset";
    case Kind::metric: return "metric";
  }
  return "?";
}

std::filesystem::path resolve_path(const std::filesystem::path& base, const std::string& path) {
  std::filesystem::path p(path);
  if (p.is_absolute() || base.empty()) return p;
  return (base / p).lexically_normal();
}

void check_layers_fit(const std::string& key, std::int64_t layers, double per_layer) {
  const double need = static_cast<double>(layers) * per_layer * 4.0;  // float32, as a stack is first built
  const double have = static_cast<double>(::sysconf(_SC_PHYS_PAGES)) * static_cast<double>(::sysconf(_SC_PAGESIZE));
  if (have <= 0 || need <= have) return;
  std::ostringstream os;
  os << std::fixed << std::setprecision(1) << key << " = " << layers << ": layers of at least "
     << std::setprecision(0) << per_layer << " parameters each need " << std::setprecision(1) << need / (1 << 30)
     << " GiB in float32, more than this machine's " << have / (1 << 30) << " GiB of memory";
  throw std::runtime_error(os.str());
}

TrainTarget::TrainTarget(torch::nn::Module& root, std::string head, std::map<std::string, std::string> model_types)
    : root_(root), head_(std::move(head)), model_types_(std::move(model_types)) {
  for (const auto& item : root_.named_modules("", /*include_self=*/false)) {
    modules_.emplace_back(item.key(), item.value().get());
  }
}

TrainTarget::~TrainTarget() = default;

std::string TrainTarget::model_type(const std::string& name) const {
  const auto it = model_types_.find(name);
  return it == model_types_.end() ? std::string() : it->second;
}

torch::nn::Module* TrainTarget::find(const std::string& name) const {
  if (name.empty()) return &root_;
  for (const auto& [n, m] : modules_) {
    if (n == name) return m;
  }
  return nullptr;
}

std::int64_t TrainTarget::train_parameters(const std::vector<torch::Tensor>& params) {
  for (const auto& p : params) {
    // New to training: frozen until now, or created trainable by the strategy itself (an adapter).
    if (!p.requires_grad() || !groups_.count(p.unsafeGetTensorImpl())) ++newly_trained_;
    p.set_requires_grad(true);
    groups_[p.unsafeGetTensorImpl()] = group_;
  }
  return static_cast<std::int64_t>(params.size());
}

std::int64_t TrainTarget::train(const std::string& name) {
  torch::nn::Module* m = find(name);
  if (!m) throw InputError("no module named '" + name + "' in the assembled model");
  const auto count = train_parameters(m->parameters(/*recurse=*/true));
  if (count == 0) throw InputError("module '" + name + "' has no parameters to train");
  return count;
}

std::int64_t TrainTarget::train(torch::nn::Module& module) { return train_parameters(module.parameters(/*recurse=*/true)); }

}  // namespace ablate::sdk
