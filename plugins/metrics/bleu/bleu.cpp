// metric/bleu: BLEU-1..4 exactly as pycocoevalcap's Bleu(4) computes them (bleu/bleu_scorer.py, the COCO
// caption scorer): the "closest" reference length, clipped n-gram counts, and its two smoothing constants
// (tiny = 1e-15 on matches, small = 1e-9 on guesses and lengths), which also make an empty prediction score
// (about) 0 rather than fail. Reports `bleu_1`..`bleu_4`: the value is the corpus BLEU (pooled counts, one
// brevity penalty for the set), per_sample the sentence BLEU, both as compute_score returns them.
//
// Tokens are Python's str.split(): runs of (Unicode) whitespace. pycocoevalcap is normally fed text that its
// PTB tokenizer (Stanford CoreNLP, Java) lowercased and stripped of punctuation; that step is not done here,
// so feed text that is already tokenized the way the benchmark wants it.

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <unordered_map>

#include "ablate/sdk/plugin.hpp"
#include "ablate/sdk/text.hpp"

namespace ablate::plugins {

namespace sdk = ablate::sdk;

struct BleuOptions {
  int n = 4;
  static BleuOptions parse(sdk::Options& o) {
    BleuOptions x;
    x.n = o.get("n", x.n);
    if (x.n < 1 || x.n > 9) o.fail("n", "must be between 1 and 9");
    return x;
  }
};

namespace {

/// n-gram -> count for n = 1..max_n; an n-gram is its words joined by one space (words hold no whitespace,
/// so the key is unambiguous and also tells n).
using NgramCounts = std::unordered_map<std::string, int>;

NgramCounts count_ngrams(const std::vector<std::string>& words, int max_n) {
  NgramCounts counts;
  for (int k = 1; k <= max_n; ++k) {
    for (std::size_t i = 0; i + static_cast<std::size_t>(k) <= words.size(); ++i) {
      std::string key = words[i];
      for (int j = 1; j < k; ++j) key += ' ' + words[i + static_cast<std::size_t>(j)];
      ++counts[key];
    }
  }
  return counts;
}

int order_of(const std::string& key) { return 1 + static_cast<int>(std::count(key.begin(), key.end(), ' ')); }

// bleu_scorer.py's constants: "so that if guess is 0 still return 0".
constexpr double kTiny = 1e-15;
constexpr double kSmall = 1e-9;

}  // namespace

class Bleu : public sdk::Metric {
 public:
  using options_type = BleuOptions;
  Bleu(const BleuOptions& o, const sdk::BuildContext&) : n_(o.n) {}

  std::vector<double> score(const std::vector<std::string>& predictions,
                            const std::vector<std::vector<std::string>>& references) const override {
    return compute(predictions, references).back().per_sample;
  }

  std::vector<sdk::MetricValue> evaluate(const std::vector<std::string>& predictions,
                                         const std::vector<std::vector<std::string>>& references) const override {
    return compute(predictions, references);
  }

 private:
  /// cook_refs + cook_test + BleuScorer.compute_score(option="closest"), in the same order of operations so
  /// that the doubles come out the same.
  std::vector<sdk::MetricValue> compute(const std::vector<std::string>& predictions,
                                        const std::vector<std::vector<std::string>>& references) const {
    const auto n = static_cast<std::size_t>(n_);
    std::vector<sdk::MetricValue> out(n);
    for (std::size_t k = 0; k < n; ++k) {
      out[k].name = "bleu_" + std::to_string(k + 1);
      out[k].per_sample.reserve(predictions.size());
    }
    std::vector<long long> total_guess(n, 0), total_correct(n, 0);
    long long total_testlen = 0, total_reflen = 0;
    for (std::size_t i = 0; i < predictions.size(); ++i) {
      // The clipping counts: each n-gram's largest count in any one reference.
      NgramCounts max_ref;
      std::vector<int> reflens;
      for (const auto& ref : references[i]) {
        const auto words = sdk::python_split(ref);
        reflens.push_back(static_cast<int>(words.size()));
        for (const auto& [ngram, count] : count_ngrams(words, n_)) {
          auto& m = max_ref[ngram];
          m = std::max(m, count);
        }
      }
      const auto words = sdk::python_split(predictions[i]);
      const int testlen = static_cast<int>(words.size());
      // "closest": min over (|l - testlen|, l), so a tie goes to the shorter reference. A sample without
      // references (pycocoevalcap refuses those) counts as one empty reference.
      int reflen = reflens.empty() ? 0 : reflens[0];
      for (int l : reflens) {
        if (std::abs(l - testlen) < std::abs(reflen - testlen) || (std::abs(l - testlen) == std::abs(reflen - testlen) && l < reflen)) reflen = l;
      }
      std::vector<int> correct(n, 0), guess(n, 0);
      for (std::size_t k = 0; k < n; ++k) guess[k] = std::max(0, testlen - static_cast<int>(k));
      for (const auto& [ngram, count] : count_ngrams(words, n_)) {
        const auto it = max_ref.find(ngram);
        correct[static_cast<std::size_t>(order_of(ngram) - 1)] += std::min(it == max_ref.end() ? 0 : it->second, count);
      }
      total_testlen += testlen;
      total_reflen += reflen;
      for (std::size_t k = 0; k < n; ++k) {
        total_guess[k] += guess[k];
        total_correct[k] += correct[k];
      }
      double bleu = 1.0;
      for (std::size_t k = 0; k < n; ++k) {
        bleu *= (static_cast<double>(correct[k]) + kTiny) / (static_cast<double>(guess[k]) + kSmall);
        out[k].per_sample.push_back(std::pow(bleu, 1.0 / static_cast<double>(k + 1)));
      }
      const double ratio = (static_cast<double>(testlen) + kTiny) / (static_cast<double>(reflen) + kSmall);
      if (ratio < 1) {
        for (std::size_t k = 0; k < n; ++k) out[k].per_sample.back() *= std::exp(1 - 1 / ratio);
      }
    }
    double bleu = 1.0;
    for (std::size_t k = 0; k < n; ++k) {
      bleu *= (static_cast<double>(total_correct[k]) + kTiny) / (static_cast<double>(total_guess[k]) + kSmall);
      out[k].value = std::pow(bleu, 1.0 / static_cast<double>(k + 1));
    }
    const double ratio = (static_cast<double>(total_testlen) + kTiny) / (static_cast<double>(total_reflen) + kSmall);
    if (ratio < 1) {
      for (auto& v : out) v.value *= std::exp(1 - 1 / ratio);
    }
    return out;
  }

  int n_;
};

}  // namespace ablate::plugins

namespace {
void register_plugin(ablate::sdk::Registry& registry) {
  registry.add<ablate::plugins::Bleu>("bleu", 1, "BLEU-1..4 (corpus and per sentence), as pycocoevalcap's Bleu(4)");
}
}  // namespace

ABLATE_PLUGIN(register_plugin)
