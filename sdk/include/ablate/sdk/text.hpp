#pragma once
// Python's whitespace rules on UTF-8 text, for metrics and datasets that must split words exactly as the
// Python reference implementations (pycocoevalcap, the official VQA evaluation) do.

#include <cstddef>
#include <string>
#include <vector>

namespace ablate::sdk {

/// Bytes of the whitespace character that starts at s[i] (0 if none), for every code point Python's
/// str.isspace() accepts (str.strip() and str.split() use it).
std::size_t python_space_at(const std::string& s, std::size_t i);

/// Python's str.split() with no argument: split on runs of whitespace, no empty words.
std::vector<std::string> python_split(const std::string& s);

}  // namespace ablate::sdk
