#pragma once
// Plain-text output for terminals: aligned tables and escaping of strings that came from models or
// datasets, so that a generated escape sequence can never drive the user's terminal.

#include <filesystem>
#include <ostream>
#include <string>
#include <vector>

namespace ablate::report {

/// Control characters and DEL shown as \n, \t, \xNN; everything else (UTF-8 included) kept.
std::string printable(const std::string& s);

/// Columns aligned to their widest cell; numbers (cells that parse as one) right-aligned.
void print_table(std::ostream& out, const std::vector<std::string>& header, const std::vector<std::vector<std::string>>& rows);

std::string fixed(double v, int digits = 4);

/// Creates the folder a command writes into (--images, curves' -o); sdk::InputError naming it if it cannot
/// be one (a file of that name, no permission).
void make_output_folder(const std::filesystem::path& dir);

}  // namespace ablate::report

namespace ablate::report {

/// RFC 4180: fields with a comma, quote or line break are quoted, quotes doubled.
void write_csv(std::ostream& out, const std::vector<std::string>& header, const std::vector<std::vector<std::string>>& rows);
/// A GitHub-flavoured Markdown table; pipes and line breaks in cells escaped.
void write_markdown(std::ostream& out, const std::vector<std::string>& header, const std::vector<std::vector<std::string>>& rows);
/// Shortest text that reads back as the same double ("%.17g" trimmed): what CSV and JSON carry.
std::string exact(double v);

}  // namespace ablate::report
