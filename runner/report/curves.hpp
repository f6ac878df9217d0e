#pragma once
// The curves of chosen runs: train loss, eval loss and each metric over steps, one line per run labelled by
// the axes that differ between the runs. Shared by `runner curves` (files) and the HTML views (inline).

#include <string>
#include <utility>
#include <vector>

#include "report/plot.hpp"
#include "report/runs.hpp"

namespace ablate::report {

struct NamedChart {
  std::string stem;  ///< file name without extension: "train_loss", "eval_loss", "exact_match"
  Chart chart;
};

/// `metrics`: which metric curves (empty: every whole-set metric the runs recorded).
std::vector<NamedChart> curves(store::Store& db, const ExperimentView& view, const std::vector<const RunSummary*>& runs,
                               const std::vector<std::string>& metrics = {});

}  // namespace ablate::report
