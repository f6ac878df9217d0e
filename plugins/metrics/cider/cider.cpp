// metric/cider: CIDEr-D exactly as pycocoevalcap's Cider computes it (cider/cider_scorer.py): TF-IDF vectors
// of 1..4-grams whose document frequencies come from the references of the set being scored (so a score
// depends on the set: the host scores the whole evaluation set, and each group on its own), idf =
// log(number of samples) - log(max(1, df)), hypothesis weights clipped at the reference's, a Gaussian penalty
// (sigma 6) on the length difference, the mean over n and over references, times 10. The value is the mean of
// the per-sample scores.
//
// Two quirks of the original are kept because they change the numbers: the "length" in the penalty is the
// number of bigrams (counts2vec adds term frequencies where its n-gram index is 1), and a set of one sample
// scores 0 (idf = log 1 - log 1). Tokens are Python's str.split(), as in metric/bleu; no PTB tokenizer.

#include <algorithm>
#include <cmath>
#include <unordered_map>
#include <unordered_set>

#include "ablate/sdk/plugin.hpp"
#include "ablate/sdk/text.hpp"

namespace ablate::plugins {

namespace sdk = ablate::sdk;

struct CiderOptions {
  int n = 4;
  double sigma = 6.0;
  static CiderOptions parse(sdk::Options& o) {
    CiderOptions x;
    x.n = o.get("n", x.n);
    x.sigma = o.get("sigma", x.sigma);
    if (x.n < 1 || x.n > 9) o.fail("n", "must be between 1 and 9");
    if (!(x.sigma > 0)) o.fail("sigma", "must be positive");
    return x;
  }
};

namespace {

/// An n-gram's key is its words joined by one space (words hold no whitespace, so keys are unambiguous).
struct Ngram {
  std::string key;
  std::size_t order;  // n - 1
  int count;
};

/// precook(): the n-grams in the order a Python dict first saw them (n ascending, then position), so that
/// sums run in the same order as the original's.
std::vector<Ngram> precook(const std::string& text, std::size_t max_n) {
  const auto words = sdk::python_split(text);
  std::vector<Ngram> out;
  std::unordered_map<std::string, std::size_t> index;
  for (std::size_t k = 1; k <= max_n; ++k) {
    for (std::size_t i = 0; i + k <= words.size(); ++i) {
      std::string key = words[i];
      for (std::size_t j = 1; j < k; ++j) key += ' ' + words[i + j];
      const auto [it, added] = index.emplace(key, out.size());
      if (added) {
        out.push_back({std::move(key), k - 1, 1});
      } else {
        ++out[it->second].count;
      }
    }
  }
  return out;
}

/// counts2vec(): TF-IDF weights per n (in first-seen order, and by key for lookups), their norms, and the
/// "length" (the bigram count, as in the original).
struct TfIdf {
  std::vector<std::vector<std::pair<const std::string*, double>>> ordered;
  std::vector<std::unordered_map<std::string, double>> by_key;
  std::vector<double> norm;
  double length = 0;
};

}  // namespace

class Cider : public sdk::Metric {
 public:
  using options_type = CiderOptions;
  Cider(const CiderOptions& o, const sdk::BuildContext&) : n_(static_cast<std::size_t>(o.n)), sigma_(o.sigma) {}

  std::vector<double> score(const std::vector<std::string>& predictions,
                            const std::vector<std::vector<std::string>>& references) const override {
    std::vector<std::vector<Ngram>> tests;
    std::vector<std::vector<std::vector<Ngram>>> refs(predictions.size());
    // Document frequency: in how many samples' reference sets an n-gram occurs.
    std::unordered_map<std::string, double> df;
    for (std::size_t i = 0; i < predictions.size(); ++i) {
      tests.push_back(precook(predictions[i], n_));
      std::unordered_set<std::string> seen;
      for (const auto& r : references[i]) {
        refs[i].push_back(precook(r, n_));
        for (const auto& g : refs[i].back()) seen.insert(g.key);
      }
      for (const auto& key : seen) df[key] += 1.0;
    }
    const double ref_len = std::log(static_cast<double>(predictions.size()));

    const auto to_vec = [&](const std::vector<Ngram>& counts) {
      TfIdf v;
      v.ordered.resize(n_);
      v.by_key.resize(n_);
      v.norm.assign(n_, 0.0);
      for (const auto& g : counts) {
        const auto it = df.find(g.key);
        const double doc_freq = std::log(std::max(1.0, it == df.end() ? 0.0 : it->second));
        const double w = static_cast<double>(g.count) * (ref_len - doc_freq);
        v.ordered[g.order].emplace_back(&g.key, w);
        v.by_key[g.order][g.key] = w;
        v.norm[g.order] += std::pow(w, 2.0);
        if (g.order == 1) v.length += g.count;
      }
      for (auto& x : v.norm) x = std::sqrt(x);
      return v;
    };
    const double two_sigma2 = 2 * std::pow(sigma_, 2.0);

    std::vector<double> out;
    out.reserve(predictions.size());
    for (std::size_t i = 0; i < predictions.size(); ++i) {
      const auto hyp = to_vec(tests[i]);
      std::vector<double> total(n_, 0.0);
      for (const auto& ref_counts : refs[i]) {
        const auto ref = to_vec(ref_counts);
        const double delta = hyp.length - ref.length;
        const double penalty = std::pow(M_E, -std::pow(delta, 2.0) / two_sigma2);
        for (std::size_t k = 0; k < n_; ++k) {
          double val = 0.0;
          for (const auto& [key, w] : hyp.ordered[k]) {
            const auto it = ref.by_key[k].find(*key);
            const double r = it == ref.by_key[k].end() ? 0.0 : it->second;
            val += std::min(w, r) * r;
          }
          if (hyp.norm[k] != 0 && ref.norm[k] != 0) val /= hyp.norm[k] * ref.norm[k];
          total[k] += val * penalty;
        }
      }
      double mean = 0.0;
      for (double t : total) mean += t;
      mean /= static_cast<double>(n_);
      // A sample without references scores 0 (the original divides by zero there).
      out.push_back(refs[i].empty() ? 0.0 : mean / static_cast<double>(refs[i].size()) * 10.0);
    }
    return out;
  }

 private:
  std::size_t n_;
  double sigma_;
};

}  // namespace ablate::plugins

namespace {
void register_plugin(ablate::sdk::Registry& registry) {
  registry.add<ablate::plugins::Cider>("cider", 1, "CIDEr-D (n 4, sigma 6), as pycocoevalcap's Cider");
}
}  // namespace

ABLATE_PLUGIN(register_plugin)
