#pragma once
// The runner's commands. Each returns the process exit status: 0 success, 1 a run or plugin failed,
// 2 bad input (nothing recorded), 130 interrupted.

#include <filesystem>
#include <string>
#include <vector>

namespace ablate::cli {

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
  int workers = 1;
  int threads = 0;  ///< intra-op threads for libtorch; 0: its default
};

int run(const Common& common, const RunArgs& args);
int plugins(const Common& common);

struct CompareArgs {
  std::string experiment;  ///< a name, or a path to the experiment's TOML
  bool all = false;        ///< also runs of cells no longer in the grid
  bool groups = false;     ///< also per-group metrics ("exact_match[task=position]")
};
int compare(const Common& common, const CompareArgs& args);

struct ReplayArgs {
  std::vector<std::int64_t> runs;  ///< one run, or several shown side by side (matched on sample id)
  std::int64_t step = -1;  ///< -1: the last step with samples
  std::filesystem::path images;  ///< write images here when set
};
int replay(const Common& common, const ReplayArgs& args);

struct EnsembleArgs {
  std::vector<std::int64_t> runs;  ///< in order of precedence: a tied vote goes to the earliest
};
int ensemble(const Common& common, const EnsembleArgs& args);

}  // namespace ablate::cli
