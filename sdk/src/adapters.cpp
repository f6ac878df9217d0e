#include "ablate/sdk/adapters.hpp"

#include <algorithm>
#include <regex>
#include <set>

#include "ablate/sdk/error.hpp"

namespace ablate::sdk {

namespace fs = std::filesystem;
using Json = nlohmann::json;

namespace {

constexpr const char* kPrefix = "base_model.model.";

bool ends_with(const std::string& s, const std::string& tail) {
  return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
}

bool full_match(const std::string& pattern, const std::string& name) {
  try {
    return std::regex_match(name, std::regex(pattern));
  } catch (const std::regex_error& e) {
    throw InputError("'" + pattern + "' is not a regular expression: " + e.what());
  }
}

// PEFT's get_pattern_key: the first key such that the name matches "(.*\.)?(key)$".
template <class Map>
const typename Map::mapped_type* pattern_value(const Map& patterns, const std::string& name) {
  for (const auto& [key, value] : patterns) {
    if (full_match("(.*\\.)?(" + key + ")", name)) return &value;
  }
  return nullptr;
}

std::string parent_of(const std::string& name) {
  const auto dot = name.rfind('.');
  return dot == std::string::npos ? std::string() : name.substr(0, dot);
}

bool inside(const std::string& name, const std::string& ancestor) {
  return name.size() > ancestor.size() && name.compare(0, ancestor.size(), ancestor) == 0 && name[ancestor.size()] == '.';
}

}  // namespace

bool peft_matches(const Json& patterns, const std::string& name) {
  if (patterns.is_string()) return full_match(patterns.get<std::string>(), name);
  if (!patterns.is_array()) return false;
  for (const auto& p : patterns) {
    const auto t = p.get<std::string>();
    if (name == t || ends_with(name, "." + t)) return true;
  }
  return false;
}

LoraConfig PeftConfig::for_module(const std::string& name) const {
  LoraConfig c = lora;
  if (const auto* r = pattern_value(rank_pattern, name)) c.r = *r;
  if (const auto* a = pattern_value(alpha_pattern, name)) c.alpha = *a;
  return c;
}

Json peft_default_targets(const std::string& model_type) {
  // Copied from peft 0.21.2's utils/constants.py, entry for entry, so that a third-party backbone plugin that
  // reports one of these model types gets PEFT's choice too.
  static const std::map<std::string, Json> table = {
      {"t5", {"q", "v"}}, {"mt5", {"q", "v"}}, {"bart", {"q_proj", "v_proj"}}, {"gpt2", {"c_attn"}},
      {"bloom", {"query_key_value"}}, {"blip-2", {"q", "v", "q_proj", "v_proj"}}, {"opt", {"q_proj", "v_proj"}},
      {"gptj", {"q_proj", "v_proj"}}, {"gpt_neox", {"query_key_value"}}, {"gpt_neo", {"q_proj", "v_proj"}},
      {"bert", {"query", "value"}}, {"roberta", {"query", "value"}}, {"xlm-roberta", {"query", "value"}},
      {"electra", {"query", "value"}}, {"deberta-v2", {"query_proj", "value_proj"}}, {"deberta", {"in_proj"}},
      {"layoutlm", {"query", "value"}}, {"llama", {"q_proj", "v_proj"}}, {"llama4", {"q_proj", "v_proj"}},
      {"chatglm", {"query_key_value"}}, {"gpt_bigcode", {"c_attn"}}, {"mpt", {"Wqkv"}},
      {"RefinedWebModel", {"query_key_value"}}, {"RefinedWeb", {"query_key_value"}}, {"falcon", {"query_key_value"}},
      {"btlm", {"c_proj", "c_attn"}}, {"codegen", {"qkv_proj"}}, {"mistral", {"q_proj", "v_proj"}},
      {"mixtral", {"q_proj", "v_proj"}}, {"stablelm", {"q_proj", "v_proj"}}, {"phi", {"q_proj", "v_proj", "fc1", "fc2"}},
      {"gemma", {"q_proj", "v_proj"}}, {"gemma2", {"q_proj", "v_proj"}}, {"gemma3_text", {"q_proj", "v_proj"}},
      {"gemma4", R"(.*language_model\..*\.(q_proj|v_proj))"}, {"qwen2", {"q_proj", "v_proj"}},
      {"qwen3", {"q_proj", "v_proj"}}, {"nemotron_h", {"q_proj", "k_proj", "v_proj", "o_proj"}},
      {"rwkv", {"key", "value", "receptance", "output"}}, {"rwkv7", {"r_proj", "k_proj", "v_proj", "o_proj", "key", "value"}}};
  const auto it = table.find(model_type);
  return it == table.end() ? Json(nullptr) : it->second;
}

PeftConfig read_peft_config(const fs::path& dir) {
  const auto file = dir / "adapter_config.json";
  if (!fs::exists(file)) throw InputError(dir.string() + ": not a PEFT adapter folder (no adapter_config.json)");
  const Json j = read_json(file);
  auto fail = [&](const std::string& why) -> void { throw InputError(file.string() + ": " + why); };
  if (!j.is_object()) fail("not a JSON object");
  auto value = [&](const char* key) -> const Json& {
    static const Json null;
    auto it = j.find(key);
    return it == j.end() ? null : *it;
  };
  if (value("peft_type") != "LORA") fail("peft_type " + value("peft_type").dump() + " is not supported (only \"LORA\")");
  // Settings that change what the adapter computes and that this runner does not implement: refused, never
  // silently ignored.
  if (value("use_dora").is_boolean() && value("use_dora").get<bool>()) fail("use_dora: DoRA adapters are not supported");
  if (!value("bias").is_null() && value("bias") != "none") fail("bias " + value("bias").dump() + " is not supported (only \"none\")");
  if (value("lora_bias").is_boolean() && value("lora_bias").get<bool>()) fail("lora_bias is not supported");
  for (const char* key : {"layers_to_transform", "layers_pattern", "trainable_token_indices", "target_parameters",
                          "layer_replication", "alora_invocation_tokens", "megatron_config", "use_bdlora"}) {
    const auto& v = value(key);
    if (!v.is_null() && !(v.is_array() && v.empty()) && !(v.is_object() && v.empty()) && !(v.is_boolean() && !v.get<bool>())) {
      fail(std::string(key) + " is not supported");
    }
  }
  if (value("use_qalora").is_boolean() && value("use_qalora").get<bool>()) fail("use_qalora is not supported");

  PeftConfig c;
  try {
    c.lora.r = value("r").get<std::int64_t>();
    c.lora.alpha = value("lora_alpha").is_null() ? 8.0 : value("lora_alpha").get<double>();
    c.lora.dropout = value("lora_dropout").is_null() ? 0.0 : value("lora_dropout").get<double>();
    c.lora.rslora = value("use_rslora").is_null() ? false : value("use_rslora").get<bool>();
    if (value("rank_pattern").is_object()) {
      for (auto it = value("rank_pattern").begin(); it != value("rank_pattern").end(); ++it) c.rank_pattern[it.key()] = it->get<std::int64_t>();
    }
    if (value("alpha_pattern").is_object()) {
      for (auto it = value("alpha_pattern").begin(); it != value("alpha_pattern").end(); ++it) c.alpha_pattern[it.key()] = it->get<double>();
    }
    if (value("modules_to_save").is_array()) c.modules_to_save = value("modules_to_save").get<std::vector<std::string>>();
  } catch (const Json::exception& e) {
    fail(std::string("malformed LoRA settings: ") + e.what());
  }
  c.target_modules = value("target_modules");
  c.exclude_modules = value("exclude_modules");
  if (!(c.target_modules.is_string() || (c.target_modules.is_array() && !c.target_modules.empty()))) {
    fail("target_modules must be a list of module names or a regular expression (PEFT's per-architecture default is not known here)");
  }
  if (c.lora.r <= 0) fail("r must be positive");
  return c;
}

TensorMap read_peft_weights(const fs::path& dir) {
  const auto file = dir / "adapter_model.safetensors";
  if (!fs::exists(file)) {
    throw InputError(dir.string() + ": no adapter_model.safetensors" +
                     (fs::exists(dir / "adapter_model.bin") ? " (adapter_model.bin must be converted to safetensors first)" : ""));
  }
  TensorMap out;
  for (auto& [key, t] : read_safetensors(file)) {
    out[key.compare(0, std::char_traits<char>::length(kPrefix), kPrefix) == 0 ? key.substr(std::char_traits<char>::length(kPrefix)) : key] = t;
  }
  return out;
}

AdapterPlan plan_adapter(torch::nn::Module& component, const std::string& component_name) {
  AdapterPlan plan;
  std::set<std::string> lora;
  std::map<std::string, torch::nn::Module*> modules;
  for (const auto& item : component.named_modules("", /*include_self=*/false)) {
    modules[item.key()] = item.value().get();
    if (auto* l = dynamic_cast<LinearImpl*>(item.value().get()); l && l->has_lora()) lora.insert(item.key());
  }
  // Owners of trainable parameters that are not adapter parameters.
  std::set<std::string> owners;
  for (const auto& p : component.named_parameters(/*recurse=*/true)) {
    if (!p.value().requires_grad()) continue;
    const auto owner = parent_of(p.key());
    const auto leaf = owner.substr(owner.rfind('.') == std::string::npos ? 0 : owner.rfind('.') + 1);
    if ((leaf == "lora_A" || leaf == "lora_B") && lora.count(parent_of(owner))) continue;
    if (owner.empty()) {
      throw InputError(component_name + ": parameter '" + p.key() + "' trains but belongs to no submodule, so it cannot be saved as a PEFT adapter");
    }
    owners.insert(owner);
  }
  auto all_trainable = [&](torch::nn::Module& m) {
    auto params = m.parameters(/*recurse=*/true);
    return !params.empty() && std::all_of(params.begin(), params.end(), [](const torch::Tensor& t) { return t.requires_grad(); });
  };
  auto holds_lora = [&](const std::string& name) {
    return std::any_of(lora.begin(), lora.end(), [&](const std::string& l) { return l == name || inside(l, name); });
  };
  // Each owner rises to the largest enclosing module that trains whole and holds no adapter, so that a fully
  // trained layer is one entry rather than one per linear.
  std::set<std::string> chosen;
  for (auto name : owners) {
    if (holds_lora(name)) {
      throw InputError(component_name + ": module '" + name +
                       "' trains in full and carries a LoRA adapter; PEFT cannot save that (train the adapter or the module)");
    }
    for (auto up = parent_of(name); !up.empty() && all_trainable(*modules.at(up)) && !holds_lora(up); up = parent_of(up)) name = up;
    chosen.insert(name);
  }
  for (const auto& name : chosen) {
    const bool covered = std::any_of(chosen.begin(), chosen.end(), [&](const std::string& other) { return inside(name, other); });
    if (!covered) plan.modules_to_save.push_back(name);
  }
  plan.lora_modules.assign(lora.begin(), lora.end());
  return plan;
}

void write_peft_adapter(torch::nn::Module& component, const std::string& component_name, const fs::path& dir, const Json& extra) {
  const auto plan = plan_adapter(component, component_name);
  if (plan.empty()) throw InputError(component_name + ": no LoRA adapter to save");
  std::map<std::string, LinearImpl*> layers;
  std::map<std::string, torch::nn::Module*> modules;
  for (const auto& item : component.named_modules("", false)) {
    modules[item.key()] = item.value().get();
    if (auto* l = dynamic_cast<LinearImpl*>(item.value().get()); l && l->has_lora()) layers[item.key()] = l;
  }
  // The most common rank and alpha are the config's; the others go to rank_pattern / alpha_pattern by full
  // name, as PEFT writes them.
  std::map<std::int64_t, int> ranks;
  std::map<double, int> alphas;
  const LoraConfig& first = layers.begin()->second->lora_config();
  bool fan_in_fan_out = false;
  for (const auto& [name, l] : layers) {
    const auto& c = l->lora_config();
    if (c.rslora != first.rslora || c.dropout != first.dropout) {
      throw InputError(component_name + ": adapters with different rslora or dropout settings cannot share one PEFT adapter_config.json");
    }
    ++ranks[c.r];
    ++alphas[c.alpha];
    fan_in_fan_out = fan_in_fan_out || l->fan_in_fan_out;
  }
  auto most = [](const auto& counts) {
    return std::max_element(counts.begin(), counts.end(), [](const auto& a, const auto& b) { return a.second < b.second; })->first;
  };
  const auto r = most(ranks);
  const auto alpha = most(alphas);
  auto number = [](double v) { return v == static_cast<double>(static_cast<std::int64_t>(v)) ? Json(static_cast<std::int64_t>(v)) : Json(v); };
  Json rank_pattern = Json::object(), alpha_pattern = Json::object();
  TensorMap tensors;
  torch::NoGradGuard no_grad;
  for (const auto& [name, l] : layers) {
    if (l->lora_config().r != r) rank_pattern[name] = l->lora_config().r;
    if (l->lora_config().alpha != alpha) alpha_pattern[name] = number(l->lora_config().alpha);
    tensors[kPrefix + name + ".lora_A.weight"] = l->lora_A->weight.detach().cpu();
    tensors[kPrefix + name + ".lora_B.weight"] = l->lora_B->weight.detach().cpu();
  }
  for (const auto& name : plan.modules_to_save) {
    for (const auto& [key, t] : state_dict(*modules.at(name))) tensors[kPrefix + name + "." + key] = t.detach().cpu();
  }
  Json config = {
      {"peft_type", "LORA"},
      {"task_type", nullptr},
      {"base_model_name_or_path", nullptr},
      {"r", r},
      {"lora_alpha", number(alpha)},
      {"lora_dropout", first.dropout},
      {"use_rslora", first.rslora},
      {"target_modules", plan.lora_modules},
      {"exclude_modules", nullptr},
      {"modules_to_save", plan.modules_to_save.empty() ? Json(nullptr) : Json(plan.modules_to_save)},
      {"rank_pattern", rank_pattern},
      {"alpha_pattern", alpha_pattern},
      {"bias", "none"},
      {"fan_in_fan_out", fan_in_fan_out},
      {"init_lora_weights", true},
      {"inference_mode", true},
      {"use_dora", false},
      {"layers_to_transform", nullptr},
      {"layers_pattern", nullptr},
      {"revision", nullptr},
  };
  config.update(extra);
  fs::create_directories(dir);
  write_safetensors(dir / "adapter_model.safetensors", tensors, {{"format", "pt"}});
  write_json(dir / "adapter_config.json", config);
}

}  // namespace ablate::sdk
