#include "report/text.hpp"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <system_error>

#include "ablate/sdk/error.hpp"

namespace ablate::report {

std::string printable(const std::string& s) {
  std::string out;
  for (unsigned char c : s) {
    if (c == '\n') out += "\\n";
    else if (c == '\t') out += "\\t";
    else if (c == '\r') out += "\\r";
    else if (c < 0x20 || c == 0x7f) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", c);
      out += buf;
    } else {
      out += static_cast<char>(c);
    }
  }
  return out;
}

namespace {
bool is_number(const std::string& s) {
  if (s.empty()) return false;
  char* end = nullptr;
  std::strtod(s.c_str(), &end);
  return end && *end == '\0';
}
// Display width of UTF-8 text: one column per code point (good enough for labels and numbers).
std::size_t width(const std::string& s) {
  return static_cast<std::size_t>(std::count_if(s.begin(), s.end(), [](char c) { return (static_cast<unsigned char>(c) & 0xC0) != 0x80; }));
}
}  // namespace

void print_table(std::ostream& out, const std::vector<std::string>& header, const std::vector<std::vector<std::string>>& rows) {
  std::vector<std::size_t> w(header.size());
  for (std::size_t c = 0; c < header.size(); ++c) w[c] = width(header[c]);
  for (const auto& r : rows) {
    for (std::size_t c = 0; c < r.size() && c < w.size(); ++c) w[c] = std::max(w[c], width(r[c]));
  }
  auto line = [&](const std::vector<std::string>& cells, bool head) {
    for (std::size_t c = 0; c < w.size(); ++c) {
      const std::string cell = c < cells.size() ? printable(cells[c]) : "";
      const std::string pad(w[c] - std::min(w[c], width(cell)), ' ');
      const bool right = !head && is_number(cell);
      out << (c ? "  " : "") << (right ? pad + cell : cell + (c + 1 < w.size() ? pad : ""));
    }
    out << "\n";
  };
  line(header, true);
  std::vector<std::string> rule;
  for (auto n : w) rule.push_back(std::string(n, '-'));
  line(rule, true);
  for (const auto& r : rows) line(r, false);
}

std::string fixed(double v, int digits) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*f", digits, v);
  return buf;
}

}  // namespace ablate::report

namespace ablate::report {

void write_csv(std::ostream& out, const std::vector<std::string>& header, const std::vector<std::vector<std::string>>& rows) {
  auto field = [](const std::string& s) {
    if (s.find_first_of(",\"\r\n") == std::string::npos) return s;
    std::string q = "\"";
    for (char c : s) q += c == '"' ? std::string("\"\"") : std::string(1, c);
    return q + "\"";
  };
  auto line = [&](const std::vector<std::string>& cells) {
    for (std::size_t c = 0; c < cells.size(); ++c) out << (c ? "," : "") << field(cells[c]);
    out << "\r\n";
  };
  line(header);
  for (const auto& r : rows) line(r);
}

void write_markdown(std::ostream& out, const std::vector<std::string>& header, const std::vector<std::vector<std::string>>& rows) {
  auto cell = [](const std::string& s) {
    std::string e;
    for (char c : printable(s)) e += c == '|' ? std::string("\\|") : std::string(1, c);
    return e;
  };
  auto line = [&](const std::vector<std::string>& cells) {
    out << "|";
    for (const auto& c : cells) out << " " << cell(c) << " |";
    out << "\n";
  };
  line(header);
  out << "|";
  for (std::size_t c = 0; c < header.size(); ++c) out << " --- |";
  out << "\n";
  for (const auto& r : rows) line(r);
}

std::string exact(double v) {
  char buf[64];
  for (int digits = 15; digits <= 17; ++digits) {
    std::snprintf(buf, sizeof buf, "%.*g", digits, v);
    if (std::strtod(buf, nullptr) == v) break;
  }
  return buf;
}

void make_output_folder(const std::filesystem::path& dir) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec || !std::filesystem::is_directory(dir)) {
    throw sdk::InputError(dir.string() + ": cannot be made a folder (" + (ec ? ec.message() : "a file is there") + ")");
  }
}

}  // namespace ablate::report
