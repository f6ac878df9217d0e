#include "train/artifacts.hpp"

#include "ablate/sdk/linear.hpp"

namespace ablate {

namespace {
void merge_adapters(torch::nn::Module& module) {
  for (const auto& m : module.modules()) {
    if (auto* linear = dynamic_cast<sdk::LinearImpl*>(m.get()); linear && linear->has_lora()) linear->merge();
  }
}
bool adapter_tensor(const std::string& name) {
  return name.find(".lora_A.") != std::string::npos || name.find(".lora_B.") != std::string::npos;
}
}  // namespace

void export_component(sdk::Component& part, const std::filesystem::path& dir) {
  auto& module = part.module();
  merge_adapters(module);
  auto tensors = sdk::state_dict(module);
  for (auto t = tensors.begin(); t != tensors.end();) t = adapter_tensor(t->first) ? tensors.erase(t) : std::next(t);
  std::filesystem::create_directories(dir);
  sdk::write_safetensors(dir / "model.safetensors", tensors, {{"format", "pt"}});
  if (auto cfg = part.hf_config(); !cfg.is_null()) sdk::write_json(dir / "config.json", cfg);
  part.save_extras(dir);
}

sdk::TensorMap stage_changes(torch::nn::Module& model) {
  sdk::TensorMap out;
  merge_adapters(model);
  for (const auto& m : model.named_modules("", false)) {
    if (auto* linear = dynamic_cast<sdk::LinearImpl*>(m.value().get()); linear && linear->has_lora()) {
      out[m.key() + ".weight"] = linear->weight.detach();
    }
  }
  for (const auto& p : model.named_parameters()) {
    if (p.value().requires_grad() && !adapter_tensor(p.key())) out[p.key()] = p.value().detach();
  }
  return out;
}

}  // namespace ablate
