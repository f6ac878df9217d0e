#pragma once
// Typed options: a read-only view of one table of an experiment (or of a config.json), converted once by a
// plugin into its options struct with defaults. The view records every key it was asked for, so that
//  - keys nobody asked for are reported as unknown, with file, line and key (finish());
//  - the resolved table (every key read, with its value or its default) is what the host hashes into a
//    cell's canonical key and stores with the run.

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "ablate/sdk/error.hpp"

namespace ablate::sdk {

using Json = nlohmann::json;

/// Where a value came from, for error messages.
struct SourcePos {
  std::string file;
  int line = 0;
};

/// Positions of values in a JSON tree, keyed by JSON pointer ("/model/encoder/weights"). Built by the host
/// from the TOML parser's source regions; empty for trees without a source.
using SourceMap = std::map<std::string, SourcePos>;

/// `key` escaped as one JSON pointer segment ("a/b" -> "a~1b").
std::string pointer_token(std::string_view key);
/// "FILE:LINE" of the value at `pointer`, or of its closest ancestor that has a position (keys inside an
/// inline table have none of their own); `fallback` when nothing on the path has one.
std::string locate(const SourceMap& where, const std::string& pointer, const std::string& fallback);

/// Read-only view of one table. Not thread-safe; cheap to copy (copies share the record of keys read).
class Options {
 public:
  /// `table` must outlive the view. `pointer` is the table's JSON pointer within the document ("" for the
  /// root); `display` is its dotted name for messages ("model.encoder"); `where` may be null.
  Options(const Json& table, std::string pointer, std::string display, std::shared_ptr<const SourceMap> where,
          std::string fallback_file = {});
  /// A view over a tree that has no source map (config.json): messages name `file`.
  static Options of_file(const Json& table, const std::string& file);

  bool has(std::string_view key) const;

  /// The value of `key`, or `fallback` if absent; throws OptionError if present with another type.
  template <class T>
  T get(std::string_view key, T fallback);
  std::string get(std::string_view key, const char* fallback) { return get<std::string>(key, fallback); }
  /// get() for a size or a count (a width, a number of heads or layers): OptionError unless it is at least
  /// `min`, so that a zero or negative one is reported with its file instead of reaching a division or a shape.
  std::int64_t size(std::string_view key, std::int64_t fallback, std::int64_t min = 1);
  /// size() for a key that config.json may hold as null to mean "derive it" (GPT-2's n_inner, LLaMA's
  /// head_dim): nullopt when absent or null; anything else must be an integer of at least `min`.
  std::optional<std::int64_t> nullable_size(std::string_view key, std::int64_t min = 1);
  /// get() for a dropout probability: OptionError unless 0 <= p < 1.
  double probability(std::string_view key, double fallback);
  /// get() for a norm's epsilon: OptionError when negative (a negative one makes the norm NaN on rows whose
  /// variance is below it, and transformers gives NaN without a word).
  double non_negative(std::string_view key, double fallback);
  /// The value of `key`; throws OptionError if absent.
  template <class T>
  T require(std::string_view key);
  /// The value if present.
  template <class T>
  std::optional<T> maybe(std::string_view key);

  /// A nested table. Absent keys give an empty table; the sub-view shares this view's record.
  Options table(std::string_view key);
  /// Views over the tables of an array of tables (an absent key gives none); unknown keys inside them are
  /// reported by finish() like any other.
  std::vector<Options> list(std::string_view key);
  /// Whether `key` holds an array (for keys that take a table or an array of tables).
  bool is_list(std::string_view key) const;
  /// The raw JSON value (null if absent); marks the key as read and records it as given.
  const Json& raw(std::string_view key);

  /// Throws OptionError naming the first key that was never read. Call after parsing.
  void finish() const;
  /// Every key read, with its value or default, as a JSON object (nested tables included).
  Json resolved() const;

  /// Throws OptionError "FILE:LINE: display.key: message".
  [[noreturn]] void fail(std::string_view key, std::string_view message) const;
  /// "FILE:LINE" of `key` (or of the table when the key is absent).
  std::string where(std::string_view key) const;
  const std::string& display() const { return display_; }

 private:
  struct Record;
  Options(const Json& table, std::string pointer, std::string display, std::shared_ptr<const SourceMap> where,
          std::string fallback_file, std::shared_ptr<Record> record);
  const Json* find(std::string_view key) const;
  void note(std::string_view key, const Json& value);
  std::string qualified(std::string_view key) const;
  template <class T>
  T convert(std::string_view key, const Json& value) const;

  const Json* table_;
  std::string pointer_;
  std::string display_;
  std::shared_ptr<const SourceMap> where_;
  std::string fallback_file_;
  std::shared_ptr<Record> record_;
};

// The supported T: bool, std::int64_t, int, double, std::string, std::vector<std::string>,
// std::vector<std::int64_t>, std::vector<double>, Json. Integers convert to double; nothing else converts.
extern template bool Options::get<bool>(std::string_view, bool);
extern template std::int64_t Options::get<std::int64_t>(std::string_view, std::int64_t);
extern template int Options::get<int>(std::string_view, int);
extern template double Options::get<double>(std::string_view, double);
extern template std::string Options::get<std::string>(std::string_view, std::string);
extern template std::vector<std::string> Options::get<std::vector<std::string>>(std::string_view,
                                                                                 std::vector<std::string>);
extern template std::vector<std::int64_t> Options::get<std::vector<std::int64_t>>(std::string_view,
                                                                                   std::vector<std::int64_t>);
extern template std::vector<double> Options::get<std::vector<double>>(std::string_view, std::vector<double>);
extern template Json Options::get<Json>(std::string_view, Json);
extern template bool Options::require<bool>(std::string_view);
extern template std::int64_t Options::require<std::int64_t>(std::string_view);
extern template double Options::require<double>(std::string_view);
extern template std::string Options::require<std::string>(std::string_view);
extern template std::optional<std::int64_t> Options::maybe<std::int64_t>(std::string_view);
extern template std::optional<double> Options::maybe<double>(std::string_view);
extern template std::optional<std::string> Options::maybe<std::string>(std::string_view);
extern template std::optional<bool> Options::maybe<bool>(std::string_view);

}  // namespace ablate::sdk
