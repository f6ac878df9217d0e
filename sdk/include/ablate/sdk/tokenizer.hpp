#pragma once
// Tokenizers read from a Hugging Face tokenizer.json (byte-level BPE, BPE with byte fallback, WordLevel) or a
// SentencePiece tokenizer.model, as the README's "Plugins and the models they load" lists. Anything else
// is refused with an error naming the file and the unsupported part.

#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

namespace ablate::sdk {

class Tokenizer {
 public:
  Tokenizer();
  ~Tokenizer();
  Tokenizer(const Tokenizer&);
  Tokenizer& operator=(const Tokenizer&);
  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;

  /// Reads tokenizer.json; throws InputError naming the file on anything it cannot honour.
  static Tokenizer from_file(const std::filesystem::path& file);
  static Tokenizer from_json(const nlohmann::json& doc, const std::string& origin);
  /// The tokenizer of a Hugging Face model folder: tokenizer.json, with tokenizer_config.json for the special
  /// tokens and whether BOS / EOS are added.
  static Tokenizer from_folder(const std::filesystem::path& dir);
  /// A word-level tokenizer over `words` (deduplicated, order kept) with the special tokens <pad>=0,
  /// <s>=1, </s>=2, <unk>=3, a lowercasing normalizer, the Whitespace pre-tokenizer, and a post-processor
  /// that prepends <s>. Its JSON loads in the `tokenizers` library.
  static Tokenizer word_level(const std::vector<std::string>& words);

  /// Token ids of `text`; with add_special_tokens, as the post-processor says (BOS first).
  std::vector<std::int64_t> encode(std::string_view text, bool add_special_tokens = false) const;
  /// Text of `ids`, tokens joined by the model's decoder (WordLevel: single spaces).
  std::string decode(const std::vector<std::int64_t>& ids, bool skip_special_tokens = true) const;

  std::int64_t vocab_size() const;
  std::int64_t bos_id() const;  ///< -1 if none
  std::int64_t eos_id() const;
  std::int64_t pad_id() const;
  std::int64_t unk_id() const;
  std::string token(std::int64_t id) const;
  /// The id of a token (added tokens included); -1 if there is none.
  std::int64_t token_to_id(const std::string& token) const;

  nlohmann::json to_json() const;
  void save(const std::filesystem::path& file) const;
  /// Writes tokenizer.json and tokenizer_config.json into a model folder.
  void save_folder(const std::filesystem::path& dir) const;

 private:
  /// from_folder's second half: tokenizer_config.json's added tokens and special-token names applied to `doc`.
  static Tokenizer with_config(nlohmann::json doc, const std::string& origin, const nlohmann::json& cfg, bool from_model_file);
  struct State;
  std::unique_ptr<State> s_;
};

}  // namespace ablate::sdk
