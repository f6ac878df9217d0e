// strategy/lora: LoRA adapters on the adaptable linear layers of one component whose names end with a
// target. Targets are scoped to a component (the backbone unless told otherwise), so that "v_proj" never
// silently adapts the vision tower as well, the pitfall GIT-LLM ran into with PEFT's suffix matching.

#include <algorithm>
#include <sstream>

#include "ablate/sdk/linear.hpp"
#include "ablate/sdk/plugin.hpp"

namespace ablate::plugins {

namespace sdk = ablate::sdk;

struct LoraOptions {
  sdk::LoraConfig lora{8, 8.0, 0.0, false};  // PEFT's defaults: r = 8, lora_alpha = 8, no dropout
  std::vector<std::string> target_modules{"q_proj", "v_proj"};
  std::vector<std::string> exclude;
  std::string component = "backbone";

  static LoraOptions parse(sdk::Options& o) {
    LoraOptions x;
    x.lora.r = o.get("r", x.lora.r);
    x.lora.alpha = o.get("alpha", x.lora.alpha);
    x.lora.dropout = o.get("dropout", x.lora.dropout);
    x.lora.rslora = o.get("rslora", x.lora.rslora);
    x.target_modules = o.get("target_modules", x.target_modules);
    x.exclude = o.get("exclude", x.exclude);
    x.component = o.get("component", x.component);
    if (x.lora.r <= 0) o.fail("r", "must be positive");
    if (x.lora.dropout < 0 || x.lora.dropout >= 1) o.fail("dropout", "must be in [0, 1)");
    if (x.target_modules.empty()) o.fail("target_modules", "must name at least one module");
    if (x.component != "encoder" && x.component != "projector" && x.component != "backbone") {
      o.fail("component", "must be \"encoder\", \"projector\" or \"backbone\"");
    }
    return x;
  }
};

bool ends_with_segment(const std::string& name, const std::string& target) {
  if (name == target) return true;
  return name.size() > target.size() && name.compare(name.size() - target.size(), target.size(), target) == 0 &&
         name[name.size() - target.size() - 1] == '.';
}

class Lora : public sdk::Strategy {
 public:
  using options_type = LoraOptions;
  Lora(const LoraOptions& o, const sdk::BuildContext&) : o_(o) {}

  void apply(sdk::TrainTarget& target) override {
    const std::string prefix = o_.component + ".";
    std::int64_t attached = 0;
    for (const auto& [name, module] : target.modules()) {
      if (name.compare(0, prefix.size(), prefix) != 0) continue;
      const bool wanted = std::any_of(o_.target_modules.begin(), o_.target_modules.end(),
                                      [&](const std::string& t) { return ends_with_segment(name, t); });
      const bool excluded = std::any_of(o_.exclude.begin(), o_.exclude.end(),
                                        [&](const std::string& t) { return name.find(t) != std::string::npos; });
      if (!wanted || excluded) continue;
      auto* linear = dynamic_cast<sdk::LinearImpl*>(module);
      if (!linear) {
        throw sdk::InputError("lora: target '" + name + "' is not an adaptable linear layer");
      }
      linear->attach_lora(o_.lora);
      ++attached;
    }
    if (attached == 0) {
      std::ostringstream os;
      os << "lora: target_modules [";
      for (std::size_t i = 0; i < o_.target_modules.size(); ++i) os << (i ? ", " : "") << o_.target_modules[i];
      os << "] match no linear layer in " << o_.component;
      throw sdk::InputError(os.str());
    }
  }

 private:
  LoraOptions o_;
};

}  // namespace ablate::plugins

namespace {
void register_plugin(ablate::sdk::Registry& registry) {
  registry.add<ablate::plugins::Lora>("lora", 1, "LoRA adapters on one component's linear layers");
}
}  // namespace

ABLATE_PLUGIN(register_plugin)
