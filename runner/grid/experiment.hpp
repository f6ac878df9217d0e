#pragma once
// Experiments: a TOML file read into a JSON tree (with the line of every value), its [grid] expanded into
// cells, and each cell resolved: host sections and every plugin's options parsed with their defaults,
// unknown keys refused, and the resolved configuration hashed into the cell's canonical key.
// Only runner/ knows about the grid; plugins see their own table.

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "ablate/sdk/options.hpp"
#include "ablate/sdk/registry.hpp"

namespace ablate {

class PluginHost;
using sdk::Json;

/// A plugin named in a cell: its kind, id, version and where its options table sits in the cell's tree.
struct PluginRef {
  sdk::Kind kind = sdk::Kind::encoder;
  std::string id;
  int version = 1;
  std::string pointer;  ///< JSON pointer of its table in the cell's config ("/model/encoder")
  std::string display;  ///< dotted name for messages ("model.encoder")
  std::string qualified() const { return std::string(sdk::kind_name(kind)) + "/" + id; }
};

/// One dataset of [data] train or eval.
struct DataSource {
  PluginRef plugin;
  std::int64_t limit = 0;  ///< 0: every sample
  /// A sample the dataset cannot make (sdk::SampleError: a missing or corrupt image): "fail" stops the run
  /// naming it; "skip" reports it and goes on (training takes the next sample that works instead).
  std::string on_bad_sample = "fail";
  /// In a mixture: the share of training draws from this dataset (weights are normalised over the mixture).
  double weight = 1.0;
  /// In a mixture: how its samples are told apart ("<name>/<sample id>", metadata "dataset"). Default: the
  /// plugin id.
  std::string name;
};

/// [data] train or eval: one dataset (a table), or a mixture (an array of tables). Training draws from a
/// mixture's datasets at random in proportion to their weights; evaluation takes all of each, in order.
struct DataRef {
  std::vector<DataSource> sources;
  bool mixture() const { return sources.size() > 1; }
  std::string display() const;  ///< "data.train", for messages about the whole role
};

struct Schedule {
  std::string kind = "cosine";  ///< constant, linear, cosine
  double warmup_ratio = 0.0;
  std::int64_t warmup_steps = -1;  ///< when >= 0, wins over warmup_ratio
};

struct TrainConfig {
  std::int64_t steps = 100;
  std::int64_t batch_size = 8;
  std::int64_t grad_accum = 1;
  double lr = 1e-4;
  double weight_decay = 0.0;
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
  double max_grad_norm = 1.0;  ///< <= 0: no clipping
  Schedule schedule;
  std::int64_t checkpoint_every = 0;  ///< 0: only at the end
  std::int64_t keep_checkpoints = 2;
  std::int64_t log_every = 10;
  std::int64_t max_text_tokens = 64;
  std::string loss_on = "target";  ///< target (default) or text
  std::string precision = "fp32";  ///< fp32, bf16 or fp16: mixed precision (autocast), fp32 master weights
  bool tf32 = false;  ///< CUDA: float32 matrix products on TF32 tensor cores (torch.backends.cuda.matmul.allow_tf32)
  std::vector<std::string> gradient_checkpointing;  ///< components whose layers recompute activations
};

/// A strategy's own optimizer settings (its table's lr and weight_decay), for the parameters it trains.
struct StrategyGroup {
  std::optional<double> lr, weight_decay;
};

struct GenerateConfig {
  std::int64_t max_new_tokens = 16;
  bool do_sample = false;
  double temperature = 1.0, top_p = 1.0;
  std::int64_t top_k = 0;
  std::vector<std::string> stop;
  Json to_json() const;
};

struct EvalConfig {
  std::int64_t every = 0;  ///< 0: only at the end
  bool at_start = true;    ///< evaluate before the first step too
  std::int64_t samples = 16;  ///< generations stored per evaluation; -1 ("all"): every one
  std::int64_t batch_size = 32;
  GenerateConfig generate;
  /// Applied in order to each generated text before metrics see it: "first_line" (cut at the first
  /// newline), "strip" (surrounding whitespace), "lowercase" (ASCII).
  std::vector<std::string> postprocess;
  std::vector<PluginRef> metrics;
  /// A sample metadata field ("task", "question_type"): each metric is also recorded per value of it, as
  /// "exact_match[task=position]".
  std::string group_by;
};

/// One cell of the grid, fully resolved.
struct Cell {
  std::int64_t index = 0;
  Json axes = Json::object();  ///< axis -> value
  std::string label;           ///< "strategy=projector+head, train.lr=0.001"
  Json config;                 ///< the cell's own tree (grid applied)
  std::shared_ptr<const sdk::SourceMap> where;
  Json resolved;               ///< every key with its value or default: what is hashed
  std::string key;             ///< SHA-256 hex of the canonical resolved configuration

  std::string name;            ///< experiment name
  std::uint64_t seed = 0;
  std::string layout = "prefix";  ///< prefix (GIT), inline (LLaVA), prefix_lm (PaliGemma)
  std::string image_token = "<image>";  ///< inline: the text token the image replaces
  PluginRef encoder, projector, backbone;
  std::vector<PluginRef> strategies;
  std::vector<StrategyGroup> strategy_groups;  ///< one per strategy
  DataRef train_data, eval_data;
  TrainConfig train;
  EvalConfig eval;
  Json export_dirs = Json::object();  ///< component -> folder, written after the run is done
  Json export_adapters = Json::object();  ///< component -> folder for its PEFT adapter

  // ---- [[stages]]: a cell that trains in stages is its last stage, with the earlier ones in `before`.
  // Each stage is a cell of its own (its configuration is the file's with the stage's tables merged over
  // it) whose key covers every stage up to it, so cells that share a prefix of stages share those runs.
  std::string stage_name;        ///< "" when the experiment has no stages
  std::int64_t stage_index = 0;  ///< 0-based
  std::int64_t stage_count = 1;
  std::vector<Cell> before;      ///< the earlier stages, in order (empty without stages)

  /// Every plugin the cell names (model parts, datasets, strategies, metrics), in a fixed order.
  std::vector<const PluginRef*> plugins() const;

  // ---- decoding sweeps: grid axes under eval.generate / eval.postprocess do not retrain. A cell with such
  // axes is a decode-only run over the final checkpoint of its training run, which is the last of `before`
  // (configured without those axes, so that cells differing only in decoding share it, and adding a
  // decoding axis to a finished experiment trains nothing).
  bool decode_only = false;

  /// A fresh options view over a plugin's table in this cell (for creating the plugin).
  sdk::Options options(const PluginRef& ref) const;
};

struct Experiment {
  std::filesystem::path file;
  std::filesystem::path base_dir;  ///< relative paths in the file resolve against this folder
  std::string text;
  std::string text_sha256;
  std::string name;
  std::vector<std::filesystem::path> requires;  ///< experiments to run first
  std::vector<std::string> axes;                ///< grid axes in file order
  std::vector<Cell> cells;
};

/// [train] read from its table, with defaults; throws OptionError on a bad value.
TrainConfig parse_train_config(sdk::Options& table);

/// Reads and expands an experiment file and resolves every cell against the registered plugins. Throws
/// sdk::InputError ("FILE:LINE: key: problem") on any bad input. Does not touch weights folders.
Experiment load_experiment(const std::filesystem::path& file, const PluginHost& host);

/// Hashes the canonical configuration of each cell, with a fingerprint of every `weights` folder it names
/// (which must exist by now). Sets Cell::key.
void compute_keys(Experiment& experiment);

/// SHA-256 over a folder's files: names, sizes and contents (files over 64 MiB are sampled at their start,
/// middle and end, so that multi-gigabyte checkpoints are fingerprinted in milliseconds).
std::string fingerprint_folder(const std::filesystem::path& dir);

/// A short readable label of an axis value: "projector+lora(r=8)", "0.001".
std::string value_label(const Json& value);

}  // namespace ablate
