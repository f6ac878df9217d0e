#pragma once
// The steps of a Hugging Face tokenizer pipeline, as the `tokenizers` library 0.23 runs them: normalizers,
// pre-tokenizers, models (BPE, WordLevel), post-processors and decoders, each built from its tokenizer.json
// object. Internal to libablate_sdk; tokenizer.cpp drives them.

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include <nlohmann/json.hpp>

namespace ablate::sdk::tok {

using Json = nlohmann::json;

/// A piece of the input on its way through the pipeline. Splits holding an added token are left alone by
/// every later step.
struct Split {
  std::string text;           ///< UTF-8, normalized
  bool at_start = false;      ///< begins at byte 0 of the original input (Metaspace's "first" scheme)
  std::int64_t token = -1;    ///< an added token's id, or -1
};
using Splits = std::vector<Split>;

class Normalizer {
 public:
  virtual ~Normalizer() = default;
  virtual std::string apply(const std::string& text) const = 0;
};

class PreTokenizer {
 public:
  virtual ~PreTokenizer() = default;
  /// Splits one piece (without a token) into pieces; empty pieces are dropped by the caller.
  virtual Splits apply(const Split& split) const = 0;
};

class Model {
 public:
  virtual ~Model() = default;
  virtual std::vector<std::int64_t> tokenize(const std::string& text) const = 0;
  virtual std::optional<std::int64_t> id(const std::string& token) const = 0;
  virtual std::optional<std::string> token(std::int64_t id) const = 0;
  /// Entries in the vocabulary (the added tokens' ids continue from here).
  virtual std::int64_t size() const = 0;
};

class PostProcessor {
 public:
  virtual ~PostProcessor() = default;
  virtual std::vector<std::int64_t> apply(std::vector<std::int64_t> ids, bool add_special_tokens) const = 0;
};

class Decoder {
 public:
  virtual ~Decoder() = default;
  virtual std::vector<std::string> apply(std::vector<std::string> tokens) const = 0;
};

/// Builders from the tokenizer.json objects; null JSON gives nullptr. Throw std::runtime_error naming the
/// unsupported part (the caller adds the file name).
std::unique_ptr<Normalizer> make_normalizer(const Json& j);
std::unique_ptr<PreTokenizer> make_pre_tokenizer(const Json& j);
std::unique_ptr<Model> make_model(const Json& j);
std::unique_ptr<PostProcessor> make_post_processor(const Json& j);
std::unique_ptr<Decoder> make_decoder(const Json& j);

/// Runs a pre-tokenizer over every split without a token, dropping empty results.
Splits pre_tokenize(const PreTokenizer& p, Splits in);

}  // namespace ablate::sdk::tok
