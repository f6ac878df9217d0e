// runner curves: PNG and SVG of the curves of chosen runs (see curves.hpp), into a folder.

#include "report/curves.hpp"
#include "report/text.hpp"

#include <fstream>
#include <iostream>

#include "ablate/sdk/error.hpp"
#include "cli/commands.hpp"

namespace ablate::report {

std::vector<NamedChart> curves(store::Store& db, const ExperimentView& view, const std::vector<const RunSummary*>& runs,
                               const std::vector<std::string>& metrics) {
  const auto differing = view.differing_axes(runs);
  std::vector<std::string> names = metrics;
  if (names.empty()) {
    for (const auto* r : runs) {
      for (const auto& [m, v] : r->metrics) {
        if (m.find('[') == std::string::npos && std::find(names.begin(), names.end(), m) == names.end()) names.push_back(m);
      }
    }
  }
  std::vector<NamedChart> out;
  auto label = [&](const RunSummary& r) { return "run " + std::to_string(r.run.id) + (differing.empty() && !r.ensemble() ? "" : ": " + run_label(r, differing)); };
  auto loss_chart = [&](const char* split, const char* title) {
    NamedChart nc{std::string(split) + "_loss", {title, "step", "loss", {}}};
    for (const auto* r : runs) {
      if (r->ensemble()) continue;  // an ensemble has one set of metrics and no steps: nothing to draw
      Series s{label(*r), {}};
      for (const auto& row : db.steps(r->run.id, split)) s.points.emplace_back(static_cast<double>(row.step), row.loss);
      nc.chart.series.push_back(std::move(s));
    }
    out.push_back(std::move(nc));
  };
  loss_chart("train", ("train loss, " + view.name).c_str());
  loss_chart("eval", ("eval loss, " + view.name).c_str());
  for (const auto& m : names) {
    NamedChart nc{m, {m + ", " + view.name, "step", m, {}}};
    for (const auto* r : runs) {
      if (r->ensemble()) continue;
      Series s{label(*r), {}};
      for (const auto& [step, value] : db.metric_history(r->run.id, m)) s.points.emplace_back(static_cast<double>(step), value);
      nc.chart.series.push_back(std::move(s));  // kept when empty: a run has the same colour in every chart
    }
    out.push_back(std::move(nc));
  }
  return out;
}

}  // namespace ablate::report

namespace ablate::cli {

namespace {

// Metric names such as "exact_match[task=x]" made safe as file names.
std::string file_stem(const std::string& s) {
  std::string out;
  for (unsigned char c : s) out += std::isalnum(c) || c == '_' || c == '-' || c == '.' ? static_cast<char>(c) : '_';
  return out;
}

}  // namespace

int curves(const Common& common, const CurvesArgs& args) {
  if (!std::filesystem::exists(common.db)) throw sdk::InputError(common.db.string() + ": no results database here");
  store::Store db(common.db, /*create=*/false);
  auto view = report::load_experiment(db, args.experiment, report::parse_selection(args.filter.all, args.filter.where, args.filter.status), common.db.string());
  std::vector<const report::RunSummary*> chosen;
  for (const auto& r : view.runs) {
    if (args.runs.empty() || std::find(args.runs.begin(), args.runs.end(), r.run.id) != args.runs.end()) chosen.push_back(&r);
  }
  for (auto id : args.runs) {
    if (std::none_of(chosen.begin(), chosen.end(), [&](const auto* r) { return r->run.id == id; })) {
      throw sdk::InputError("--runs " + std::to_string(id) + ": not a run of '" + view.name + "' that the selection keeps (see runner compare)");
    }
  }
  if (chosen.empty()) throw sdk::InputError("no run of '" + view.name + "' matches (see runner compare)");
  const auto charts = report::curves(db, view, chosen, args.metrics);
  report::make_output_folder(args.out);
  for (const auto& c : charts) {
    const auto stem = args.out / file_stem(c.stem);
    std::ofstream(stem.string() + ".svg", std::ios::binary) << report::render_svg(c.chart);
    const auto png = report::render_png(c.chart);
    std::ofstream(stem.string() + ".png", std::ios::binary).write(reinterpret_cast<const char*>(png.data()), static_cast<std::streamsize>(png.size()));
    std::cout << stem.string() << ".png  " << stem.string() << ".svg  (" << c.chart.series.size() << " line"
              << (c.chart.series.size() == 1 ? "" : "s") << ")\n";
  }
  return 0;
}

}  // namespace ablate::cli
