#pragma once
// The one entry point of a plugin library. Write, once per library:
//
//   void register_plugin(ablate::sdk::Registry& registry) { registry.add<MyBackbone>("mine", 1, "..."); }
//   ABLATE_PLUGIN(register_plugin)
//
// It exports two symbols through BOOST_DLL_ALIAS: the ABI record, plain data that the host reads and
// compares before it calls anything in the library, and the register function.

#include <cstdint>

#include <boost/dll/alias.hpp>
#include <torch/version.h>

#include "ablate/sdk/registry.hpp"

// nlohmann::json's layout depends on JSON_DIAGNOSTICS, and Json values cross the plugin boundary. The SDK's
// CMake target sets it for everything that links it; a plugin built some other way must set it too.
#if !defined(JSON_DIAGNOSTICS) || !JSON_DIAGNOSTICS
#error "ablate's SDK is built with JSON_DIAGNOSTICS=1: link the ablate_sdk CMake target (ablate_add_plugin does), or define it"
#endif

namespace ablate::sdk {

inline constexpr std::uint32_t kAbiMagic = 0x41424c54;  // "ABLT"
/// Bumped whenever an SDK interface or struct changes layout.
inline constexpr std::uint32_t kSdkAbiVersion = 7;  // 6: nlohmann::json with JSON_DIAGNOSTICS; 7: TrainTarget's model types

/// What must match exactly between host and plugin: the SDK is a C++ interface (vtables, std::string,
/// std::function and libtorch types cross the boundary), so the same SDK ABI, libtorch, compiler and
/// libstdc++ string ABI are required.
struct AbiRecord {
  std::uint32_t magic;
  std::uint32_t sdk_abi;
  char torch_version[32];
  char compiler[128];
  std::int32_t cxx11_abi;
};

using RegisterFunction = void(Registry&);

}  // namespace ablate::sdk

#define ABLATE_DETAIL_COMPILER "gcc " __VERSION__

/// Fills the record with this translation unit's compile-time values (constant-initialised data).
#define ABLATE_ABI_RECORD_VALUE                                                                          \
  {                                                                                                      \
    ::ablate::sdk::kAbiMagic, ::ablate::sdk::kSdkAbiVersion, TORCH_VERSION, ABLATE_DETAIL_COMPILER,      \
        _GLIBCXX_USE_CXX11_ABI                                                                           \
  }

#define ABLATE_PLUGIN(register_function)                                                             \
  extern "C" const ::ablate::sdk::AbiRecord ablate_plugin_abi_record = ABLATE_ABI_RECORD_VALUE;      \
  BOOST_DLL_ALIAS(ablate_plugin_abi_record, ablate_plugin_abi)                                       \
  BOOST_DLL_ALIAS(register_function, ablate_plugin_register)
