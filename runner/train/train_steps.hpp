#pragma once
// A training step's forward and backward passes, as the trainer's loop runs them (train/trainer.cpp), in one of
// two ways (`runner --train-graph`):
//  - eager: each step's micro-batches as collated, their own length;
//  - fixed shapes: each step padded to one of a few shapes (text columns and loss slots rounded up to a ladder
//    of sizes), so that on CUDA a shape's forward and backward passes are one CUDA graph, captured the first
//    time the shape comes, checked once against the eager passes on the same batch, and replayed after that.
//    The padding changes no number that matters: padded text is never attended to, padded loss slots predict
//    no token. On the CPU the same padded steps run eagerly (what the tests can check without a GPU).
// The optimizer's update stays outside the graph: a few multi-tensor kernels, with the learning rate and step
// counts on the host, as checkpoints keep them.

#include <cstdint>
#include <map>
#include <memory>
#include <ostream>
#include <string>
#include <utility>
#include <vector>

#include <torch/types.h>

#include "data/batches.hpp"

namespace ablate {

class VlmModel;
class LossScaler;
class CudaGraph;
struct TrainConfig;

/// auto: fixed shapes and CUDA graphs on CUDA (without gradient checkpointing), else eager; on: fixed shapes,
/// CUDA graphs on CUDA; off: eager.
enum class TrainGraphMode { automatic, on, off };

class TrainSteps {
 public:
  TrainSteps(VlmModel& model, std::vector<torch::Tensor> params, const TrainConfig& config, torch::Device device,
             TrainGraphMode mode);
  ~TrainSteps();
  TrainSteps(const TrainSteps&) = delete;
  TrainSteps& operator=(const TrainSteps&) = delete;

  /// Steps are padded to fixed shapes.
  bool fixed_shapes() const { return fixed_; }
  /// How the steps run, for the log: "eager", "padded to fixed shapes, each shape a CUDA graph", ...
  std::string describe() const;
  /// On a data thread: the step's micro-batches as the loss reads them, all padded to one shape when fixed.
  std::vector<LossInputs> prepare(const std::vector<TrainBatch>& micro) const;
  /// Forward and backward passes of one step (its micro-batches' features set when the feature cache stands
  /// in): the gradients are left in the parameters, and the step's loss, the mean over its `loss_tokens`, is
  /// returned on the device. Lines about capturing go to `out`.
  torch::Tensor run(std::vector<LossInputs>& micro, std::int64_t loss_tokens, LossScaler* scaler, std::ostream& out);

  /// The size a text width or a loss-slot count is padded to: 16, 24, 32, 48, 64, 96, ... (powers of two and
  /// one and a half times them), at most `limit`.
  static std::int64_t bucket(std::int64_t n, std::int64_t limit);

 private:
  struct Shape;  // one fixed shape: its inputs on the device, its graph, its outputs
  /// Forward and backward over `micro`: the gradients made afresh, or with `into_grads` zeroed and added into
  /// grads_ (what a graph captures). Returns the step's loss (its tensor is the graph's output when captured).
  torch::Tensor passes(std::vector<LossInputs>& micro, const torch::Tensor& loss_tokens, LossScaler* scaler, bool into_grads);
  torch::Tensor run_graph(Shape& shape, std::vector<LossInputs>& micro, std::int64_t loss_tokens, LossScaler* scaler,
                          std::ostream& out);

  VlmModel& model_;
  std::vector<torch::Tensor> params_;
  const TrainConfig& config_;
  torch::Device device_;
  bool fixed_ = false, graphs_ = false;
  std::int64_t text_limit_ = 0;
  std::map<std::pair<std::int64_t, std::int64_t>, std::unique_ptr<Shape>> shapes_;  ///< by (text width, loss slots)
  std::vector<torch::Tensor> grads_;  ///< per parameter, what every graph writes; undefined where a step gives none
  std::string refused_;  ///< why the steps are not CUDA graphs, once that was found: not tried again
  bool told_too_many_ = false;
};

}  // namespace ablate
