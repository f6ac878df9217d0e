#include "data_files.hpp"

#include <algorithm>
#include <array>
#include <cstring>
#include <fstream>
#include <iterator>
#include <sstream>
#include <stdexcept>

#include "ablate/sdk/component.hpp"
#include "ablate/sdk/weights.hpp"

namespace ablate::plugins::data {

namespace fs = std::filesystem;
using value_t = sdk::Json::value_t;

std::pair<std::size_t, std::size_t> line_col(std::string_view text, std::size_t offset) {
  offset = std::min(offset, text.size());
  std::size_t line = 1, line_start = 0;
  for (std::size_t i = 0; i < offset; ++i) {
    if (text[i] == '\n') {
      ++line;
      line_start = i + 1;
    }
  }
  return {line, offset - line_start + 1};
}

std::string read_text(const fs::path& file) {
  sdk::require_regular_file(file);  // a FIFO would block the open, a device (/dev/zero) never end
  std::ifstream in(file, std::ios::binary);
  if (!in) throw sdk::InputError(file.string() + ": cannot open (missing or unreadable)");
  std::ostringstream os;
  os << in.rdbuf();
  return os.str();
}

namespace {

std::vector<std::string> tokens_of(const Pointer& ptr) {
  std::vector<std::string> out;
  const auto s = ptr.to_string();
  std::size_t i = 0;
  while (i < s.size()) {
    const auto next = s.find('/', i + 1);
    std::string raw = s.substr(i + 1, next == std::string::npos ? std::string::npos : next - i - 1);
    std::string tok;
    for (std::size_t k = 0; k < raw.size(); ++k) {
      if (raw[k] == '~' && k + 1 < raw.size()) {
        tok.push_back(raw[k + 1] == '1' ? '/' : '~');
        ++k;
      } else {
        tok.push_back(raw[k]);
      }
    }
    out.push_back(tok);
    if (next == std::string::npos) break;
    i = next;
  }
  return out;
}

// A scanner over JSON text that is known to be valid: finds where the value at a pointer starts.
struct Scanner {
  std::string_view s;
  std::size_t i = 0;

  bool at_end() const { return i >= s.size(); }
  void ws() {
    while (i < s.size() && (s[i] == ' ' || s[i] == '\t' || s[i] == '\n' || s[i] == '\r')) ++i;
  }
  void skip_string() {
    ++i;
    while (i < s.size()) {
      if (s[i] == '\\') {
        i += 2;
      } else if (s[i++] == '"') {
        return;
      }
    }
  }
  void skip_value() {
    ws();
    if (at_end()) return;
    if (s[i] == '"') return skip_string();
    if (s[i] == '{' || s[i] == '[') {
      int depth = 0;
      while (i < s.size()) {
        const char c = s[i];
        if (c == '"') {
          skip_string();
          continue;
        }
        if (c == '{' || c == '[') ++depth;
        if (c == '}' || c == ']') --depth;
        ++i;
        if (depth == 0) return;
      }
      return;
    }
    while (i < s.size() && !std::strchr(",}] \t\r\n", s[i])) ++i;
  }
  // Moves to the member `key` of the object at i; false if absent.
  bool member(const std::string& key) {
    ++i;
    for (;;) {
      ws();
      if (at_end() || s[i] != '"') return false;
      const auto start = i;
      skip_string();
      std::string name;
      try {
        name = sdk::Json::parse(s.substr(start, i - start)).get<std::string>();
      } catch (const std::exception&) {
        return false;
      }
      ws();
      if (at_end() || s[i] != ':') return false;
      ++i;
      ws();
      if (name == key) return true;
      skip_value();
      ws();
      if (at_end() || s[i] != ',') return false;
      ++i;
    }
  }
  bool element(std::size_t index) {
    ++i;
    for (std::size_t n = 0;; ++n) {
      ws();
      if (at_end() || s[i] == ']') return false;
      if (n == index) return true;
      skip_value();
      ws();
      if (at_end() || s[i] != ',') return false;
      ++i;
    }
  }
};

std::size_t locate(std::string_view text, const Pointer& ptr) {
  Scanner sc{text};
  sc.ws();
  std::size_t best = sc.i;
  for (const auto& tok : tokens_of(ptr)) {
    if (sc.at_end()) break;
    bool found = false;
    if (text[sc.i] == '{') {
      found = sc.member(tok);
    } else if (text[sc.i] == '[' && !tok.empty() && tok.find_first_not_of("0123456789") == std::string::npos) {
      found = sc.element(std::stoul(tok));
    }
    if (!found) break;
    sc.ws();
    best = sc.i;
  }
  return best;
}

// "parse error at line 3, column 5: syntax error while parsing value - ..." -> "syntax error while parsing ...".
std::string parse_problem(const std::string& what) {
  const auto column = what.find("column ");
  if (column != std::string::npos) {
    const auto colon = what.find(": ", column);
    if (colon != std::string::npos) return what.substr(colon + 2);
  }
  const auto bracket = what.find("] ");
  return bracket == std::string::npos ? what : what.substr(bracket + 2);
}

}  // namespace

const char* type_name(value_t type) {
  switch (type) {
    case value_t::null: return "null";
    case value_t::object: return "an object";
    case value_t::array: return "an array";
    case value_t::string: return "a string";
    case value_t::boolean: return "a boolean";
    case value_t::number_integer:
    case value_t::number_unsigned: return "an integer";
    case value_t::number_float: return "a number";
    default: return "a value";
  }
}

std::string describe(const Pointer& ptr) {
  std::string out;
  for (const auto& tok : tokens_of(ptr)) {
    if (!tok.empty() && tok.find_first_not_of("0123456789") == std::string::npos) {
      out += "[" + tok + "]";
    } else {
      out += (out.empty() ? "" : ".") + tok;
    }
  }
  return out;
}

JsonText::JsonText(std::string file, std::string text, std::size_t first_line)
    : file_(std::move(file)), text_(std::move(text)), first_line_(first_line) {
  try {
    root_ = sdk::Json::parse(text_);
  } catch (const sdk::Json::parse_error& e) {
    // e.byte counts the characters read, the offending one included.
    const auto [line, col] = line_col(text_, e.byte > 0 ? e.byte - 1 : 0);
    throw sdk::InputError(file_ + ":" + std::to_string(line + first_line_ - 1) + ":" + std::to_string(col) +
                          ": malformed JSON: " + parse_problem(e.what()));
  } catch (const sdk::Json::exception& e) {
    throw sdk::InputError(file_ + ": " + sdk::json_error_text(e));  // a number too large for a double: no position
  }
}

JsonText JsonText::read(const fs::path& file) { return JsonText(file.string(), read_text(file)); }

std::string JsonText::where(const Pointer& ptr) const {
  const auto [line, col] = line_col(text_, locate(text_, ptr));
  return file_ + ":" + std::to_string(line + first_line_ - 1) + ":" + std::to_string(col);
}

void JsonText::fail(const Pointer& ptr, const std::string& problem) const {
  const auto path = describe(ptr);
  throw sdk::InputError(where(ptr) + ": " + (path.empty() ? "" : path + ": ") + problem);
}

namespace {
bool matches(const sdk::Json& v, value_t type) {
  if (type == value_t::number_integer) return v.is_number_integer();
  if (type == value_t::number_float) return v.is_number();
  return v.type() == type;
}
}  // namespace

const sdk::Json& JsonText::at(const Pointer& ptr, value_t type) const {
  const auto& v = root_.at(ptr);
  if (!matches(v, type)) fail(ptr, std::string("expected ") + type_name(type) + ", got " + type_name(v.type()));
  return v;
}

const sdk::Json* JsonText::maybe(const Pointer& object, const std::string& key, value_t type) const {
  const auto& obj = at(object, value_t::object);
  const auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return nullptr;
  return &at(object / key, type);
}

const sdk::Json& JsonText::need(const Pointer& object, const std::string& key, value_t type) const {
  const auto* v = maybe(object, key, type);
  if (!v) fail(object, "'" + key + "' is missing");
  return *v;
}

std::string JsonText::string(const Pointer& object, const std::string& key) const {
  return need(object, key, value_t::string).get<std::string>();
}

std::int64_t JsonText::integer(const Pointer& object, const std::string& key) const {
  const auto& obj = at(object, value_t::object);
  const auto it = obj.find(key);
  if (it == obj.end()) fail(object, "'" + key + "' is missing");
  if (it->is_number_integer()) return it->get<std::int64_t>();
  if (it->is_string()) {
    const auto s = it->get<std::string>();
    if (!s.empty() && s.size() < 19 && s.find_first_not_of("0123456789") == std::string::npos) return std::stoll(s);
  }
  fail(object / key, std::string("expected an integer, got ") + type_name(it->type()));
}

std::string JsonText::id(const Pointer& object, const std::string& key) const {
  const auto& obj = at(object, value_t::object);
  const auto it = obj.find(key);
  if (it == obj.end()) fail(object, "'" + key + "' is missing");
  if (it->is_string()) return it->get<std::string>();
  if (it->is_number_integer()) return std::to_string(it->get<std::int64_t>());
  fail(object / key, std::string("expected a string or an integer, got ") + type_name(it->type()));
}

void JsonText::release() {
  std::string().swap(text_);
  root_ = sdk::Json();
}

std::string read_line(const fs::path& file, const JsonlLine& line) {
  std::ifstream in(file, std::ios::binary);
  std::string out(line.length, '\0');
  if (!in || !in.seekg(static_cast<std::streamoff>(line.offset)) || !in.read(out.data(), static_cast<std::streamsize>(out.size()))) {
    throw sdk::InputError(file.string() + ": line " + std::to_string(line.number) + ": cannot be read again (the file changed?)");
  }
  return out;
}

ImageRoot::ImageRoot(const fs::path& root) : root_(fs::absolute(root).lexically_normal()) {
  // "a/b/" normalises to "a/b/" with an empty last component; drop it so that relative paths compare.
  if (!root_.has_filename()) root_ = root_.parent_path();
}

fs::path ImageRoot::resolve(const JsonText& doc, const Pointer& at, const std::string& name) const {
  if (name.find('\0') != std::string::npos) doc.fail(at, "'" + sdk::show_nul(name) + "': an image name with a NUL character");
  const auto p = (root_ / name).lexically_normal();
  const auto rel = p.lexically_relative(root_);
  if (name.empty() || rel.empty() || *rel.begin() == ".." || rel == ".") {
    doc.fail(at, "'" + name + "' is empty or outside the image folder " + root_.string());
  }
  return p;
}

namespace {

// An image's InputError (which names its file or origin) as the sample's error, for on_bad_sample to decide on.
template <class Read>
sdk::Image for_sample(const std::string& sample_id, Read&& read) {
  try {
    return read();
  } catch (const sdk::InputError& e) {
    throw sdk::SampleError(sample_id, "sample " + sample_id + ": " + e.what());
  }
}

}  // namespace

sdk::Image decode_image(const std::vector<std::uint8_t>& bytes, const std::string& origin, const std::string& sample_id) {
  return for_sample(sample_id, [&] { return sdk::decode_image(bytes, origin); });
}

sdk::Image load_image(const fs::path& file, const std::string& sample_id) {
  // sdk::read_image refuses a FIFO or a device (a link to /dev/zero) before reading it.
  return for_sample(sample_id, [&] { return sdk::read_image(file); });
}

sdk::Image no_image() { return sdk::Image::from_shape({0, 0, 3}); }

std::optional<std::vector<std::uint8_t>> decode_base64(std::string_view text, std::string* problem) {
  std::array<int, 256> value;
  value.fill(-1);
  const char* alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  for (int k = 0; k < 64; ++k) value[static_cast<unsigned char>(alphabet[k])] = k;
  std::vector<std::uint8_t> out;
  out.reserve(text.size() / 4 * 3);
  std::uint32_t acc = 0;
  int bits = 0, digits = 0, padding = 0;
  for (std::size_t i = 0; i < text.size(); ++i) {
    const auto c = static_cast<unsigned char>(text[i]);
    if (c == ' ' || c == '\n' || c == '\r' || c == '\t') continue;
    if (c == '=') {
      ++padding;
      continue;
    }
    if (value[c] < 0 || padding > 0) {
      if (problem) {
        std::ostringstream os;
        if (padding > 0) {
          os << "data after '=' padding at character " << i;
        } else if (c >= 0x20 && c < 0x7f) {
          os << "character '" << static_cast<char>(c) << "' at " << i << " is not base64";
        } else {
          os << "byte 0x" << std::hex << static_cast<int>(c) << std::dec << " at " << i << " is not base64";
        }
        *problem = os.str();
      }
      return std::nullopt;
    }
    acc = (acc << 6) | static_cast<std::uint32_t>(value[c]);
    bits += 6;
    ++digits;
    if (bits >= 8) {
      bits -= 8;
      out.push_back(static_cast<std::uint8_t>((acc >> bits) & 0xff));
    }
  }
  if (digits % 4 == 1 || padding > 2 || (padding > 0 && (digits + padding) % 4 != 0)) {
    if (problem) *problem = "truncated (" + std::to_string(digits) + " base64 digits)";
    return std::nullopt;
  }
  return out;
}

Template::Template(std::string text, const std::vector<std::string>& fields) {
  std::string literal;
  for (std::size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if ((c == '{' || c == '}') && i + 1 < text.size() && text[i + 1] == c) {
      literal.push_back(c);
      ++i;
      continue;
    }
    if (c == '}') throw std::invalid_argument("unmatched '}' at character " + std::to_string(i) + " (write '}}' for a brace)");
    if (c != '{') {
      literal.push_back(c);
      continue;
    }
    const auto end = text.find('}', i);
    if (end == std::string::npos) throw std::invalid_argument("unmatched '{' at character " + std::to_string(i) + " (write '{{' for a brace)");
    const auto field = text.substr(i + 1, end - i - 1);
    const auto name = field.substr(0, field.find(':'));
    if (std::find(fields.begin(), fields.end(), name) == fields.end()) {
      std::string known;
      for (const auto& f : fields) known += (known.empty() ? "" : ", ") + ("{" + f + "}");
      throw std::invalid_argument("unknown field {" + field + "} (known: " + known + ")");
    }
    if (field.size() > name.size()) {
      const auto spec = field.substr(name.size() + 1);
      if (spec.size() < 2 || spec[0] != '0' || spec.find_first_not_of("0123456789") != std::string::npos) {
        throw std::invalid_argument("field {" + field + "}: the only format is :0N (zero-padded to N digits)");
      }
      // A file name has at most 255 bytes (NAME_MAX): a wider pad names no file, and a huge one exhausted memory.
      if (spec.size() > 4 || std::stoi(spec) > 255) {
        throw std::invalid_argument("field {" + field + "}: pads to more digits than a file name can hold (at most 255)");
      }
    }
    if (!literal.empty()) pieces_.push_back({literal, false});
    literal.clear();
    pieces_.push_back({field, true});
    i = end;
  }
  if (!literal.empty()) pieces_.push_back({literal, false});
}

std::string Template::fill(const std::map<std::string, std::string>& values) const {
  std::string out;
  for (const auto& p : pieces_) {
    if (!p.field) {
      out += p.text;
      continue;
    }
    const auto colon = p.text.find(':');
    const auto& v = values.at(p.text.substr(0, colon));
    if (colon != std::string::npos) {
      const auto width = static_cast<std::size_t>(std::stoul(p.text.substr(colon + 1)));
      if (v.size() < width) out.append(width - v.size(), '0');
    }
    out += v;
  }
  return out;
}

bool Template::uses(const std::string& field) const {
  return std::any_of(pieces_.begin(), pieces_.end(),
                     [&](const Piece& p) { return p.field && p.text.substr(0, p.text.find(':')) == field; });
}

void check_images_exist(const std::string& origin, const std::vector<std::string>& ids, const std::vector<fs::path>& paths) {
  std::size_t missing = 0, with_image = 0;
  std::string first;
  for (std::size_t i = 0; i < paths.size(); ++i) {
    if (paths[i].empty()) continue;
    ++with_image;
    std::error_code ec;
    if (!fs::is_regular_file(paths[i], ec)) {
      if (missing++ == 0) first = "sample " + ids[i] + ": " + paths[i].string();
    }
  }
  if (missing > 0) {
    throw sdk::InputError(origin + ": " + std::to_string(missing) + " of " + std::to_string(with_image) +
                          " images missing (check_images), first: " + first);
  }
}

void ImageFileOptions::read(sdk::Options& o) {
  image_folder = o.get("image_folder", image_folder);
  limit = o.get("limit", limit);
  check_images = o.get("check_images", check_images);
}

void ImageFileOptions::read_with_file(sdk::Options& o) {
  file = o.require<std::string>("file");
  read(o);
}

void check_limit(sdk::Options& o, std::int64_t limit) {
  if (limit < 0) o.fail("limit", "must be 0 (all) or positive");
}

ImageRoot image_root(const fs::path& base_dir, const std::string& image_folder, const fs::path& default_dir) {
  return ImageRoot(image_folder.empty() ? default_dir : sdk::resolve_path(base_dir, image_folder));
}

std::string trim(std::string_view s) {
  const auto b = s.find_first_not_of(" \t\r\n");
  if (b == std::string_view::npos) return {};
  const auto e = s.find_last_not_of(" \t\r\n");
  return std::string(s.substr(b, e - b + 1));
}

}  // namespace ablate::plugins::data
