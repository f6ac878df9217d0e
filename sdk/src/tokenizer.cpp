#include "ablate/sdk/tokenizer.hpp"

#include <algorithm>
#include <map>
#include <unordered_map>

#include "ablate/sdk/error.hpp"
#include "ablate/sdk/weights.hpp"

namespace ablate::sdk {

namespace {

bool is_space(unsigned char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; }
// \w as the Whitespace pre-tokenizer's regex sees it, for ASCII; bytes of multi-byte UTF-8 characters count
// as word characters (letters of other scripts), which is what \w does for letters.
bool is_word(unsigned char c) { return std::isalnum(c) || c == '_' || c >= 0x80; }

}  // namespace

struct Tokenizer::State {
  std::unordered_map<std::string, std::int64_t> vocab;
  std::vector<std::string> tokens;  // id -> token
  struct Added {
    std::string content;
    std::int64_t id;
    bool special;
  };
  std::vector<Added> added;  // longest first for matching
  bool lowercase = false;
  std::string pre_tokenizer = "Whitespace";
  std::vector<std::int64_t> prefix_ids;  // from TemplateProcessing "single", before $A
  std::vector<std::int64_t> suffix_ids;  // after $A
  std::int64_t unk = -1, bos = -1, eos = -1, pad = -1;
  nlohmann::json post_processor;  // kept verbatim for to_json()

  bool is_special(std::int64_t id) const {
    return std::any_of(added.begin(), added.end(), [&](const Added& a) { return a.id == id && a.special; });
  }
};

Tokenizer::Tokenizer() : s_(std::make_unique<State>()) {}
Tokenizer::~Tokenizer() = default;
Tokenizer::Tokenizer(const Tokenizer& o) : s_(std::make_unique<State>(*o.s_)) {}
Tokenizer& Tokenizer::operator=(const Tokenizer& o) {
  if (this != &o) s_ = std::make_unique<State>(*o.s_);
  return *this;
}
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;

Tokenizer Tokenizer::from_file(const std::filesystem::path& file) { return from_json(read_json(file), file.string()); }

Tokenizer Tokenizer::from_json(const nlohmann::json& doc, const std::string& origin) {
  auto fail = [&](const std::string& what) -> void { throw InputError(origin + ": " + what); };
  Tokenizer t;
  State& s = *t.s_;
  if (!doc.is_object() || !doc.contains("model") || !doc["model"].is_object()) fail("no \"model\" object");
  const auto& model = doc["model"];
  const std::string type = model.value("type", "");
  if (type != "WordLevel") fail("tokenizer model \"" + type + "\" is not supported yet (supported: WordLevel)");
  if (!model.contains("vocab") || !model["vocab"].is_object()) fail("model.vocab is not an object");
  std::int64_t max_id = -1;
  for (auto it = model["vocab"].begin(); it != model["vocab"].end(); ++it) {
    const auto id = it.value().get<std::int64_t>();
    s.vocab[it.key()] = id;
    max_id = std::max(max_id, id);
  }
  if (doc.contains("added_tokens") && doc["added_tokens"].is_array()) {
    for (const auto& a : doc["added_tokens"]) {
      State::Added added{a.value("content", ""), a.value("id", std::int64_t{-1}), a.value("special", false)};
      if (added.content.empty() || added.id < 0) fail("added_tokens entry without content or id");
      s.vocab[added.content] = added.id;
      max_id = std::max(max_id, added.id);
      s.added.push_back(added);
    }
  }
  std::sort(s.added.begin(), s.added.end(),
            [](const State::Added& a, const State::Added& b) { return a.content.size() > b.content.size(); });
  s.tokens.assign(static_cast<std::size_t>(max_id + 1), std::string());
  for (const auto& [tok, id] : s.vocab) s.tokens[static_cast<std::size_t>(id)] = tok;

  if (model.contains("unk_token") && model["unk_token"].is_string()) {
    auto it = s.vocab.find(model["unk_token"].get<std::string>());
    if (it != s.vocab.end()) s.unk = it->second;
  }
  const auto& norm = doc.contains("normalizer") ? doc["normalizer"] : nlohmann::json();
  if (!norm.is_null()) {
    if (norm.value("type", "") != "Lowercase") fail("normalizer \"" + norm.value("type", "") + "\" is not supported");
    s.lowercase = true;
  }
  const auto& pre = doc.contains("pre_tokenizer") ? doc["pre_tokenizer"] : nlohmann::json();
  if (!pre.is_null()) {
    s.pre_tokenizer = pre.value("type", "");
    if (s.pre_tokenizer != "Whitespace" && s.pre_tokenizer != "WhitespaceSplit") {
      fail("pre_tokenizer \"" + s.pre_tokenizer + "\" is not supported for WordLevel");
    }
  }
  if (doc.contains("decoder") && !doc["decoder"].is_null()) fail("decoders are not supported for WordLevel");
  const auto& post = doc.contains("post_processor") ? doc["post_processor"] : nlohmann::json();
  if (!post.is_null()) {
    if (post.value("type", "") != "TemplateProcessing") {
      fail("post_processor \"" + post.value("type", "") + "\" is not supported");
    }
    bool after = false;
    for (const auto& item : post["single"]) {
      if (item.contains("Sequence")) {
        after = true;
      } else if (item.contains("SpecialToken")) {
        const auto name = item["SpecialToken"]["id"].get<std::string>();
        auto it = s.vocab.find(name);
        if (it == s.vocab.end()) fail("post_processor uses unknown special token " + name);
        (after ? s.suffix_ids : s.prefix_ids).push_back(it->second);
      }
    }
    s.post_processor = post;
  }
  auto lookup = [&](std::initializer_list<const char*> names) -> std::int64_t {
    for (const char* n : names) {
      auto it = s.vocab.find(n);
      if (it != s.vocab.end()) return it->second;
    }
    return -1;
  };
  s.pad = lookup({"<pad>", "[PAD]", "<|pad|>"});
  s.bos = s.prefix_ids.empty() ? lookup({"<s>", "<bos>", "[CLS]"}) : s.prefix_ids.front();
  s.eos = lookup({"</s>", "<eos>", "<|endoftext|>", "[SEP]"});
  return t;
}

Tokenizer Tokenizer::word_level(const std::vector<std::string>& words) {
  nlohmann::json vocab = nlohmann::json::object();
  nlohmann::json added = nlohmann::json::array();
  const char* specials[] = {"<pad>", "<s>", "</s>", "<unk>"};
  std::int64_t next = 0;
  for (const char* sp : specials) {
    vocab[sp] = next;
    added.push_back({{"id", next}, {"content", sp}, {"single_word", false}, {"lstrip", false}, {"rstrip", false},
                     {"normalized", false}, {"special", true}});
    ++next;
  }
  for (const auto& w : words) {
    if (!vocab.contains(w)) vocab[w] = next++;
  }
  nlohmann::json doc = {
      {"version", "1.0"},
      {"truncation", nullptr},
      {"padding", nullptr},
      {"added_tokens", added},
      {"normalizer", {{"type", "Lowercase"}}},
      {"pre_tokenizer", {{"type", "Whitespace"}}},
      {"post_processor",
       {{"type", "TemplateProcessing"},
        {"single", {{{"SpecialToken", {{"id", "<s>"}, {"type_id", 0}}}}, {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}}},
        {"pair",
         {{{"SpecialToken", {{"id", "<s>"}, {"type_id", 0}}}},
          {{"Sequence", {{"id", "A"}, {"type_id", 0}}}},
          {{"Sequence", {{"id", "B"}, {"type_id", 1}}}}}},
        {"special_tokens", {{"<s>", {{"id", "<s>"}, {"ids", {1}}, {"tokens", {"<s>"}}}}}}}},
      {"decoder", nullptr},
      {"model", {{"type", "WordLevel"}, {"vocab", vocab}, {"unk_token", "<unk>"}}},
  };
  return from_json(doc, "<word-level tokenizer>");
}

std::vector<std::int64_t> Tokenizer::encode(std::string_view text, bool add_special_tokens) const {
  const State& s = *s_;
  std::vector<std::int64_t> ids;
  if (add_special_tokens) ids = s.prefix_ids;
  auto emit_piece = [&](std::string piece) {
    if (s.lowercase) {
      for (auto& c : piece) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    }
    auto it = s.vocab.find(piece);
    if (it != s.vocab.end()) {
      ids.push_back(it->second);
    } else if (s.unk >= 0) {
      ids.push_back(s.unk);
    } else {
      throw InputError("tokenizer: '" + piece + "' is not in the vocabulary and there is no unknown token");
    }
  };
  auto emit_text = [&](std::string_view seg) {
    std::size_t i = 0;
    while (i < seg.size()) {
      const auto c = static_cast<unsigned char>(seg[i]);
      if (is_space(c)) {
        ++i;
        continue;
      }
      std::size_t j = i;
      if (s.pre_tokenizer == "WhitespaceSplit") {
        while (j < seg.size() && !is_space(static_cast<unsigned char>(seg[j]))) ++j;
      } else if (is_word(c)) {
        while (j < seg.size() && is_word(static_cast<unsigned char>(seg[j]))) ++j;
      } else {
        while (j < seg.size() && !is_word(static_cast<unsigned char>(seg[j])) && !is_space(static_cast<unsigned char>(seg[j]))) ++j;
      }
      emit_piece(std::string(seg.substr(i, j - i)));
      i = j;
    }
  };
  // Added tokens are matched in the raw text first, longest first, as the tokenizers library does.
  std::size_t start = 0, i = 0;
  while (i < text.size()) {
    const State::Added* hit = nullptr;
    for (const auto& a : s.added) {
      if (text.compare(i, a.content.size(), a.content) == 0) {
        hit = &a;
        break;
      }
    }
    if (!hit) {
      ++i;
      continue;
    }
    emit_text(text.substr(start, i - start));
    ids.push_back(hit->id);
    i += hit->content.size();
    start = i;
  }
  emit_text(text.substr(start));
  if (add_special_tokens) ids.insert(ids.end(), s.suffix_ids.begin(), s.suffix_ids.end());
  return ids;
}

std::string Tokenizer::decode(const std::vector<std::int64_t>& ids, bool skip_special_tokens) const {
  std::string out;
  for (auto id : ids) {
    if (id < 0 || id >= static_cast<std::int64_t>(s_->tokens.size())) continue;
    if (skip_special_tokens && s_->is_special(id)) continue;
    if (!out.empty()) out += ' ';
    out += s_->tokens[static_cast<std::size_t>(id)];
  }
  return out;
}

std::int64_t Tokenizer::vocab_size() const { return static_cast<std::int64_t>(s_->tokens.size()); }
std::int64_t Tokenizer::bos_id() const { return s_->bos; }
std::int64_t Tokenizer::eos_id() const { return s_->eos; }
std::int64_t Tokenizer::pad_id() const { return s_->pad; }
std::int64_t Tokenizer::unk_id() const { return s_->unk; }
std::string Tokenizer::token(std::int64_t id) const {
  return id >= 0 && id < vocab_size() ? s_->tokens[static_cast<std::size_t>(id)] : std::string();
}

nlohmann::json Tokenizer::to_json() const {
  const State& s = *s_;
  nlohmann::json vocab = nlohmann::json::object();
  nlohmann::json added = nlohmann::json::array();
  std::vector<State::Added> by_id = s.added;
  std::sort(by_id.begin(), by_id.end(), [](const State::Added& a, const State::Added& b) { return a.id < b.id; });
  for (const auto& a : by_id) {
    added.push_back({{"id", a.id}, {"content", a.content}, {"single_word", false}, {"lstrip", false}, {"rstrip", false},
                     {"normalized", false}, {"special", a.special}});
  }
  for (const auto& [tok, id] : s.vocab) vocab[tok] = id;
  nlohmann::json doc = {{"version", "1.0"},
                        {"truncation", nullptr},
                        {"padding", nullptr},
                        {"added_tokens", added},
                        {"normalizer", s.lowercase ? nlohmann::json{{"type", "Lowercase"}} : nlohmann::json()},
                        {"pre_tokenizer", {{"type", s.pre_tokenizer}}},
                        {"post_processor", s.post_processor},
                        {"decoder", nullptr},
                        {"model", {{"type", "WordLevel"}, {"vocab", vocab}}}};
  doc["model"]["unk_token"] = s.unk >= 0 ? s.tokens[static_cast<std::size_t>(s.unk)] : "";
  return doc;
}

void Tokenizer::save(const std::filesystem::path& file) const { write_json(file, to_json()); }

}  // namespace ablate::sdk
