#include "ablate/sdk/options.hpp"

#include <set>
#include <sstream>

namespace ablate::sdk {

InputError::InputError(const std::string& message) : std::runtime_error(message) {}
InputError::~InputError() = default;
OptionError::OptionError(const std::string& message) : InputError(message) {}
OptionError::~OptionError() = default;

namespace {

const char* type_name(const Json& v) {
  switch (v.type()) {
    case Json::value_t::null: return "nothing";
    case Json::value_t::boolean: return "a boolean";
    case Json::value_t::number_integer:
    case Json::value_t::number_unsigned: return "an integer";
    case Json::value_t::number_float: return "a float";
    case Json::value_t::string: return "a string";
    case Json::value_t::array: return "an array";
    case Json::value_t::object: return "a table";
    default: return "an unsupported value";
  }
}

}  // namespace

std::string pointer_token(std::string_view key) {
  std::string out;
  for (char c : key) {
    if (c == '~') out += "~0";
    else if (c == '/') out += "~1";
    else out += c;
  }
  return out;
}

std::string locate(const SourceMap& where, const std::string& pointer, const std::string& fallback) {
  for (std::string p = pointer;; p = p.substr(0, p.rfind('/'))) {
    auto it = where.find(p);
    if (it != where.end()) return it->second.file + ":" + std::to_string(it->second.line);
    if (p.empty()) break;
  }
  return fallback;
}

// What every view over one document shares: which pointers were read (a key read as a whole counts for its
// subtree) and the resolved tree.
struct Options::Record {
  std::set<std::string> read;
  std::set<std::string> lists;  // arrays whose tables were handed out as views
  Json resolved = Json::object();
};

Options::Options(const Json& table, std::string pointer, std::string display, std::shared_ptr<const SourceMap> where,
                 std::string fallback_file)
    : Options(table, std::move(pointer), std::move(display), std::move(where), std::move(fallback_file),
              std::make_shared<Record>()) {}

Options::Options(const Json& table, std::string pointer, std::string display, std::shared_ptr<const SourceMap> where,
                 std::string fallback_file, std::shared_ptr<Record> record)
    : table_(&table),
      pointer_(std::move(pointer)),
      display_(std::move(display)),
      where_(std::move(where)),
      fallback_file_(std::move(fallback_file)),
      record_(std::move(record)) {
  if (!table_->is_object() && !table_->is_null()) {
    std::ostringstream os;
    os << this->where("") << ": " << display_ << ": expected a table, got " << type_name(*table_);
    throw OptionError(os.str());
  }
}

Options Options::of_file(const Json& table, const std::string& file) {
  return Options(table, "", "", nullptr, file);
}

const Json* Options::find(std::string_view key) const {
  if (!table_->is_object()) return nullptr;
  auto it = table_->find(std::string(key));
  return it == table_->end() ? nullptr : &*it;
}

bool Options::has(std::string_view key) const { return find(key) != nullptr; }

std::string Options::qualified(std::string_view key) const {
  if (display_.empty()) return std::string(key);
  if (key.empty()) return display_;
  return display_ + "." + std::string(key);
}

std::string Options::where(std::string_view key) const {
  const std::string ptr = key.empty() ? pointer_ : pointer_ + "/" + pointer_token(key);
  const std::string fallback = fallback_file_.empty() ? std::string("<options>") : fallback_file_;
  return where_ ? locate(*where_, ptr, fallback) : fallback;
}

void Options::fail(std::string_view key, std::string_view message) const {
  std::ostringstream os;
  os << where(key) << ": " << qualified(key) << ": " << message;
  throw OptionError(os.str());
}

void Options::note(std::string_view key, const Json& value) {
  record_->read.insert(pointer_ + "/" + pointer_token(key));
  Json::json_pointer ptr(pointer_ + "/" + pointer_token(key));
  record_->resolved[ptr] = value;
}

template <class T>
T Options::convert(std::string_view key, const Json& v) const {
  auto bad = [&](const char* want) -> T {
    fail(key, std::string("expected ") + want + ", got " + type_name(v));
  };
  if constexpr (std::is_same_v<T, bool>) {
    if (!v.is_boolean()) return bad("a boolean");
    return v.get<bool>();
  } else if constexpr (std::is_same_v<T, std::int64_t> || std::is_same_v<T, int>) {
    if (!v.is_number_integer()) return bad("an integer");
    return static_cast<T>(v.get<std::int64_t>());
  } else if constexpr (std::is_same_v<T, double>) {
    if (!v.is_number()) return bad("a number");
    return v.get<double>();
  } else if constexpr (std::is_same_v<T, std::string>) {
    if (!v.is_string()) return bad("a string");
    return v.get<std::string>();
  } else if constexpr (std::is_same_v<T, Json>) {
    return v;
  } else {
    using E = typename T::value_type;
    if (!v.is_array()) return bad("an array");
    T out;
    for (const auto& e : v) {
      if constexpr (std::is_same_v<E, std::string>) {
        if (!e.is_string()) return bad("an array of strings");
        out.push_back(e.get<std::string>());
      } else if constexpr (std::is_same_v<E, double>) {
        if (!e.is_number()) return bad("an array of numbers");
        out.push_back(e.get<double>());
      } else {
        if (!e.is_number_integer()) return bad("an array of integers");
        out.push_back(e.get<std::int64_t>());
      }
    }
    return out;
  }
}

template <class T>
T Options::get(std::string_view key, T fallback) {
  if (const Json* v = find(key)) {
    T out = convert<T>(key, *v);
    note(key, Json(out));
    return out;
  }
  note(key, Json(fallback));
  return fallback;
}

template <class T>
T Options::require(std::string_view key) {
  const Json* v = find(key);
  if (!v) fail(key, "missing (required)");
  T out = convert<T>(key, *v);
  note(key, Json(out));
  return out;
}

template <class T>
std::optional<T> Options::maybe(std::string_view key) {
  const Json* v = find(key);
  if (!v) return std::nullopt;
  T out = convert<T>(key, *v);
  note(key, Json(out));
  return out;
}

std::int64_t Options::size(std::string_view key, std::int64_t fallback, std::int64_t min) {
  const auto v = get(key, fallback);
  if (v < min) fail(key, "must be at least " + std::to_string(min) + ", got " + std::to_string(v));
  return v;
}

std::optional<std::int64_t> Options::nullable_size(std::string_view key, std::int64_t min) {
  const Json* v = find(key);
  if (!v || v->is_null()) {
    note(key, Json());
    return std::nullopt;
  }
  return size(key, 0, min);
}

double Options::non_negative(std::string_view key, double fallback) {
  const auto v = get(key, fallback);
  if (!(v >= 0.0)) fail(key, "must be 0 or more, got " + Json(v).dump());
  return v;
}

double Options::probability(std::string_view key, double fallback) {
  const auto p = get(key, fallback);
  if (!(p >= 0.0 && p < 1.0)) fail(key, "must be a probability in [0, 1), got " + Json(p).dump());
  return p;
}

Options Options::table(std::string_view key) {
  static const Json kEmpty = Json::object();
  const Json* v = find(key);
  std::string ptr = pointer_ + "/" + pointer_token(key);
  if (v && !v->is_object()) fail(key, std::string("expected a table, got ") + type_name(*v));
  // The table itself is not marked read: finish() checks its keys one by one.
  Json::json_pointer jp(ptr);
  if (!record_->resolved.contains(jp)) record_->resolved[jp] = Json::object();
  return Options(v ? *v : kEmpty, ptr, qualified(key), where_, fallback_file_, record_);
}

std::vector<Options> Options::list(std::string_view key) {
  std::vector<Options> out;
  const Json* v = find(key);
  if (!v) return out;
  if (!v->is_array()) fail(key, std::string("expected an array of tables, got ") + type_name(*v));
  const std::string ptr = pointer_ + "/" + pointer_token(key);
  record_->lists.insert(ptr);
  Json::json_pointer jp(ptr);
  record_->resolved[jp] = Json::array();
  for (std::size_t i = 0; i < v->size(); ++i) {
    const std::string item = ptr + "/" + std::to_string(i);
    if (!(*v)[i].is_object()) fail(key, "item " + std::to_string(i) + " is not a table");
    record_->resolved[jp].push_back(Json::object());
    out.push_back(Options((*v)[i], item, qualified(key) + "[" + std::to_string(i) + "]", where_, fallback_file_, record_));
  }
  return out;
}

bool Options::is_list(std::string_view key) const {
  const Json* v = find(key);
  return v && v->is_array();
}

const Json& Options::raw(std::string_view key) {
  static const Json kNull;
  const Json* v = find(key);
  if (!v) return kNull;
  note(key, *v);
  return *v;
}

void Options::finish() const {
  if (!table_->is_object()) return;
  // Depth-first over this table: a key is known if it, or an ancestor below this table, was read whole.
  struct Walk {
    const Options& self;
    void operator()(const Json& node, const std::string& ptr, const std::string& display) const {
      for (auto it = node.begin(); it != node.end(); ++it) {
        std::string p = ptr + "/" + pointer_token(it.key());
        if (self.record_->read.count(p)) continue;
        Json::json_pointer jp(p);
        const std::string name = display.empty() ? it.key() : display + "." + it.key();
        bool is_table_view = it->is_object() && self.record_->resolved.contains(jp);
        if (is_table_view) {
          (*this)(*it, p, name);
          continue;
        }
        if (it->is_array() && self.record_->lists.count(p)) {
          for (std::size_t i = 0; i < it->size(); ++i) {
            (*this)((*it)[i], p + "/" + std::to_string(i), name + "[" + std::to_string(i) + "]");
          }
          continue;
        }
        const std::string fallback = self.fallback_file_.empty() ? "<options>" : self.fallback_file_;
        throw OptionError((self.where_ ? locate(*self.where_, p, fallback) : fallback) + ": " + name + ": unknown key");
      }
    }
  };
  Walk{*this}(*table_, pointer_, display_);
}

Json Options::resolved() const {
  Json::json_pointer jp(pointer_);
  if (pointer_.empty()) return record_->resolved;
  return record_->resolved.contains(jp) ? record_->resolved[jp] : Json::object();
}

template bool Options::get<bool>(std::string_view, bool);
template std::int64_t Options::get<std::int64_t>(std::string_view, std::int64_t);
template int Options::get<int>(std::string_view, int);
template double Options::get<double>(std::string_view, double);
template std::string Options::get<std::string>(std::string_view, std::string);
template std::vector<std::string> Options::get<std::vector<std::string>>(std::string_view, std::vector<std::string>);
template std::vector<std::int64_t> Options::get<std::vector<std::int64_t>>(std::string_view, std::vector<std::int64_t>);
template std::vector<double> Options::get<std::vector<double>>(std::string_view, std::vector<double>);
template Json Options::get<Json>(std::string_view, Json);
template bool Options::require<bool>(std::string_view);
template std::int64_t Options::require<std::int64_t>(std::string_view);
template double Options::require<double>(std::string_view);
template std::string Options::require<std::string>(std::string_view);
template std::optional<std::int64_t> Options::maybe<std::int64_t>(std::string_view);
template std::optional<double> Options::maybe<double>(std::string_view);
template std::optional<std::string> Options::maybe<std::string>(std::string_view);
template std::optional<bool> Options::maybe<bool>(std::string_view);

}  // namespace ablate::sdk
