#include "train/train_steps.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>

#include <torch/torch.h>

#include "ablate/sdk/random.hpp"
#include "grid/experiment.hpp"
#include "model/cuda_graph.hpp"
#include "model/vlm.hpp"
#include "train/optimizer.hpp"
#include "train/precision.hpp"

namespace ablate {

namespace {

// Each shape's graph keeps its own inputs (its temporaries share one pool); past this many shapes, new ones run
// eagerly.
constexpr std::size_t kMaxShapes = 16;

std::string first_line(const std::string& s) { return s.substr(0, s.find('\n')); }

}  // namespace

// One fixed shape: its inputs on the device (refilled in place every step, so that the graph reads the step's
// batch), its graph, and the loss it computes (rewritten at every replay). The gradients are TrainSteps::grads_.
struct TrainSteps::Shape {
  std::vector<LossInputs> inputs;
  torch::Tensor count;  ///< the step's loss tokens, a float32 scalar on the device
  std::unique_ptr<CudaGraph> graph;
  torch::Tensor loss;
};

TrainSteps::TrainSteps(VlmModel& model, std::vector<torch::Tensor> params, const TrainConfig& config, torch::Device device,
                       TrainGraphMode mode)
    : model_(model), params_(std::move(params)), config_(config), device_(device) {
  // The recomputation of gradient checkpointing saves and restores the generator's state in the forward pass:
  // not capturable. auto pads only where the padding buys a graph (on the CPU it only costs: 13% slower steps
  // on the tiny benchmark, bench/README.md).
  const bool capturable = CudaGraph::available(device) && config.gradient_checkpointing.empty();
  fixed_ = mode == TrainGraphMode::on || (mode == TrainGraphMode::automatic && capturable);
  graphs_ = fixed_ && capturable;
  if (fixed_ && CudaGraph::available(device) && !capturable) {
    refused_ = "gradient checkpointing reads the random-number state in the forward pass";
  }
  text_limit_ = std::min(config.max_text_tokens, model.max_text_width());
}

std::string TrainSteps::describe() const {
  if (!fixed_) return "eager";
  if (graphs_) return "padded to fixed shapes, each shape a CUDA graph";
  return "padded to fixed shapes, run eagerly (" + (refused_.empty() ? "CUDA graphs need a CUDA device" : "no CUDA graph: " + refused_) + ")";
}

TrainSteps::~TrainSteps() = default;

std::int64_t TrainSteps::bucket(std::int64_t n, std::int64_t limit) {
  std::int64_t size = 16;
  while (size < n) size = (size & (size - 1)) == 0 ? size * 3 / 2 : size / 3 * 4;  // 16, 24, 32, 48, 64, 96...
  return std::max(n, std::min(size, limit));
}

std::vector<LossInputs> TrainSteps::prepare(const std::vector<TrainBatch>& micro) const {
  std::int64_t width = 0, slots = 0;
  if (fixed_) {
    // One shape for all the step's micro-batches: one graph replays them in order.
    for (const auto& b : micro) {
      width = std::max(width, b.ids.size(1));
      slots = std::max(slots, b.loss_tokens);
    }
    if (width > text_limit_) {
      // The inline layout's placeholder column lets an eager batch take one position more than its padded form
      // (t - 1 + n against t + n): a batch that fills the backbone's positions runs as collated, and eagerly
      // (run()), rather than padded past them.
      width = slots = 0;
    } else {
      width = bucket(width, text_limit_);
      slots = bucket(slots, micro.front().ids.size(0) * (width + model_.image_tokens()));
    }
  }
  std::vector<LossInputs> out;
  for (const auto& b : micro) out.push_back(model_.loss_inputs(b, width, slots));
  return out;
}

torch::Tensor TrainSteps::passes(std::vector<LossInputs>& micro, const torch::Tensor& loss_tokens, LossScaler* scaler,
                                 bool into_grads) {
  if (into_grads) {
    // Zeroed, then added to in place by backward: every shape's graph writes the same gradient tensors.
    std::vector<torch::Tensor> zero;
    for (std::size_t i = 0; i < params_.size(); ++i) {
      params_[i].mutable_grad() = grads_[i];
      if (grads_[i].defined()) zero.push_back(grads_[i]);
    }
    if (!zero.empty()) at::_foreach_zero_(zero);
  } else {
    for (auto& p : params_) p.mutable_grad() = torch::Tensor();  // made afresh by backward
  }
  torch::Tensor total;
  for (auto& in : micro) {
    if (!fixed_ && in.loss_tokens == 0) continue;  // nothing to learn from; a fixed shape runs it anyway (zero)
    torch::Tensor loss;
    {
      AutocastGuard autocast(device_, config_.precision);
      // Token-weighted over the whole step: each loss token counts the same whatever micro-batch holds it.
      loss = model_.loss_sum(in) / loss_tokens;
    }
    (scaler ? scaler->scale(loss) : loss).backward();
    total = total.defined() ? total + loss.detach() : loss.detach();
  }
  return total.defined() ? total : torch::zeros({}, torch::TensorOptions().device(device_));
}

torch::Tensor TrainSteps::run(std::vector<LossInputs>& micro, std::int64_t loss_tokens, LossScaler* scaler, std::ostream& out) {
  // A step prepare() left as collated (it fills the backbone's positions) runs eagerly: its shape is its own.
  if (graphs_ && refused_.empty() && micro.front().ids.size(1) <= text_limit_) {
    const auto key = std::make_pair(micro.front().ids.size(1), micro.front().predictors.size(0));
    auto it = shapes_.find(key);
    if (it == shapes_.end() && shapes_.size() < kMaxShapes) it = shapes_.emplace(key, std::make_unique<Shape>()).first;
    if (it != shapes_.end()) return run_graph(*it->second, micro, loss_tokens, scaler, out);
    if (!told_too_many_) {
      out << "  training step: more than " << kMaxShapes << " shapes; new ones run eagerly\n";
      told_too_many_ = true;
    }
  }
  const auto count = torch::full({}, static_cast<double>(loss_tokens), torch::TensorOptions().dtype(torch::kFloat32).device(device_));
  return passes(micro, count, scaler, /*into_grads=*/false);
}

torch::Tensor TrainSteps::run_graph(Shape& shape, std::vector<LossInputs>& micro, std::int64_t loss_tokens, LossScaler* scaler,
                                    std::ostream& out) {
  // The step's batch into the shape's inputs: copies queued on the stream (from pinned memory, or on the device
  // for cached features), then the graph reads them.
  if (shape.inputs.empty()) {
    shape.inputs = micro;
    for (auto& in : shape.inputs) {
      for (auto* t : in.tensors()) {
        if (t->defined()) *t = t->to(device_, /*non_blocking=*/true, /*copy=*/true);
      }
    }
    shape.count = torch::zeros({}, torch::TensorOptions().dtype(torch::kFloat32).device(device_));
  } else {
    if (micro.size() != shape.inputs.size()) throw std::logic_error("training step: another number of micro-batches");
    for (std::size_t m = 0; m < micro.size(); ++m) {
      auto to = shape.inputs[m].tensors();
      auto from = micro[m].tensors();
      for (std::size_t k = 0; k < to.size(); ++k) {
        if (to[k]->defined() != from[k]->defined() || (to[k]->defined() && to[k]->sizes() != from[k]->sizes())) {
          throw std::logic_error("training step: a batch of a fixed shape came with tensors of another shape");
        }
        if (to[k]->defined()) to[k]->copy_(*from[k], /*non_blocking=*/true);
      }
    }
  }
  shape.count.fill_(static_cast<double>(loss_tokens));
  if (shape.graph) {
    shape.graph->replay();
    for (std::size_t i = 0; i < params_.size(); ++i) params_[i].mutable_grad() = grads_[i];
    return shape.loss.clone();  // the next replay rewrites shape.loss; the trainer reads this one later
  }

  // First step of this shape: the eager passes, then the capture, then a replay on the same inputs that must
  // give the same loss and gradients. Dropout draws the same numbers in both: the replay starts from the
  // generator state the eager passes started from (a graph's random numbers follow the generator's offset at
  // replay time).
  auto rng = sdk::get_rng_state(device_);
  rng.cpu = torch::Tensor();  // the device's generator alone: dropout on CUDA draws from it
  const auto eager_loss = passes(shape.inputs, shape.count, scaler, /*into_grads=*/false);
  std::vector<torch::Tensor> eager_grads;
  for (const auto& p : params_) eager_grads.push_back(p.grad());
  if (grads_.empty()) {
    // The gradient tensors every graph writes, outside the graphs' pool: one set, whatever the number of shapes.
    for (const auto& g : eager_grads) grads_.push_back(g.defined() ? torch::zeros_like(g) : torch::Tensor());
  }
  auto refuse = [&](const std::string& why) {
    refused_ = why;
    out << "  training step: no CUDA graph: " << why << "; steps run eagerly\n";
    for (std::size_t i = 0; i < params_.size(); ++i) params_[i].mutable_grad() = eager_grads[i];
    shapes_.clear();  // `shape` too: every graph and its memory let go
    return eager_loss;
  };

  auto graph = std::make_unique<CudaGraph>();
  const CudaGraph* share = nullptr;  // shapes never run at once, and their outputs are read before the next runs
  for (const auto& [key, other] : shapes_) {
    if (other->graph) share = other->graph.get();
  }
  torch::Tensor captured_loss;
  try {
    // Warmed on the capture stream every time: autograd's threads set up their cuBLAS handles' workspaces
    // lazily, and a workspace first made during capture would live in the graph's memory.
    graph->capture(device_, [&] { captured_loss = passes(shape.inputs, shape.count, scaler, /*into_grads=*/true); }, share,
                   /*warm_up=*/true);
  } catch (const std::exception& e) {
    return refuse("capture failed: " + first_line(e.what()));
  }
  sdk::set_rng_state(device_, rng);
  graph->replay();

  // The check, with one wait for the device, once per shape: the gradients as one vector, their difference
  // relative to their norm. The same kernels on the same numbers, but some backward kernels add in a varying
  // order (atomics), which low precision rounds further apart.
  std::vector<torch::Tensor> diffs, sizes;
  for (std::size_t i = 0; i < params_.size(); ++i) {
    if (!eager_grads[i].defined()) continue;
    diffs.push_back((grads_[i].to(torch::kFloat32) - eager_grads[i].to(torch::kFloat32)).norm());
    sizes.push_back(eager_grads[i].to(torch::kFloat32).norm());
  }
  const double le = eager_loss.item<double>(), lg = captured_loss.item<double>();
  const double diff = diffs.empty() ? 0.0 : torch::stack(diffs).norm().item<double>();
  const double size = sizes.empty() ? 0.0 : torch::stack(sizes).norm().item<double>();
  const double tolerance = config_.precision == "fp32" ? 1e-3 : 1e-2;
  char numbers[160];
  std::snprintf(numbers, sizeof numbers, "loss %.7g against %.7g eager, gradients %.2g apart relative to their norm", lg, le,
                size > 0 ? diff / size : diff);
  if (!std::isfinite(lg) || std::abs(lg - le) > tolerance * std::max(1.0, std::abs(le)) || !(diff <= tolerance * std::max(size, 1e-12))) {
    return refuse(std::string("the replay differs from the eager passes (") + numbers + ")");
  }
  shape.graph = std::move(graph);
  shape.loss = captured_loss;
  out << "  training step as a CUDA graph: text width " << shape.inputs.front().ids.size(1) << ", loss slots "
      << shape.inputs.front().predictors.size(0) << "; replay checked (" << numbers << ")\n";
  for (std::size_t i = 0; i < params_.size(); ++i) params_[i].mutable_grad() = grads_[i];
  return captured_loss.clone();
}

}  // namespace ablate
