#pragma once
// What every results view starts from: an experiment's runs with their final numbers, selected by axis
// values and status. `runner compare`, `runner report` and `runner serve` all read the database through here.

#include <functional>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "store/store.hpp"

namespace ablate::report {

struct RunSummary {
  store::RunRow run;
  std::vector<std::pair<std::string, double>> metrics;  ///< at the run's last step with metrics
  std::optional<double> first_loss, last_loss;          ///< eval loss at the first and last evaluation
  std::int64_t last_step = 0;                           ///< last train step recorded
  std::optional<double> trainable_pct;                  ///< share of parameters that train (none: an ensemble)
  bool ensemble() const { return run.stage_name == "ensemble"; }
  std::optional<double> metric(const std::string& name) const;
  /// A column's value as a number: "eval_loss", "eval_loss@first", "trainable%", "step" or a metric.
  std::optional<double> number(const std::string& column) const;
};

struct Selection {
  bool all = false;  ///< also runs of cells no longer in the grid (ensembles are always shown)
  std::vector<std::pair<std::string, std::string>> where;  ///< axis = value label, all must hold
  std::vector<std::string> status;                         ///< any of these (empty: every status)
};

/// From the command line: `where` entries are "AXIS=VALUE".
Selection parse_selection(bool all, const std::vector<std::string>& where, const std::vector<std::string>& status);

struct ExperimentView {
  std::int64_t id = 0;
  std::string name;
  std::vector<std::string> axes;  ///< the grid's axes, in file order
  std::vector<RunSummary> runs;   ///< in run order
  /// Metric names over the runs, in first-seen order; `groups`: per-group ones ("exact_match[task=x]") too.
  std::vector<std::string> metric_names(bool groups) const;
  /// The axes whose values differ between `runs` (what tells them apart), in axis order.
  std::vector<std::string> differing_axes(const std::vector<const RunSummary*>& runs) const;
};

/// `experiment` is a name or the path of its TOML file. Throws sdk::InputError naming `db_name` when the
/// experiment is not recorded, or when `where` names an axis the experiment does not have.
ExperimentView load_experiment(store::Store& db, const std::string& experiment, const Selection& selection,
                               const std::string& db_name);

/// The runs table that compare and the HTML views show: run, stage (staged experiments), the axes, ensemble
/// (its members, when there is one), status, step, trainable%, then each of `numbers` (a RunSummary::number
/// column) written by `format`.
struct RunTable {
  std::vector<std::string> header;
  std::vector<std::vector<std::string>> rows;  ///< one per run of the view, in its order
};
RunTable run_table(const ExperimentView& view, const std::vector<std::string>& numbers,
                   const std::function<std::string(std::optional<double>)>& format);

/// A run's short label from the axes that tell it apart from the others ("strategy=full"), or "run N".
std::string run_label(const RunSummary& r, const std::vector<std::string>& axes);

}  // namespace ablate::report
