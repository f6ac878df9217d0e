// metric/exact_match: 1 when the prediction equals a reference after trimming, collapsing runs of whitespace
// and (by default) lowercasing; else 0.

#include <algorithm>
#include <cctype>
#include <sstream>

#include "ablate/sdk/plugin.hpp"

namespace ablate::plugins {

namespace sdk = ablate::sdk;

struct ExactMatchOptions {
  bool lowercase = true;
  static ExactMatchOptions parse(sdk::Options& o) {
    ExactMatchOptions x;
    x.lowercase = o.get("lowercase", x.lowercase);
    return x;
  }
};

class ExactMatch : public sdk::Metric {
 public:
  using options_type = ExactMatchOptions;
  ExactMatch(const ExactMatchOptions& o, const sdk::BuildContext&) : o_(o) {}

  std::vector<double> score(const std::vector<std::string>& predictions,
                            const std::vector<std::vector<std::string>>& references) const override {
    std::vector<double> out;
    out.reserve(predictions.size());
    for (std::size_t i = 0; i < predictions.size(); ++i) {
      const auto p = normalise(predictions[i]);
      const auto& refs = references[i];
      out.push_back(std::any_of(refs.begin(), refs.end(), [&](const std::string& r) { return normalise(r) == p; }) ? 1.0 : 0.0);
    }
    return out;
  }

 private:
  std::string normalise(const std::string& s) const {
    std::istringstream is(s);
    std::string out;
    for (std::string w; is >> w;) out += (out.empty() ? "" : " ") + w;
    if (o_.lowercase) {
      std::transform(out.begin(), out.end(), out.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
    }
    return out;
  }
  ExactMatchOptions o_;
};

}  // namespace ablate::plugins

namespace {
void register_plugin(ablate::sdk::Registry& registry) {
  registry.add<ablate::plugins::ExactMatch>("exact_match", 1, "Exact match after whitespace and case normalisation");
}
}  // namespace

ABLATE_PLUGIN(register_plugin)
