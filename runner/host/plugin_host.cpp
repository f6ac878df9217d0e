#include "host/plugin_host.hpp"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <sstream>

#include <boost/dll/shared_library.hpp>
#include <c10/util/Exception.h>

#include "ablate/sdk/weights.hpp"

namespace ablate {

namespace fs = std::filesystem;

std::string describe_exception(const std::exception& e) {
  // A size in a config or in the data that this machine cannot hold: say so, not where in torch it showed.
  const std::string hint = " (a size in the model's config or in the data too large for this machine?)";
  if (dynamic_cast<const std::bad_alloc*>(&e)) return "out of memory" + hint;
  if (const auto* c10 = dynamic_cast<const c10::Error*>(&e)) {
    const std::string message = c10->what_without_backtrace();
    const std::string tried = "can't allocate memory: you tried to allocate ";
    if (const auto at = message.find(tried); at != std::string::npos) {
      std::ostringstream os;
      os.precision(1);
      os << "out of memory: tried to allocate " << std::fixed << std::strtod(message.c_str() + at + tried.size(), nullptr) / (1 << 30)
         << " GiB" << hint;
      return os.str();
    }
    return message;
  }
  return sdk::json_error_text(e);
}

namespace {

const sdk::AbiRecord kHostAbi = ABLATE_ABI_RECORD_VALUE;

// Reads at most n characters: a record from another SDK may not be terminated where ours is.
std::string bounded(const char* s, std::size_t n) { return std::string(s, strnlen(s, n)); }

}  // namespace

std::string abi_mismatch(const sdk::AbiRecord& p) {
  if (p.magic != kHostAbi.magic) return "magic (not an ablate ABI record)";
  auto differ = [](const char* field, const std::string& plugin, const std::string& host) {
    return std::string(field) + ": plugin " + plugin + ", runner " + host;
  };
  if (p.sdk_abi != kHostAbi.sdk_abi) return differ("sdk_abi", std::to_string(p.sdk_abi), std::to_string(kHostAbi.sdk_abi));
  const auto torch_p = bounded(p.torch_version, sizeof p.torch_version);
  const auto torch_h = bounded(kHostAbi.torch_version, sizeof kHostAbi.torch_version);
  if (torch_p != torch_h) return differ("torch_version", torch_p, torch_h);
  const auto cc_p = bounded(p.compiler, sizeof p.compiler), cc_h = bounded(kHostAbi.compiler, sizeof kHostAbi.compiler);
  if (cc_p != cc_h) return differ("compiler", "'" + cc_p + "'", "'" + cc_h + "'");
  if (p.cxx11_abi != kHostAbi.cxx11_abi) {
    return differ("cxx11_abi", std::to_string(p.cxx11_abi), std::to_string(kHostAbi.cxx11_abi));
  }
  return {};
}

struct PluginHost::Library {
  boost::dll::shared_library lib;
  fs::path file;
};

struct PluginHost::State {
  template <class T>
  struct Entry {
    sdk::Factory<T> factory;
    PluginInfo info;
    std::shared_ptr<Library> library;
  };
  std::map<std::string, Entry<sdk::Encoder>> encoders;
  std::map<std::string, Entry<sdk::Projector>> projectors;
  std::map<std::string, Entry<sdk::Backbone>> backbones;
  std::map<std::string, Entry<sdk::Strategy>> strategies;
  std::map<std::string, Entry<sdk::Dataset>> datasets;
  std::map<std::string, Entry<sdk::Metric>> metrics;

  template <class F>
  void each_table(F&& f) {
    f(encoders);
    f(projectors);
    f(backbones);
    f(strategies);
    f(datasets);
    f(metrics);
  }
  template <class F>
  void each_table(F&& f) const {
    const_cast<State*>(this)->each_table(std::forward<F>(f));
  }
};

namespace {

// Collects what one library registers, so that a register function that throws halfway leaves nothing.
class StagingRegistry : public sdk::Registry {
 public:
  template <class T>
  struct Item {
    sdk::Kind kind;
    sdk::Factory<T> factory;
  };
  std::vector<Item<sdk::Encoder>> encoders;
  std::vector<Item<sdk::Projector>> projectors;
  std::vector<Item<sdk::Backbone>> backbones;
  std::vector<Item<sdk::Strategy>> strategies;
  std::vector<Item<sdk::Dataset>> datasets;
  std::vector<Item<sdk::Metric>> metrics;
  void add_encoder(sdk::Factory<sdk::Encoder> f) override { encoders.push_back({sdk::Kind::encoder, std::move(f)}); }
  void add_projector(sdk::Factory<sdk::Projector> f) override { projectors.push_back({sdk::Kind::projector, std::move(f)}); }
  void add_backbone(sdk::Factory<sdk::Backbone> f) override { backbones.push_back({sdk::Kind::backbone, std::move(f)}); }
  void add_strategy(sdk::Factory<sdk::Strategy> f) override { strategies.push_back({sdk::Kind::strategy, std::move(f)}); }
  void add_dataset(sdk::Factory<sdk::Dataset> f) override { datasets.push_back({sdk::Kind::dataset, std::move(f)}); }
  void add_metric(sdk::Factory<sdk::Metric> f) override { metrics.push_back({sdk::Kind::metric, std::move(f)}); }
};

}  // namespace

PluginHost::PluginHost() : s_(std::make_unique<State>()) {}

// Factories hold std::function objects whose code lives in the libraries: clear them before the libraries.
PluginHost::~PluginHost() {
  s_->each_table([](auto& table) {
    for (auto& [id, entry] : table) entry.factory = {};
  });
}

std::vector<fs::path> PluginHost::search_path(const fs::path& executable, const std::vector<std::string>& extra) {
  std::vector<fs::path> dirs;
  for (const auto& e : extra) dirs.emplace_back(e);
  if (const char* env = std::getenv("ABLATE_PLUGIN_PATH")) {
    std::stringstream ss(env);
    for (std::string part; std::getline(ss, part, ':');) {
      if (!part.empty()) dirs.emplace_back(part);
    }
  }
  const fs::path bin = executable.parent_path();
  dirs.push_back(bin.parent_path() / "plugins");                   // build tree
  dirs.push_back(bin.parent_path() / "lib" / "ablate" / "plugins");  // install tree
  return dirs;
}

void PluginHost::discover(const std::vector<fs::path>& dirs, std::ostream& log) {
  for (const auto& dir : dirs) {
    std::error_code ec;
    if (!fs::is_directory(dir, ec)) continue;
    std::vector<fs::path> files;
    for (const auto& entry : fs::directory_iterator(dir, ec)) {
      if (entry.is_regular_file() && entry.path().extension() == ".so") files.push_back(entry.path());
    }
    std::sort(files.begin(), files.end());
    for (const auto& f : files) load(f, log);
  }
}

bool PluginHost::load(const fs::path& file, std::ostream& log) {
  auto library = std::make_shared<Library>();
  library->file = file;
  try {
    library->lib.load(file, boost::dll::load_mode::rtld_now | boost::dll::load_mode::rtld_local);
  } catch (const std::exception& e) {
    log << "plugins: skipping " << file.string() << ": cannot load (" << e.what() << ")\n";
    return false;
  }
  if (!library->lib.has("ablate_plugin_abi") || !library->lib.has("ablate_plugin_register")) {
    log << "plugins: skipping " << file.string() << ": not an ablate plugin (no ablate_plugin_abi / "
        << "ablate_plugin_register entry point)\n";
    return false;
  }
  // The record is plain data: read and compared before any function of the library runs.
  const auto& record = library->lib.get_alias<const sdk::AbiRecord>("ablate_plugin_abi");
  if (auto why = abi_mismatch(record); !why.empty()) {
    log << "plugins: skipping " << file.string() << ": ABI mismatch in " << why << "\n";
    return false;
  }
  StagingRegistry staged;
  try {
    auto& reg = library->lib.get_alias<sdk::RegisterFunction>("ablate_plugin_register");
    reg(staged);
  } catch (const std::exception& e) {
    log << "plugins: skipping " << file.string() << ": its register function threw: " << describe_exception(e) << "\n";
    return false;
  } catch (...) {
    log << "plugins: skipping " << file.string() << ": its register function threw a non-standard exception\n";
    return false;
  }
  std::size_t added = 0;
  auto commit = [&](auto& items, auto& table) {
    for (auto& item : items) {
      PluginInfo info{item.kind, item.factory.id, item.factory.version, item.factory.summary, file};
      auto it = table.find(item.factory.id);
      if (it != table.end()) {
        log << "plugins: " << info.qualified() << " from " << file.string() << " ignored: already registered by "
            << it->second.info.file.string() << "\n";
        continue;
      }
      const std::string id = item.factory.id;  // the factory is moved from below
      table.emplace(id, typename std::remove_reference_t<decltype(table)>::mapped_type{std::move(item.factory), info, library});
      ++added;
    }
  };
  commit(staged.encoders, s_->encoders);
  commit(staged.projectors, s_->projectors);
  commit(staged.backbones, s_->backbones);
  commit(staged.strategies, s_->strategies);
  commit(staged.datasets, s_->datasets);
  commit(staged.metrics, s_->metrics);
  return added > 0;
}

std::vector<PluginInfo> PluginHost::list() const {
  std::vector<PluginInfo> out;
  s_->each_table([&](auto& table) {
    for (const auto& [id, entry] : table) out.push_back(entry.info);
  });
  return out;
}

const PluginInfo* PluginHost::find(sdk::Kind kind, const std::string& id) const {
  const PluginInfo* found = nullptr;
  s_->each_table([&](auto& table) {
    auto it = table.find(id);
    if (it != table.end() && it->second.info.kind == kind) found = &it->second.info;
  });
  return found;
}

const PluginInfo& PluginHost::require(sdk::Kind kind, const std::string& id, const std::string& where) const {
  if (const auto* info = find(kind, id)) return *info;
  std::string known;
  for (const auto& info : list()) {
    if (info.kind == kind) known += (known.empty() ? "" : ", ") + info.id;
  }
  throw sdk::OptionError(where + ": no " + sdk::kind_name(kind) + " plugin '" + id + "' (found: " +
                         (known.empty() ? "none; see `runner plugins`" : known) + ")");
}

void PluginHost::parse(sdk::Kind kind, const std::string& id, sdk::Options& options) const {
  bool done = false;
  s_->each_table([&](auto& table) {
    auto it = table.find(id);
    if (done || it == table.end() || it->second.info.kind != kind) return;
    done = true;
    guarded(it->second.info.qualified(), "options", [&] { it->second.factory.parse(options); });
  });
  if (!done) throw sdk::InputError(std::string("no ") + sdk::kind_name(kind) + " plugin '" + id + "'");
}

template <class T>
std::shared_ptr<T> PluginHost::create(sdk::Kind kind, const std::string& id, sdk::Options& o,
                                      const sdk::BuildContext& c) const {
  std::shared_ptr<T> made;
  bool found = false;
  s_->each_table([&](auto& table) {
    using Entry = typename std::remove_reference_t<decltype(table)>::mapped_type;
    if constexpr (std::is_same_v<Entry, State::Entry<T>>) {
      auto it = table.find(id);
      if (it == table.end()) return;
      found = true;
      auto raw = guarded(it->second.info.qualified(), "construct", [&] { return it->second.factory.create(o, c); });
      // The object's code lives in the library: the deleter destroys the object first, then lets go of the
      // library, so no object outlives its code.
      auto library = it->second.library;
      T* ptr = raw.get();
      made = std::shared_ptr<T>(ptr, [raw = std::move(raw), library](T*) mutable {
        raw.reset();
        library.reset();
      });
    }
  });
  if (!found) throw sdk::InputError(std::string("no ") + sdk::kind_name(kind) + " plugin '" + id + "'");
  return made;
}

std::shared_ptr<sdk::Encoder> PluginHost::create_encoder(const std::string& id, sdk::Options& o, const sdk::BuildContext& c) const {
  return create<sdk::Encoder>(sdk::Kind::encoder, id, o, c);
}
std::shared_ptr<sdk::Projector> PluginHost::create_projector(const std::string& id, sdk::Options& o,
                                                             const sdk::BuildContext& c) const {
  return create<sdk::Projector>(sdk::Kind::projector, id, o, c);
}
std::shared_ptr<sdk::Backbone> PluginHost::create_backbone(const std::string& id, sdk::Options& o, const sdk::BuildContext& c) const {
  return create<sdk::Backbone>(sdk::Kind::backbone, id, o, c);
}
std::shared_ptr<sdk::Strategy> PluginHost::create_strategy(const std::string& id, sdk::Options& o, const sdk::BuildContext& c) const {
  return create<sdk::Strategy>(sdk::Kind::strategy, id, o, c);
}
std::shared_ptr<sdk::Dataset> PluginHost::create_dataset(const std::string& id, sdk::Options& o, const sdk::BuildContext& c) const {
  return create<sdk::Dataset>(sdk::Kind::dataset, id, o, c);
}
std::shared_ptr<sdk::Metric> PluginHost::create_metric(const std::string& id, sdk::Options& o, const sdk::BuildContext& c) const {
  return create<sdk::Metric>(sdk::Kind::metric, id, o, c);
}

}  // namespace ablate
