#include "ablate/sdk/checkpoint.hpp"
#include "ablate/sdk/random.hpp"

#include <ATen/autocast_mode.h>
#include <torch/autograd.h>

namespace ablate::sdk {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// What the backward pass needs to run the layer again exactly as the forward pass did.
struct Replay : torch::CustomClassHolder {
  std::function<torch::Tensor(const torch::Tensor&)> layer;
  c10::Device device = c10::kCPU;
  RngState rng;
  bool autocast = false;
  at::ScalarType autocast_dtype = at::kFloat;
  std::vector<bool> needs_grad;  // x, then each parameter
};

// Sets the generators to the forward pass's states and puts the current ones back when done, so that the
// recomputation draws the same dropout masks without shifting the training's random stream.
class RngFork {
 public:
  explicit RngFork(const Replay& r) : restore_(r.device) { set_rng_state(r.device, r.rng); }

 private:
  RngRestore restore_;
};

class AutocastAs {
 public:
  AutocastAs(c10::DeviceType type, bool enabled, at::ScalarType dtype)
      : type_(type), was_(at::autocast::is_autocast_enabled(type)), dtype_(at::autocast::get_autocast_dtype(type)) {
    at::autocast::set_autocast_enabled(type_, enabled);
    at::autocast::set_autocast_dtype(type_, dtype);
    if (enabled) at::autocast::increment_nesting();
    enabled_ = enabled;
  }
  ~AutocastAs() {
    if (enabled_ && at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
    at::autocast::set_autocast_enabled(type_, was_);
    at::autocast::set_autocast_dtype(type_, dtype_);
  }

 private:
  c10::DeviceType type_;
  bool was_;
  at::ScalarType dtype_;
  bool enabled_ = false;
};

struct CheckpointFunction : torch::autograd::Function<CheckpointFunction> {
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& x, const at::TensorList& params,
                               const c10::intrusive_ptr<Replay>& replay) {
    variable_list saved{x};
    saved.insert(saved.end(), params.begin(), params.end());
    ctx->save_for_backward(saved);
    ctx->saved_data["replay"] = c10::IValue::make_capsule(replay);
    // Function::apply runs forward with gradients off: no graph is kept for the layer.
    return replay->layer(x);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    auto replay = c10::static_intrusive_pointer_cast<Replay>(ctx->saved_data["replay"].toCapsule());
    const auto saved = ctx->get_saved_variables();
    const auto& x = saved[0];
    variable_list result(replay->needs_grad.size() + 1);  // one per forward input: x, each parameter, replay
    torch::Tensor input = x.detach().requires_grad_(replay->needs_grad[0]);
    torch::Tensor out;
    {
      RngFork fork(*replay);
      AutocastAs autocast(replay->device.type(), replay->autocast, replay->autocast_dtype);
      torch::AutoGradMode grad(true);
      out = replay->layer(input);
    }
    // Gradients with respect to what needs them, and nothing else: no .grad is touched here, the engine
    // accumulates what this returns.
    variable_list inputs;
    std::vector<std::size_t> slots;
    if (replay->needs_grad[0]) {
      inputs.push_back(input);
      slots.push_back(0);
    }
    for (std::size_t i = 1; i < saved.size(); ++i) {
      if (!replay->needs_grad[i]) continue;
      inputs.push_back(saved[i]);
      slots.push_back(i);
    }
    if (inputs.empty()) return result;
    auto grads = torch::autograd::grad({out}, inputs, {grad_outputs[0]}, /*retain_graph=*/false, /*create_graph=*/false,
                                       /*allow_unused=*/true);
    for (std::size_t k = 0; k < slots.size(); ++k) result[slots[k]] = grads[k];
    return result;
  }
};

}  // namespace

torch::Tensor maybe_checkpoint(bool enabled, torch::nn::Module& layer, std::function<torch::Tensor(const torch::Tensor&)> fn,
                               const torch::Tensor& x) {
  if (!enabled || !layer.is_training() || !torch::GradMode::is_enabled()) return fn(x);
  return checkpoint(std::move(fn), x, layer.parameters(/*recurse=*/true));
}

torch::Tensor checkpoint(std::function<torch::Tensor(const torch::Tensor&)> layer, const torch::Tensor& x,
                         const std::vector<torch::Tensor>& params) {
  auto replay = c10::make_intrusive<Replay>();
  replay->layer = std::move(layer);
  replay->device = x.device();
  replay->rng = get_rng_state(x.device());
  replay->autocast = at::autocast::is_autocast_enabled(x.device().type());
  replay->autocast_dtype = at::autocast::get_autocast_dtype(x.device().type());
  replay->needs_grad.push_back(x.requires_grad());
  for (const auto& p : params) replay->needs_grad.push_back(p.requires_grad());
  return CheckpointFunction::apply(x, at::TensorList(params), replay);
}

}  // namespace ablate::sdk
