#pragma once
// Trains and evaluates one cell of a grid, recording as it goes: steps, evaluations (loss, metrics,
// generated samples), checkpoints and what trains. A run that was killed resumes from its last checkpoint
// with exactly the model, optimizer, random generators and data position it had.

#include <atomic>
#include <chrono>
#include <filesystem>
#include <functional>
#include <string>
#include <vector>

#include <torch/types.h>

#include "grid/experiment.hpp"
#include "model/vlm.hpp"
#include "store/store.hpp"
#include "train/train_steps.hpp"

namespace ablate {

class PluginHost;
class FeatureCache;

/// The whole grid's progress, for the progress line: train steps it still had to run when it started, and
/// how many of them are done.
struct GridProgress {
  std::int64_t planned = 0;
  std::int64_t done = 0;
  std::chrono::steady_clock::time_point start = std::chrono::steady_clock::now();
};

struct RunContext {
  RunContext(store::Store& s, const PluginHost& h) : store(s), host(h) {}
  store::Store& store;
  const PluginHost& host;
  torch::Device device = torch::kCPU;
  std::string device_label;  // describe_device(device), as the log and runs.device show it; empty: device.str()
  std::filesystem::path results_dir;  ///< checkpoints go under results_dir/checkpoints
  int workers = 1;                     ///< data worker threads
  const std::atomic<bool>* interrupted = nullptr;
  std::string revision;                ///< source revision of this runner
  std::string hostname;
  std::string progress_prefix;         ///< "[2/5 strategy=projector]"
  bool interactive = false;            ///< progress on one rewritten line (a terminal) or a line per log interval
  GridProgress grid;
  FeatureCache* features = nullptr;    ///< frozen-encoder features shared by the grid's cells; null: none
  DecodeGraphMode decode_graph = DecodeGraphMode::automatic;  ///< how generation runs its steps (model/vlm.hpp)
  TrainGraphMode train_graph = TrainGraphMode::automatic;    ///< how training runs its steps (train/train_steps.hpp)
};

enum class Outcome { done, diverged, interrupted };

/// Runs (or resumes) cell `cell` (or one stage of it) as run `run_id`. `earlier_stages`: for a stage, the
/// files of weights the stages before it changed, applied in order before its strategies. For a
/// decode-only cell, `checkpoint` is the training run's checkpoint folder: its trainable weights are
/// loaded and the cell's evaluation runs once, without training. Throws sdk::InputError on bad input,
/// other exceptions on failures; the caller records them.
Outcome run_cell(const Experiment& experiment, const Cell& cell, std::int64_t run_id, RunContext& ctx,
                 const std::vector<std::filesystem::path>& earlier_stages = {},
                 const std::filesystem::path& checkpoint = {});

}  // namespace ablate
