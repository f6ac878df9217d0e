#pragma once
// The plugin host: finds plugin libraries, checks each one's ABI record before calling anything in it,
// registers its factories, and builds objects that keep their library loaded for as long as they live.
// Exceptions from plugin code are rethrown naming the plugin and the stage.

#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <ostream>
#include <string>
#include <vector>

#include "ablate/sdk/plugin.hpp"
#include "ablate/sdk/registry.hpp"

namespace ablate {

/// A plugin failed at some stage (construct, forward...). Not the user's input: exit status 1.
class PluginError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// The one-line reason a plugin exception gives (c10 errors without their C++ backtrace).
std::string describe_exception(const std::exception& e);

/// Runs `fn`, rethrowing what it throws as "kind/id: stage: message": sdk::InputError stays an InputError
/// (bad input, exit 2), anything else becomes a PluginError.
template <class F>
auto guarded(const std::string& plugin, const char* stage, F&& fn) -> decltype(fn()) {
  try {
    return fn();
  } catch (const sdk::InputError& e) {
    throw sdk::InputError(plugin + ": " + stage + ": " + e.what());
  } catch (const std::exception& e) {
    throw PluginError(plugin + ": " + stage + ": " + describe_exception(e));
  }
}

struct PluginInfo {
  sdk::Kind kind;
  std::string id;
  int version = 1;
  std::string summary;
  std::filesystem::path file;
  std::string qualified() const { return std::string(sdk::kind_name(kind)) + "/" + id; }
};

/// Compares a plugin's ABI record with the host's; returns "" when they match, else which field differs.
std::string abi_mismatch(const sdk::AbiRecord& plugin);

class PluginHost {
 public:
  PluginHost();
  ~PluginHost();

  /// The folders searched, in order: each --plugins folder, then ABLATE_PLUGIN_PATH (colon-separated), then
  /// the build tree's plugins/ and the install tree's lib/ablate/plugins next to the executable.
  static std::vector<std::filesystem::path> search_path(const std::filesystem::path& executable,
                                                        const std::vector<std::string>& extra);

  /// Loads every *.so in `dirs`. A file that is not a usable plugin is reported on `log` and skipped; an id
  /// already registered for its kind keeps its first library.
  void discover(const std::vector<std::filesystem::path>& dirs, std::ostream& log);
  /// Loads one library; false (with the reason on `log`) if it is skipped.
  bool load(const std::filesystem::path& file, std::ostream& log);

  std::vector<PluginInfo> list() const;
  const PluginInfo* find(sdk::Kind kind, const std::string& id) const;
  /// The factory's version; throws sdk::OptionError-style InputError listing the known ids if absent.
  const PluginInfo& require(sdk::Kind kind, const std::string& id, const std::string& where) const;

  /// Runs the factory's option parser (no side effects).
  void parse(sdk::Kind kind, const std::string& id, sdk::Options& options) const;

  std::shared_ptr<sdk::Encoder> create_encoder(const std::string& id, sdk::Options& o, const sdk::BuildContext& c) const;
  std::shared_ptr<sdk::Projector> create_projector(const std::string& id, sdk::Options& o, const sdk::BuildContext& c) const;
  std::shared_ptr<sdk::Backbone> create_backbone(const std::string& id, sdk::Options& o, const sdk::BuildContext& c) const;
  std::shared_ptr<sdk::Strategy> create_strategy(const std::string& id, sdk::Options& o, const sdk::BuildContext& c) const;
  std::shared_ptr<sdk::Dataset> create_dataset(const std::string& id, sdk::Options& o, const sdk::BuildContext& c) const;
  std::shared_ptr<sdk::Metric> create_metric(const std::string& id, sdk::Options& o, const sdk::BuildContext& c) const;

 private:
  struct Library;
  struct State;
  template <class T>
  std::shared_ptr<T> create(sdk::Kind kind, const std::string& id, sdk::Options& o, const sdk::BuildContext& c) const;
  std::unique_ptr<State> s_;
};

}  // namespace ablate
