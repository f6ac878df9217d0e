#pragma once
// Scoring generated text with metric plugins: each metric on the whole set, then on each group's subset.
// The trainer's evaluation and `runner ensemble` both score through here.

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "ablate/sdk/metric.hpp"
#include "grid/experiment.hpp"

namespace ablate {

using Metrics = std::vector<std::pair<PluginRef, std::shared_ptr<sdk::Metric>>>;

struct Scored {
  /// "exact_match", "bleu_4", and per group "exact_match[task=position]", in metric order.
  std::vector<std::pair<std::string, double>> values;
  /// Each value of the whole set with one score per prediction (the groups' are not repeated here).
  std::vector<std::pair<std::string, std::vector<double>>> per_sample;
};

/// `groups[j]` is prediction j's value of the `group_by` field ("" when it has none); empty `group_by` or
/// `groups`: no per-group values.
Scored score(const Metrics& metrics, const std::vector<std::string>& predictions,
             const std::vector<std::vector<std::string>>& references, const std::string& group_by = {},
             const std::vector<std::string>& groups = {});

}  // namespace ablate
