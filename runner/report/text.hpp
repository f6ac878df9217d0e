#pragma once
// Plain-text output for terminals: aligned tables and escaping of strings that came from models or
// datasets, so that a generated escape sequence can never drive the user's terminal.

#include <ostream>
#include <string>
#include <vector>

namespace ablate::report {

/// Control characters and DEL shown as \n, \t, \xNN; everything else (UTF-8 included) kept.
std::string printable(const std::string& s);

/// Columns aligned to their widest cell; numbers (cells that parse as one) right-aligned.
void print_table(std::ostream& out, const std::vector<std::string>& header, const std::vector<std::vector<std::string>>& rows);

std::string fixed(double v, int digits = 4);

}  // namespace ablate::report
