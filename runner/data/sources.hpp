#pragma once
// The datasets of [data] train or eval as the trainer sees them: one dataset, or a mixture of several.
// Applies each dataset's `limit` and `on_bad_sample`, and in a mixture names samples "<name>/<id>" and
// tags them with metadata "dataset" = name (so `group_by = "dataset"` scores each dataset on its own).

#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <ostream>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "ablate/sdk/dataset.hpp"
#include "data/batches.hpp"
#include "grid/experiment.hpp"

namespace ablate {

class DataSources {
 public:
  using Factory = std::function<std::shared_ptr<sdk::Dataset>(const DataSource&)>;
  DataSources(const DataRef& ref, const Factory& make, std::ostream& out);

  std::size_t sources() const { return sets_.size(); }
  std::size_t count(std::size_t source) const { return counts_[source]; }  ///< after `limit`
  std::size_t size() const;  ///< every source's count, added up

  /// Sample `index` of `source` (< count(source)); nullopt when it cannot be made and on_bad_sample is
  /// "skip" (reported once); throws sdk::InputError naming it when on_bad_sample is "fail". Thread-safe.
  std::optional<sdk::Sample> get(std::size_t source, std::size_t index);
  /// Sample `index` of the sources concatenated in order (evaluation).
  std::optional<sdk::Sample> get(std::size_t index);

  /// The union of the sources' closed vocabularies (empty when none has one).
  std::vector<std::string> vocabulary() const;
  /// What building the datasets decided: the dataset's report, or for a mixture name -> report (with the
  /// sample count of each, and for training its weight).
  sdk::Json report(bool training) const;
  const DataRef& ref() const { return ref_; }

 private:
  const DataRef& ref_;
  std::ostream& out_;
  std::vector<std::shared_ptr<sdk::Dataset>> sets_;
  std::vector<std::size_t> counts_;
  std::mutex mu_;
  std::set<std::string> skipped_;
};

/// Which sample the n-th training draw is, as (source, index). A mixture draws each position's dataset at
/// random in proportion to the weights, seeded by (seed, n); within a dataset, draws follow a SampleOrder
/// (a fresh permutation per pass). Every draw is a function of (seed, n) alone, so a resumed run rebuilds
/// the same batches. With one source it is exactly SampleOrder(count, seed).
class DrawOrder {
 public:
  DrawOrder(const DataSources& data, std::uint64_t seed, std::uint64_t draws);
  std::pair<std::size_t, std::size_t> at(std::uint64_t n);
  /// How many of the `draws` draws fall on each source.
  const std::vector<std::uint64_t>& drawn() const { return drawn_; }

 private:
  std::vector<SampleOrder> orders_;
  std::vector<std::pair<std::uint32_t, std::uint32_t>> plan_;  ///< mixture: (source, k-th draw of it) per n
  std::vector<std::uint64_t> drawn_;
};

}  // namespace ablate
