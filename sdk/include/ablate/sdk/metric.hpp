#pragma once
// Metrics: one score per sample and a value for the whole set; a metric may report several values
// (BLEU-1..4) from one pass.

#include <string>
#include <vector>

namespace ablate::sdk {

/// One value a metric reports on a set of predictions.
struct MetricValue {
  std::string name;                ///< "" = the plugin's id; else the full name ("bleu_4")
  double value = 0;                ///< on the whole set (a corpus-level BLEU is not the mean of sentence BLEUs)
  std::vector<double> per_sample;  ///< one per prediction, stored with the samples
};

class Metric {
 public:
  virtual ~Metric();
  /// One score per prediction; predictions.size() == references.size(). Scoring sees the whole set at
  /// once because some metrics (CIDEr) weigh words by how the whole corpus uses them. Thread-safe.
  virtual std::vector<double> score(const std::vector<std::string>& predictions,
                                    const std::vector<std::vector<std::string>>& references) const = 0;
  /// The aggregate of per-sample scores (the mean unless a metric says otherwise).
  virtual double aggregate(const std::vector<double>& scores) const;
  /// Everything the metric reports on this set. The default: one value named after the plugin,
  /// aggregate(score(...)). Metrics with several values or a corpus-level value override it. The host
  /// calls it on the whole evaluation set and again on each group (`[eval] group_by`).
  virtual std::vector<MetricValue> evaluate(const std::vector<std::string>& predictions,
                                            const std::vector<std::vector<std::string>>& references) const;
};

}  // namespace ablate::sdk
