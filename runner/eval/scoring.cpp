#include "eval/scoring.hpp"

#include <map>
#include <stdexcept>

#include "host/plugin_host.hpp"

namespace ablate {

Scored score(const Metrics& metrics, const std::vector<std::string>& predictions,
             const std::vector<std::vector<std::string>>& references, const std::string& group_by,
             const std::vector<std::string>& groups) {
  // A corpus-level value such as BLEU's is computed on the group's samples, not averaged from sentence scores.
  std::map<std::string, std::vector<std::size_t>> members;
  if (!group_by.empty()) {
    for (std::size_t j = 0; j < groups.size(); ++j) {
      if (!groups[j].empty()) members[groups[j]].push_back(j);
    }
  }
  Scored out;
  for (const auto& [ref, metric] : metrics) {
    auto run_metric = [&, &ref = ref, &metric = metric](const std::vector<std::string>& p, const std::vector<std::vector<std::string>>& r) {
      auto result = guarded(ref.qualified(), "evaluate", [&] { return metric->evaluate(p, r); });
      for (auto& v : result) {
        if (v.name.empty()) v.name = ref.id;
        if (v.per_sample.size() != p.size()) {
          throw std::runtime_error(ref.qualified() + ": evaluate: " + std::to_string(v.per_sample.size()) + " scores for " +
                                   std::to_string(p.size()) + " predictions");
        }
      }
      return result;
    };
    for (auto& v : run_metric(predictions, references)) {
      out.values.emplace_back(v.name, v.value);
      out.per_sample.emplace_back(v.name, std::move(v.per_sample));
    }
    for (const auto& [value, js] : members) {
      std::vector<std::string> p;
      std::vector<std::vector<std::string>> r;
      for (auto j : js) {
        p.push_back(predictions[j]);
        r.push_back(references[j]);
      }
      for (const auto& v : run_metric(p, r)) out.values.emplace_back(v.name + "[" + group_by + "=" + value + "]", v.value);
    }
  }
  return out;
}

}  // namespace ablate
