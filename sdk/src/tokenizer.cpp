// Tokenizers as Hugging Face's `tokenizers` library 0.23 runs a tokenizer.json, and as transformers 5.17
// loads a model folder (tokenizer_config.json; SentencePiece tokenizer.model files read with
// libsentencepiece and turned into the BPE pipeline transformers builds from them).

#include "ablate/sdk/tokenizer.hpp"

#include <algorithm>
#include <map>
#include <set>
#include <unordered_map>

#include <sentencepiece_processor.h>

#include "ablate/sdk/error.hpp"
#include "ablate/sdk/weights.hpp"
#include "tokenizer_steps.hpp"
#include "unicode.hpp"

namespace ablate::sdk {

namespace {

const char* const kMetaspace = "\xE2\x96\x81";  // U+2581, SentencePiece's word boundary

// A member by reference, null when absent: a type error inside it then names its whole path in the file
// ("added_tokens/0/special"). json::value() would hand back a copy, and the path would start at the copy.
const nlohmann::json& member(const nlohmann::json& object, const char* key) {
  static const nlohmann::json kNull;
  if (!object.is_object()) return kNull;
  const auto it = object.find(key);
  return it == object.end() ? kNull : *it;
}

nlohmann::json added_token(std::int64_t id, const std::string& content, bool special, bool normalized = false) {
  return {{"id", id}, {"content", content}, {"single_word", false}, {"lstrip", false}, {"rstrip", false},
          {"normalized", normalized}, {"special", special}};
}

// A special token named in tokenizer_config.json under `key`: a string or {"content": ...}; null (the model
// has no such token) gives "". transformers refuses any other type, and so does this.
std::string token_name(const char* key, const nlohmann::json& v) {
  if (v.is_null()) return {};
  if (v.is_string()) return v.get<std::string>();
  if (v.is_object() && v.contains("content")) {
    if (!v["content"].is_string()) throw std::runtime_error("a special token's content must be a string, got " + v["content"].dump());
    return v["content"].get<std::string>();
  }
  throw std::runtime_error(std::string(key) + ": expected a token (a string or {\"content\": ...}) or null, got " + v.dump());
}

nlohmann::json template_post(const std::string& bos, std::int64_t bos_id, bool add_bos, const std::string& eos,
                             std::int64_t eos_id, bool add_eos) {
  nlohmann::json single = nlohmann::json::array(), specials = nlohmann::json::object();
  if (add_bos) {
    single.push_back({{"SpecialToken", {{"id", bos}, {"type_id", 0}}}});
    specials[bos] = {{"id", bos}, {"ids", {bos_id}}, {"tokens", {bos}}};
  }
  single.push_back({{"Sequence", {{"id", "A"}, {"type_id", 0}}}});
  if (add_eos) {
    single.push_back({{"SpecialToken", {{"id", eos}, {"type_id", 0}}}});
    specials[eos] = {{"id", eos}, {"ids", {eos_id}}, {"tokens", {eos}}};
  }
  return {{"type", "TemplateProcessing"}, {"single", single}, {"pair", single}, {"special_tokens", specials}};
}

// What transformers 5.17's LlamaTokenizer runs, whatever tokenizer.json says about these parts: no
// normalizer, Metaspace (prepend_scheme "first" unless legacy or add_prefix_space say otherwise), the
// SentencePiece-style decoder, and BOS / EOS as add_bos_token / add_eos_token ask.
void apply_llama_tokenizer(nlohmann::json& doc, const nlohmann::json& cfg, std::int64_t bos_id, std::int64_t eos_id) {
  const bool add_prefix_space = cfg.value("add_prefix_space", nlohmann::json(true)).is_boolean() ? cfg.value("add_prefix_space", true) : true;
  const bool legacy = cfg.value("legacy", nlohmann::json(false)).is_boolean() ? cfg.value("legacy", false) : false;
  const std::string scheme = !add_prefix_space ? "never" : (legacy ? "always" : "first");
  doc["normalizer"] = nullptr;
  doc["pre_tokenizer"] = {{"type", "Metaspace"}, {"replacement", kMetaspace}, {"prepend_scheme", scheme}, {"split", false}};
  nlohmann::json decoders = {{{"type", "Replace"}, {"pattern", {{"String", kMetaspace}}}, {"content", " "}},
                             {{"type", "ByteFallback"}},
                             {{"type", "Fuse"}}};
  if (add_prefix_space) decoders.push_back({{"type", "Strip"}, {"content", " "}, {"start", 1}, {"stop", 0}});
  doc["decoder"] = {{"type", "Sequence"}, {"decoders", decoders}};
  doc["post_processor"] = template_post(token_name("bos_token", cfg.value("bos_token", nlohmann::json("<s>"))), bos_id,
                                        cfg.value("add_bos_token", false), token_name("eos_token", cfg.value("eos_token", nlohmann::json("</s>"))),
                                        eos_id, cfg.value("add_eos_token", false));
}

// transformers' generate_merges for a SentencePiece BPE vocabulary: every split of every piece into two
// pieces of the vocabulary, ordered by the merged piece's id, then the left and right lengths (in code
// points); within one piece by the halves' ids.
nlohmann::json generate_merges(const std::vector<std::string>& pieces, const std::unordered_map<std::string, std::int64_t>& vocab) {
  struct Merge {
    std::string left, right;
    std::int64_t id;
    std::size_t left_len, right_len;
  };
  std::vector<Merge> merges;
  for (std::size_t id = 0; id < pieces.size(); ++id) {
    const auto cps = unicode::decode(pieces[id]);
    std::vector<Merge> local;
    for (std::size_t k = 1; k < cps.size(); ++k) {
      const auto left = unicode::encode(std::u32string_view(cps).substr(0, k));
      const auto right = unicode::encode(std::u32string_view(cps).substr(k));
      if (vocab.count(left) && vocab.count(right)) local.push_back({left, right, static_cast<std::int64_t>(id), k, cps.size() - k});
    }
    std::sort(local.begin(), local.end(), [&](const Merge& a, const Merge& b) {
      return std::make_pair(vocab.at(a.left), vocab.at(a.right)) < std::make_pair(vocab.at(b.left), vocab.at(b.right));
    });
    merges.insert(merges.end(), local.begin(), local.end());
  }
  std::stable_sort(merges.begin(), merges.end(), [](const Merge& a, const Merge& b) {
    return std::make_tuple(a.id, a.left_len, a.right_len) < std::make_tuple(b.id, b.left_len, b.right_len);
  });
  nlohmann::json out = nlohmann::json::array();
  for (const auto& m : merges) out.push_back({m.left, m.right});
  return out;
}

// A SentencePiece BPE model as transformers 5.17 converts it (SentencePieceExtractor + LlamaTokenizer).
nlohmann::json sentencepiece_json(const std::filesystem::path& file) {
  sentencepiece::SentencePieceProcessor sp;
  if (const auto status = sp.Load(file.string()); !status.ok()) {
    throw InputError(file.string() + ": not a readable SentencePiece model (" + status.ToString() + ")");
  }
  float entropy = 0;
  if (sp.CalculateEntropy("probe", 1.0f, &entropy).ok()) {
    throw InputError(file.string() + ": a Unigram SentencePiece model; only BPE models (LLaMA's kind) are supported");
  }
  std::vector<std::string> pieces;
  std::unordered_map<std::string, std::int64_t> vocab;
  nlohmann::json vocab_json = nlohmann::json::object(), added = nlohmann::json::array();
  for (int id = 0; id < sp.GetPieceSize(); ++id) {
    const auto& piece = sp.IdToPiece(id);
    pieces.push_back(piece);
    vocab.emplace(piece, id);
    vocab_json[piece] = id;
    // Control pieces (<s>, </s>) and the unknown piece become special added tokens. User-defined pieces
    // would become non-special ones, but libsentencepiece 0.1.97 does not tell them from normal pieces.
    if (sp.IsControl(id) || sp.IsUnknown(id)) added.push_back(added_token(id, piece, true));
  }
  return {{"version", "1.0"},
          {"truncation", nullptr},
          {"padding", nullptr},
          {"added_tokens", added},
          {"normalizer", nullptr},
          {"pre_tokenizer", nullptr},
          {"post_processor", nullptr},
          {"decoder", nullptr},
          {"model",
           {{"type", "BPE"}, {"dropout", nullptr}, {"unk_token", nullptr}, {"continuing_subword_prefix", nullptr},
            {"end_of_word_suffix", nullptr}, {"fuse_unk", true}, {"byte_fallback", true}, {"ignore_merges", false},
            {"vocab", vocab_json}, {"merges", generate_merges(pieces, vocab)}}}};
}

bool is_whitespace_at(const std::u32string& s, std::size_t i) { return i < s.size() && unicode::is_whitespace(s[i]); }

}  // namespace

struct Tokenizer::State {
  nlohmann::json doc;  // what the pipeline was built from; save() writes it
  std::shared_ptr<const tok::Normalizer> normalizer;
  std::shared_ptr<const tok::PreTokenizer> pre_tokenizer;
  std::shared_ptr<const tok::Model> model;
  std::shared_ptr<const tok::PostProcessor> post_processor;
  std::shared_ptr<const tok::Decoder> decoder;
  struct Added {
    std::string content;
    std::string pattern;  // what is matched: the normalized form for normalized tokens
    std::int64_t id;
    bool special, normalized, lstrip, rstrip, single_word;
  };
  std::vector<Added> added;
  std::unordered_map<std::string, std::int64_t> added_ids;
  std::unordered_map<std::int64_t, std::size_t> added_by_id;
  std::int64_t unk = -1, bos = -1, eos = -1, pad = -1;

  // find_matches of tokenizers' AddedVocabulary: leftmost-longest matches of the given tokens; a match
  // rejected by single_word still consumes its text; lstrip / rstrip take adjacent whitespace into the
  // token's split.
  tok::Splits find_matches(const std::string& text, bool at_start, bool normalized_tokens) const {
    tok::Splits out;
    std::vector<const Added*> tokens;
    for (const auto& a : added) {
      if (a.normalized == normalized_tokens) tokens.push_back(&a);
    }
    if (tokens.empty() || text.empty()) return {{text, at_start, -1}};
    const auto cps = unicode::decode(text);
    std::vector<std::size_t> off(cps.size() + 1, 0);
    for (std::size_t i = 0; i < cps.size(); ++i) off[i + 1] = off[i] + unicode::encode(cps[i]).size();
    auto cp_at = [&](std::size_t byte) { return static_cast<std::size_t>(std::lower_bound(off.begin(), off.end(), byte) - off.begin()); };
    std::size_t start_offset = 0, i = 0;
    while (i < text.size()) {
      const Added* best = nullptr;
      for (const auto* a : tokens) {
        if (!a->pattern.empty() && text.compare(i, a->pattern.size(), a->pattern) == 0 &&
            (!best || a->pattern.size() > best->pattern.size())) {
          best = a;
        }
      }
      if (!best) {
        ++i;
        continue;
      }
      std::size_t start = i, stop = i + best->pattern.size();
      i = stop;
      if (best->single_word) {
        const auto b = cp_at(start), e = cp_at(stop);
        const bool start_space = b == 0 || !unicode::is_word(cps[b - 1]);
        const bool stop_space = e == cps.size() || !unicode::is_word(cps[e]);
        if (!(start_space && stop_space)) continue;
      }
      if (best->lstrip) {
        auto b = cp_at(start);
        while (b > 0 && unicode::is_whitespace(cps[b - 1])) --b;
        start = std::max(off[b], start_offset);
      }
      if (best->rstrip) {
        auto e = cp_at(stop);
        while (is_whitespace_at(cps, e)) ++e;
        stop = off[e];
        i = stop;
      }
      if (start_offset < start) out.push_back({text.substr(start_offset, start - start_offset), at_start && start_offset == 0, -1});
      out.push_back({text.substr(start, stop - start), false, best->id});
      start_offset = stop;
    }
    if (start_offset < text.size()) out.push_back({text.substr(start_offset), at_start && start_offset == 0, -1});
    return out;
  }

  void build(const std::string& origin) {
    try {
      normalizer = tok::make_normalizer(member(doc, "normalizer"));
      pre_tokenizer = tok::make_pre_tokenizer(member(doc, "pre_tokenizer"));
      if (!doc.contains("model") || !doc["model"].is_object()) throw std::runtime_error("no \"model\" object");
      model = tok::make_model(doc["model"]);
      post_processor = tok::make_post_processor(member(doc, "post_processor"));
      decoder = tok::make_decoder(member(doc, "decoder"));
      read_added_tokens();
    } catch (const InputError&) {
      throw;
    } catch (const std::exception& e) {
      throw InputError(origin + ": " + json_error_text(e));
    }
  }

  // Added tokens: an id of the vocabulary when the content is in it, else the next free id counted from
  // the vocabulary's size, in file order (the `id` field is not trusted, as tokenizers does not).
  void read_added_tokens() {
    const auto& list = member(doc, "added_tokens");
    if (!list.is_array() && !list.is_null()) throw std::runtime_error("added_tokens: expected an array, got " + list.dump());
    added.clear();
    added_ids.clear();
    added_by_id.clear();
    std::int64_t next_id = model->size();
    for (const auto& a : list) {
      if (!a.is_object()) throw std::runtime_error("added_tokens: each entry must be an object, got " + a.dump());
      Added t{a.value("content", std::string()), "", -1, a.value("special", false), a.value("normalized", !a.value("special", false)),
              a.value("lstrip", false), a.value("rstrip", false), a.value("single_word", false)};
      if (t.content.empty()) continue;
      if (auto id = model->id(t.content)) t.id = *id;
      else if (auto it = added_ids.find(t.content); it != added_ids.end()) t.id = it->second;
      else t.id = next_id++;
      t.pattern = t.normalized && normalizer ? normalizer->apply(t.content) : t.content;
      if (added_ids.count(t.content)) continue;
      added_ids[t.content] = t.id;
      added_by_id[t.id] = added.size();
      added.push_back(t);
    }
  }

  std::int64_t id_of(const std::string& token) const {
    if (auto it = added_ids.find(token); it != added_ids.end()) return it->second;
    if (auto id = model->id(token)) return *id;
    return -1;
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
  if (!doc.is_object()) throw InputError(origin + ": not a tokenizer.json object");
  Tokenizer t;
  State& s = *t.s_;
  s.doc = doc;
  s.build(origin);
  auto lookup = [&](std::initializer_list<const char*> names) -> std::int64_t {
    for (const char* n : names) {
      if (auto id = s.id_of(n); id >= 0) return id;
    }
    return -1;
  };
  // Without a tokenizer_config.json, the usual names (from_folder overrides them with the config's).
  s.pad = lookup({"<pad>", "[PAD]", "<|pad|>", "<|padding|>"});
  s.bos = lookup({"<s>", "<bos>", "<|begin_of_text|>", "[CLS]", "<|endoftext|>"});
  s.eos = lookup({"</s>", "<eos>", "<|end_of_text|>", "<|endoftext|>", "[SEP]"});
  s.unk = lookup({"<unk>", "[UNK]", "<|unk|>"});
  if (doc["model"].is_object() && doc["model"].value("unk_token", nlohmann::json()).is_string()) {
    s.unk = s.id_of(doc["model"]["unk_token"].get<std::string>());
  }
  return t;
}

Tokenizer Tokenizer::from_folder(const std::filesystem::path& dir) {
  const auto json_file = dir / "tokenizer.json", model_file = dir / "tokenizer.model", cfg_file = dir / "tokenizer_config.json";
  const nlohmann::json cfg = std::filesystem::exists(cfg_file) ? read_json(cfg_file) : nlohmann::json::object();
  nlohmann::json doc;
  std::string origin;
  if (std::filesystem::exists(json_file)) {
    doc = read_json(json_file);
    origin = json_file.string();
  } else if (std::filesystem::exists(model_file)) {
    doc = sentencepiece_json(model_file);
    origin = model_file.string();
  } else {
    throw InputError(dir.string() + ": no tokenizer.json or tokenizer.model");
  }
  // tokenizer_config.json's own errors name it (tokenizer.json's are named inside from_json and build).
  try {
    return with_config(doc, origin, cfg, !std::filesystem::exists(json_file));
  } catch (const InputError&) {
    throw;
  } catch (const std::exception& e) {
    throw InputError(cfg_file.string() + ": " + json_error_text(e));
  }
}

Tokenizer Tokenizer::with_config(nlohmann::json doc, const std::string& origin, const nlohmann::json& cfg, bool from_model_file) {
  if (!cfg.is_object()) throw std::runtime_error("expected a JSON object, got " + cfg.dump());
  // Added tokens that only tokenizer_config.json lists (LLaVA's <image>, say).
  if (cfg.contains("added_tokens_decoder") && cfg["added_tokens_decoder"].is_object()) {
    std::set<std::string> have;
    for (const auto& a : doc.value("added_tokens", nlohmann::json::array())) {
      if (a.is_object()) have.insert(a.value("content", std::string()));
    }
    std::vector<std::pair<std::int64_t, nlohmann::json>> extra;
    for (auto it = cfg["added_tokens_decoder"].begin(); it != cfg["added_tokens_decoder"].end(); ++it) {
      const auto& key = it.key();
      if (key.empty() || key.size() > 10 || key.find_first_not_of("0123456789") != std::string::npos) {
        throw std::runtime_error("added_tokens_decoder: key '" + key + "' is not a token id");
      }
      if (!it.value().is_object()) throw std::runtime_error("added_tokens_decoder['" + key + "']: expected an object");
      const auto content = it.value().value("content", std::string());
      if (content.empty() || have.count(content)) continue;
      auto entry = it.value();
      entry["id"] = std::stoll(key);
      extra.emplace_back(std::stoll(key), entry);
    }
    std::sort(extra.begin(), extra.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
    for (auto& [id, entry] : extra) doc["added_tokens"].push_back(entry);
  }
  Tokenizer t = from_json(doc, origin);
  const auto cls = cfg.value("tokenizer_class", std::string());
  const bool llama = cls == "LlamaTokenizer" || cls == "LlamaTokenizerFast" || (doc["model"].value("byte_fallback", false) && from_model_file);
  // transformers adds a name the vocabulary lacks as a new token (its id past every row the model was trained
  // with): refused here by name, as token_name refuses another type.
  auto id_named = [&](const char* key, std::int64_t fallback) {
    if (!cfg.contains(key)) return fallback;
    const auto name = token_name(key, cfg[key]);
    if (name.empty()) return std::int64_t{-1};
    const auto id = t.token_to_id(name);
    if (id < 0) {
      throw std::runtime_error(std::string(key) + ": '" + name + "' is not a token of " + origin +
                               " (transformers would add it as a new token, with an embedding row never trained)");
    }
    return id;
  };
  t.s_->bos = id_named("bos_token", t.s_->bos);
  t.s_->eos = id_named("eos_token", t.s_->eos);
  t.s_->pad = id_named("pad_token", t.s_->pad);
  t.s_->unk = id_named("unk_token", t.s_->unk);
  if (llama) {
    apply_llama_tokenizer(t.s_->doc, cfg, t.s_->bos, t.s_->eos);
    t.s_->build(origin);
  }
  return t;
}

Tokenizer Tokenizer::word_level(const std::vector<std::string>& words) {
  nlohmann::json vocab = nlohmann::json::object();
  nlohmann::json added = nlohmann::json::array();
  std::int64_t next = 0;
  for (const char* sp : {"<pad>", "<s>", "</s>", "<unk>"}) {
    vocab[sp] = next;
    added.push_back(added_token(next, sp, true));
    ++next;
  }
  for (const auto& w : words) {
    if (!vocab.contains(w)) vocab[w] = next++;
  }
  nlohmann::json doc = {{"version", "1.0"},
                        {"truncation", nullptr},
                        {"padding", nullptr},
                        {"added_tokens", added},
                        {"normalizer", {{"type", "Lowercase"}}},
                        {"pre_tokenizer", {{"type", "Whitespace"}}},
                        {"post_processor", template_post("<s>", 1, true, "</s>", 2, false)},
                        {"decoder", nullptr},
                        {"model", {{"type", "WordLevel"}, {"vocab", vocab}, {"unk_token", "<unk>"}}}};
  return from_json(doc, "<word-level tokenizer>");
}

std::vector<std::int64_t> Tokenizer::encode(std::string_view text, bool add_special_tokens) const {
  const State& s = *s_;
  // Added tokens in the raw text first, then, piece by piece, the normalizer and the normalized ones.
  tok::Splits splits;
  for (auto& raw : s.find_matches(std::string(text), true, false)) {
    if (raw.token >= 0) {
      splits.push_back(std::move(raw));
      continue;
    }
    const auto normalized = s.normalizer ? s.normalizer->apply(raw.text) : raw.text;
    for (auto& piece : s.find_matches(normalized, raw.at_start, true)) splits.push_back(std::move(piece));
  }
  if (s.pre_tokenizer) splits = tok::pre_tokenize(*s.pre_tokenizer, std::move(splits));
  std::vector<std::int64_t> ids;
  for (const auto& split : splits) {
    if (split.token >= 0) {
      ids.push_back(split.token);
    } else if (!split.text.empty()) {
      const auto part = s.model->tokenize(split.text);
      ids.insert(ids.end(), part.begin(), part.end());
    }
  }
  return s.post_processor ? s.post_processor->apply(std::move(ids), add_special_tokens) : ids;
}

std::string Tokenizer::decode(const std::vector<std::int64_t>& ids, bool skip_special_tokens) const {
  const State& s = *s_;
  std::vector<std::string> tokens;
  for (auto id : ids) {
    if (auto it = s.added_by_id.find(id); it != s.added_by_id.end()) {
      const auto& a = s.added[it->second];
      if (!(skip_special_tokens && a.special)) tokens.push_back(a.pattern);
    } else if (auto t = s.model->token(id)) {
      tokens.push_back(*t);
    }
  }
  if (!s.decoder) {
    std::string out;
    for (const auto& t : tokens) out += (out.empty() ? "" : " ") + t;
    return out;
  }
  std::string out;
  for (const auto& t : s.decoder->apply(std::move(tokens))) out += t;
  return out;
}

std::int64_t Tokenizer::vocab_size() const {
  std::int64_t n = s_->model->size();
  for (const auto& a : s_->added) n = std::max(n, a.id + 1);
  return n;
}
std::int64_t Tokenizer::bos_id() const { return s_->bos; }
std::int64_t Tokenizer::eos_id() const { return s_->eos; }
std::int64_t Tokenizer::pad_id() const { return s_->pad; }
std::int64_t Tokenizer::unk_id() const { return s_->unk; }
std::string Tokenizer::token(std::int64_t id) const {
  if (auto it = s_->added_by_id.find(id); it != s_->added_by_id.end()) return s_->added[it->second].content;
  return s_->model->token(id).value_or(std::string());
}
std::int64_t Tokenizer::token_to_id(const std::string& token) const { return s_->id_of(token); }

nlohmann::json Tokenizer::to_json() const { return s_->doc; }

void Tokenizer::save(const std::filesystem::path& file) const { write_json(file, to_json()); }

void Tokenizer::save_folder(const std::filesystem::path& dir) const {
  save(dir / "tokenizer.json");
  auto name = [&](std::int64_t id) -> nlohmann::json { return id >= 0 ? nlohmann::json(token(id)) : nlohmann::json(); };
  // The pipeline in tokenizer.json is complete, so the generic class runs it as written.
  write_json(dir / "tokenizer_config.json", {{"tokenizer_class", "PreTrainedTokenizerFast"},
                                             {"bos_token", name(bos_id())},
                                             {"eos_token", name(eos_id())},
                                             {"pad_token", name(pad_id())},
                                             {"unk_token", name(unk_id())}});
}

}  // namespace ablate::sdk
