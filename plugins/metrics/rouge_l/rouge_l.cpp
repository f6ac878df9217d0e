// metric/rouge_l: ROUGE-L as pycocoevalcap's Rouge scorer computes it: tokens split on single spaces,
// longest common subsequence against each reference, precision and recall maximised over references
// separately, F-measure with beta = 1.2.

#include <algorithm>

#include "ablate/sdk/plugin.hpp"

namespace ablate::plugins {

namespace sdk = ablate::sdk;

struct RougeLOptions {
  double beta = 1.2;
  static RougeLOptions parse(sdk::Options& o) {
    RougeLOptions x;
    x.beta = o.get("beta", x.beta);
    return x;
  }
};

/// Python's str.split(" "): empty strings between repeated spaces are tokens too.
std::vector<std::string> split_spaces(const std::string& s) {
  std::vector<std::string> out;
  std::size_t start = 0;
  for (std::size_t i = 0; i <= s.size(); ++i) {
    if (i == s.size() || s[i] == ' ') {
      out.push_back(s.substr(start, i - start));
      start = i + 1;
    }
  }
  return out;
}

std::size_t lcs(const std::vector<std::string>& a, const std::vector<std::string>& b) {
  std::vector<std::size_t> prev(b.size() + 1, 0), cur(b.size() + 1, 0);
  for (std::size_t i = 1; i <= a.size(); ++i) {
    for (std::size_t j = 1; j <= b.size(); ++j) {
      cur[j] = a[i - 1] == b[j - 1] ? prev[j - 1] + 1 : std::max(prev[j], cur[j - 1]);
    }
    std::swap(prev, cur);
  }
  return prev[b.size()];
}

class RougeL : public sdk::Metric {
 public:
  using options_type = RougeLOptions;
  RougeL(const RougeLOptions& o, const sdk::BuildContext&) : beta_(o.beta) {}

  std::vector<double> score(const std::vector<std::string>& predictions,
                            const std::vector<std::vector<std::string>>& references) const override {
    std::vector<double> out;
    out.reserve(predictions.size());
    for (std::size_t i = 0; i < predictions.size(); ++i) {
      const auto cand = split_spaces(predictions[i]);
      double prec_max = 0.0, rec_max = 0.0;
      for (const auto& ref : references[i]) {
        const auto r = split_spaces(ref);
        const double common = static_cast<double>(lcs(r, cand));
        prec_max = std::max(prec_max, common / static_cast<double>(cand.size()));
        rec_max = std::max(rec_max, common / static_cast<double>(r.size()));
      }
      const double b2 = beta_ * beta_;
      out.push_back(prec_max != 0.0 && rec_max != 0.0 ? ((1 + b2) * prec_max * rec_max) / (rec_max + b2 * prec_max) : 0.0);
    }
    return out;
  }

 private:
  double beta_;
};

}  // namespace ablate::plugins

namespace {
void register_plugin(ablate::sdk::Registry& registry) {
  registry.add<ablate::plugins::RougeL>("rouge_l", 1, "ROUGE-L F-measure (beta 1.2), as pycocoevalcap");
}
}  // namespace

ABLATE_PLUGIN(register_plugin)
