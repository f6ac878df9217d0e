#include "model/feature_cache.hpp"

#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <fstream>

#include <torch/torch.h>

#include "ablate/sdk/error.hpp"
#include "ablate/sdk/hash.hpp"
#include "ablate/sdk/random.hpp"
#include "data/batches.hpp"

#ifdef ABLATE_WITH_CUDA_PROPERTIES
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDACachingAllocator.h>
#endif

namespace ablate {

namespace fs = std::filesystem;

namespace {

std::string mib(double bytes) {
  char b[32];
  std::snprintf(b, sizeof b, "%.1f MiB", bytes / (1024.0 * 1024.0));
  return b;
}

// Why the encoder's features cannot be cached, or empty. `chunk`: the first chunk's pixels, `a` their features.
std::string check_deterministic(const torch::Tensor& chunk, const torch::Tensor& a,
                                const std::function<torch::Tensor(const torch::Tensor&)>& encode) {
  if (!torch::equal(a, encode(chunk))) return "the encoder is not deterministic: its output differs between two passes over the same images (dropout?)";
  if (chunk.size(0) > 1) {
    // Alone and within a batch an image's features differ by rounding only, unless the encoder uses
    // batch statistics; rounding moves them by about 1e-3 of their size in bf16.
    const auto alone = encode(chunk.slice(0, 0, 1)).to(torch::kFloat32);
    const auto batched = a.slice(0, 0, 1).to(torch::kFloat32);
    const double diff = (alone - batched).abs().mean().item<double>();
    const double size = batched.abs().mean().item<double>();
    if (diff > 1e-2 * size + 1e-6) return "the encoder's features of an image depend on the other images of its batch";
  }
  return {};
}

// The file's `shape` tensor mapped into memory, its name removed at once: the mapping outlives the name, and
// nothing is left on disk however the process ends.
torch::Tensor map_and_unlink(const fs::path& file, const std::vector<std::int64_t>& shape, const torch::TensorOptions& options) {
  std::int64_t numel = 1;
  for (auto s : shape) numel *= s;
  auto mapped = at::from_file(file.string(), /*shared=*/false, numel, options.device(torch::kCPU)).view(shape);
  std::error_code ec;
  fs::remove(file, ec);
  return mapped;
}

}  // namespace

std::string FeatureTable::describe() const {
  const auto bytes = static_cast<double>(features.nbytes());
  return std::to_string(features.size(0)) + " images x " + std::to_string(features.size(1)) + " x " +
         std::to_string(features.size(2)) + " " + std::string(c10::toString(features.scalar_type())) + ", " + mib(bytes) +
         (file.empty() ? " on " + features.device().str() : " on disk");
}

torch::Tensor FeatureTable::rows(const torch::Tensor& index, const torch::Device& device) const {
  if (features.is_cuda()) return features.index_select(0, to_device_async(index, features.device())).to(device);
  return to_device_async(features.index_select(0, index), device);
}

torch::Tensor FeatureTable::slice(std::int64_t first, std::int64_t n, const torch::Device& device) const {
  auto part = features.slice(0, first, first + n);
  if (part.device() == device) return part;
  return to_device_async(part.contiguous(), device);
}

FeatureCache::FeatureCache(FeatureCacheMode mode, std::int64_t budget_bytes, fs::path spill_dir)
    : mode_(mode), budget_(budget_bytes), spill_dir_(std::move(spill_dir)) {}

FeatureCache::~FeatureCache() {
  std::error_code ec;
  tables_.clear();  // unmaps the files before they go
  if (!spill_dir_.empty()) fs::remove_all(spill_dir_, ec);
}

std::int64_t FeatureCache::default_budget(const torch::Device& device) {
#ifdef ABLATE_WITH_CUDA_PROPERTIES
  if (device.is_cuda()) {
    const auto index = device.has_index() ? device.index() : at::cuda::current_device();
    return static_cast<std::int64_t>(at::cuda::getDeviceProperties(index)->totalGlobalMem / 4);
  }
#else
  if (device.is_cuda()) return std::int64_t{4} << 30;  // built without CUDA headers: a fixed 4 GiB
#endif
  return static_cast<std::int64_t>(::sysconf(_SC_PHYS_PAGES)) * static_cast<std::int64_t>(::sysconf(_SC_PAGESIZE)) / 4;
}

bool FeatureCache::fits_in_memory(std::int64_t bytes, const torch::Device& device) const {
  std::lock_guard<std::mutex> lock(mu_);
  if (used_ + bytes > budget_) return false;
#ifdef ABLATE_WITH_CUDA_PROPERTIES
  if (device.is_cuda()) {
    // What the model, optimizer and activations will need is not known yet: leave at least half of what this
    // process has not reserved. (From libtorch's allocator rather than cudaMemGetInfo, so that the runner calls
    // no CUDA runtime function of its own and loads no libcudart beside the wheel's.)
    const auto index = device.has_index() ? device.index() : c10::DeviceIndex{0};
    const auto total = static_cast<std::int64_t>(at::cuda::getDeviceProperties(index)->totalGlobalMem);
    const auto reserved = c10::cuda::CUDACachingAllocator::getDeviceStats(index).reserved_bytes[0].current;
    return bytes <= (total - reserved) / 2;
  }
#else
  (void)device;
#endif
  return true;
}

bool FeatureCache::disk_has_room(std::int64_t bytes) const {
  std::error_code ec;
  fs::create_directories(spill_dir_, ec);
  const auto space = fs::space(spill_dir_, ec);
  return !ec && space.available >= static_cast<std::uintmax_t>(2 * bytes);
}

fs::path FeatureCache::spill_file(const std::string& key) const { return spill_dir_ / (sdk::sha256_hex(key).substr(0, 16) + ".bin"); }

int FeatureCache::make_room(const std::set<std::string>& keys) {
  std::lock_guard<std::mutex> lock(mu_);
  int moved = 0;
  for (auto it = tables_.begin(); it != tables_.end();) {
    const auto& table = *it->second;
    if (keys.count(it->first) || !table.file.empty()) {
      ++it;
      continue;
    }
    const auto bytes = static_cast<std::int64_t>(table.features.nbytes());
    used_ -= bytes;
    if (!disk_has_room(bytes)) {
      it = tables_.erase(it);
      continue;
    }
    auto spilled = std::make_shared<FeatureTable>();
    spilled->file = spill_file(it->first);
    spilled->seconds = table.seconds;
    const auto host = table.features.to(torch::kCPU).contiguous();
    {
      std::ofstream out(spilled->file, std::ios::binary | std::ios::trunc);
      out.write(static_cast<const char*>(host.data_ptr()), static_cast<std::streamsize>(host.nbytes()));
      if (!out) throw std::runtime_error(spilled->file.string() + ": cannot write the feature cache (disk full?)");
    }
    spilled->features = map_and_unlink(spilled->file, host.sizes().vec(), host.options());
    it->second = spilled;  // the memory goes once the last cell holding the old table has let it go
    ++moved;
    ++it;
  }
  return moved;
}

std::shared_ptr<const FeatureTable> FeatureCache::find(const std::string& key, const torch::Device& device) {
  std::shared_ptr<const FeatureTable> found;
  {
    std::lock_guard<std::mutex> lock(mu_);
    const auto it = tables_.find(key);
    if (it == tables_.end()) return nullptr;
    found = it->second;
  }
  const auto bytes = static_cast<std::int64_t>(found->features.nbytes());
  if (found->file.empty() || !fits_in_memory(bytes, device)) return found;
  auto back = std::make_shared<FeatureTable>();  // moved to disk for an earlier cell: back into memory
  back->features = found->features.to(device);
  back->seconds = found->seconds;
  std::lock_guard<std::mutex> lock(mu_);
  used_ += bytes;
  tables_[key] = back;
  return back;
}

std::shared_ptr<const FeatureTable> FeatureCache::build(const std::string& key, std::int64_t count, int workers,
                                                        const torch::Device& device,
                                                        const std::function<torch::Tensor(std::int64_t, std::int64_t)>& load,
                                                        const std::function<torch::Tensor(const torch::Tensor&)>& encode,
                                                        std::string& refused) {
  if (auto found = find(key, device)) return found;
  if (count <= 0) return nullptr;
  const auto t0 = std::chrono::steady_clock::now();
  // The caller's random generators are put back when this returns: building a table must not shift the draws
  // of the run that asked for it (an encoder with dropout draws before the check refuses it).
  sdk::RngRestore generators(device);
  torch::NoGradGuard no_grad;
  const auto chunks = (count + kChunk - 1) / kChunk;
  Prefetcher<torch::Tensor> pixels(0, chunks, std::max(1, workers), 4,
                                   [&](std::int64_t c) { return load(c * kChunk, std::min(kChunk, count - c * kChunk)); });
  auto table = std::make_shared<FeatureTable>();
  std::ofstream file;
  std::vector<std::int64_t> shape;  // [count, T, D]
  std::int64_t bytes = 0;
  for (std::int64_t c = 0; c < chunks; ++c) {
    const auto chunk = pixels.next().to(device);
    const auto features = encode(chunk);
    if (c == 0) {
      refused = check_deterministic(chunk, features, encode);
      if (!refused.empty()) return nullptr;
      // The first chunk tells the table's shape and type, and so whether it fits: on the device within the
      // budget and half of what the device has free, else on disk where the disk has twice its size free,
      // else nowhere.
      shape.assign(features.sizes().begin(), features.sizes().end());
      shape[0] = count;
      bytes = count * static_cast<std::int64_t>(features[0].nbytes());
      if (fits_in_memory(bytes, device)) {
        table->features = torch::empty(shape, features.options());
      } else {
        if (!disk_has_room(bytes)) {
          refused = "its features (" + mib(static_cast<double>(bytes)) + ") fit neither the memory budget (--feature-cache-gib) nor the free disk space of " +
                    spill_dir_.string();
          return nullptr;
        }
        table->file = spill_file(key);
        file.open(table->file, std::ios::binary | std::ios::trunc);
        if (!file) throw std::runtime_error(table->file.string() + ": cannot write the feature cache");
      }
    }
    if (table->file.empty()) {
      table->features.slice(0, c * kChunk, c * kChunk + features.size(0)).copy_(features);
    } else {
      const auto host = features.to(torch::kCPU).contiguous();
      file.write(static_cast<const char*>(host.data_ptr()), static_cast<std::streamsize>(host.nbytes()));
      if (!file) throw std::runtime_error(table->file.string() + ": cannot write the feature cache (disk full?)");
      if (c + 1 == chunks) {
        file.close();
        table->features = map_and_unlink(table->file, shape, features.options());
      }
    }
  }
  table->seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::lock_guard<std::mutex> lock(mu_);
  if (table->file.empty()) used_ += bytes;  // counted once the table is complete
  tables_[key] = table;
  return table;
}

std::string module_fingerprint(torch::nn::Module& module) {
  sdk::Sha256 h;
  auto add = [&](const std::string& name, const torch::Tensor& t) {
    const auto host = t.detach().to(torch::kCPU).contiguous();
    h.update(name).update(std::string(c10::toString(host.scalar_type())));
    for (auto s : host.sizes()) h.update(&s, sizeof s);
    h.update(host.data_ptr(), host.nbytes());
  };
  for (const auto& p : module.named_parameters(/*recurse=*/true)) add("p:" + p.key(), p.value());
  for (const auto& b : module.named_buffers(/*recurse=*/true)) add("b:" + b.key(), b.value());
  return h.hex();
}

}  // namespace ablate
