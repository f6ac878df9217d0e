#pragma once
// The optimizer side of a training step, kept apart from the loop so that tests can drive it alone against
// torch.optim: AdamW with decoupled weight decay over parameter groups (one per strategy that sets its own
// lr / weight_decay), transformers' learning-rate schedules, gradient clipping without a host
// synchronisation, and fp16 loss scaling (torch.amp.GradScaler's algorithm).

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <torch/nn/module.h>
#include <torch/optim/adamw.h>
#include <torch/types.h>

#include "grid/experiment.hpp"

namespace ablate {

/// The learning-rate multiplier of optimizer step `s` (0-based): linear warm-up, then constant, linear or
/// cosine decay to 0 at `c.steps`, as transformers' get_{constant,linear,cosine}_schedule_with_warmup.
double lr_factor(const TrainConfig& c, std::int64_t s);
/// c.lr * lr_factor(c, s).
double scheduled_lr(const TrainConfig& c, std::int64_t s);

/// A parameter group's settings before scheduling.
struct GroupSetting {
  std::string label;  ///< "train" for [train]'s, else the strategy that set them ("strategy[1] projector")
  double lr = 0;
  double weight_decay = 0;
};

/// torch.amp.GradScaler for fp16: the loss is multiplied by `scale` before backward; a step whose unscaled
/// gradients hold inf or nan is skipped and the scale halves; after `growth_interval` good steps it doubles.
class LossScaler {
 public:
  explicit LossScaler(torch::Device device, double init_scale = 65536.0, std::int64_t growth_interval = 2000);
  torch::Tensor scale(const torch::Tensor& loss) const { return loss * scale_; }
  /// Divides the gradients by the scale; returns a [1] float tensor, 1 where any was not finite.
  torch::Tensor unscale(const std::vector<torch::Tensor>& params);
  void update(const torch::Tensor& found_inf);
  double value() const { return scale_.item<double>(); }
  /// {"scale", "growth_tracker"}, for checkpoints.
  std::vector<std::pair<std::string, torch::Tensor>> state() const;
  void load(const torch::Tensor& scale, const torch::Tensor& growth_tracker);

 private:
  torch::Tensor scale_, growth_tracker_;
  std::int64_t growth_interval_;
};

struct TrainableParam {
  std::string name;
  torch::Tensor tensor;
  std::size_t group = 0;  ///< index of its GroupSetting
  bool decay = true;      ///< weight decay applies
};

/// Every parameter of `model` that requires grad, in registration order, with its group (from `groups`, by
/// TensorImpl; 0 when absent) and transformers' Trainer rule for weight decay: none inside LayerNorm
/// modules, none when the lower-cased name matches bias, layernorm, rmsnorm, (^|.)norm($|.) or _norm($|.).
std::vector<TrainableParam> trainable_parameters(torch::nn::Module& model, const std::map<const void*, std::size_t>& groups);

class TrainOptimizer {
 public:
  /// Each GroupSetting becomes up to two AdamW groups: the parameters that decay, with its weight decay,
  /// and the others without.
  TrainOptimizer(const std::vector<TrainableParam>& params, std::vector<GroupSetting> groups, const TrainConfig& c);

  struct StepResult {
    torch::Tensor grad_norm;  ///< before clipping, a 0-d float tensor (no synchronisation)
    double lr = 0;            ///< [train]'s learning rate at this step
    bool skipped = false;     ///< fp16: not finite, the step was skipped
  };
  /// Optimizer step `s` (0-based) on the accumulated gradients: unscale (fp16), clip, set each group's
  /// scheduled learning rate, step, zero the gradients.
  StepResult step(std::int64_t s);

  /// Holds the state (moments, step counts) that checkpoints save; its own step() is not used.
  torch::optim::AdamW& adamw() { return *adamw_; }
  const std::vector<torch::Tensor>& params() const { return params_; }
  const std::vector<GroupSetting>& groups() const { return groups_; }
  /// The loss scaler in fp16, else null.
  LossScaler* scaler() { return scaler_.get(); }

 private:
  void fused_step();

  TrainConfig config_;
  std::vector<GroupSetting> groups_;
  std::vector<double> base_lr_;  ///< per AdamW group
  std::vector<torch::Tensor> params_;
  std::unique_ptr<torch::optim::AdamW> adamw_;
  std::unique_ptr<LossScaler> scaler_;
};

/// clip_grad_norm_ without a host synchronisation: returns the total 2-norm as a tensor and scales the
/// gradients by min(1, max_norm / (norm + 1e-6)) when max_norm > 0.
torch::Tensor clip_gradients(const std::vector<torch::Tensor>& params, double max_norm);

}  // namespace ablate
