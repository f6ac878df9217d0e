// runner compare: one row per run of an experiment, the grid axes as columns, first and final eval loss and
// the final metrics; with [[stages]], which stage each run is.

#include <algorithm>
#include <fstream>
#include <optional>
#include <iostream>
#include <set>

#include <toml++/toml.h>

#include "ablate/sdk/error.hpp"
#include "cli/commands.hpp"
#include "grid/experiment.hpp"
#include "report/text.hpp"
#include "store/store.hpp"

namespace ablate::cli {

namespace {

// A TOML path gives its [experiment] name; anything else is taken as the name itself.
std::string experiment_name(const std::string& arg) {
  if (arg.size() > 5 && arg.compare(arg.size() - 5, 5, ".toml") == 0 && std::filesystem::exists(arg)) {
    try {
      auto doc = toml::parse_file(arg);
      if (auto name = doc["experiment"]["name"].value<std::string>()) return *name;
    } catch (const toml::parse_error& e) {
      throw sdk::InputError(arg + ":" + std::to_string(e.source().begin.line) + ": " + std::string(e.description()));
    }
    throw sdk::InputError(arg + ": no [experiment] name");
  }
  return arg;
}

}  // namespace

int compare(const Common& common, const CompareArgs& args) {
  if (!std::filesystem::exists(common.db)) throw sdk::InputError(common.db.string() + ": no results database here");
  store::Store db(common.db, /*create=*/false);
  const auto name = experiment_name(args.experiment);
  const auto id = db.experiment_id(name);
  if (!id) {
    std::string known;
    for (const auto& n : db.experiment_names()) known += (known.empty() ? "" : ", ") + n;
    throw sdk::InputError(common.db.string() + ": no experiment named '" + name + "' (recorded: " +
                          (known.empty() ? "none" : known) + ")");
  }
  const auto axes = db.experiment_axes(*id).get<std::vector<std::string>>();
  std::set<std::string> current;
  for (const auto& k : db.experiment_cells(*id)) current.insert(k.get<std::string>());

  struct Row {
    store::RunRow run;
    std::vector<std::pair<std::string, double>> metrics;
    std::optional<double> first_loss, last_loss;
    std::int64_t last_step = 0;
    double trainable_pct = 0;
  };
  std::vector<Row> rows;
  std::vector<std::string> metric_names;
  for (auto& run : db.runs(*id)) {
    // Ensembles (runner ensemble) are not grid cells but results of the experiment: always listed.
    if (!args.all && !current.count(run.cell_key) && run.stage_name != "ensemble") continue;
    Row r{run, {}, {}, {}, 0, 0};
    const auto evals = db.steps(run.id, "eval");
    if (!evals.empty()) {
      r.first_loss = evals.front().loss;
      r.last_loss = evals.back().loss;
      r.metrics = db.metrics_at(run.id, evals.back().step);
    } else if (const auto step = db.last_metrics_step(run.id)) {
      r.metrics = db.metrics_at(run.id, *step);  // an ensemble: metrics with no loss
    }
    const auto train = db.steps(run.id, "train");
    r.last_step = train.empty() ? 0 : train.back().step;
    std::int64_t total = 0, trainable = 0;
    for (const auto& t : db.trainables(run.id)) {
      total += t.params;
      trainable += t.trainable;
    }
    r.trainable_pct = total ? 100.0 * static_cast<double>(trainable) / static_cast<double>(total) : 0.0;
    for (const auto& [m, v] : r.metrics) {
      if (!args.groups && m.find('[') != std::string::npos) continue;
      if (std::find(metric_names.begin(), metric_names.end(), m) == metric_names.end()) metric_names.push_back(m);
    }
    rows.push_back(std::move(r));
  }

  // Staged cells: a run is one stage; the column says which ("3/3 instruct"). Without --all only the last
  // stages are listed (the cells' results); --all adds the earlier ones, shared ones once.
  const bool staged = std::any_of(rows.begin(), rows.end(), [](const Row& r) { return r.run.stages_total > 1; });
  std::vector<std::string> header{"run"};
  if (staged) header.push_back("stage");
  for (const auto& a : axes) header.push_back(a);
  const bool ensembles = std::any_of(rows.begin(), rows.end(), [](const Row& r) { return r.run.stage_name == "ensemble"; });
  if (ensembles) header.push_back("ensemble");
  for (const char* h : {"status", "step", "trainable%", "eval_loss@first", "eval_loss"}) header.push_back(h);
  for (const auto& m : metric_names) header.push_back(m);
  std::vector<std::vector<std::string>> table;
  for (const auto& r : rows) {
    std::vector<std::string> cells{std::to_string(r.run.id)};
    if (staged) {
      cells.push_back(std::to_string(r.run.stage + 1) + "/" + std::to_string(r.run.stages_total) +
                      (r.run.stage_name.empty() ? "" : " " + report::printable(r.run.stage_name)));
    }
    for (const auto& a : axes) cells.push_back(r.run.axes.contains(a) ? value_label(r.run.axes[a]) : "");
    if (ensembles) cells.push_back(r.run.stage_name == "ensemble" ? value_label(r.run.axes.value("ensemble", Json(""))) : "");
    cells.push_back(store::status_name(r.run.status));
    const bool trained = r.run.stage_name != "ensemble";  // an ensemble has no steps and trains nothing
    cells.push_back(trained ? std::to_string(r.last_step) + "/" + std::to_string(r.run.steps_total) : "");
    cells.push_back(trained ? report::fixed(r.trainable_pct, 2) : "");
    cells.push_back(r.first_loss ? report::fixed(*r.first_loss) : "");
    cells.push_back(r.last_loss ? report::fixed(*r.last_loss) : "");
    for (const auto& m : metric_names) {
      std::string v;
      for (const auto& [name, value] : r.metrics) {
        if (name == m) v = report::fixed(value);
      }
      cells.push_back(v);
    }
    table.push_back(std::move(cells));
  }
  std::cout << "experiment " << report::printable(name) << ": " << rows.size() << " run" << (rows.size() == 1 ? "" : "s")
            << " (" << common.db.string() << ")\n";
  report::print_table(std::cout, header, table);
  for (const auto& r : rows) {
    if (!r.run.error.empty()) std::cout << "run " << r.run.id << ": " << report::printable(r.run.error) << "\n";
  }
  return 0;
}

}  // namespace ablate::cli
