#pragma once
// What the dataset plugins for real formats share, compiled into each of them (plugins/CMakeLists.txt):
// JSON and JSONL files read with errors that name FILE:LINE:COL, image paths kept inside their root, lazy
// image loading that reports SampleError, base64, prompt templates.
//
// The files are parsed once at construction; errors in them are sdk::InputError. What can only be found by
// opening an image (missing, corrupt) is found in Dataset::get() and thrown as sdk::SampleError.

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "ablate/sdk/dataset.hpp"
#include "ablate/sdk/options.hpp"

namespace ablate::plugins::data {

namespace sdk = ablate::sdk;
using Pointer = sdk::Json::json_pointer;

/// 1-based line and column (in bytes) of byte `offset` of `text`.
std::pair<std::size_t, std::size_t> line_col(std::string_view text, std::size_t offset);

/// The whole text of `file`; InputError "FILE: cannot open (missing or unreadable)".
std::string read_text(const std::filesystem::path& file);

/// A JSON text (a whole file, or one line of a JSONL file) with its origin, so that problems with values in
/// it are reported at their position: "FILE:LINE:COL: [3].conversations[1].value: expected a string, got a
/// number". Values are looked up by JSON pointer; the position is found by scanning the text again, which
/// only happens on the error path.
class JsonText {
 public:
  /// Parses `text`; a syntax error is an InputError at the position the parser stopped. `first_line` is the
  /// line of `text`'s first character in `file` (JSONL).
  JsonText(std::string file, std::string text, std::size_t first_line = 1);
  static JsonText read(const std::filesystem::path& file);

  const sdk::Json& root() const { return root_; }
  const std::string& file() const { return file_; }
  /// "FILE:LINE:COL" of the value at `ptr` (of its closest existing ancestor).
  std::string where(const Pointer& ptr) const;
  [[noreturn]] void fail(const Pointer& ptr, const std::string& problem) const;

  /// Typed access with positioned errors. `ptr` must address an object (checked) for the key forms.
  const sdk::Json& at(const Pointer& ptr, sdk::Json::value_t type) const;
  const sdk::Json& need(const Pointer& object, const std::string& key, sdk::Json::value_t type) const;
  /// Null when absent (or JSON null); else checked against `type`.
  const sdk::Json* maybe(const Pointer& object, const std::string& key, sdk::Json::value_t type) const;
  std::string string(const Pointer& object, const std::string& key) const;
  /// An integer, or a string of digits (ids are both in the wild).
  std::int64_t integer(const Pointer& object, const std::string& key) const;
  /// A string or a number, as text (ids).
  std::string id(const Pointer& object, const std::string& key) const;

  /// Frees the text and the tree once everything is extracted (large files).
  void release();

 private:
  std::string file_;
  std::string text_;
  std::size_t first_line_ = 1;
  sdk::Json root_;
};

/// "[3].conversations[1].value" for messages.
std::string describe(const Pointer& ptr);
const char* type_name(sdk::Json::value_t type);

/// One line of a JSONL file: its 1-based number and where its bytes are.
struct JsonlLine {
  std::size_t number = 0;
  std::uint64_t offset = 0;
  std::uint64_t length = 0;
};
/// Calls `fn(line, text)` for every non-blank line of `file`, streaming (files of many GiB).
template <class F>
void for_each_line(const std::filesystem::path& file, F&& fn);
/// The bytes of one line again (from get(), any thread); InputError when the file changed under us.
std::string read_line(const std::filesystem::path& file, const JsonlLine& line);

/// The folder images are read from. Paths in a dataset are relative to it, or absolute inside it; anything
/// that resolves (lexically: "..", absolute paths) outside is refused. Symbolic links inside the root are
/// followed as they are: the root is the dataset's own tree.
class ImageRoot {
 public:
  ImageRoot() = default;
  explicit ImageRoot(const std::filesystem::path& root);
  /// The file `name` (read at `at` in `doc`) names. Fails there, naming the problem, when it is empty, holds
  /// a NUL character or escapes the root.
  std::filesystem::path resolve(const JsonText& doc, const Pointer& at, const std::string& name) const;
  const std::filesystem::path& path() const { return root_; }

 private:
  std::filesystem::path root_;
};

/// Reads and decodes an image file; a missing, unreadable or undecodable file is a SampleError naming
/// `sample_id` and the path.
sdk::Image load_image(const std::filesystem::path& file, const std::string& sample_id);
/// Decodes image bytes; SampleError naming `sample_id` and `origin` when they are not a PNG or JPEG.
sdk::Image decode_image(const std::vector<std::uint8_t>& bytes, const std::string& origin, const std::string& sample_id);
/// An empty image (0 x 0 x 3): a text-only sample.
sdk::Image no_image();

/// Standard base64 (RFC 4648, padding optional, whitespace ignored). Returns nothing and sets `problem`
/// ("character '#' at 17") on bad input.
std::optional<std::vector<std::uint8_t>> decode_base64(std::string_view text, std::string* problem);

/// A template with {name} fields ("Question: {question} Answer:"); {name:0N} zero-pads to N characters
/// ("{image_id:012}"); "{{" and "}}" are literal braces.
class Template {
 public:
  Template() = default;
  /// Throws std::invalid_argument naming an unknown field or an unbalanced brace.
  Template(std::string text, const std::vector<std::string>& fields);
  std::string fill(const std::map<std::string, std::string>& values) const;
  bool uses(const std::string& field) const;

 private:
  struct Piece {
    std::string text;
    bool field = false;
  };
  std::vector<Piece> pieces_;
};

/// Checks that every image exists (option check_images): InputError naming the count and the first
/// missing one. `paths[i]` empty means no image.
void check_images_exist(const std::string& origin, const std::vector<std::string>& ids,
                        const std::vector<std::filesystem::path>& paths);

/// Surrounding whitespace removed.
std::string trim(std::string_view s);

/// The options of the datasets whose images are files: file (the data file, where there is one),
/// image_folder (empty: the folder of the data file), limit (0: all) and check_images. read() reads all but
/// file, read_with_file() file (required) first; the check of limit is check_limit(), so that each plugin
/// keeps the order of its checks.
struct ImageFileOptions {
  std::string file;
  std::string image_folder;
  std::int64_t limit = 0;
  bool check_images = false;
  void read(sdk::Options& o);
  void read_with_file(sdk::Options& o);
};
/// Option limit: fails "must be 0 (all) or positive" when negative.
void check_limit(sdk::Options& o, std::int64_t limit);
/// The image folder: `image_folder` resolved against `base_dir`, or `default_dir` when it is empty.
ImageRoot image_root(const std::filesystem::path& base_dir, const std::string& image_folder,
                     const std::filesystem::path& default_dir);

/// The part the dataset plugins here share: the samples, kept in order, size(), the report set at
/// construction, the limit and the check_images option. `Item` has `id` and `image` (a path; empty: no
/// image) where check_images() is used.
template <class Item>
class ItemDataset : public sdk::Dataset {
 public:
  std::size_t size() const override { return samples_.size(); }
  sdk::Json report() const override { return report_; }

 protected:
  /// True once `limit` (0: none) samples are kept.
  bool full(std::int64_t limit) const { return limit > 0 && static_cast<std::int64_t>(samples_.size()) >= limit; }
  /// Option check_images: check_images_exist() over the samples.
  void check_images(const std::string& origin) const {
    std::vector<std::string> ids;
    std::vector<std::filesystem::path> paths;
    for (const auto& s : samples_) {
      ids.push_back(s.id);
      paths.emplace_back(s.image);
    }
    check_images_exist(origin, ids, paths);
  }

  std::vector<Item> samples_;
  sdk::Json report_;
};

// ---- template definitions

template <class F>
void for_each_line(const std::filesystem::path& file, F&& fn) {
  std::FILE* f = std::fopen(file.c_str(), "rb");
  if (!f) throw sdk::InputError(file.string() + ": cannot open (missing or unreadable)");
  struct Closer {
    std::FILE* f;
    ~Closer() { std::fclose(f); }
  } closer{f};
  std::string line;
  std::uint64_t offset = 0, start = 0;
  std::size_t number = 1;
  char buf[1 << 16];
  auto emit = [&] {
    if (line.find_first_not_of(" \t\r\n") != std::string::npos) {
      fn(JsonlLine{number, start, static_cast<std::uint64_t>(line.size())}, line);
    }
    line.clear();
  };
  for (std::size_t n; (n = std::fread(buf, 1, sizeof buf, f)) > 0;) {
    for (std::size_t i = 0; i < n; ++i) {
      if (buf[i] == '\n') {
        emit();
        ++number;
        start = offset + i + 1;
      } else {
        line.push_back(buf[i]);
      }
    }
    offset += n;
  }
  if (std::ferror(f)) throw sdk::InputError(file.string() + ": read error");
  emit();
}

}  // namespace ablate::plugins::data
