#include "ablate/sdk/weights.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <functional>
#include <set>
#include <sstream>
#include <tuple>

#include "ablate/sdk/error.hpp"

namespace ablate::sdk {

namespace fs = std::filesystem;

namespace {

// A read-only mapping of a whole file, shared by every tensor that points into it.
struct Mapping {
  void* data = nullptr;
  std::size_t size = 0;
  ~Mapping() {
    if (data && data != MAP_FAILED) munmap(data, size);
  }
};

struct DtypeName {
  const char* name;
  torch::ScalarType type;
};
constexpr DtypeName kDtypes[] = {
    {"F32", torch::kFloat32}, {"F16", torch::kFloat16}, {"BF16", torch::kBFloat16}, {"F64", torch::kFloat64},
    {"I64", torch::kInt64},   {"I32", torch::kInt32},   {"I16", torch::kInt16},     {"I8", torch::kInt8},
    {"U8", torch::kUInt8},    {"BOOL", torch::kBool},
};

torch::ScalarType dtype_of(const std::string& name, const fs::path& file, const std::string& tensor) {
  for (const auto& d : kDtypes) {
    if (name == d.name) return d.type;
  }
  throw InputError(file.string() + ": tensor '" + tensor + "' has unsupported dtype " + name);
}

const char* name_of(torch::ScalarType type) {
  for (const auto& d : kDtypes) {
    if (type == d.type) return d.name;
  }
  throw std::runtime_error(std::string("safetensors cannot store dtype ") + c10::toString(type));
}

std::string shape_string(c10::IntArrayRef shape) {
  std::ostringstream os;
  os << '[';
  for (std::size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
  os << ']';
  return os.str();
}

void write_atomically(const fs::path& file, const std::function<void(std::ofstream&)>& body) {
  fs::path tmp = file;
  tmp += ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) throw std::runtime_error(tmp.string() + ": cannot open for writing");
    body(out);
    out.flush();
    if (!out) throw std::runtime_error(tmp.string() + ": write failed");
  }
  // fsync before the rename, so that a crash never leaves a complete-looking name with partial contents.
  int fd = ::open(tmp.c_str(), O_RDONLY);
  if (fd >= 0) {
    ::fsync(fd);
    ::close(fd);
  }
  fs::rename(tmp, file);
}

}  // namespace

std::string json_error_text(const std::exception& e) {
  // "[json.exception.type_error.302] (/model/vocab/a) type must be string, but is number": the tag means
  // nothing to a user; the JSON pointer (JSON_DIAGNOSTICS, set for every target in sdk/CMakeLists.txt) says
  // which value is wrong, and reads "model/vocab/a: type must be string, but is number".
  std::string what = e.what();
  const auto close = what.find("] ");
  if (what.rfind("[json.exception.", 0) == 0 && close != std::string::npos) what = what.substr(close + 2);
  const auto end = what.find(") ");
  if (what.rfind("(", 0) == 0 && end != std::string::npos) {
    const std::size_t from = what.rfind("(/", 0) == 0 ? 2 : 1;  // the pointer without its leading '/'
    what = what.substr(from, end - from) + ": " + what.substr(end + 2);
  }
  return what;
}

std::string show_nul(const std::string& name) {
  std::string out;
  for (char c : name) {
    if (c == '\0') out += "\\0";
    else out += c;
  }
  return out;
}

void require_regular_file(const fs::path& file) {
  // A name from a TOML or JSON file may hold "\u0000": the system would open the name up to it.
  if (file.native().find('\0') != std::string::npos) throw InputError(show_nul(file.native()) + ": a file name with a NUL character");
  std::error_code ec;
  const auto status = fs::status(file, ec);
  if (ec || !fs::exists(status)) throw InputError(file.string() + ": cannot open (missing or unreadable)");
  if (fs::is_directory(status)) throw InputError(file.string() + ": is a folder, not a file");
  if (!fs::is_regular_file(status)) throw InputError(file.string() + ": not a regular file");
}

nlohmann::json read_json(const fs::path& file) {
  require_regular_file(file);
  std::ifstream in(file);
  if (!in) throw InputError(file.string() + ": cannot open (missing or unreadable)");
  try {
    return nlohmann::json::parse(in);
  } catch (const nlohmann::json::parse_error& e) {
    // e.byte is the position the parser stopped at.
    throw InputError(file.string() + ": malformed JSON at byte " + std::to_string(e.byte));
  } catch (const nlohmann::json::exception& e) {
    throw InputError(file.string() + ": " + json_error_text(e));  // a number too large for a double
  }
}

void write_json(const fs::path& file, const nlohmann::json& value) {
  write_atomically(file, [&](std::ofstream& out) { out << value.dump(2) << '\n'; });
}

TensorMap read_safetensors(const fs::path& file) {
  require_regular_file(file);
  int fd = ::open(file.c_str(), O_RDONLY);
  if (fd < 0) throw InputError(file.string() + ": cannot open (missing or unreadable)");
  struct stat st {};
  ::fstat(fd, &st);
  auto map = std::make_shared<Mapping>();
  map->size = static_cast<std::size_t>(st.st_size);
  if (map->size < 8) {
    ::close(fd);
    throw InputError(file.string() + ": not a safetensors file (shorter than its 8-byte header length)");
  }
  map->data = ::mmap(nullptr, map->size, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (map->data == MAP_FAILED) throw InputError(file.string() + ": cannot be memory-mapped");

  const auto* bytes = static_cast<const std::uint8_t*>(map->data);
  std::uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | bytes[i];
  if (header_len > map->size - 8) {
    throw InputError(file.string() + ": header length " + std::to_string(header_len) + " exceeds the file size");
  }
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(bytes + 8, bytes + 8 + header_len);
  } catch (const nlohmann::json::parse_error& e) {
    throw InputError(file.string() + ": malformed safetensors header at byte " + std::to_string(8 + e.byte));
  } catch (const nlohmann::json::exception& e) {
    throw InputError(file.string() + ": safetensors header: " + json_error_text(e));
  }
  if (!header.is_object()) throw InputError(file.string() + ": safetensors header is not a JSON object");
  const std::size_t data_start = 8 + header_len;
  const std::size_t data_size = map->size - data_start;

  // The header as the safetensors library validates it: integer shapes and offsets, and tensors that tile the
  // data exactly (in offset order, no gap, no overlap, nothing after the last). What that library refuses is
  // refused here, so that a file loads in both or in neither.
  auto bad = [&](const std::string& tensor, const std::string& what) {
    return InputError(file.string() + ": tensor '" + tensor + "' " + what);
  };
  auto natural = [](const nlohmann::json& v) {
    return v.is_number_unsigned() || (v.is_number_integer() && v.get<std::int64_t>() >= 0);
  };
  struct Entry {
    std::string name;
    torch::ScalarType type;
    std::vector<std::int64_t> shape;
    std::uint64_t begin, end;
  };
  std::vector<Entry> entries;
  for (auto it = header.begin(); it != header.end(); ++it) {
    const auto& info = it.value();
    if (it.key() == "__metadata__") {
      const bool strings = info.is_object() && std::all_of(info.begin(), info.end(), [](const auto& v) { return v.is_string(); });
      if (!strings) throw InputError(file.string() + ": __metadata__ must be an object of strings");
      continue;
    }
    if (!info.is_object() || !info.contains("dtype") || !info.contains("shape") || !info.contains("data_offsets")) {
      throw bad(it.key(), "lacks dtype, shape or data_offsets");
    }
    if (!info["dtype"].is_string()) throw bad(it.key(), "has a dtype that is not a string: " + info["dtype"].dump());
    Entry e{it.key(), dtype_of(info["dtype"].get<std::string>(), file, it.key()), {}, 0, 0};
    const auto& shape = info["shape"];
    if (!shape.is_array() || !std::all_of(shape.begin(), shape.end(), natural)) {
      throw bad(it.key(), "has a shape that is not a list of non-negative integers: " + shape.dump());
    }
    // Bytes, with overflow checked: a forged shape must not wrap around to a size that matches the offsets.
    std::uint64_t bytes_needed = c10::elementSize(e.type);
    for (const auto& d : shape) {
      const auto n = d.get<std::uint64_t>();
      if (n != 0 && bytes_needed > (std::uint64_t{1} << 62) / n) throw bad(it.key(), "has a shape too large: " + shape.dump());
      bytes_needed *= n;
      e.shape.push_back(static_cast<std::int64_t>(n));
    }
    const auto& offsets = info["data_offsets"];
    if (!offsets.is_array() || offsets.size() != 2 || !natural(offsets[0]) || !natural(offsets[1])) {
      throw bad(it.key(), "has data_offsets that are not two non-negative integers: " + offsets.dump());
    }
    e.begin = offsets[0].get<std::uint64_t>();
    e.end = offsets[1].get<std::uint64_t>();
    if (e.end < e.begin || e.end > data_size || e.end - e.begin != bytes_needed) {
      throw bad(it.key(), "has data offsets that do not match its shape " + shape_string(e.shape) + " or lie outside the file");
    }
    entries.push_back(std::move(e));
  }
  std::sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) {
    return std::tie(a.begin, a.end) < std::tie(b.begin, b.end);
  });
  std::uint64_t covered = 0;
  for (const auto& e : entries) {
    if (e.begin != covered) {
      throw bad(e.name, e.begin < covered ? "overlaps the tensor before it" : "starts after a gap in the data");
    }
    covered = e.end;
  }
  if (covered != data_size) {
    throw InputError(file.string() + ": " + std::to_string(data_size - covered) + " bytes after the last tensor's data");
  }

  TensorMap out;
  for (auto& e : entries) {
    const auto type = e.type;
    const auto& shape = e.shape;
    const auto expected = e.end - e.begin;
    void* ptr = const_cast<std::uint8_t*>(bytes + data_start + e.begin);
    torch::Tensor t;
    if (reinterpret_cast<std::uintptr_t>(ptr) % c10::elementSize(type) != 0) {
      // Misaligned data cannot be viewed in place; copy it into an aligned buffer.
      t = torch::empty(shape, torch::TensorOptions().dtype(type));
      std::memcpy(t.data_ptr(), ptr, expected);
    } else {
      t = torch::from_blob(ptr, shape, [map](void*) {}, torch::TensorOptions().dtype(type));
    }
    out.emplace(e.name, std::move(t));
  }
  return out;
}

TensorMap read_weights(const fs::path& dir) {
  const fs::path single = dir / "model.safetensors";
  const fs::path index = dir / "model.safetensors.index.json";
  if (fs::exists(index)) {
    auto doc = read_json(index);
    if (!doc.contains("weight_map") || !doc["weight_map"].is_object()) {
      throw InputError(index.string() + ": no weight_map object");
    }
    std::set<std::string> shards;
    for (auto it = doc["weight_map"].begin(); it != doc["weight_map"].end(); ++it) {
      if (!it.value().is_string()) {
        throw InputError(index.string() + ": weight_map['" + it.key() + "']: expected a shard's file name, got " + it.value().dump());
      }
      shards.insert(it.value().get<std::string>());
    }
    TensorMap all;
    for (const auto& shard : shards) {
      for (auto& [name, t] : read_safetensors(dir / shard)) all.emplace(name, std::move(t));
    }
    for (auto it = doc["weight_map"].begin(); it != doc["weight_map"].end(); ++it) {
      if (!all.count(it.key())) {
        throw InputError(index.string() + ": '" + it.key() + "' is listed in " + it.value().get<std::string>() +
                         " but not stored there");
      }
    }
    return all;
  }
  if (fs::exists(single)) return read_safetensors(single);
  if (fs::exists(dir / "pytorch_model.bin")) {
    throw InputError(dir.string() + ": only safetensors weights are supported (found pytorch_model.bin)");
  }
  throw InputError(dir.string() + ": no model.safetensors or model.safetensors.index.json");
}

void write_safetensors(const fs::path& file, const TensorMap& tensors, const std::map<std::string, std::string>& metadata) {
  nlohmann::json header = nlohmann::json::object();
  std::vector<torch::Tensor> data;
  std::uint64_t offset = 0;
  for (const auto& [name, tensor] : tensors) {
    auto t = tensor.detach().to(torch::kCPU).contiguous();
    const std::uint64_t n = static_cast<std::uint64_t>(t.numel()) * t.element_size();
    header[name] = {{"dtype", name_of(t.scalar_type())}, {"shape", t.sizes().vec()}, {"data_offsets", {offset, offset + n}}};
    offset += n;
    data.push_back(std::move(t));
  }
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::string text = header.dump();
  while ((text.size() + 8) % 8 != 0) text += ' ';
  write_atomically(file, [&](std::ofstream& out) {
    std::uint64_t len = text.size();
    char le[8];
    for (int i = 0; i < 8; ++i) le[i] = static_cast<char>((len >> (8 * i)) & 0xff);
    out.write(le, 8);
    out.write(text.data(), static_cast<std::streamsize>(text.size()));
    for (const auto& t : data) {
      out.write(static_cast<const char*>(t.data_ptr()), static_cast<std::streamsize>(t.numel() * t.element_size()));
    }
  });
}

TensorMap state_dict(const torch::nn::Module& module, bool trainable_only) {
  TensorMap out;
  for (const auto& p : module.named_parameters(/*recurse=*/true)) {
    if (trainable_only && !p.value().requires_grad()) continue;
    out.emplace(p.key(), p.value());
  }
  if (!trainable_only) {
    for (const auto& b : module.named_buffers(/*recurse=*/true)) out.emplace(b.key(), b.value());
  }
  return out;
}

LoadReport load_state(torch::nn::Module& module, const TensorMap& tensors, const std::string& origin, bool strict,
                      const std::vector<std::string>& ignore_unexpected) {
  LoadReport report;
  TensorMap targets = state_dict(module, false);
  torch::NoGradGuard no_grad;
  for (auto& [name, target] : targets) {
    auto it = tensors.find(name);
    if (it == tensors.end()) {
      report.missing.push_back(name);
      continue;
    }
    if (it->second.sizes() != target.sizes()) {
      report.mismatched.push_back(name + ": file " + shape_string(it->second.sizes()) + " vs model " +
                                  shape_string(target.sizes()));
      continue;
    }
    target.copy_(it->second);
  }
  for (const auto& [name, t] : tensors) {
    if (targets.count(name)) continue;
    bool ignored = false;
    for (const auto& pattern : ignore_unexpected) {
      if (!pattern.empty() && pattern[0] == '*') {
        const auto suffix = std::string_view(pattern).substr(1);
        if (name.size() >= suffix.size() && name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0) ignored = true;
      } else if (name.compare(0, pattern.size(), pattern) == 0) {
        ignored = true;
      }
    }
    if (!ignored) report.unexpected.push_back(name);
  }
  if (strict && (!report.missing.empty() || !report.unexpected.empty() || !report.mismatched.empty())) {
    std::ostringstream os;
    os << origin << ": weights do not fit the model:";
    auto list = [&](const char* what, const std::vector<std::string>& names) {
      if (names.empty()) return;
      os << ' ' << what << " (" << names.size() << "): ";
      for (std::size_t i = 0; i < names.size() && i < 8; ++i) os << (i ? ", " : "") << names[i];
      if (names.size() > 8) os << ", ...";
      os << ';';
    };
    list("missing", report.missing);
    list("unexpected", report.unexpected);
    list("mis-shaped", report.mismatched);
    throw InputError(os.str());
  }
  return report;
}

void load_weights_with_prefix(torch::nn::Module& module, const fs::path& path, const std::vector<std::string>& prefixes) {
  auto tensors = fs::is_directory(path) ? read_weights(path) : read_safetensors(path);
  for (const auto& prefix : prefixes) {
    const bool all = !tensors.empty() && std::all_of(tensors.begin(), tensors.end(), [&](const auto& kv) {
      return kv.first.compare(0, prefix.size(), prefix) == 0;
    });
    if (!all) continue;
    TensorMap stripped;
    for (auto& [k, v] : tensors) stripped.emplace(k.substr(prefix.size()), v);
    tensors = std::move(stripped);
    break;
  }
  load_state(module, tensors, path.string());
}

void save_pretrained(const fs::path& dir, const torch::nn::Module& module, const nlohmann::json& config) {
  fs::create_directories(dir);
  write_safetensors(dir / "model.safetensors", state_dict(module, false), {{"format", "pt"}});
  if (!config.is_null()) write_json(dir / "config.json", config);
}

}  // namespace ablate::sdk
