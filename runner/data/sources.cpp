#include "data/sources.hpp"

#include <algorithm>

#include "ablate/sdk/error.hpp"
#include "host/plugin_host.hpp"

namespace ablate {

DataSources::DataSources(const DataRef& ref, const Factory& make, std::ostream& out) : ref_(ref), out_(out) {
  for (const auto& src : ref.sources) {
    sets_.push_back(make(src));
    const auto n = sets_.back()->size();
    counts_.push_back(src.limit > 0 ? std::min<std::size_t>(n, static_cast<std::size_t>(src.limit)) : n);
  }
}

std::size_t DataSources::size() const {
  std::size_t n = 0;
  for (auto c : counts_) n += c;
  return n;
}

std::optional<sdk::Sample> DataSources::get(std::size_t source, std::size_t index) {
  const auto& src = ref_.sources[source];
  std::optional<sdk::SampleError> bad;
  auto sample = guarded(src.plugin.qualified(), "get", [&]() -> std::optional<sdk::Sample> {
    try {
      return sets_[source]->get(index);
    } catch (const sdk::SampleError& e) {
      bad = e;
      return std::nullopt;
    }
  });
  if (bad) {
    if (src.on_bad_sample == "fail") {
      // Plugins' messages usually name the sample already ("sample 8: images/8.jpg: cannot open image").
      const std::string what = bad->what();
      const bool named = what.find(bad->sample_id()) != std::string::npos;
      throw sdk::InputError(src.plugin.display + ": " + (named ? "" : "sample " + bad->sample_id() + ": ") + what +
                            " (on_bad_sample = \"skip\" leaves such samples out)");
    }
    std::lock_guard<std::mutex> lock(mu_);
    if (skipped_.insert(src.plugin.display + "\n" + bad->sample_id()).second) {
      out_ << "  skipping sample " << bad->sample_id() << " of " << src.plugin.display << ": " << bad->what() << "\n";
    }
    return std::nullopt;
  }
  if (ref_.mixture()) {
    sample->id = src.name + "/" + sample->id;
    sample->metadata["dataset"] = src.name;
  }
  return sample;
}

std::optional<sdk::Sample> DataSources::get(std::size_t index) {
  for (std::size_t s = 0; s < counts_.size(); ++s) {
    if (index < counts_[s]) return get(s, index);
    index -= counts_[s];
  }
  throw std::out_of_range("DataSources::get: index past the end");
}

std::vector<std::string> DataSources::vocabulary() const {
  std::vector<std::string> words;
  std::set<std::string> seen;
  for (std::size_t s = 0; s < sets_.size(); ++s) {
    for (auto& w : guarded(ref_.sources[s].plugin.qualified(), "vocabulary", [&] { return sets_[s]->vocabulary(); })) {
      if (seen.insert(w).second) words.push_back(std::move(w));
    }
  }
  return words;
}

sdk::Json DataSources::report(bool training) const {
  auto one = [&](std::size_t s) { return guarded(ref_.sources[s].plugin.qualified(), "report", [&] { return sets_[s]->report(); }); };
  if (!ref_.mixture()) return one(0);
  sdk::Json r = sdk::Json::object();
  for (std::size_t s = 0; s < sets_.size(); ++s) {
    auto entry = one(s);
    if (!entry.is_object()) entry = sdk::Json::object();
    entry["samples"] = counts_[s];
    if (training) entry["weight"] = ref_.sources[s].weight;
    r[ref_.sources[s].name] = entry;
  }
  return r;
}

namespace {

// splitmix64: a well-mixed 64-bit value from (seed, n), so each draw is independent of every other.
std::uint64_t mix(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

}  // namespace

DrawOrder::DrawOrder(const DataSources& data, std::uint64_t seed, std::uint64_t draws) {
  const auto n = data.sources();
  drawn_.assign(n, 0);
  for (std::size_t s = 0; s < n; ++s) {
    // Source 0 keeps the plain order's seed: a one-dataset run draws what it always drew.
    orders_.emplace_back(std::max<std::size_t>(data.count(s), 1), s == 0 ? seed : mix(seed ^ (0x6d6978ULL + s)));
  }
  if (n == 1) {
    drawn_[0] = draws;
    return;
  }
  double total = 0;
  std::vector<double> cumulative;
  for (std::size_t s = 0; s < n; ++s) {
    // A source with no samples (all cut by limit) is never drawn.
    total += data.count(s) > 0 ? data.ref().sources[s].weight : 0.0;
    cumulative.push_back(total);
  }
  plan_.reserve(draws);
  std::vector<std::uint32_t> next(n, 0);
  const std::uint64_t salt = mix(seed ^ 0x5eed5eedULL);
  for (std::uint64_t i = 0; i < draws; ++i) {
    const double u = static_cast<double>(mix(salt + i) >> 11) * 0x1.0p-53 * total;  // uniform in [0, total)
    auto s = static_cast<std::size_t>(std::upper_bound(cumulative.begin(), cumulative.end(), u) - cumulative.begin());
    s = std::min(s, n - 1);
    while (data.count(s) == 0) s = (s + 1) % n;  // only on a rounding edge next to an empty source
    plan_.emplace_back(static_cast<std::uint32_t>(s), next[s]++);
    ++drawn_[s];
  }
}

std::pair<std::size_t, std::size_t> DrawOrder::at(std::uint64_t n) {
  if (plan_.empty()) return {0, orders_[0].at(n)};
  const auto [s, k] = plan_.at(static_cast<std::size_t>(n));
  return {s, orders_[s].at(k)};
}

}  // namespace ablate
