#include "report/runs.hpp"

#include <algorithm>
#include <filesystem>
#include <set>

#include <toml++/toml.h>

#include "ablate/sdk/error.hpp"
#include "grid/experiment.hpp"
#include "report/text.hpp"

namespace ablate::report {

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

Selection parse_selection(bool all, const std::vector<std::string>& where, const std::vector<std::string>& status) {
  Selection sel;
  sel.all = all;
  sel.status = status;
  for (const auto& w : where) {
    const auto eq = w.find('=');
    if (eq == std::string::npos || eq == 0) throw sdk::InputError("--where " + w + ": expected AXIS=VALUE (as compare prints it)");
    sel.where.emplace_back(w.substr(0, eq), w.substr(eq + 1));
  }
  return sel;
}

std::optional<double> RunSummary::metric(const std::string& name) const {
  for (const auto& [n, v] : metrics) {
    if (n == name) return v;
  }
  return std::nullopt;
}

std::optional<double> RunSummary::number(const std::string& column) const {
  if (column == "eval_loss") return last_loss;
  if (column == "eval_loss@first") return first_loss;
  if (column == "trainable%") return trainable_pct;
  if (column == "step") return ensemble() ? std::nullopt : std::optional<double>(static_cast<double>(last_step));
  if (column == "run") return static_cast<double>(run.id);
  return metric(column);
}

std::vector<std::string> ExperimentView::metric_names(bool groups) const {
  std::vector<std::string> names;
  for (const auto& r : runs) {
    for (const auto& [m, v] : r.metrics) {
      if (!groups && m.find('[') != std::string::npos) continue;
      if (std::find(names.begin(), names.end(), m) == names.end()) names.push_back(m);
    }
  }
  return names;
}

std::vector<std::string> ExperimentView::differing_axes(const std::vector<const RunSummary*>& chosen) const {
  std::vector<std::string> out;
  for (const auto& a : axes) {
    std::set<std::string> values;
    for (const auto* r : chosen) values.insert(r->run.axes.contains(a) ? r->run.axes[a].dump() : "");
    if (values.size() > 1) out.push_back(a);
  }
  return out;
}

RunTable run_table(const ExperimentView& view, const std::vector<std::string>& numbers,
                   const std::function<std::string(std::optional<double>)>& format) {
  const bool staged = std::any_of(view.runs.begin(), view.runs.end(), [](const RunSummary& r) { return r.run.stages_total > 1; });
  const bool ensembles = std::any_of(view.runs.begin(), view.runs.end(), [](const RunSummary& r) { return r.ensemble(); });
  RunTable t;
  t.header.push_back("run");
  if (staged) t.header.push_back("stage");
  for (const auto& a : view.axes) t.header.push_back(a);
  if (ensembles) t.header.push_back("ensemble");
  for (const char* h : {"status", "step", "trainable%"}) t.header.push_back(h);
  for (const auto& n : numbers) t.header.push_back(n);
  for (const auto& r : view.runs) {
    std::vector<std::string> cells{std::to_string(r.run.id)};
    if (staged) {
      cells.push_back(std::to_string(r.run.stage + 1) + "/" + std::to_string(r.run.stages_total) +
                      (r.run.stage_name.empty() ? "" : " " + r.run.stage_name));
    }
    for (const auto& a : view.axes) cells.push_back(r.run.axes.contains(a) ? value_label(r.run.axes[a]) : "");
    if (ensembles) cells.push_back(r.ensemble() ? value_label(r.run.axes.value("ensemble", Json(""))) : "");
    cells.push_back(store::status_name(r.run.status));
    // An ensemble has no steps and trains nothing.
    cells.push_back(r.ensemble() ? "" : std::to_string(r.last_step) + "/" + std::to_string(r.run.steps_total));
    cells.push_back(r.trainable_pct ? fixed(*r.trainable_pct, 2) : "");
    for (const auto& n : numbers) cells.push_back(format(r.number(n)));
    t.rows.push_back(std::move(cells));
  }
  return t;
}

std::string run_label(const RunSummary& r, const std::vector<std::string>& axes) {
  if (r.ensemble()) return r.run.label;
  std::string label;
  for (const auto& a : axes) {
    if (!r.run.axes.contains(a)) continue;
    label += (label.empty() ? "" : ", ") + a + "=" + value_label(r.run.axes[a]);
  }
  if (r.run.stages_total > 1 && !r.run.stage_name.empty()) label += (label.empty() ? "" : ", ") + std::string("stage ") + r.run.stage_name;
  return label.empty() ? "run " + std::to_string(r.run.id) : label;
}

ExperimentView load_experiment(store::Store& db, const std::string& experiment, const Selection& selection,
                               const std::string& db_name) {
  ExperimentView view;
  view.name = experiment_name(experiment);
  const auto id = db.experiment_id(view.name);
  if (!id) {
    std::string known;
    for (const auto& n : db.experiment_names()) known += (known.empty() ? "" : ", ") + n;
    throw sdk::InputError(db_name + ": no experiment named '" + view.name + "' (recorded: " + (known.empty() ? "none" : known) + ")");
  }
  view.id = *id;
  view.axes = db.experiment_axes(*id).get<std::vector<std::string>>();
  for (const auto& [axis, value] : selection.where) {
    if (std::find(view.axes.begin(), view.axes.end(), axis) == view.axes.end()) {
      std::string known;
      for (const auto& a : view.axes) known += (known.empty() ? "" : ", ") + a;
      throw sdk::InputError("--where " + axis + "=" + value + ": experiment '" + view.name + "' has no axis '" + axis +
                            "' (axes: " + (known.empty() ? "none" : known) + ")");
    }
  }
  for (const auto& s : selection.status) {
    static const std::set<std::string> kKnown = {"pending", "running", "done", "failed", "diverged", "interrupted"};
    if (!kKnown.count(s)) throw sdk::InputError("--status " + s + ": not a run status (pending, running, done, failed, diverged, interrupted)");
  }
  std::set<std::string> current;
  for (const auto& k : db.experiment_cells(*id)) current.insert(k.get<std::string>());

  for (auto& run : db.runs(*id)) {
    const bool ensemble = run.stage_name == "ensemble";
    if (!selection.all && !current.count(run.cell_key) && !ensemble) continue;
    if (!selection.status.empty() &&
        std::find(selection.status.begin(), selection.status.end(), store::status_name(run.status)) == selection.status.end()) {
      continue;
    }
    const bool matches = std::all_of(selection.where.begin(), selection.where.end(), [&](const auto& w) {
      return run.axes.contains(w.first) && value_label(run.axes[w.first]) == w.second;
    });
    if (!matches) continue;
    RunSummary r;
    r.run = std::move(run);
    const auto evals = db.steps(r.run.id, "eval");
    if (!evals.empty()) {
      r.first_loss = evals.front().loss;
      r.last_loss = evals.back().loss;
    }
    if (const auto step = db.last_metrics_step(r.run.id)) r.metrics = db.metrics_at(r.run.id, *step);
    const auto train = db.steps(r.run.id, "train");
    r.last_step = train.empty() ? 0 : train.back().step;
    if (!ensemble) {
      std::int64_t total = 0, trainable = 0;
      for (const auto& t : db.trainables(r.run.id)) {
        total += t.params;
        trainable += t.trainable;
      }
      r.trainable_pct = total ? 100.0 * static_cast<double>(trainable) / static_cast<double>(total) : 0.0;
    }
    view.runs.push_back(std::move(r));
  }
  return view;
}

}  // namespace ablate::report
