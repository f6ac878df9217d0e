// runner compare: one row per run of an experiment (grid axes, status, trainable share, first and final eval
// loss, final metrics), filtered by axis values and status, sorted, as an aligned table, CSV, JSON or
// Markdown; with --summary, the cells averaged over seeds (mean and standard deviation), the best cell per
// metric and each axis's values averaged over the rest.

#include <algorithm>
#include <cmath>
#include <iostream>
#include <map>

#include <nlohmann/json.hpp>

#include "ablate/sdk/error.hpp"
#include "cli/commands.hpp"
#include "grid/experiment.hpp"
#include "report/runs.hpp"
#include "report/text.hpp"
#include "store/store.hpp"

namespace ablate::cli {

namespace {

using report::RunSummary;
using Table = std::vector<std::vector<std::string>>;

// Losses are better low; every metric here is better high.
bool lower_is_better(const std::string& column) { return column.rfind("eval_loss", 0) == 0; }

bool is_seed_axis(const std::string& axis) { return axis == "seed" || (axis.size() > 5 && axis.compare(axis.size() - 5, 5, ".seed") == 0); }

struct Stat {
  std::size_t n = 0;
  double mean = 0, std = NAN;  ///< sample standard deviation; NaN with fewer than two values
};

Stat stat(const std::vector<double>& xs) {
  Stat s;
  s.n = xs.size();
  if (xs.empty()) return s;
  for (double x : xs) s.mean += x;
  s.mean /= static_cast<double>(xs.size());
  if (xs.size() > 1) {
    double ss = 0;
    for (double x : xs) ss += (x - s.mean) * (x - s.mean);
    s.std = std::sqrt(ss / static_cast<double>(xs.size() - 1));
  }
  return s;
}

void emit(std::ostream& out, const std::string& format, const std::vector<std::string>& header, const Table& rows) {
  if (format == "csv") report::write_csv(out, header, rows);
  else if (format == "markdown") report::write_markdown(out, header, rows);
  else report::print_table(out, header, rows);
}

}  // namespace

int compare(const Common& common, const CompareArgs& args) {
  if (!std::filesystem::exists(common.db)) throw sdk::InputError(common.db.string() + ": no results database here");
  if (args.format != "table" && args.format != "csv" && args.format != "json" && args.format != "markdown") {
    throw sdk::InputError("--format " + args.format + ": must be table, csv, json or markdown");
  }
  const auto sel = report::parse_selection(args.filter.all, args.filter.where, args.filter.status);
  store::Store db(common.db, /*create=*/false);
  auto view = report::load_experiment(db, args.experiment, sel, common.db.string());

  auto metric_names = view.metric_names(args.groups);
  std::vector<std::string> wanted;  // --metrics a b, or a,b
  for (const auto& m : args.metrics) {
    std::size_t start = 0;
    for (auto comma = m.find(','); ; comma = m.find(',', start)) {
      const auto part = m.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
      if (!part.empty()) wanted.push_back(part);
      if (comma == std::string::npos) break;
      start = comma + 1;
    }
  }
  if (!wanted.empty()) {
    for (const auto& m : wanted) {
      const auto all = view.metric_names(true);
      if (std::find(all.begin(), all.end(), m) == all.end() && !view.runs.empty()) {
        std::string known;
        for (const auto& k : view.metric_names(false)) known += (known.empty() ? "" : ", ") + k;
        throw sdk::InputError("--metrics " + m + ": no run of '" + view.name + "' recorded it (recorded: " + (known.empty() ? "none" : known) + ")");
      }
    }
    metric_names = wanted;
  }

  // Sorting: by a number column (runs without one last) or an axis's label; stable, so run order breaks ties.
  if (!args.sort.empty()) {
    const bool axis = std::find(view.axes.begin(), view.axes.end(), args.sort) != view.axes.end();
    static const std::vector<std::string> kNumbers = {"run", "step", "trainable%", "eval_loss@first", "eval_loss"};
    const auto all = view.metric_names(true);
    if (!axis && std::find(kNumbers.begin(), kNumbers.end(), args.sort) == kNumbers.end() &&
        std::find(all.begin(), all.end(), args.sort) == all.end()) {
      throw sdk::InputError("--sort " + args.sort + ": not a column (an axis, run, step, trainable%, eval_loss, or a metric)");
    }
    std::stable_sort(view.runs.begin(), view.runs.end(), [&](const RunSummary& a, const RunSummary& b) {
      if (axis) {
        const auto la = a.run.axes.contains(args.sort) ? value_label(a.run.axes[args.sort]) : "";
        const auto lb = b.run.axes.contains(args.sort) ? value_label(b.run.axes[args.sort]) : "";
        return args.desc ? lb < la : la < lb;
      }
      const auto va = a.number(args.sort), vb = b.number(args.sort);
      if (!va || !vb) return va.has_value() && !vb.has_value();
      return args.desc ? *vb < *va : *va < *vb;
    });
  }

  std::vector<std::string> numbers = {"eval_loss@first", "eval_loss"};
  numbers.insert(numbers.end(), metric_names.begin(), metric_names.end());
  const bool text = args.format == "table" || args.format == "markdown";
  auto number = [&](std::optional<double> v) { return !v ? std::string() : text ? report::fixed(*v) : report::exact(*v); };

  if (!args.summary) {
    if (args.format == "json") {
      nlohmann::json runs = nlohmann::json::array();
      for (const auto& r : view.runs) {
        nlohmann::json j = {{"run", r.run.id}, {"label", r.run.label}, {"axes", r.run.axes}, {"status", store::status_name(r.run.status)},
                            {"stage", r.run.stage}, {"stage_name", r.run.stage_name}, {"step", r.last_step},
                            {"steps_total", r.run.steps_total}, {"seed", r.run.seed}, {"error", r.run.error}};
        j["trainable_pct"] = r.trainable_pct ? nlohmann::json(*r.trainable_pct) : nlohmann::json();
        for (const auto& n : numbers) j[n] = r.number(n) ? nlohmann::json(*r.number(n)) : nlohmann::json();
        runs.push_back(j);
      }
      std::cout << nlohmann::json{{"experiment", view.name}, {"database", common.db.string()}, {"axes", view.axes}, {"runs", runs}}.dump(1) << "\n";
      return 0;
    }
    const auto table = report::run_table(view, numbers, number);
    if (args.format == "table") {
      std::cout << "experiment " << report::printable(view.name) << ": " << table.rows.size() << " run"
                << (table.rows.size() == 1 ? "" : "s") << " (" << common.db.string() << ")\n";
    }
    emit(std::cout, args.format, table.header, table.rows);
    if (args.format == "table") {
      for (const auto& r : view.runs) {
        if (!r.run.error.empty()) std::cout << "run " << r.run.id << ": " << report::printable(r.run.error) << "\n";
      }
    }
    return 0;
  }

  // ---- --summary: cells over seeds (finished runs only: a failed run's numbers are not a result).
  std::vector<std::string> cell_axes;
  for (const auto& a : view.axes) {
    if (!is_seed_axis(a)) cell_axes.push_back(a);
  }
  struct Cell {
    std::vector<std::string> labels;
    std::vector<const RunSummary*> runs;
  };
  std::vector<Cell> cells;
  for (const auto& r : view.runs) {
    if (r.run.status != store::Status::done || r.ensemble()) continue;  // an ensemble is not a cell
    std::vector<std::string> labels;
    for (const auto& a : cell_axes) labels.push_back(r.run.axes.contains(a) ? value_label(r.run.axes[a]) : "");
    auto it = std::find_if(cells.begin(), cells.end(), [&](const Cell& c) { return c.labels == labels; });
    if (it == cells.end()) cells.push_back({labels, {&r}});
    else it->runs.push_back(&r);
  }
  auto cell_stat = [&](const Cell& c, const std::string& n) {
    std::vector<double> xs;
    for (const auto* r : c.runs) {
      if (auto v = r->number(n)) xs.push_back(*v);
    }
    return stat(xs);
  };
  auto cell_name = [&](const Cell& c) {
    std::string s;
    for (std::size_t i = 0; i < cell_axes.size(); ++i) s += (s.empty() ? "" : ", ") + cell_axes[i] + "=" + c.labels[i];
    return s.empty() ? std::string("all runs") : s;
  };
  std::vector<std::string> header = cell_axes;
  header.push_back("runs");
  for (const auto& n : numbers) {
    if (text) {
      header.push_back(n);
    } else {
      header.push_back(n + "_mean");
      header.push_back(n + "_std");
    }
  }
  Table rows;
  nlohmann::json jcells = nlohmann::json::array();
  for (const auto& c : cells) {
    std::vector<std::string> row;
    for (std::size_t i = 0; i < cell_axes.size(); ++i) row.push_back(c.labels[i]);
    std::string ids;
    for (const auto* r : c.runs) ids += (ids.empty() ? "" : "+") + std::to_string(r->run.id);
    row.push_back(ids);
    nlohmann::json jc = {{"axes", nlohmann::json::object()}, {"runs", nlohmann::json::array()}};
    for (std::size_t i = 0; i < cell_axes.size(); ++i) jc["axes"][cell_axes[i]] = c.labels[i];
    for (const auto* r : c.runs) jc["runs"].push_back(r->run.id);
    for (const auto& n : numbers) {
      const auto s = cell_stat(c, n);
      if (text) {
        row.push_back(s.n == 0 ? "" : report::fixed(s.mean) + (std::isnan(s.std) ? "" : " ± " + report::fixed(s.std)));
      } else {
        row.push_back(s.n ? report::exact(s.mean) : "");
        row.push_back(std::isnan(s.std) ? "" : report::exact(s.std));
      }
      jc[n] = {{"n", s.n}, {"mean", s.n ? nlohmann::json(s.mean) : nlohmann::json()}, {"std", std::isnan(s.std) ? nlohmann::json() : nlohmann::json(s.std)}};
    }
    rows.push_back(row);
    jcells.push_back(jc);
  }
  // The best cell per column, by mean; and each axis's values, averaged over every other axis.
  nlohmann::json best = nlohmann::json::object();
  std::vector<std::string> best_lines;
  for (const auto& n : numbers) {
    const Cell* top = nullptr;
    double top_mean = 0;
    for (const auto& c : cells) {
      const auto s = cell_stat(c, n);
      if (!s.n) continue;
      if (!top || (lower_is_better(n) ? s.mean < top_mean : s.mean > top_mean)) {
        top = &c;
        top_mean = s.mean;
      }
    }
    if (!top) continue;
    best[n] = {{"cell", cell_name(*top)}, {"mean", top_mean}, {"lower_is_better", lower_is_better(n)}};
    best_lines.push_back(n + (lower_is_better(n) ? " (lowest)" : " (highest)") + ": " + cell_name(*top) + "  " + report::fixed(top_mean));
  }
  nlohmann::json marginals = nlohmann::json::object();
  std::vector<std::pair<std::string, Table>> marginal_tables;
  for (std::size_t i = 0; i < cell_axes.size(); ++i) {
    std::vector<std::string> values;
    for (const auto& c : cells) {
      if (std::find(values.begin(), values.end(), c.labels[i]) == values.end()) values.push_back(c.labels[i]);
    }
    if (values.size() < 2) continue;
    Table t;
    for (const auto& v : values) {
      std::vector<std::string> row{v};
      for (const auto& n : numbers) {
        std::vector<double> xs;
        for (const auto& c : cells) {
          if (c.labels[i] != v) continue;
          for (const auto* r : c.runs) {
            if (auto x = r->number(n)) xs.push_back(*x);
          }
        }
        const auto s = stat(xs);
        row.push_back(s.n ? (text ? report::fixed(s.mean) : report::exact(s.mean)) : "");
        marginals[cell_axes[i]][v][n] = s.n ? nlohmann::json(s.mean) : nlohmann::json();
      }
      t.push_back(row);
    }
    marginal_tables.emplace_back(cell_axes[i], std::move(t));
  }
  if (args.format == "json") {
    std::cout << nlohmann::json{{"experiment", view.name}, {"database", common.db.string()}, {"cells", jcells},
                                {"best", best}, {"axes", marginals}}.dump(1) << "\n";
    return 0;
  }
  if (args.format == "table") {
    std::cout << "experiment " << report::printable(view.name) << ": " << cells.size() << " cell" << (cells.size() == 1 ? "" : "s")
              << " over the seeds of finished runs, mean ± standard deviation (" << common.db.string() << ")\n";
  }
  emit(std::cout, args.format, header, rows);
  if (args.format == "csv") return 0;  // one table per CSV file
  std::cout << "\nbest cell by mean:\n";
  for (const auto& l : best_lines) std::cout << "  " << report::printable(l) << "\n";
  for (const auto& [axis, t] : marginal_tables) {
    std::vector<std::string> h{axis};
    for (const auto& n : numbers) h.push_back(n);
    std::cout << "\n" << report::printable(axis) << ", averaged over the other axes and seeds:\n";
    emit(std::cout, args.format, h, t);
  }
  return 0;
}

}  // namespace ablate::cli
