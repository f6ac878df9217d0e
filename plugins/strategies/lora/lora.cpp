// strategy/lora: LoRA adapters on the linear layers of one component that PEFT's rules select, optionally
// next to modules trained in full (PEFT's modules_to_save), or loaded from a PEFT adapter folder.
// Targets are scoped to a component (the backbone unless told otherwise), so that "v_proj" never silently
// adapts the vision tower as well, the pitfall GIT-LLM ran into with PEFT's suffix matching. Every entry of
// a target list must match something: a name that matches nothing is a typo, not a smaller adapter.

#include <algorithm>
#include <regex>
#include <set>
#include <sstream>

#include "ablate/sdk/adapters.hpp"
#include "ablate/sdk/linear.hpp"
#include "ablate/sdk/plugin.hpp"
#include "ablate/sdk/weights.hpp"

namespace ablate::plugins {

namespace sdk = ablate::sdk;
using sdk::Json;

struct LoraOptions {
  sdk::PeftConfig peft;
  std::string component = "backbone";
  std::string weights;       ///< a PEFT adapter folder to start from ("" = fresh adapters)
  std::string where;         ///< "FILE:LINE" of the table, for messages
  bool default_targets = false;  ///< target_modules not given: PEFT's default for the component's model type

  static LoraOptions parse(sdk::Options& o) {
    LoraOptions x;
    x.where = o.where("plugin");
    x.component = o.get("component", x.component);
    if (x.component != "encoder" && x.component != "projector" && x.component != "backbone") {
      o.fail("component", "must be \"encoder\", \"projector\" or \"backbone\"");
    }
    x.weights = o.get("weights", std::string());
    if (!x.weights.empty()) {
      // Everything else comes from the folder's adapter_config.json; saying it twice could only disagree.
      for (const char* key : {"r", "alpha", "dropout", "rslora", "target_modules", "exclude", "modules_to_save"}) {
        if (o.has(key)) o.fail(key, "not with weights: it comes from the adapter's adapter_config.json");
      }
      return x;
    }
    auto& c = x.peft;
    c.lora = sdk::LoraConfig{8, 8.0, 0.0, false};  // PEFT's defaults: r = 8, lora_alpha = 8, no dropout
    c.lora.r = o.get("r", c.lora.r);
    c.lora.alpha = o.get("alpha", c.lora.alpha);
    c.lora.dropout = o.get("dropout", c.lora.dropout);
    c.lora.rslora = o.get("rslora", c.lora.rslora);
    x.default_targets = !o.has("target_modules");
    // When defaulted, apply() replaces the list by the model type's; the resolved config (and so the cell key)
    // keeps recording this one, so that experiments written before model types mattered keep their keys.
    c.target_modules = o.get("target_modules", Json::array({"q_proj", "v_proj"}));
    c.exclude_modules = o.get("exclude", Json(nullptr));
    c.modules_to_save = o.get("modules_to_save", std::vector<std::string>{});
    if (c.lora.r <= 0) o.fail("r", "must be positive");
    if (c.lora.dropout < 0 || c.lora.dropout >= 1) o.fail("dropout", "must be in [0, 1)");
    auto names_or_regex = [&](const char* key, const Json& v, bool allow_null) {
      const bool list = v.is_array() && std::all_of(v.begin(), v.end(), [](const Json& e) { return e.is_string(); });
      if (!(list || v.is_string() || (allow_null && v.is_null()))) {
        o.fail(key, "must be a list of module names or a regular expression string");
      }
      if (v.is_array() && v.empty() && !allow_null) o.fail(key, "must name at least one module");
      if (v.is_string() && v != "all-linear") {
        try {
          std::regex check(v.get<std::string>());
        } catch (const std::regex_error& e) {
          o.fail(key, std::string("not a regular expression: ") + e.what());
        }
      }
    };
    names_or_regex("target_modules", c.target_modules, false);
    names_or_regex("exclude", c.exclude_modules, true);
    return x;
  }
};

bool ends_with(const std::string& s, const std::string& tail) {
  return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
}

class Lora : public sdk::Strategy {
 public:
  using options_type = LoraOptions;
  Lora(const LoraOptions& o, const sdk::BuildContext& ctx) : o_(o) {
    if (!o_.weights.empty()) {
      dir_ = sdk::resolve_path(ctx.base_dir, o_.weights);
      o_.peft = sdk::read_peft_config(dir_);
    }
  }

  void apply(sdk::TrainTarget& target) override {
    const auto& c = o_.peft;
    const bool from_options = dir_.empty();
    const std::string prefix = o_.component + ".";
    const std::string head = target.head().compare(0, prefix.size(), prefix) == 0 ? target.head().substr(prefix.size()) : "";
    auto* component = target.find(o_.component);
    if (!component) throw sdk::InputError("lora: the model has no " + o_.component);
    // No target_modules: PEFT's choice for the component's model type (GPT-2's fused c_attn, q/v
    // elsewhere). Where PEFT has none (a vision tower, a projector) it asks for target_modules; q_proj
    // and v_proj, the attention projections the ViT encoders name so, stay ours.
    std::string defaulted_for;
    if (o_.default_targets) {
      const auto model_type = target.model_type(o_.component);
      const auto peft_default = sdk::peft_default_targets(model_type);
      if (!peft_default.is_null()) o_.peft.target_modules = peft_default;
      defaulted_for = model_type.empty() ? " (the default; set target_modules)"
                                         : " (the default for model type '" + model_type + "'; set target_modules)";
    }

    // PEFT's order: excluded modules, then modules_to_save (never adapted), then targets.
    auto saved_here = [&](const std::string& name) {
      return std::any_of(c.modules_to_save.begin(), c.modules_to_save.end(), [&](const std::string& m) {
        return name == m || ends_with(name, "." + m) || name.find("." + m + ".") != std::string::npos ||
               name.compare(0, m.size() + 1, m + ".") == 0;
      });
    };
    std::vector<std::pair<std::string, sdk::LinearImpl*>> chosen;
    std::set<std::string> linear_leaves;
    std::map<std::string, int> hits;
    for (const auto& [qualified, module] : target.modules()) {
      if (qualified.compare(0, prefix.size(), prefix) != 0) continue;
      const auto name = qualified.substr(prefix.size());
      auto* linear = dynamic_cast<sdk::LinearImpl*>(module);
      if (linear) linear_leaves.insert(name.substr(name.rfind('.') == std::string::npos ? 0 : name.rfind('.') + 1));
      if (!c.exclude_modules.is_null() && sdk::peft_matches(c.exclude_modules, name)) continue;
      if (saved_here(name)) continue;
      bool wanted;
      if (c.target_modules == "all-linear") {
        wanted = linear && name != head;  // PEFT leaves the output layer out
      } else {
        wanted = sdk::peft_matches(c.target_modules, name);
      }
      if (!wanted) continue;
      if (!linear) throw sdk::InputError("lora: target '" + qualified + "' is not an adaptable linear layer");
      chosen.emplace_back(name, linear);
      if (c.target_modules.is_array()) {
        for (const auto& t : c.target_modules) {
          if (sdk::peft_matches(Json::array({t}), name)) ++hits[t.get<std::string>()];
        }
      }
    }
    std::string available;
    for (const auto& l : linear_leaves) available += (available.empty() ? "" : ", ") + l;
    if (chosen.empty()) {
      throw sdk::InputError(where() + "target_modules " + c.target_modules.dump() + defaulted_for + " match no linear layer in " +
                            o_.component + " (its linear layers end with: " + available + ")");
    }
    if (from_options && c.target_modules.is_array()) {
      for (const auto& t : c.target_modules) {
        if (!hits.count(t.get<std::string>())) {
          throw sdk::InputError(where() + "target_modules entry '" + t.get<std::string>() + "'" + defaulted_for +
                                " matches no linear layer in " + o_.component + " (its linear layers end with: " + available + ")");
        }
      }
    }
    for (const auto& [name, linear] : chosen) {
      if (linear->has_lora()) throw sdk::InputError(where() + "'" + prefix + name + "' already carries a LoRA adapter");
      linear->attach_lora(c.for_module(name));
      target.train(*linear->lora_A);
      target.train(*linear->lora_B);
    }
    // modules_to_save: matched as PEFT matches them (the module name ends with the entry), trained whole.
    std::vector<std::string> saved;
    for (const auto& m : c.modules_to_save) {
      int n = 0;
      for (const auto& [qualified, module] : target.modules()) {
        if (qualified.compare(0, prefix.size(), prefix) != 0 || !ends_with(qualified, m)) continue;
        target.train(qualified);
        saved.push_back(qualified.substr(prefix.size()));
        ++n;
      }
      if (n == 0) throw sdk::InputError(where() + "modules_to_save entry '" + m + "' matches no module in " + o_.component);
    }
    if (!dir_.empty()) load(*component, chosen, saved);
  }

 private:
  std::string where() const { return o_.where + ": strategy lora: "; }

  // Strict: every adapter and saved module gets its tensors, and the file holds nothing else.
  void load(torch::nn::Module& component, const std::vector<std::pair<std::string, sdk::LinearImpl*>>& chosen,
            const std::vector<std::string>& saved) const {
    const auto tensors = sdk::read_peft_weights(dir_);
    const auto origin = (dir_ / "adapter_model.safetensors").string();
    std::set<std::string> expected;
    for (const auto& [name, linear] : chosen) {
      expected.insert(name + ".lora_A.weight");
      expected.insert(name + ".lora_B.weight");
    }
    auto all = sdk::state_dict(component);
    for (const auto& m : saved) {
      for (const auto& [key, t] : all) {
        if (key.compare(0, m.size() + 1, m + ".") == 0) expected.insert(key);
      }
    }
    std::vector<std::string> missing, unexpected;
    for (const auto& k : expected) {
      if (!tensors.count(k)) missing.push_back(k);
    }
    for (const auto& [k, t] : tensors) {
      if (!expected.count(k)) unexpected.push_back(k);
    }
    if (!missing.empty() || !unexpected.empty()) {
      std::ostringstream os;
      os << origin << ": does not fit its adapter_config.json on this " << o_.component;
      if (!missing.empty()) os << "; missing " << missing.size() << " (" << missing.front() << (missing.size() > 1 ? ", ..." : "") << ")";
      if (!unexpected.empty()) os << "; unexpected " << unexpected.size() << " (" << unexpected.front() << (unexpected.size() > 1 ? ", ..." : "") << ")";
      throw sdk::InputError(os.str());
    }
    sdk::TensorMap wanted;
    for (const auto& k : expected) wanted[k] = tensors.at(k);
    const auto report = sdk::load_state(component, wanted, origin, /*strict=*/false);
    if (!report.mismatched.empty()) throw sdk::InputError(origin + ": mis-shaped tensor " + report.mismatched.front());
  }

  LoraOptions o_;
  std::filesystem::path dir_;
};

}  // namespace ablate::plugins

namespace {
void register_plugin(ablate::sdk::Registry& registry) {
  registry.add<ablate::plugins::Lora>("lora", 2, "LoRA adapters on one component's linear layers (PEFT's format and rules)");
}
}  // namespace

ABLATE_PLUGIN(register_plugin)
