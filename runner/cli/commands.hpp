#pragma once
// The runner's commands. Each returns the process exit status: 0 success, 1 a run or plugin failed,
// 2 bad input (nothing recorded), 130 interrupted.

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "ablate/sdk/error.hpp"

namespace ablate::cli {

/// The value of an auto|on|off option (--feature-cache, --decode-graph, --train-graph, --fused-norm) as
/// Mode::automatic, on or off; bad input otherwise.
template <class Mode>
Mode parse_auto_on_off(const std::string& option, const std::string& value) {
  if (value == "auto") return Mode::automatic;
  if (value == "on") return Mode::on;
  if (value == "off") return Mode::off;
  throw sdk::InputError(option + " " + value + ": expected auto, on or off");
}

struct Common {
  std::filesystem::path executable;
  std::filesystem::path db = "results/results.db";
  std::vector<std::string> plugin_dirs;
  bool verbose = false;
};

struct RunArgs {
  std::vector<std::filesystem::path> experiments;
  bool dry_run = false;
  std::string device = "auto";
  int workers = 0;  ///< data threads; 0: half the cores, at most 8
  int threads = 0;  ///< intra-op threads for libtorch; 0: its default
  std::string feature_cache = "auto";  ///< frozen-encoder feature cache: auto, on, off
  double feature_cache_gib = -1;       ///< memory for it; < 0: a quarter of the device's
  std::string decode_graph = "auto";   ///< decode steps: auto, on (fixed-size KV cache, CUDA graph), off
  std::string train_graph = "auto";    ///< training steps: auto (graphs on CUDA, else eager), on (fixed shapes, CUDA graphs), off
  std::string fused_norm = "auto";     ///< sdk::add_layer_norm's fused path: auto (on for CUDA), on, off
  std::string fused_relu = "off";      ///< sdk::relu_mlp's fused node: on, off
};

int run(const Common& common, const RunArgs& args);
int plugins(const Common& common);

/// Which runs of an experiment a view shows (compare, curves, report).
struct RunFilter {
  bool all = false;                  ///< also runs of cells no longer in the grid
  std::vector<std::string> where;    ///< "axis=value": only runs with that value (as compare prints it)
  std::vector<std::string> status;   ///< only runs with one of these statuses
};

struct CompareArgs {
  std::string experiment;  ///< a name, or a path to the experiment's TOML
  RunFilter filter;
  bool groups = false;     ///< also per-group metrics ("exact_match[task=position]")
  std::vector<std::string> metrics;  ///< these metric columns (default: every whole-set metric)
  bool summary = false;    ///< cells over seeds: mean and standard deviation, best cell, per-axis means
  std::string sort;        ///< a column to sort by
  bool desc = false;
  std::string format = "table";  ///< table, csv, json, markdown
};
int compare(const Common& common, const CompareArgs& args);

struct ReplayArgs {
  std::vector<std::int64_t> runs;  ///< one run, or several shown side by side (matched on sample id)
  std::int64_t step = -1;  ///< -1: the last step with samples
  std::filesystem::path images;  ///< write images here when set
  std::vector<std::string> samples;  ///< only these sample ids (default: every sample of the step)
};
int replay(const Common& common, const ReplayArgs& args);

struct CurvesArgs {
  std::string experiment;
  RunFilter filter;
  std::vector<std::int64_t> runs;    ///< only these (default: every run the filter keeps)
  std::vector<std::string> metrics;  ///< metric curves (default: every whole-set metric)
  std::filesystem::path out = "curves";
};
int curves(const Common& common, const CurvesArgs& args);

struct ReportArgs {
  std::string experiment;
  RunFilter filter;
  std::filesystem::path out = "report.html";
  std::size_t samples = 24;  ///< sample ids in the gallery
};
int report(const Common& common, const ReportArgs& args);

struct ServeArgs {
  std::string db;  ///< positional; default: --db
  std::string host = "127.0.0.1";
  int port = 8765;  ///< 0: any free port (printed)
  int refresh = 10;  ///< seconds between a page's reloads; 0: none
  bool verbose = false;
};
int serve(const Common& common, const ServeArgs& args);

struct EnsembleArgs {
  std::vector<std::int64_t> runs;  ///< in order of precedence: a tied vote goes to the earliest
};
int ensemble(const Common& common, const EnsembleArgs& args);

}  // namespace ablate::cli
