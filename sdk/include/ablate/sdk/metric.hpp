#pragma once
// Metrics: one score per sample and an aggregate.

#include <string>
#include <vector>

namespace ablate::sdk {

class Metric {
 public:
  virtual ~Metric();
  /// One score per prediction; predictions.size() == references.size(). Scoring sees the whole set at
  /// once because some metrics (CIDEr) weigh words by how the whole corpus uses them. Thread-safe.
  virtual std::vector<double> score(const std::vector<std::string>& predictions,
                                    const std::vector<std::vector<std::string>>& references) const = 0;
  /// The aggregate of per-sample scores (the mean unless a metric says otherwise).
  virtual double aggregate(const std::vector<double>& scores) const;
};

}  // namespace ablate::sdk
