#pragma once
// SHA-256, for cell keys, image content hashes and checkpoint hashes.

#include <array>
#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>

namespace ablate::sdk {

class Sha256 {
 public:
  Sha256();
  Sha256& update(const void* data, std::size_t size);
  Sha256& update(std::string_view s) { return update(s.data(), s.size()); }
  std::array<std::uint8_t, 32> digest();
  std::string hex();

 private:
  void block(const std::uint8_t* p);
  std::array<std::uint32_t, 8> h_;
  std::array<std::uint8_t, 64> buf_;
  std::uint64_t total_ = 0;
  std::size_t used_ = 0;
};

std::string sha256_hex(std::string_view data);
std::string sha256_file(const std::filesystem::path& file);

}  // namespace ablate::sdk
