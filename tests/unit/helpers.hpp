#pragma once
// Shared by the unit tests: temporary folders, the built-in plugins, and a tiny experiment.

#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include "host/plugin_host.hpp"

namespace ablate::test {

/// A fresh folder under the system's temporary directory, removed with everything in it at scope exit.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  const std::filesystem::path& path() const { return path_; }
  std::filesystem::path operator/(const std::string& name) const { return path_ / name; }

 private:
  std::filesystem::path path_;
};

std::filesystem::path write_file(const std::filesystem::path& file, const std::string& text);
std::string read_file(const std::filesystem::path& file);

/// The plugins built with the tree (build/plugins), loaded once.
const PluginHost& builtin_plugins();
/// Folder of the test fixture plugins (build/test-plugins/<name>).
std::filesystem::path fixture_plugin(const std::string& name);

/// Sets one of the SDK's process-wide switches (sdk::set_fused_norm, set_fused_relu) for a scope, then puts
/// back what it was.
class ScopedSwitch {
 public:
  ScopedSwitch(bool (*get)(), void (*set)(bool), bool on) : set_(set), was_(get()) { set_(on); }
  ~ScopedSwitch() { set_(was_); }
  ScopedSwitch(const ScopedSwitch&) = delete;
  ScopedSwitch& operator=(const ScopedSwitch&) = delete;

 private:
  void (*set_)(bool);
  bool was_;
};

/// A complete experiment on tiny models built from scratch: `steps` steps, evaluated and checkpointed
/// every `every` steps. `extra` is appended (a [grid] table, say).
std::string tiny_experiment(const std::string& name, int steps = 8, int every = 4, const std::string& extra = "");

}  // namespace ablate::test
