#pragma once
// Errors that cross the SDK boundary. Plugins throw them (or any std::exception); the host catches at the
// call site, adds the plugin id and stage, and turns them into exit codes in main().

#include <stdexcept>
#include <string>

namespace ablate::sdk {

/// Bad input from a user: a TOML key, a JSON or safetensors file, an image. The message names the file and
/// what is wrong, on one line. The runner exits with status 2 on it and leaves the database untouched.
class InputError : public std::runtime_error {
 public:
  explicit InputError(const std::string& message);
  ~InputError() override;
};

/// An option in an experiment that is unknown, missing or of the wrong type or range.
/// Its message reads "FILE:LINE: KEY: problem".
class OptionError : public InputError {
 public:
  explicit OptionError(const std::string& message);
  ~OptionError() override;
};

}  // namespace ablate::sdk
