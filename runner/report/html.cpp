// runner report: one self-contained HTML file for an experiment (html.hpp).

#include "report/html.hpp"

#include <algorithm>
#include <fstream>
#include <iostream>
#include <map>
#include <sstream>

#include "ablate/sdk/error.hpp"
#include "cli/commands.hpp"
#include "grid/experiment.hpp"
#include "report/curves.hpp"
#include "report/text.hpp"

namespace ablate::report {

std::string html_escape(const std::string& s) {
  std::string out;
  out.reserve(s.size());
  for (char c : s) {
    switch (c) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&quot;"; break;
      case '\'': out += "&#39;"; break;
      default: out += c;
    }
  }
  return out;
}

namespace {

std::string base64(const std::string& bytes) {
  static const char* k = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  std::size_t i = 0;
  for (; i + 2 < bytes.size(); i += 3) {
    const unsigned v = (static_cast<unsigned char>(bytes[i]) << 16) | (static_cast<unsigned char>(bytes[i + 1]) << 8) |
                       static_cast<unsigned char>(bytes[i + 2]);
    out += {k[v >> 18], k[(v >> 12) & 63], k[(v >> 6) & 63], k[v & 63]};
  }
  if (i + 1 == bytes.size()) {
    const unsigned v = static_cast<unsigned char>(bytes[i]) << 16;
    out += {k[v >> 18], k[(v >> 12) & 63], '=', '='};
  } else if (i + 2 == bytes.size()) {
    const unsigned v = (static_cast<unsigned char>(bytes[i]) << 16) | (static_cast<unsigned char>(bytes[i + 1]) << 8);
    out += {k[v >> 18], k[(v >> 12) & 63], k[(v >> 6) & 63], '='};
  }
  return out;
}

constexpr const char* kStyle = R"css(
body{font:14px/1.45 system-ui,-apple-system,"DejaVu Sans",sans-serif;margin:24px;color:#1a1a1a;max-width:1400px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
.meta{color:#666;margin:0 0 12px} table{border-collapse:collapse;margin:6px 0}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top} th{background:#f4f4f4}
td.num{text-align:right;font-variant-numeric:tabular-nums} .status-failed,.status-diverged{color:#b00}
.status-running{color:#06c} .curves{display:flex;flex-wrap:wrap;gap:12px} .curves img{max-width:100%;border:1px solid #eee}
.sample{display:flex;gap:16px;border:1px solid #e4e4e4;border-radius:6px;padding:10px;margin:10px 0}
.sample img{width:160px;height:auto;image-rendering:pixelated;border:1px solid #ccc;flex:none}
.text{white-space:pre-wrap;word-break:break-word} .id{font-family:monospace;color:#555} .error{color:#b00}
details{margin:4px 0} summary{cursor:pointer}
)css";

struct Cell {
  Cell(std::string t, bool n = false, std::string c = {}) : text(std::move(t)), number(n), cls(std::move(c)) {}
  std::string text;
  bool number;
  std::string cls;  ///< extra CSS class
};

void table(std::ostringstream& h, const std::vector<std::string>& header, const std::vector<std::vector<Cell>>& rows) {
  h << "<table><thead><tr>";
  for (const auto& c : header) h << "<th>" << html_escape(c) << "</th>";
  h << "</tr></thead><tbody>\n";
  for (const auto& r : rows) {
    h << "<tr>";
    for (const auto& c : r) {
      std::string cls = c.number ? "num" : "";
      if (!c.cls.empty()) cls += (cls.empty() ? "" : " ") + c.cls;
      h << "<td" << (cls.empty() ? "" : " class=\"" + cls + "\"") << ">" << html_escape(c.text) << "</td>";
    }
    h << "</tr>\n";
  }
  h << "</tbody></table>\n";
}

std::string opt_number(std::optional<double> v, int digits = 4) { return v ? fixed(*v, digits) : ""; }

}  // namespace

std::string experiment_page(store::Store& db, const ExperimentView& view, const PageOptions& o) {
  std::ostringstream h;
  h << "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
    << "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
    << "<link rel=\"icon\" href=\"data:,\">"  // no favicon request: the page needs nothing from a network
    // No script may run, whatever a sample's text holds (it is escaped too: this is the second fence).
    << "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:"
    << (o.image_url.empty() ? "" : " 'self'") << "; style-src 'unsafe-inline'\">";
  if (o.refresh_seconds > 0) h << "<meta http-equiv=\"refresh\" content=\"" << o.refresh_seconds << "\">";
  h << "<title>" << html_escape(view.name) << " · ablate</title><style>" << kStyle << "</style></head><body>\n";
  if (!o.back_link.empty()) h << "<p><a href=\"" << html_escape(o.back_link) << "\">all experiments</a></p>\n";
  h << "<h1>" << html_escape(view.name) << "</h1>\n<p class=\"meta\">" << view.runs.size() << " run"
    << (view.runs.size() == 1 ? "" : "s") << " · " << html_escape(o.database) << " · " << html_escape(store::now_iso8601()) << "</p>\n";

  // ---- the grid
  std::vector<std::string> numbers = {"eval_loss@first", "eval_loss"};
  for (const auto& m : view.metric_names(false)) numbers.push_back(m);
  const auto grid = run_table(view, numbers, [](std::optional<double> v) { return opt_number(v); });
  // Right-aligned: the run id and every column from step on; the status coloured.
  const auto step_col = static_cast<std::size_t>(std::find(grid.header.begin(), grid.header.end(), "step") - grid.header.begin());
  std::vector<std::vector<Cell>> rows;
  for (const auto& r : grid.rows) {
    std::vector<Cell> row;
    for (std::size_t c = 0; c < r.size(); ++c) {
      const bool status = c + 1 == step_col;
      row.push_back({r[c], c == 0 || c >= step_col, status ? "status-" + r[c] : ""});
    }
    rows.push_back(std::move(row));
  }
  const auto& header = grid.header;
  h << "<h2>Runs</h2>\n";
  table(h, header, rows);
  for (const auto& r : view.runs) {
    if (!r.run.error.empty()) h << "<p class=\"error\">run " << r.run.id << ": " << html_escape(r.run.error) << "</p>\n";
  }

  // ---- curves
  std::vector<const RunSummary*> all;
  for (const auto& r : view.runs) all.push_back(&r);
  h << "<h2>Curves</h2>\n<div class=\"curves\">\n";
  if (!all.empty()) {
    for (const auto& c : curves(db, view, all)) {
      h << "<figure><img alt=\"" << html_escape(c.chart.title) << "\" width=\"" << kChartWidth << "\" height=\"" << kChartHeight
        << "\" src=\"data:image/svg+xml;base64," << base64(render_svg(c.chart)) << "\"></figure>\n";
    }
  }
  h << "</div>\n";

  // ---- what trained
  h << "<h2>What trained</h2>\n";
  for (const auto& r : view.runs) {
    if (r.ensemble()) continue;
    const auto t = db.trainables(r.run.id);
    h << "<details><summary>run " << r.run.id << ": " << html_escape(r.run.label.empty() ? "(one cell)" : r.run.label) << " — "
      << html_escape(opt_number(r.trainable_pct, 2)) << "% trainable</summary>\n";
    std::vector<std::vector<Cell>> trows;
    for (const auto& m : t) {
      trows.push_back({{m.module}, {m.mode}, {std::to_string(m.params), true}, {std::to_string(m.trainable), true},
                       {m.lr ? exact(*m.lr) : "", true}, {m.weight_decay ? exact(*m.weight_decay) : "", true}});
    }
    table(h, {"module", "mode", "params", "trainable", "lr", "weight_decay"}, trows);
    h << "</details>\n";
  }

  // ---- samples: each sample id once, with every run's output at its last step with samples.
  struct Shown {
    const RunSummary* run;
    std::int64_t step;
    std::map<std::string, store::SampleRow> by_id;
  };
  std::vector<Shown> shown;
  std::vector<std::string> order;
  for (const auto& r : view.runs) {
    const auto steps = db.sample_steps(r.run.id);
    if (steps.empty()) continue;
    Shown s{&r, steps.back(), {}};
    for (auto& row : db.samples(r.run.id, s.step)) {
      if (std::find(order.begin(), order.end(), row.sample_id) == order.end()) order.push_back(row.sample_id);
      s.by_id.emplace(row.sample_id, std::move(row));
    }
    shown.push_back(std::move(s));
  }
  h << "<h2>Samples</h2>\n";
  if (order.size() > o.samples) {
    h << "<p class=\"meta\">the first " << o.samples << " of " << order.size() << " sample ids</p>\n";
    order.resize(o.samples);
  }
  for (const auto& id : order) {
    const store::SampleRow* first = nullptr;
    for (const auto& s : shown) {
      if (!first && s.by_id.count(id)) first = &s.by_id.at(id);
    }
    h << "<div class=\"sample\">";
    if (!first->image_sha256.empty()) {
      std::string src;
      if (!o.image_url.empty()) {
        src = o.image_url + first->image_sha256;
      } else if (auto im = db.image(first->image_sha256)) {
        src = "data:image/" + im->format + ";base64," + base64(std::string(im->bytes.begin(), im->bytes.end()));
      }
      if (!src.empty()) h << "<img alt=\"" << html_escape("image of sample " + id) << "\" src=\"" << html_escape(src) << "\">";
    }
    h << "<div><div class=\"id\">" << html_escape(id) << "</div><div class=\"text\"><b>prompt</b> " << html_escape(first->prompt)
      << "</div><div class=\"text\"><b>references</b> ";
    for (std::size_t k = 0; k < first->references.size(); ++k) h << (k ? " | " : "") << html_escape(first->references[k]);
    h << "</div>\n";
    std::vector<std::vector<Cell>> srows;
    for (const auto& s : shown) {
      const auto it = s.by_id.find(id);
      if (it == s.by_id.end()) continue;
      std::string scores;
      for (auto sc = it->second.scores.begin(); sc != it->second.scores.end(); ++sc) {
        scores += (scores.empty() ? "" : ", ") + sc.key() + " " + fixed(sc.value().get<double>(), 3);
      }
      srows.push_back({{std::to_string(s.run->run.id), true}, {run_label(*s.run, view.axes)}, {std::to_string(s.step), true},
                       {it->second.output, false, "text"}, {scores}});
    }
    table(h, {"run", "cell", "step", "output", "scores"}, srows);
    h << "</div></div>\n";
  }
  if (order.empty()) h << "<p class=\"meta\">no samples recorded yet</p>\n";
  h << "</body></html>\n";
  return h.str();
}

}  // namespace ablate::report

namespace ablate::cli {

int report(const Common& common, const ReportArgs& args) {
  if (!std::filesystem::exists(common.db)) throw sdk::InputError(common.db.string() + ": no results database here");
  store::Store db(common.db, /*create=*/false);
  const auto view = report::load_experiment(db, args.experiment, report::parse_selection(args.filter.all, args.filter.where, args.filter.status), common.db.string());
  report::PageOptions o;
  o.samples = args.samples;
  o.database = common.db.string();
  if (std::filesystem::is_directory(args.out)) throw sdk::InputError(args.out.string() + ": is a folder (give a file name)");
  const auto page = report::experiment_page(db, view, o);
  // Written beside the target and renamed over it: a reader never sees half a report.
  const auto tmp = args.out.string() + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary);
    if (!f) throw sdk::InputError(args.out.string() + ": cannot write here");
    f << page;
    if (!f.flush()) {
      std::filesystem::remove(tmp);
      throw sdk::InputError(tmp + ": cannot write (disk full?)");
    }
  }
  std::error_code renamed;
  std::filesystem::rename(tmp, args.out, renamed);
  if (renamed) {
    std::filesystem::remove(tmp);
    throw sdk::InputError(args.out.string() + ": cannot write (" + renamed.message() + ")");
  }
  std::cout << args.out.string() << ": " << view.runs.size() << " runs of " << report::printable(view.name) << ", "
            << page.size() / 1024 << " KiB, self-contained\n";
  return 0;
}

}  // namespace ablate::cli
