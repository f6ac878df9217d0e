#include "report/plot.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <memory>
#include <stdexcept>

#include <cairo-svg.h>
#include <cairo.h>

namespace ablate::report {

namespace {

// Tableau's ten colours (matplotlib's default cycle): distinct and readable on white.
constexpr double kPalette[][3] = {{0.122, 0.467, 0.706}, {1.000, 0.498, 0.055}, {0.173, 0.627, 0.173}, {0.839, 0.153, 0.157},
                                  {0.580, 0.404, 0.741}, {0.549, 0.337, 0.294}, {0.890, 0.467, 0.761}, {0.498, 0.498, 0.498},
                                  {0.737, 0.741, 0.133}, {0.090, 0.745, 0.812}};

// Tick positions at 1, 2 or 5 times a power of ten, about `target` of them across [lo, hi].
std::vector<double> ticks(double lo, double hi, int target) {
  const double span = hi - lo;
  const double raw = span / std::max(1, target);
  const double mag = std::pow(10.0, std::floor(std::log10(raw)));
  double step = mag;
  for (double m : {1.0, 2.0, 5.0, 10.0}) {
    if (m * mag >= raw) {
      step = m * mag;
      break;
    }
  }
  std::vector<double> out;
  for (double t = std::ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) out.push_back(std::abs(t) < step * 1e-9 ? 0.0 : t);
  return out;
}

std::string tick_label(double v) {
  char buf[32];
  if (v != 0 && (std::abs(v) >= 1e5 || std::abs(v) < 1e-3)) std::snprintf(buf, sizeof buf, "%.0e", v);
  else std::snprintf(buf, sizeof buf, "%g", v);
  return buf;
}

void text_at(cairo_t* cr, const std::string& s, double x, double y, double align_x, double align_y) {
  cairo_text_extents_t e;
  cairo_text_extents(cr, s.c_str(), &e);
  cairo_move_to(cr, x - e.x_advance * align_x, y + e.height * align_y);
  cairo_show_text(cr, s.c_str());
}

std::string elide(cairo_t* cr, std::string s, double width) {
  cairo_text_extents_t e;
  cairo_text_extents(cr, s.c_str(), &e);
  if (e.x_advance <= width) return s;
  while (!s.empty()) {
    // Cut whole UTF-8 characters only.
    do s.pop_back(); while (!s.empty() && (static_cast<unsigned char>(s.back()) & 0xC0) == 0x80);
    if (!s.empty()) s.pop_back();
    cairo_text_extents(cr, (s + "…").c_str(), &e);
    if (e.x_advance <= width) return s + "…";
  }
  return s;
}

void draw(cairo_t* cr, const Chart& c, int width, int height) {
  cairo_set_source_rgb(cr, 1, 1, 1);
  cairo_paint(cr);
  cairo_select_font_face(cr, "DejaVu Sans", CAIRO_FONT_SLANT_NORMAL, CAIRO_FONT_WEIGHT_NORMAL);

  // Data range (non-finite values are left out: a diverged run's NaN would otherwise blank the chart).
  double x0 = std::numeric_limits<double>::infinity(), x1 = -x0, y0 = x0, y1 = -x0;
  for (const auto& s : c.series) {
    for (const auto& [x, y] : s.points) {
      if (!std::isfinite(x) || !std::isfinite(y)) continue;
      x0 = std::min(x0, x), x1 = std::max(x1, x), y0 = std::min(y0, y), y1 = std::max(y1, y);
    }
  }
  const bool empty = !std::isfinite(x0);
  if (empty) x0 = 0, x1 = 1, y0 = 0, y1 = 1;
  if (x1 - x0 < 1e-12) x0 -= 0.5, x1 += 0.5;
  if (y1 - y0 < 1e-12) {
    const double pad = std::max(std::abs(y0) * 0.05, 0.05);
    y0 -= pad, y1 += pad;
  } else {
    const double pad = (y1 - y0) * 0.05;
    y0 -= pad, y1 += pad;
  }

  // Legend on the right, one line per series.
  const double legend_w = c.series.size() > 1 || (!c.series.empty() && !c.series[0].label.empty()) ? 220 : 0;
  const double left = 64, right = width - 16 - legend_w, top = 40, bottom = height - 48;
  auto px = [&](double x) { return left + (x - x0) / (x1 - x0) * (right - left); };
  auto py = [&](double y) { return bottom - (y - y0) / (y1 - y0) * (bottom - top); };

  cairo_set_source_rgb(cr, 0.1, 0.1, 0.1);
  cairo_set_font_size(cr, 15);
  text_at(cr, c.title, left, 24, 0, 0);

  cairo_set_font_size(cr, 11);
  cairo_set_line_width(cr, 1);
  for (double t : ticks(y0, y1, 6)) {
    cairo_set_source_rgb(cr, 0.9, 0.9, 0.9);
    cairo_move_to(cr, left, std::round(py(t)) + 0.5);
    cairo_line_to(cr, right, std::round(py(t)) + 0.5);
    cairo_stroke(cr);
    cairo_set_source_rgb(cr, 0.3, 0.3, 0.3);
    text_at(cr, tick_label(t), left - 6, py(t), 1, 0.5);
  }
  for (double t : ticks(x0, x1, 8)) {
    cairo_set_source_rgb(cr, 0.9, 0.9, 0.9);
    cairo_move_to(cr, std::round(px(t)) + 0.5, top);
    cairo_line_to(cr, std::round(px(t)) + 0.5, bottom);
    cairo_stroke(cr);
    cairo_set_source_rgb(cr, 0.3, 0.3, 0.3);
    text_at(cr, tick_label(t), px(t), bottom + 6, 0.5, 1);
  }
  cairo_set_source_rgb(cr, 0.3, 0.3, 0.3);
  cairo_rectangle(cr, left + 0.5, top + 0.5, right - left, bottom - top);
  cairo_stroke(cr);
  text_at(cr, c.x_label, (left + right) / 2, height - 12, 0.5, 0);
  cairo_save(cr);
  cairo_translate(cr, 16, (top + bottom) / 2);
  cairo_rotate(cr, -M_PI / 2);
  text_at(cr, c.y_label, 0, 0, 0.5, 0.5);
  cairo_restore(cr);
  if (empty) text_at(cr, "no data", (left + right) / 2, (top + bottom) / 2, 0.5, 0.5);

  // The lines, clipped to the plot; markers where points are few (evaluations).
  cairo_save(cr);
  cairo_rectangle(cr, left, top, right - left, bottom - top);
  cairo_clip(cr);
  cairo_set_line_width(cr, 1.8);
  cairo_set_line_join(cr, CAIRO_LINE_JOIN_ROUND);
  for (std::size_t i = 0; i < c.series.size(); ++i) {
    const auto* col = kPalette[i % 10];
    cairo_set_source_rgb(cr, col[0], col[1], col[2]);
    bool pen = false;
    for (const auto& [x, y] : c.series[i].points) {
      if (!std::isfinite(x) || !std::isfinite(y)) {
        pen = false;
        continue;
      }
      if (pen) cairo_line_to(cr, px(x), py(y));
      else cairo_move_to(cr, px(x), py(y));
      pen = true;
    }
    cairo_stroke(cr);
    if (c.series[i].points.size() <= 40) {
      for (const auto& [x, y] : c.series[i].points) {
        if (!std::isfinite(x) || !std::isfinite(y)) continue;
        cairo_arc(cr, px(x), py(y), 2.8, 0, 2 * M_PI);
        cairo_fill(cr);
      }
    }
  }
  cairo_restore(cr);

  if (legend_w > 0) {
    cairo_set_font_size(cr, 11);
    double y = top + 8;
    for (std::size_t i = 0; i < c.series.size() && y < bottom; ++i, y += 18) {
      const auto* col = kPalette[i % 10];
      cairo_set_source_rgb(cr, col[0], col[1], col[2]);
      cairo_set_line_width(cr, 3);
      cairo_move_to(cr, right + 12, y);
      cairo_line_to(cr, right + 32, y);
      cairo_stroke(cr);
      cairo_set_source_rgb(cr, 0.1, 0.1, 0.1);
      text_at(cr, elide(cr, c.series[i].label, legend_w - 44), right + 38, y, 0, 0.5);
    }
  }
}

cairo_status_t append(void* closure, const unsigned char* data, unsigned int length) {
  auto* out = static_cast<std::string*>(closure);
  out->append(reinterpret_cast<const char*>(data), length);
  return CAIRO_STATUS_SUCCESS;
}

void check(cairo_status_t s, const char* what) {
  if (s != CAIRO_STATUS_SUCCESS) throw std::runtime_error(std::string("cairo: ") + what + ": " + cairo_status_to_string(s));
}

}  // namespace

std::string render_svg(const Chart& chart, int width, int height) {
  std::string out;
  {
    std::unique_ptr<cairo_surface_t, decltype(&cairo_surface_destroy)> surface(
        cairo_svg_surface_create_for_stream(append, &out, width, height), cairo_surface_destroy);
    std::unique_ptr<cairo_t, decltype(&cairo_destroy)> cr(cairo_create(surface.get()), cairo_destroy);
    draw(cr.get(), chart, width, height);
    check(cairo_status(cr.get()), "drawing");
    cairo_surface_finish(surface.get());  // flushes the SVG into `out`
    check(cairo_surface_status(surface.get()), "svg");
  }
  return out;
}

std::vector<std::uint8_t> render_png(const Chart& chart, int width, int height) {
  std::string out;
  std::unique_ptr<cairo_surface_t, decltype(&cairo_surface_destroy)> surface(
      cairo_image_surface_create(CAIRO_FORMAT_RGB24, width, height), cairo_surface_destroy);
  std::unique_ptr<cairo_t, decltype(&cairo_destroy)> cr(cairo_create(surface.get()), cairo_destroy);
  draw(cr.get(), chart, width, height);
  check(cairo_status(cr.get()), "drawing");
  check(cairo_surface_write_to_png_stream(surface.get(), append, &out), "png");
  return {out.begin(), out.end()};
}

}  // namespace ablate::report
