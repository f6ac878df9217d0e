#include "train/optimizer.hpp"

#include <cmath>
#include <regex>
#include <set>

#include <torch/torch.h>

namespace ablate {

double lr_factor(const TrainConfig& c, std::int64_t s) {
  const std::int64_t total = c.steps;
  const std::int64_t warmup = c.schedule.warmup_steps >= 0
                                  ? c.schedule.warmup_steps
                                  : static_cast<std::int64_t>(std::ceil(static_cast<double>(total) * c.schedule.warmup_ratio));
  // The same expressions as transformers' lr_lambda functions, so that LambdaLR gives the same doubles.
  if (s < warmup) return static_cast<double>(s) / static_cast<double>(std::max<std::int64_t>(1, warmup));
  if (c.schedule.kind == "constant") return 1.0;
  const double span = static_cast<double>(std::max<std::int64_t>(1, total - warmup));
  if (c.schedule.kind == "linear") return std::max(0.0, static_cast<double>(total - s) / span);
  const double progress = static_cast<double>(s - warmup) / span;
  return std::max(0.0, 0.5 * (1.0 + std::cos(M_PI * progress)));
}

double scheduled_lr(const TrainConfig& c, std::int64_t s) { return c.lr * lr_factor(c, s); }

std::vector<TrainableParam> trainable_parameters(torch::nn::Module& model, const std::map<const void*, std::size_t>& groups) {
  static const std::regex no_decay(R"(bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.))");
  std::set<const void*> in_layer_norm;
  for (const auto& m : model.modules(/*include_self=*/true)) {
    if (dynamic_cast<torch::nn::LayerNormImpl*>(m.get())) {
      for (const auto& p : m->parameters()) in_layer_norm.insert(p.unsafeGetTensorImpl());
    }
  }
  std::vector<TrainableParam> out;
  for (const auto& item : model.named_parameters(/*recurse=*/true)) {
    if (!item.value().requires_grad()) continue;
    TrainableParam p;
    p.name = item.key();
    p.tensor = item.value();
    const auto* impl = p.tensor.unsafeGetTensorImpl();
    if (auto it = groups.find(impl); it != groups.end()) p.group = it->second;
    std::string lower = p.name;
    for (auto& ch : lower) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
    p.decay = !in_layer_norm.count(impl) && !std::regex_search(lower, no_decay);
    out.push_back(std::move(p));
  }
  return out;
}

torch::Tensor clip_gradients(const std::vector<torch::Tensor>& params, double max_norm) {
  std::vector<torch::Tensor> norms;
  for (const auto& p : params) {
    if (p.grad().defined()) norms.push_back(p.grad().detach().norm(2).to(torch::kFloat32));
  }
  if (norms.empty()) return torch::zeros({});
  auto total = torch::stack(norms).norm(2);
  if (max_norm > 0) {
    auto coef = (max_norm / (total + 1e-6)).clamp_max(1.0);
    for (const auto& p : params) {
      if (p.grad().defined()) p.grad().detach().mul_(coef.to(p.grad().dtype()));
    }
  }
  return total;
}

LossScaler::LossScaler(torch::Device device, double init_scale, std::int64_t growth_interval)
    : scale_(torch::full({1}, init_scale, torch::TensorOptions().dtype(torch::kFloat32).device(device))),
      growth_tracker_(torch::zeros({1}, torch::TensorOptions().dtype(torch::kInt32).device(device))),
      growth_interval_(growth_interval) {}

torch::Tensor LossScaler::unscale(const std::vector<torch::Tensor>& params) {
  auto found_inf = torch::zeros({1}, scale_.options());
  auto inv_scale = scale_.to(torch::kFloat64).reciprocal().to(torch::kFloat32);
  std::vector<torch::Tensor> grads;
  for (const auto& p : params) {
    if (p.grad().defined()) grads.push_back(p.grad());
  }
  if (!grads.empty()) at::_amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv_scale);
  return found_inf;
}

void LossScaler::update(const torch::Tensor& found_inf) {
  // torch.amp.GradScaler's defaults: growth factor 2, backoff 0.5.
  at::_amp_update_scale_(scale_, growth_tracker_, found_inf, 2.0, 0.5, growth_interval_);
}

std::vector<std::pair<std::string, torch::Tensor>> LossScaler::state() const {
  return {{"scale", scale_}, {"growth_tracker", growth_tracker_}};
}

void LossScaler::load(const torch::Tensor& scale, const torch::Tensor& growth_tracker) {
  scale_.copy_(scale);
  growth_tracker_.copy_(growth_tracker);
}

TrainOptimizer::TrainOptimizer(const std::vector<TrainableParam>& params, std::vector<GroupSetting> groups, const TrainConfig& c)
    : config_(c), groups_(std::move(groups)) {
  std::vector<torch::optim::OptimizerParamGroup> adam_groups;
  const auto base = torch::optim::AdamWOptions(c.lr).betas({c.beta1, c.beta2}).eps(c.eps).weight_decay(c.weight_decay);
  for (std::size_t g = 0; g < groups_.size(); ++g) {
    for (const bool decay : {true, false}) {
      std::vector<torch::Tensor> members;
      for (const auto& p : params) {
        if (p.group == g && p.decay == decay) members.push_back(p.tensor);
      }
      if (members.empty()) continue;
      auto o = base;
      o.lr(groups_[g].lr).weight_decay(decay ? groups_[g].weight_decay : 0.0);
      adam_groups.emplace_back(members, std::make_unique<torch::optim::AdamWOptions>(o));
      base_lr_.push_back(groups_[g].lr);
    }
  }
  for (const auto& p : params) params_.push_back(p.tensor);
  adamw_ = std::make_unique<torch::optim::AdamW>(std::move(adam_groups), base);
  if (c.precision == "fp16") {
    scaler_ = std::make_unique<LossScaler>(params_.empty() ? torch::Device(torch::kCPU) : params_.front().device());
  }
}

TrainOptimizer::StepResult TrainOptimizer::step(std::int64_t s) {
  StepResult r;
  torch::Tensor found_inf;
  if (scaler_) found_inf = scaler_->unscale(params_);
  r.grad_norm = clip_gradients(params_, config_.max_grad_norm);
  const double factor = lr_factor(config_, s);
  r.lr = config_.lr * factor;
  auto& adam_groups = adamw_->param_groups();
  for (std::size_t i = 0; i < adam_groups.size(); ++i) {
    static_cast<torch::optim::AdamWOptions&>(adam_groups[i].options()).lr(base_lr_[i] * factor);
  }
  // GradScaler skips the update when the unscaled gradients are not finite; knowing that takes a sync.
  r.skipped = scaler_ && found_inf.item<float>() != 0.0f;
  if (!r.skipped) adamw_->step();
  if (scaler_) scaler_->update(found_inf);
  adamw_->zero_grad(/*set_to_none=*/true);
  return r;
}

}  // namespace ablate
