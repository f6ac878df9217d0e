#include "train/optimizer.hpp"

#include <array>
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
  // One multi-tensor kernel per stage instead of two operations per parameter: with LoRA a step has many
  // small gradients, and launching per-parameter operations costs more than the arithmetic.
  std::map<c10::ScalarType, std::vector<torch::Tensor>> grads;  // _foreach_ lists must share a dtype
  for (const auto& p : params) {
    if (p.grad().defined()) grads[p.grad().scalar_type()].push_back(p.grad().detach());
  }
  if (grads.empty()) return torch::zeros({});
  std::vector<torch::Tensor> norms;
  for (const auto& [dtype, list] : grads) {
    for (auto& n : at::_foreach_norm(list, 2)) norms.push_back(n.to(torch::kFloat32));
  }
  auto total = torch::stack(norms).norm(2);
  if (max_norm > 0) {
    auto coef = (max_norm / (total + 1e-6)).clamp_max(1.0);
    for (auto& [dtype, list] : grads) at::_foreach_mul_(list, coef.to(dtype));
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

void TrainOptimizer::fused_step() {
  // torch::optim::AdamW keeps the state (and writes it into checkpoints); the update itself is ATen's fused
  // AdamW kernel (torch.optim.AdamW(fused=True)): one multi-tensor kernel per group instead of about ten
  // operations per parameter. The update of AdamW::step (decoupled decay p *= 1 - lr * wd, then
  // p -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)), rounded slightly differently.
  for (auto& group : adamw_->param_groups()) {
    const auto& o = static_cast<const torch::optim::AdamWOptions&>(group.options());
    // One kernel call per (dtype, step count): the kernel needs one dtype per list and reads each parameter's
    // step from state_steps, which for parameters that always had gradients is one value.
    std::map<std::pair<c10::ScalarType, std::int64_t>, std::array<std::vector<torch::Tensor>, 4>> lists;
    for (auto& p : group.params()) {
      if (!p.grad().defined()) continue;
      auto& slot = adamw_->state()[p.unsafeGetTensorImpl()];
      if (!slot) {
        auto st = std::make_unique<torch::optim::AdamWParamState>();
        st->step(0);
        st->exp_avg(torch::zeros_like(p, torch::MemoryFormat::Preserve));
        st->exp_avg_sq(torch::zeros_like(p, torch::MemoryFormat::Preserve));
        slot = std::move(st);
      }
      auto& st = static_cast<torch::optim::AdamWParamState&>(*slot);
      st.step(st.step() + 1);
      auto& l = lists[{p.scalar_type(), st.step()}];
      l[0].push_back(p);
      l[1].push_back(p.grad());
      l[2].push_back(st.exp_avg());
      l[3].push_back(st.exp_avg_sq());
    }
    for (auto& [key, l] : lists) {
      const auto steps = torch::full({}, static_cast<double>(key.second), l[0].front().options().dtype(torch::kFloat32));
      const std::vector<torch::Tensor> state_steps(l[0].size(), steps);
      torch::NoGradGuard no_grad;
      at::_fused_adamw_(l[0], l[1], l[2], l[3], {}, state_steps, o.lr(), std::get<0>(o.betas()), std::get<1>(o.betas()),
                        o.weight_decay(), o.eps(), /*amsgrad=*/false, /*maximize=*/false);
    }
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
  if (!r.skipped) fused_step();
  if (scaler_) scaler_->update(found_inf);
  adamw_->zero_grad(/*set_to_none=*/true);
  return r;
}

}  // namespace ablate
