#pragma once
// The frozen-encoder feature cache. When a cell trains nothing in the image encoder and preprocessing is
// deterministic (it is: resize, crop, normalise), the encoder's output for an image is the same at every
// step, so each image of a dataset is encoded once and its features are reused across epochs, by every
// evaluation, and by every later cell of the process that has the same encoder weights, precision, device
// and dataset.
//
// Features are computed in a fixed order and in fixed chunks of kChunk images, whatever the cell's batch
// size or the order of the grid's cells: a cell's result is then the same whether it ran first, after
// another cell, alone, or resumed after a kill. (Computed per training batch, the first batch an image
// appears in would decide its rounding.)
//
// Each dataset's table lives on the device when it fits the memory budget (and half of the device's free
// memory), else in a file under the results folder, mapped into memory and unlinked at once (nothing stays on
// disk), else, when the disk lacks the room too, nowhere: the run encodes every step. A cell that does not use a
// table moves it to disk, so that its memory goes to that cell and a later cell of the grid with the same
// encoder still finds it (brought back into memory when it fits again).

#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>

#include <torch/nn/module.h>
#include <torch/types.h>

namespace ablate {

enum class FeatureCacheMode {
  automatic,  ///< cache where it saves work: every evaluation set; a training set the run passes over once at least
  on,         ///< cache every frozen encoder's datasets
  off,
};

/// One dataset's encoder outputs: row i holds sample i's features.
struct FeatureTable {
  torch::Tensor features;  ///< [N, T, D] on the device, or a CPU tensor mapped from a file
  std::filesystem::path file;  ///< the file, when on disk
  double seconds = 0;      ///< to compute it
  std::string describe() const;  ///< "32 images x 17 x 64 float, 0.1 MiB on cpu"
  /// Rows `index` ([B] int64 on the CPU) on `device`.
  torch::Tensor rows(const torch::Tensor& index, const torch::Device& device) const;
  /// Rows [first, first + n) on `device`.
  torch::Tensor slice(std::int64_t first, std::int64_t n, const torch::Device& device) const;
};

class FeatureCache {
 public:
  static constexpr std::int64_t kChunk = 32;  ///< images encoded together while building a table

  /// `budget_bytes`: device (or, on the CPU, main) memory the tables may take; beyond it they go to disk
  /// under `spill_dir`.
  FeatureCache(FeatureCacheMode mode, std::int64_t budget_bytes, std::filesystem::path spill_dir);
  ~FeatureCache();
  FeatureCache(const FeatureCache&) = delete;
  FeatureCache& operator=(const FeatureCache&) = delete;

  /// A quarter of the device's memory (of the machine's memory for the CPU).
  static std::int64_t default_budget(const torch::Device& device);

  FeatureCacheMode mode() const { return mode_; }
  /// The table built under `key`, or null. One that was moved to disk comes back into memory on `device` when
  /// it fits there again.
  std::shared_ptr<const FeatureTable> find(const std::string& key, const torch::Device& device);
  /// Moves every table but those under `keys` out of memory, to disk (a cell calls it with the keys it uses,
  /// none when it uses none): the memory goes to this cell, and a later cell still finds them. A table the disk
  /// has no room for is let go (a cell needing it encodes again, to the same values: tables are built in a
  /// fixed order). Returns how many tables were moved.
  int make_room(const std::set<std::string>& keys);

  /// Builds the table of `count` images under `key`: load(first, n) gives the prepared pixels of images
  /// [first, first + n) ([n, 3, H, W], called on `workers` threads), encode(pixels) their features. Before
  /// it, checks on the first chunk that the encoder is deterministic and computes each image independently
  /// of the others in its batch (no dropout, no batch statistics); returns null, with the reason in
  /// `refused`, when it is not (or when the table fits neither memory nor disk). The caller's random
  /// generators are left as they were.
  std::shared_ptr<const FeatureTable> build(const std::string& key, std::int64_t count, int workers, const torch::Device& device,
                                            const std::function<torch::Tensor(std::int64_t, std::int64_t)>& load,
                                            const std::function<torch::Tensor(const torch::Tensor&)>& encode,
                                            std::string& refused);

 private:
  bool fits_in_memory(std::int64_t bytes, const torch::Device& device) const;
  /// The spill folder has twice `bytes` free (made if need be).
  bool disk_has_room(std::int64_t bytes) const;
  std::filesystem::path spill_file(const std::string& key) const;

  FeatureCacheMode mode_;
  std::int64_t budget_, used_ = 0;
  std::filesystem::path spill_dir_;
  mutable std::mutex mu_;
  std::map<std::string, std::shared_ptr<const FeatureTable>> tables_;
};

/// SHA-256 over a module's parameters and buffers: names, dtypes, shapes and values.
std::string module_fingerprint(torch::nn::Module& module);

}  // namespace ablate
