#include "ablate/sdk/text.hpp"

namespace ablate::sdk {

// Lead bytes never occur inside a UTF-8 character, so scanning byte by byte is safe.
std::size_t python_space_at(const std::string& s, std::size_t i) {
  const auto b = [&](std::size_t k) { return i + k < s.size() ? static_cast<unsigned char>(s[i + k]) : 0u; };
  const unsigned c = b(0);
  if ((c >= 0x09 && c <= 0x0d) || (c >= 0x1c && c <= 0x20)) return 1;
  if (c == 0xc2 && (b(1) == 0x85 || b(1) == 0xa0)) return 2;                        // U+0085, U+00A0
  if (c == 0xe1 && b(1) == 0x9a && b(2) == 0x80) return 3;                          // U+1680
  if (c == 0xe2 && b(1) == 0x80 && ((b(2) >= 0x80 && b(2) <= 0x8a) || b(2) == 0xa8 || b(2) == 0xa9 || b(2) == 0xaf)) {
    return 3;                                                                       // U+2000-200A, 2028, 2029, 202F
  }
  if (c == 0xe2 && b(1) == 0x81 && b(2) == 0x9f) return 3;                          // U+205F
  if (c == 0xe3 && b(1) == 0x80 && b(2) == 0x80) return 3;                          // U+3000
  return 0;
}

std::vector<std::string> python_split(const std::string& s) {
  std::vector<std::string> words;
  std::size_t i = 0, start = std::string::npos;
  while (i < s.size()) {
    if (const auto w = python_space_at(s, i)) {
      if (start != std::string::npos) words.push_back(s.substr(start, i - start));
      start = std::string::npos;
      i += w;
    } else {
      if (start == std::string::npos) start = i;
      ++i;
    }
  }
  if (start != std::string::npos) words.push_back(s.substr(start));
  return words;
}

}  // namespace ablate::sdk
