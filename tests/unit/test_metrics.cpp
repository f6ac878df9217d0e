// The metric plugins on examples small enough to check by hand (tests/parity/test_metrics.py holds them
// against pycocoevalcap and the official VQA evaluation on thousands of cases).

#include <catch2/catch.hpp>

#include <cmath>

#include "helpers.hpp"

using namespace ablate;
using ablate::test::builtin_plugins;

namespace {

std::shared_ptr<sdk::Metric> metric(const std::string& id) {
  static const sdk::Json table = sdk::Json::object();
  sdk::Options o(table, "", "metric", nullptr, "test");
  return builtin_plugins().create_metric(id, o, sdk::BuildContext{});
}

}  // namespace

TEST_CASE("bleu: clipped n-gram precisions, closest reference length, brevity penalty", "[metrics]") {
  // "a b c" against "a b d e": unigrams 2/3, bigrams 1/2, no trigram; 3 words against 4 gives a brevity
  // penalty of exp(1 - 4/3). The smoothing constants (1e-15, 1e-9) move these by under 1e-9.
  const auto values = metric("bleu")->evaluate({"a b c"}, {{"a b d e"}});
  REQUIRE(values.size() == 4);
  CHECK(values[0].name == "bleu_1");
  CHECK(values[3].name == "bleu_4");
  const double bp = std::exp(1.0 - 4.0 / 3.0);
  CHECK(values[0].value == Approx(2.0 / 3.0 * bp).epsilon(1e-8));
  CHECK(values[1].value == Approx(std::sqrt(1.0 / 3.0) * bp).epsilon(1e-8));
  CHECK(values[2].value < 1e-4);
  CHECK(values[0].per_sample == std::vector<double>{values[0].value});
  // An exact copy scores 1; the closest reference (the shorter one on a tie) sets the length.
  const auto copy = metric("bleu")->score({"x y z w", "p q"}, {{"x y z w", "a"}, {"p q r", "p"}});
  CHECK(copy[0] == Approx(1.0).epsilon(1e-8));
  // "p q": 1- and 2-grams all right, no 3- or 4-gram (1e-15 / 1e-9 each): (1e-12)^(1/4) = 1e-3, with no
  // brevity penalty since the reference lengths 3 and 1 tie at distance 1 and the shorter one counts.
  CHECK(copy[1] == Approx(1e-3).epsilon(1e-6));
}

TEST_CASE("cider: tf-idf cosine over the set, bigram-count length penalty, times 10", "[metrics]") {
  const auto cider = metric("cider");
  // Two samples with disjoint words: every n-gram has idf log 2. An exact copy scores 10. "w x q" against
  // "w x y z": unigram cosine 2/(sqrt 3 * 2), bigram 1/(sqrt 2 * sqrt 3), no 3- or 4-gram in common, and
  // 2 bigrams against 3 gives the penalty exp(-1/72).
  const auto scores = cider->score({"a b c d", "w x q"}, {{"a b c d"}, {"w x y z"}});
  REQUIRE(scores.size() == 2);
  CHECK(scores[0] == Approx(10.0).epsilon(1e-12));
  CHECK(scores[1] == Approx((1 / std::sqrt(3.0) + 1 / std::sqrt(6.0)) / 4 * std::exp(-1.0 / 72) * 10).epsilon(1e-12));
  CHECK(cider->evaluate({"a b c d", "w x q"}, {{"a b c d"}, {"w x y z"}})[0].value == Approx((scores[0] + scores[1]) / 2));
  // One sample: idf = log 1 - log 1 = 0 for everything, as pycocoevalcap has it.
  CHECK(cider->score({"a b c d"}, {{"a b c d"}}) == std::vector<double>{0.0});
}

TEST_CASE("vqa_accuracy: leave-one-out min(1, matches / 3), official normalisation", "[metrics]") {
  const auto vqa = metric("vqa_accuracy");
  std::vector<std::string> mixed(3, "two");
  mixed.resize(10, "dog");
  const std::vector<std::string> unanimous(10, "yes");
  std::vector<std::string> almost(9, "yes");
  almost.emplace_back("Yes.");
  // "2" is "two" once normalised: 3 subsets hold 2 of them (2/3), 7 hold all 3 (1): 0.9.
  // With unanimous annotators the official code normalises nothing, so "Yes" misses "yes".
  const auto scores = vqa->score({"2", "Yes", "yes", "Yes", "The dog!", "dont", "a/b"},
                                 {mixed, unanimous, unanimous, almost, mixed, {"don't", "no"}, {"b", "a b"}});
  CHECK(scores[0] == Approx(0.9).epsilon(1e-12));
  CHECK(scores[1] == 0.0);
  CHECK(scores[2] == 1.0);
  CHECK(scores[3] == 1.0);
  CHECK(scores[4] == 1.0);                                        // "dog" x7: every subset has at least 6
  CHECK(scores[5] == Approx((0 + 1.0 / 3) / 2).epsilon(1e-12));   // two answers: leave-one-out over two
  CHECK(scores[6] == Approx(1.0 / 3).epsilon(1e-12));             // "a/b" -> "a b" -> "b" (article dropped)
  // One answer: exact match after normalisation; none: 0.
  CHECK(vqa->score({"Two.", "x"}, {{"2"}, {}}) == std::vector<double>{1.0, 0.0});
}
