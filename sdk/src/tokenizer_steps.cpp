// The tokenizer pipeline's steps, written from the `tokenizers` 0.23 sources (normalizers/, pre_tokenizers/,
// models/bpe/, processors/, decoders/) so that ids come out the same. Regex pre-tokenizers are hand-written
// scanners of the patterns that real tokenizer.json files use (GPT-2's, Llama-3's and Qwen2's); any other
// pattern is refused by name rather than approximated.

#include "tokenizer_steps.hpp"

#include <algorithm>
#include <array>
#include <cstdio>
#include <queue>
#include <stdexcept>

#include "unicode.hpp"

namespace ablate::sdk::tok {

namespace {

namespace uc = ablate::sdk::unicode;

[[noreturn]] void unsupported(const std::string& what) { throw std::runtime_error(what + " is not supported"); }

std::string type_of(const Json& j) { return j.is_object() ? j.value("type", std::string()) : std::string(); }

// A String pattern of Split / Replace: {"String": "..."} (a literal) or {"Regex": "..."}.
struct Pattern {
  bool regex = false;
  std::string text;
};
Pattern pattern_of(const Json& j) {
  if (j.contains("String")) return {false, j["String"].get<std::string>()};
  if (j.contains("Regex")) return {true, j["Regex"].get<std::string>()};
  unsupported("pattern " + j.dump());
}

// ---------------------------------------------------------------- byte-level mapping (GPT-2 bytes_to_unicode)

const std::array<char32_t, 256>& bytes_char() {
  static const std::array<char32_t, 256> table = [] {
    std::array<char32_t, 256> t{};
    char32_t next = 256;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      t[static_cast<std::size_t>(b)] = printable ? static_cast<char32_t>(b) : next++;
    }
    return t;
  }();
  return table;
}

const std::unordered_map<char32_t, std::uint8_t>& char_bytes() {
  static const auto table = [] {
    std::unordered_map<char32_t, std::uint8_t> t;
    for (int b = 0; b < 256; ++b) t[bytes_char()[static_cast<std::size_t>(b)]] = static_cast<std::uint8_t>(b);
    return t;
  }();
  return table;
}

std::string byte_map(const std::string& text) {
  std::string out;
  for (unsigned char b : text) out += uc::encode(bytes_char()[b]);
  return out;
}

// UTF-8 with every maximal invalid subpart replaced by one U+FFFD, as Rust's String::from_utf8_lossy does.
std::string utf8_lossy(const std::string& bytes) {
  std::string out;
  const auto* p = reinterpret_cast<const unsigned char*>(bytes.data());
  const std::size_t n = bytes.size();
  std::size_t i = 0;
  while (i < n) {
    const unsigned char b = p[i];
    if (b < 0x80) {
      out += static_cast<char>(b);
      ++i;
      continue;
    }
    int need = 0;
    unsigned char lo = 0x80, hi = 0xBF;  // the allowed range of the second byte
    if (b >= 0xC2 && b <= 0xDF) need = 1;
    else if (b == 0xE0) { need = 2; lo = 0xA0; }
    else if (b >= 0xE1 && b <= 0xEC) need = 2;
    else if (b == 0xED) { need = 2; hi = 0x9F; }
    else if (b >= 0xEE && b <= 0xEF) need = 2;
    else if (b == 0xF0) { need = 3; lo = 0x90; }
    else if (b >= 0xF1 && b <= 0xF3) need = 3;
    else if (b == 0xF4) { need = 3; hi = 0x8F; }
    std::size_t got = 0;
    for (int k = 1; k <= need && i + static_cast<std::size_t>(k) < n; ++k) {
      const unsigned char c = p[i + static_cast<std::size_t>(k)];
      const bool ok = k == 1 ? (c >= lo && c <= hi) : (c >= 0x80 && c <= 0xBF);
      if (!ok) break;
      ++got;
    }
    if (need > 0 && got == static_cast<std::size_t>(need)) {
      out.append(bytes, i, static_cast<std::size_t>(need) + 1);
      i += static_cast<std::size_t>(need) + 1;
    } else {
      out += "\xEF\xBF\xBD";
      i += 1 + got;
    }
  }
  return out;
}

// ---------------------------------------------------------------- splitting with a behaviour

struct Piece {
  std::size_t begin, end;  // byte offsets
  bool match;
};

enum class Behavior { removed, isolated, merged_with_previous, merged_with_next, contiguous };

Behavior behavior_of(const std::string& name) {
  if (name == "Removed" || name == "removed") return Behavior::removed;
  if (name == "Isolated" || name == "isolated") return Behavior::isolated;
  if (name == "MergedWithPrevious" || name == "merged_with_previous") return Behavior::merged_with_previous;
  if (name == "MergedWithNext" || name == "merged_with_next") return Behavior::merged_with_next;
  if (name == "Contiguous" || name == "contiguous") return Behavior::contiguous;
  unsupported("split behavior \"" + name + "\"");
}

// Pieces covering text from a list of match ranges (non-overlapping, increasing).
std::vector<Piece> cover(std::size_t size, const std::vector<std::pair<std::size_t, std::size_t>>& matches) {
  std::vector<Piece> out;
  std::size_t at = 0;
  for (const auto& [b, e] : matches) {
    if (b > at) out.push_back({at, b, false});
    out.push_back({b, e, true});
    at = e;
  }
  if (at < size || out.empty()) out.push_back({at, size, false});
  return out;
}

Splits apply_behavior(const Split& in, std::vector<Piece> pieces, Behavior behavior, bool invert) {
  if (invert) {
    for (auto& p : pieces) p.match = !p.match;
  }
  std::vector<std::pair<std::size_t, std::size_t>> kept;
  switch (behavior) {
    case Behavior::removed:
      for (const auto& p : pieces) {
        if (!p.match) kept.emplace_back(p.begin, p.end);
      }
      break;
    case Behavior::isolated:
      for (const auto& p : pieces) kept.emplace_back(p.begin, p.end);
      break;
    case Behavior::merged_with_previous: {
      bool prev_match = false;
      for (const auto& p : pieces) {
        if (p.match && !prev_match && !kept.empty()) kept.back().second = p.end;
        else kept.emplace_back(p.begin, p.end);
        prev_match = p.match;
      }
      break;
    }
    case Behavior::merged_with_next: {
      bool prev_match = false;
      for (auto it = pieces.rbegin(); it != pieces.rend(); ++it) {
        if (it->match && !prev_match && !kept.empty()) kept.back().first = it->begin;
        else kept.emplace_back(it->begin, it->end);
        prev_match = it->match;
      }
      std::reverse(kept.begin(), kept.end());
      break;
    }
    case Behavior::contiguous: {
      bool prev = false;
      for (const auto& p : pieces) {
        if (p.match == prev && !kept.empty()) kept.back().second = p.end;
        else kept.emplace_back(p.begin, p.end);
        prev = p.match;
      }
      break;
    }
  }
  Splits out;
  for (const auto& [b, e] : kept) {
    if (e > b) out.push_back({in.text.substr(b, e - b), in.at_start && b == 0, -1});
  }
  return out;
}

// ---------------------------------------------------------------- regex scanners (code-point based)

// Byte offsets of code points, with one past the end.
std::vector<std::size_t> byte_offsets(const std::u32string& s) {
  std::vector<std::size_t> off(s.size() + 1, 0);
  for (std::size_t i = 0; i < s.size(); ++i) off[i + 1] = off[i] + uc::encode(s[i]).size();
  return off;
}

bool is_other(char32_t c) { return !uc::is_whitespace(c) && !uc::is_letter(c) && !uc::is_number(c); }
bool is_newline(char32_t c) { return c == U'\r' || c == U'\n'; }

template <class Pred>
std::size_t run(const std::u32string& s, std::size_t i, Pred pred) {
  while (i < s.size() && pred(s[i])) ++i;
  return i;
}

// \s+(?!\S) then \s+ at a whitespace character: the run, less its last character when a non-space follows.
std::size_t whitespace_end(const std::u32string& s, std::size_t i) {
  const std::size_t j = run(s, i, uc::is_whitespace);
  if (j == s.size()) return j;
  return j - i >= 2 ? j - 1 : i + 1;
}

// 's|'t|'re|'ve|'m|'ll|'d, case-sensitive (GPT-2) or with Unicode case folding (Llama-3's (?i:...)).
std::size_t contraction(const std::u32string& s, std::size_t i, bool fold) {
  if (s[i] != U'\'' || i + 1 >= s.size()) return 0;
  auto is = [&](std::size_t k, char32_t lower) {
    if (k >= s.size()) return false;
    const char32_t c = s[k];
    if (c == lower) return true;
    if (!fold) return false;
    if (c == lower - 32) return true;              // ASCII upper case
    return lower == U's' && c == U'\u017F';        // LATIN SMALL LETTER LONG S folds to s
  };
  if (is(i + 1, U's') || is(i + 1, U't') || is(i + 1, U'm') || is(i + 1, U'd')) return 2;
  if ((is(i + 1, U'r') || is(i + 1, U'v')) && is(i + 2, U'e')) return 3;
  if (is(i + 1, U'l') && is(i + 2, U'l')) return 3;
  return 0;
}

// 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
std::vector<std::pair<std::size_t, std::size_t>> scan_gpt2(const std::u32string& s) {
  std::vector<std::pair<std::size_t, std::size_t>> out;
  std::size_t i = 0;
  while (i < s.size()) {
    std::size_t j;
    const char32_t c = s[i];
    if (const auto k = contraction(s, i, false)) {
      j = i + k;
    } else {
      // ` ?` takes one U+0020 only; a space before whitespace falls through to the whitespace rules.
      const std::size_t from = c == U' ' && i + 1 < s.size() ? i + 1 : i;
      const char32_t d = s[from];
      if (uc::is_letter(d)) j = run(s, from, uc::is_letter);
      else if (uc::is_number(d)) j = run(s, from, uc::is_number);
      else if (is_other(d)) j = run(s, from, is_other);
      else j = whitespace_end(s, i);
    }
    out.emplace_back(i, j);
    i = j;
  }
  return out;
}

// (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,K}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
// with K = 3 (Llama-3) or 1 (Qwen2).
std::vector<std::pair<std::size_t, std::size_t>> scan_llama3(const std::u32string& s, std::size_t digits) {
  std::vector<std::pair<std::size_t, std::size_t>> out;
  std::size_t i = 0;
  const std::size_t n = s.size();
  while (i < n) {
    const char32_t c = s[i];
    std::size_t j = 0;
    if (const auto k = contraction(s, i, true)) {
      j = i + k;
    } else if (uc::is_letter(c)) {
      j = run(s, i, uc::is_letter);
    } else if (!is_newline(c) && !uc::is_number(c) && i + 1 < n && uc::is_letter(s[i + 1])) {
      j = run(s, i + 1, uc::is_letter);
    } else if (uc::is_number(c)) {
      j = i;
      while (j < n && j - i < digits && uc::is_number(s[j])) ++j;
    } else if ((c == U' ' && i + 1 < n && is_other(s[i + 1])) || is_other(c)) {
      j = run(s, run(s, c == U' ' ? i + 1 : i, is_other), is_newline);
    } else {  // whitespace
      const std::size_t end = run(s, i, uc::is_whitespace);
      std::size_t last_newline = end;
      for (std::size_t k = i; k < end; ++k) {
        if (is_newline(s[k])) last_newline = k;
      }
      j = last_newline < end ? last_newline + 1 : whitespace_end(s, i);
    }
    out.emplace_back(i, j);
    i = j;
  }
  return out;
}

const char* const kGpt2Pattern = R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
const char* const kLlama3Pattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
const char* const kQwen2Pattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

using Scanner = std::vector<std::pair<std::size_t, std::size_t>> (*)(const std::u32string&);
std::vector<std::pair<std::size_t, std::size_t>> scan_llama3_3(const std::u32string& s) { return scan_llama3(s, 3); }
std::vector<std::pair<std::size_t, std::size_t>> scan_llama3_1(const std::u32string& s) { return scan_llama3(s, 1); }

Scanner scanner_for(const std::string& pattern) {
  if (pattern == kGpt2Pattern) return scan_gpt2;
  if (pattern == kLlama3Pattern) return scan_llama3_3;
  if (pattern == kQwen2Pattern) return scan_llama3_1;
  throw std::runtime_error("the pre-tokenizer regex " + Json(pattern).dump() +
                           " is not supported (supported: GPT-2's, Llama-3's and Qwen2's)");
}

// Scanner matches (code points) as byte pieces of the split.
std::vector<Piece> scan_pieces(const std::string& text, Scanner scan) {
  const auto s = uc::decode(text);
  const auto off = byte_offsets(s);
  std::vector<std::pair<std::size_t, std::size_t>> matches;
  for (const auto& [b, e] : scan(s)) matches.emplace_back(off[b], off[e]);
  return cover(text.size(), matches);
}

// Non-overlapping leftmost occurrences of a literal.
std::vector<std::pair<std::size_t, std::size_t>> find_literal(const std::string& text, const std::string& needle) {
  std::vector<std::pair<std::size_t, std::size_t>> out;
  if (needle.empty()) return out;
  for (std::size_t at = text.find(needle); at != std::string::npos; at = text.find(needle, at + needle.size())) {
    out.emplace_back(at, at + needle.size());
  }
  return out;
}

std::string replace_all(const std::string& text, const std::string& needle, const std::string& with) {
  std::string out;
  std::size_t at = 0;
  for (const auto& [b, e] : find_literal(text, needle)) {
    out.append(text, at, b - at);
    out += with;
    at = e;
  }
  out.append(text, at, std::string::npos);
  return out;
}

// ---------------------------------------------------------------- normalizers

class Lowercase : public Normalizer {
 public:
  std::string apply(const std::string& t) const override { return uc::encode(uc::lowercase(uc::decode(t))); }
};

class Prepend : public Normalizer {
 public:
  explicit Prepend(std::string p) : p_(std::move(p)) {}
  std::string apply(const std::string& t) const override { return t.empty() ? t : p_ + t; }

 private:
  std::string p_;
};

class ReplaceNormalizer : public Normalizer {
 public:
  ReplaceNormalizer(std::string from, std::string to) : from_(std::move(from)), to_(std::move(to)) {}
  std::string apply(const std::string& t) const override { return replace_all(t, from_, to_); }

 private:
  std::string from_, to_;
};

class StripNormalizer : public Normalizer {
 public:
  StripNormalizer(bool left, bool right) : left_(left), right_(right) {}
  std::string apply(const std::string& t) const override {
    auto s = uc::decode(t);
    std::size_t b = 0, e = s.size();
    if (left_) b = run(s, 0, uc::is_whitespace);
    if (right_) {
      while (e > b && uc::is_whitespace(s[e - 1])) --e;
    }
    return uc::encode(std::u32string_view(s).substr(b, e - b));
  }

 private:
  bool left_, right_;
};

class ByteLevelNormalizer : public Normalizer {
 public:
  std::string apply(const std::string& t) const override { return byte_map(t); }
};

class NormalizerSequence : public Normalizer {
 public:
  explicit NormalizerSequence(std::vector<std::unique_ptr<Normalizer>> steps) : steps_(std::move(steps)) {}
  std::string apply(const std::string& t) const override {
    std::string s = t;
    for (const auto& n : steps_) s = n->apply(s);
    return s;
  }

 private:
  std::vector<std::unique_ptr<Normalizer>> steps_;
};

// ---------------------------------------------------------------- pre-tokenizers

class ByteLevel : public PreTokenizer {
 public:
  ByteLevel(bool add_prefix_space, bool use_regex) : prefix_(add_prefix_space), regex_(use_regex) {}
  Splits apply(const Split& in) const override {
    Split s = in;
    if (prefix_ && (s.text.empty() || s.text[0] != ' ')) s.text = " " + s.text;
    Splits parts = regex_ ? apply_behavior(s, scan_pieces(s.text, scan_gpt2), Behavior::isolated, false) : Splits{s};
    for (auto& p : parts) p.text = byte_map(p.text);
    return parts;
  }

 private:
  bool prefix_, regex_;
};

class SplitPreTokenizer : public PreTokenizer {
 public:
  SplitPreTokenizer(Pattern pattern, Behavior behavior, bool invert)
      : pattern_(std::move(pattern)), behavior_(behavior), invert_(invert), scanner_(pattern_.regex ? scanner_for(pattern_.text) : nullptr) {}
  Splits apply(const Split& in) const override {
    auto pieces = scanner_ ? scan_pieces(in.text, scanner_) : cover(in.text.size(), find_literal(in.text, pattern_.text));
    return apply_behavior(in, std::move(pieces), behavior_, invert_);
  }

 private:
  Pattern pattern_;
  Behavior behavior_;
  bool invert_;
  Scanner scanner_;
};

class Digits : public PreTokenizer {
 public:
  explicit Digits(bool individual) : individual_(individual) {}
  Splits apply(const Split& in) const override {
    const auto s = uc::decode(in.text);
    const auto off = byte_offsets(s);
    std::vector<std::pair<std::size_t, std::size_t>> matches;
    for (std::size_t i = 0; i < s.size(); ++i) {
      if (uc::is_numeric(s[i])) matches.emplace_back(off[i], off[i + 1]);
    }
    return apply_behavior(in, cover(in.text.size(), matches), individual_ ? Behavior::isolated : Behavior::contiguous, false);
  }

 private:
  bool individual_;
};

class Metaspace : public PreTokenizer {
 public:
  Metaspace(std::string replacement, std::string scheme, bool split)
      : replacement_(std::move(replacement)), scheme_(std::move(scheme)), split_(split) {}
  Splits apply(const Split& in) const override {
    Split s = in;
    s.text = replace_all(s.text, " ", replacement_);
    const bool starts = s.text.compare(0, replacement_.size(), replacement_) == 0;
    if (!s.text.empty() && !starts && (scheme_ == "always" || (scheme_ == "first" && s.at_start))) {
      s.text = replacement_ + s.text;
    }
    if (!split_) return {s};
    return apply_behavior(s, cover(s.text.size(), find_literal(s.text, replacement_)), Behavior::merged_with_next, false);
  }

 private:
  std::string replacement_, scheme_;
  bool split_;
};

// \w+|[^\w\s]+, keeping the matches: what the Whitespace pre-tokenizer does.
class Whitespace : public PreTokenizer {
 public:
  Splits apply(const Split& in) const override {
    const auto s = uc::decode(in.text);
    const auto off = byte_offsets(s);
    std::vector<std::pair<std::size_t, std::size_t>> matches;
    auto punct = [](char32_t c) { return !uc::is_word(c) && !uc::is_whitespace(c); };
    for (std::size_t i = 0; i < s.size();) {
      if (uc::is_whitespace(s[i])) {
        ++i;
        continue;
      }
      const std::size_t j = uc::is_word(s[i]) ? run(s, i, uc::is_word) : run(s, i, punct);
      matches.emplace_back(off[i], off[j]);
      i = j;
    }
    return apply_behavior(in, cover(in.text.size(), matches), Behavior::removed, true);
  }
};

class WhitespaceSplit : public PreTokenizer {
 public:
  Splits apply(const Split& in) const override {
    const auto s = uc::decode(in.text);
    const auto off = byte_offsets(s);
    std::vector<std::pair<std::size_t, std::size_t>> spaces;
    for (std::size_t i = 0; i < s.size(); ++i) {
      if (uc::is_whitespace(s[i])) spaces.emplace_back(off[i], off[i + 1]);
    }
    return apply_behavior(in, cover(in.text.size(), spaces), Behavior::removed, false);
  }
};

class PreTokenizerSequence : public PreTokenizer {
 public:
  explicit PreTokenizerSequence(std::vector<std::unique_ptr<PreTokenizer>> steps) : steps_(std::move(steps)) {}
  Splits apply(const Split& in) const override {
    Splits cur{in};
    for (const auto& p : steps_) cur = pre_tokenize(*p, std::move(cur));
    return cur;
  }

 private:
  std::vector<std::unique_ptr<PreTokenizer>> steps_;
};

// ---------------------------------------------------------------- models

// Ids are u32 in tokenizers, which refuses a file with any other: so does this (a negative id would reach the
// embedding as an index). `where` names the field.
std::int64_t u32_id(const Json& id, const std::string& where) {
  // Parsed files hold non-negative integers as unsigned; tokenizers made in memory hold them signed.
  const bool u32 = id.is_number_unsigned() ? id.get<std::uint64_t>() <= 0xFFFFFFFFull
                   : id.is_number_integer() && id.get<std::int64_t>() >= 0 && id.get<std::int64_t>() <= 0xFFFFFFFFll;
  if (!u32) throw std::runtime_error(where + ": id must be an integer from 0 to 4294967295, got " + id.dump());
  return id.get<std::int64_t>();
}

// An optional string field of a model: absent or null for none, else a string (tokenizers refuses anything else).
std::optional<std::string> optional_string(const Json& j, const char* key) {
  if (!j.contains(key) || j[key].is_null()) return std::nullopt;
  if (!j[key].is_string()) throw std::runtime_error(std::string("model.") + key + ": expected a string, got " + j[key].dump());
  return j[key].get<std::string>();
}

std::unordered_map<std::string, std::int64_t> read_vocab(const Json& j) {
  if (!j.is_object()) throw std::runtime_error("model.vocab: expected an object of token: id");
  std::unordered_map<std::string, std::int64_t> vocab;
  for (auto it = j.begin(); it != j.end(); ++it) vocab[it.key()] = u32_id(it.value(), "model.vocab[" + Json(it.key()).dump() + "]");
  return vocab;
}

std::unordered_map<std::int64_t, std::string> reverse(const std::unordered_map<std::string, std::int64_t>& vocab) {
  std::unordered_map<std::int64_t, std::string> r;
  for (const auto& [t, id] : vocab) r[id] = t;
  return r;
}

// What WordLevel and BPE share: the token <-> id maps of tokenizer.json's "vocab".
class VocabModel : public Model {
 public:
  explicit VocabModel(const Json& j) : vocab_(read_vocab(j.at("vocab"))), vocab_r_(reverse(vocab_)) {}
  std::optional<std::int64_t> id(const std::string& t) const override {
    auto it = vocab_.find(t);
    return it == vocab_.end() ? std::nullopt : std::optional<std::int64_t>(it->second);
  }
  std::optional<std::string> token(std::int64_t id) const override {
    auto it = vocab_r_.find(id);
    return it == vocab_r_.end() ? std::nullopt : std::optional<std::string>(it->second);
  }
  std::int64_t size() const override { return static_cast<std::int64_t>(vocab_.size()); }

 protected:
  std::unordered_map<std::string, std::int64_t> vocab_;
  std::unordered_map<std::int64_t, std::string> vocab_r_;
};

class WordLevel : public VocabModel {
 public:
  explicit WordLevel(const Json& j) : VocabModel(j) {
    if (const auto unk = optional_string(j, "unk_token")) {
      auto it = vocab_.find(*unk);
      if (it == vocab_.end()) unsupported("a WordLevel unk_token missing from the vocabulary");
      unk_ = it->second;
    }
  }
  std::vector<std::int64_t> tokenize(const std::string& text) const override {
    auto it = vocab_.find(text);
    if (it != vocab_.end()) return {it->second};
    if (unk_ < 0) throw std::runtime_error("'" + text + "' is not in the vocabulary and there is no unknown token");
    return {unk_};
  }

 private:
  std::int64_t unk_ = -1;
};

class Bpe : public VocabModel {
 public:
  explicit Bpe(const Json& j) : VocabModel(j) {
    if (!j.value("dropout", Json()).is_null() && j["dropout"].get<double>() > 0) unsupported("BPE dropout");
    unk_token_ = optional_string(j, "unk_token").value_or("");
    prefix_ = optional_string(j, "continuing_subword_prefix").value_or("");
    suffix_ = optional_string(j, "end_of_word_suffix").value_or("");
    fuse_unk_ = j.value("fuse_unk", false);
    byte_fallback_ = j.value("byte_fallback", false);
    ignore_merges_ = j.value("ignore_merges", false);
    if (!unk_token_.empty() && !vocab_.count(unk_token_)) unsupported("a BPE unk_token missing from the vocabulary");
    std::int64_t rank = 0;
    for (const auto& m : j.at("merges")) {
      std::string a, b;
      if (m.is_string()) {
        const auto s = m.get<std::string>();
        const auto space = s.find(' ');
        if (space == std::string::npos || s.find(' ', space + 1) != std::string::npos) {
          throw std::runtime_error("malformed merge \"" + s + "\"");
        }
        a = s.substr(0, space);
        b = s.substr(space + 1);
      } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
        a = m[0].get<std::string>();
        b = m[1].get<std::string>();
      } else {
        throw std::runtime_error("malformed merge " + m.dump() + " (expected \"a b\" or [\"a\", \"b\"])");
      }
      const auto ia = vocab_.find(a), ib = vocab_.find(b);
      const auto merged = vocab_.find(a + b.substr(std::min(prefix_.size(), b.size())));
      if (ia == vocab_.end() || ib == vocab_.end() || merged == vocab_.end()) {
        throw std::runtime_error("merge \"" + a + " " + b + "\" uses tokens missing from the vocabulary");
      }
      merges_[key(ia->second, ib->second)] = {rank++, merged->second};  // a later duplicate wins, as in Rust
    }
  }

  std::vector<std::int64_t> tokenize(const std::string& w) const override {
    if (w.empty()) return {};
    if (ignore_merges_) {
      auto it = vocab_.find(w);
      if (it != vocab_.end()) return {it->second};
    }
    struct Symbol {
      std::int64_t c;
      std::ptrdiff_t prev, next;
      std::size_t len;
    };
    std::vector<Symbol> word;
    auto add = [&](std::int64_t id, std::size_t len) {
      const auto idx = static_cast<std::ptrdiff_t>(word.size());
      if (!word.empty()) word.back().next = idx;
      word.push_back({id, idx - 1, -1, len});
    };
    // A pending unknown token: its id (-1: none) and how many bytes it covers. Two plain variables rather than
    // an optional pair, which GCC 12 reports as maybe-uninitialized.
    std::int64_t unk = -1;
    std::size_t unk_bytes = 0;
    const auto chars = unicode::decode(w);
    for (std::size_t i = 0; i < chars.size(); ++i) {
      const std::string c = unicode::encode(chars[i]);
      std::string s = c;
      if (i > 0 && !prefix_.empty()) s = prefix_ + s;
      if (i + 1 == chars.size() && !suffix_.empty()) s += suffix_;
      if (auto it = vocab_.find(s); it != vocab_.end()) {
        if (unk >= 0) add(unk, unk_bytes);
        unk = -1;
        add(it->second, c.size());
        continue;
      }
      if (byte_fallback_) {
        std::vector<std::int64_t> bytes;
        for (unsigned char b : s) {
          char name[8];
          std::snprintf(name, sizeof name, "<0x%02X>", b);
          auto it = vocab_.find(name);
          if (it == vocab_.end()) break;
          bytes.push_back(it->second);
        }
        if (bytes.size() == s.size()) {
          for (auto id : bytes) add(id, 1);  // a pending unknown is not flushed first, as in Rust
          continue;
        }
      }
      if (!unk_token_.empty()) {
        const auto unk_id = vocab_.at(unk_token_);
        if (unk >= 0 && fuse_unk_) {
          unk_bytes += c.size();
        } else {
          if (unk >= 0) add(unk, unk_bytes);
          unk = unk_id;
          unk_bytes = c.size();
        }
      }
      // No unknown token and no fallback: the character is dropped, as the Rust implementation does.
    }
    if (unk >= 0) add(unk, unk_bytes);
    merge_all(word);
    std::vector<std::int64_t> out;
    for (const auto& s : word) {
      if (s.len > 0) out.push_back(s.c);
    }
    return out;
  }


 private:
  static std::uint64_t key(std::int64_t a, std::int64_t b) {
    return (static_cast<std::uint64_t>(a) << 32) ^ static_cast<std::uint64_t>(b & 0xffffffff);
  }

  // models/bpe/word.rs merge_all: the lowest-ranked adjacent pair first, leftmost on ties, with stale queue
  // entries recognised by their new id.
  template <class Symbols>
  void merge_all(Symbols& word) const {
    struct Merge {
      std::ptrdiff_t pos;
      std::int64_t rank, new_id;
      bool operator<(const Merge& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
    };
    std::priority_queue<Merge> queue;
    auto lookup = [&](std::int64_t a, std::int64_t b) -> const std::pair<std::int64_t, std::int64_t>* {
      auto it = merges_.find(key(a, b));
      return it == merges_.end() ? nullptr : &it->second;
    };
    for (std::size_t i = 0; i + 1 < word.size(); ++i) {
      if (auto m = lookup(word[i].c, word[i + 1].c)) queue.push({static_cast<std::ptrdiff_t>(i), m->first, m->second});
    }
    while (!queue.empty()) {
      const Merge top = queue.top();
      queue.pop();
      auto& cur = word[static_cast<std::size_t>(top.pos)];
      if (cur.len == 0 || cur.next < 0) continue;
      auto& right = word[static_cast<std::size_t>(cur.next)];
      const auto* m = lookup(cur.c, right.c);
      if (!m || m->second != top.new_id) continue;
      cur.c = top.new_id;
      cur.len += right.len;
      cur.next = right.next;
      right.len = 0;
      if (right.next >= 0) word[static_cast<std::size_t>(right.next)].prev = top.pos;
      if (cur.prev >= 0) {
        if (auto pm = lookup(word[static_cast<std::size_t>(cur.prev)].c, cur.c)) queue.push({cur.prev, pm->first, pm->second});
      }
      if (cur.next >= 0) {
        if (auto nm = lookup(cur.c, word[static_cast<std::size_t>(cur.next)].c)) queue.push({top.pos, nm->first, nm->second});
      }
    }
  }

  std::unordered_map<std::uint64_t, std::pair<std::int64_t, std::int64_t>> merges_;  // (a, b) -> (rank, new id)
  std::string unk_token_, prefix_, suffix_;
  bool fuse_unk_ = false, byte_fallback_ = false, ignore_merges_ = false;
};

// ---------------------------------------------------------------- post-processors

class Template : public PostProcessor {
 public:
  explicit Template(const Json& j) {
    for (const auto& item : j.at("single")) {
      if (item.contains("Sequence")) {
        pieces_.push_back({});  // the sequence itself
      } else {
        const auto name = item.at("SpecialToken").at("id").get<std::string>();
        const auto& special = j.at("special_tokens").at(name);
        const auto& ids = special.at("ids");
        if (!ids.is_array()) throw std::runtime_error("post_processor.special_tokens[" + Json(name).dump() + "].ids: expected an array");
        pieces_.push_back({-1});  // marks a special piece
        for (const auto& id : ids) pieces_.back().push_back(u32_id(id, "post_processor.special_tokens[" + Json(name).dump() + "].ids"));
      }
    }
  }
  std::vector<std::int64_t> apply(std::vector<std::int64_t> ids, bool add) const override {
    std::vector<std::int64_t> out;
    for (const auto& p : pieces_) {
      if (p.empty()) out.insert(out.end(), ids.begin(), ids.end());
      else if (add) out.insert(out.end(), p.begin() + 1, p.end());
    }
    return out;
  }

 private:
  std::vector<std::vector<std::int64_t>> pieces_;
};

class Surround : public PostProcessor {  // RobertaProcessing, BertProcessing: CLS A SEP
 public:
  Surround(std::int64_t cls, std::int64_t sep) : cls_(cls), sep_(sep) {}
  std::vector<std::int64_t> apply(std::vector<std::int64_t> ids, bool add) const override {
    if (!add) return ids;
    ids.insert(ids.begin(), cls_);
    ids.push_back(sep_);
    return ids;
  }

 private:
  std::int64_t cls_, sep_;
};

class NoPost : public PostProcessor {  // ByteLevel: offsets only
 public:
  std::vector<std::int64_t> apply(std::vector<std::int64_t> ids, bool) const override { return ids; }
};

class PostSequence : public PostProcessor {
 public:
  explicit PostSequence(std::vector<std::unique_ptr<PostProcessor>> steps) : steps_(std::move(steps)) {}
  std::vector<std::int64_t> apply(std::vector<std::int64_t> ids, bool add) const override {
    for (const auto& p : steps_) ids = p->apply(std::move(ids), add);
    return ids;
  }

 private:
  std::vector<std::unique_ptr<PostProcessor>> steps_;
};

// ---------------------------------------------------------------- decoders

class ByteLevelDecoder : public Decoder {
 public:
  std::vector<std::string> apply(std::vector<std::string> tokens) const override {
    std::string bytes;
    const auto& map = char_bytes();
    for (const auto& t : tokens) {
      const auto chars = uc::decode(t);
      std::string mapped;
      bool all = true;
      for (char32_t c : chars) {
        auto it = map.find(c);
        if (it == map.end()) {
          all = false;
          break;
        }
        mapped += static_cast<char>(it->second);
      }
      bytes += all ? mapped : t;
    }
    return {utf8_lossy(bytes)};
  }
};

class MetaspaceDecoder : public Decoder {
 public:
  MetaspaceDecoder(std::string replacement, bool prepend) : replacement_(std::move(replacement)), prepend_(prepend) {}
  std::vector<std::string> apply(std::vector<std::string> tokens) const override {
    for (std::size_t i = 0; i < tokens.size(); ++i) {
      tokens[i] = replace_all(tokens[i], replacement_, i == 0 && prepend_ ? "" : " ");
    }
    return tokens;
  }

 private:
  std::string replacement_;
  bool prepend_;
};

class ReplaceDecoder : public Decoder {
 public:
  ReplaceDecoder(std::string from, std::string to) : from_(std::move(from)), to_(std::move(to)) {}
  std::vector<std::string> apply(std::vector<std::string> tokens) const override {
    for (auto& t : tokens) t = replace_all(t, from_, to_);
    return tokens;
  }

 private:
  std::string from_, to_;
};

class ByteFallback : public Decoder {
 public:
  std::vector<std::string> apply(std::vector<std::string> tokens) const override {
    std::vector<std::string> out;
    std::string bytes;
    std::size_t count = 0;
    auto flush = [&] {
      if (count == 0) return;
      const auto text = utf8_lossy(bytes);
      const bool valid = text.size() == bytes.size() && text == bytes;
      if (valid) {
        out.push_back(bytes);
      } else {
        for (std::size_t k = 0; k < count; ++k) out.push_back("\xEF\xBF\xBD");
      }
      bytes.clear();
      count = 0;
    };
    for (const auto& t : tokens) {
      unsigned int value = 0;
      if (t.size() == 6 && t.compare(0, 3, "<0x") == 0 && t[5] == '>' && std::isxdigit(static_cast<unsigned char>(t[3])) &&
          std::isxdigit(static_cast<unsigned char>(t[4])) && std::sscanf(t.c_str() + 3, "%2x", &value) == 1) {
        bytes += static_cast<char>(value);
        ++count;
        continue;
      }
      flush();
      out.push_back(t);
    }
    flush();
    return out;
  }
};

class Fuse : public Decoder {
 public:
  std::vector<std::string> apply(std::vector<std::string> tokens) const override {
    std::string all;
    for (const auto& t : tokens) all += t;
    return {all};
  }
};

class StripDecoder : public Decoder {
 public:
  StripDecoder(char32_t content, std::size_t start, std::size_t stop) : content_(content), start_(start), stop_(stop) {}
  std::vector<std::string> apply(std::vector<std::string> tokens) const override {
    for (auto& t : tokens) {
      auto s = uc::decode(t);
      std::size_t b = 0, e = s.size();
      while (b < e && b < start_ && s[b] == content_) ++b;
      std::size_t stripped = 0;
      while (e > b && stripped < stop_ && s[e - 1] == content_) {
        --e;
        ++stripped;
      }
      t = uc::encode(std::u32string_view(s).substr(b, e - b));
    }
    return tokens;
  }

 private:
  char32_t content_;
  std::size_t start_, stop_;
};

class DecoderSequence : public Decoder {
 public:
  explicit DecoderSequence(std::vector<std::unique_ptr<Decoder>> steps) : steps_(std::move(steps)) {}
  std::vector<std::string> apply(std::vector<std::string> tokens) const override {
    for (const auto& d : steps_) tokens = d->apply(std::move(tokens));
    return tokens;
  }

 private:
  std::vector<std::unique_ptr<Decoder>> steps_;
};

std::string metaspace_scheme(const Json& j) {
  if (j.contains("prepend_scheme") && j["prepend_scheme"].is_string()) {
    const auto scheme = j["prepend_scheme"].get<std::string>();
    if (j.value("add_prefix_space", true) == false && scheme != "never") {
      throw std::runtime_error("Metaspace: add_prefix_space false contradicts prepend_scheme " + scheme);
    }
    return scheme;
  }
  return j.value("add_prefix_space", true) ? "always" : "never";
}

// The children of a Sequence step, built by `make` (null children are skipped).
template <class T>
std::vector<std::unique_ptr<T>> children(const Json& list, std::unique_ptr<T> (*make)(const Json&)) {
  std::vector<std::unique_ptr<T>> steps;
  for (const auto& item : list) {
    if (auto step = make(item)) steps.push_back(std::move(step));
  }
  return steps;
}

}  // namespace

Splits pre_tokenize(const PreTokenizer& p, Splits in) {
  Splits out;
  for (auto& s : in) {
    if (s.token >= 0) {
      out.push_back(std::move(s));
      continue;
    }
    for (auto& part : p.apply(s)) {
      if (!part.text.empty()) out.push_back(std::move(part));
    }
  }
  return out;
}

std::unique_ptr<Normalizer> make_normalizer(const Json& j) {
  if (j.is_null()) return nullptr;
  const auto type = type_of(j);
  if (type == "Lowercase") return std::make_unique<Lowercase>();
  if (type == "Prepend") return std::make_unique<Prepend>(j.at("prepend").get<std::string>());
  if (type == "Replace") {
    const auto p = pattern_of(j.at("pattern"));
    if (p.regex) unsupported("a Replace normalizer with a regex");
    return std::make_unique<ReplaceNormalizer>(p.text, j.at("content").get<std::string>());
  }
  if (type == "Strip") return std::make_unique<StripNormalizer>(j.value("strip_left", true), j.value("strip_right", true));
  if (type == "ByteLevel") return std::make_unique<ByteLevelNormalizer>();
  if (type == "Sequence") return std::make_unique<NormalizerSequence>(children(j.at("normalizers"), &make_normalizer));
  unsupported("normalizer \"" + type + "\"");
}

std::unique_ptr<PreTokenizer> make_pre_tokenizer(const Json& j) {
  if (j.is_null()) return nullptr;
  const auto type = type_of(j);
  if (type == "ByteLevel") return std::make_unique<ByteLevel>(j.value("add_prefix_space", true), j.value("use_regex", true));
  if (type == "Split") {
    return std::make_unique<SplitPreTokenizer>(pattern_of(j.at("pattern")), behavior_of(j.at("behavior").get<std::string>()),
                                               j.value("invert", false));
  }
  if (type == "Digits") return std::make_unique<Digits>(j.value("individual_digits", false));
  if (type == "Metaspace") return std::make_unique<Metaspace>(j.value("replacement", std::string("\xE2\x96\x81")), metaspace_scheme(j), j.value("split", true));
  if (type == "Whitespace") return std::make_unique<Whitespace>();
  if (type == "WhitespaceSplit") return std::make_unique<WhitespaceSplit>();
  if (type == "Sequence") return std::make_unique<PreTokenizerSequence>(children(j.at("pretokenizers"), &make_pre_tokenizer));
  unsupported("pre-tokenizer \"" + type + "\"");
}

std::unique_ptr<Model> make_model(const Json& j) {
  const auto type = type_of(j);
  if (type == "BPE" || (type.empty() && j.contains("merges"))) return std::make_unique<Bpe>(j);
  if (type == "WordLevel") return std::make_unique<WordLevel>(j);
  throw std::runtime_error("tokenizer model \"" + type + "\" is not supported (supported: BPE, WordLevel)");
}

std::unique_ptr<PostProcessor> make_post_processor(const Json& j) {
  if (j.is_null()) return nullptr;
  const auto type = type_of(j);
  if (type == "TemplateProcessing") return std::make_unique<Template>(j);
  if (type == "ByteLevel") return std::make_unique<NoPost>();
  if (type == "RobertaProcessing" || type == "BertProcessing") {
    return std::make_unique<Surround>(j.at("cls").at(1).get<std::int64_t>(), j.at("sep").at(1).get<std::int64_t>());
  }
  if (type == "Sequence") return std::make_unique<PostSequence>(children(j.at("processors"), &make_post_processor));
  unsupported("post-processor \"" + type + "\"");
}

std::unique_ptr<Decoder> make_decoder(const Json& j) {
  if (j.is_null()) return nullptr;
  const auto type = type_of(j);
  if (type == "ByteLevel") return std::make_unique<ByteLevelDecoder>();
  if (type == "Metaspace") {
    return std::make_unique<MetaspaceDecoder>(j.value("replacement", std::string("\xE2\x96\x81")), metaspace_scheme(j) != "never");
  }
  if (type == "Replace") {
    const auto p = pattern_of(j.at("pattern"));
    if (p.regex) unsupported("a Replace decoder with a regex");
    return std::make_unique<ReplaceDecoder>(p.text, j.at("content").get<std::string>());
  }
  if (type == "ByteFallback") return std::make_unique<ByteFallback>();
  if (type == "Fuse") return std::make_unique<Fuse>();
  if (type == "Strip") {
    const auto content = uc::decode(j.at("content").get<std::string>());
    if (content.size() != 1) unsupported("a Strip decoder of several characters");
    return std::make_unique<StripDecoder>(content[0], j.value("start", std::size_t{0}), j.value("stop", std::size_t{0}));
  }
  if (type == "Sequence") return std::make_unique<DecoderSequence>(children(j.at("decoders"), &make_decoder));
  unsupported("decoder \"" + type + "\"");
}

}  // namespace ablate::sdk::tok
