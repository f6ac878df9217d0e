#pragma once
// Line charts of training curves, drawn once with Cairo and written as SVG or PNG (the same drawing code,
// so both files show the same thing). No browser, no Python: `runner curves` and the HTML report use it.

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace ablate::report {

struct Series {
  std::string label;
  std::vector<std::pair<double, double>> points;  ///< (step, value), in step order
};

struct Chart {
  std::string title;
  std::string x_label = "step";
  std::string y_label;
  std::vector<Series> series;
};

inline constexpr int kChartWidth = 760, kChartHeight = 440;

std::string render_svg(const Chart& chart, int width = kChartWidth, int height = kChartHeight);
std::vector<std::uint8_t> render_png(const Chart& chart, int width = kChartWidth, int height = kChartHeight);

}  // namespace ablate::report
