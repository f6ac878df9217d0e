// runner ensemble: majority vote over the answers several runs gave to the same samples, scored with the
// first run's metrics and stored as a run of its own (stage_name "ensemble") in the first run's experiment,
// so that `runner compare` lists it and `runner replay` shows its answers beside the members'.
//
// Votes: each run's stored output (after its [eval] postprocess) at its last step with samples, compared
// after trimming, collapsing whitespace and ASCII lowercasing. The answer with the most votes wins; a tie
// goes to the tied answer of the earliest run in the order given (list the strongest run first), in that
// run's spelling. Only samples every run stored take part (set [eval] samples = "all" to store them all).

#include <algorithm>
#include <cctype>
#include <iostream>
#include <map>
#include <set>

#include "ablate/sdk/error.hpp"
#include "ablate/sdk/hash.hpp"
#include "cli/commands.hpp"
#include "eval/scoring.hpp"
#include "host/plugin_host.hpp"
#include "report/text.hpp"
#include "store/store.hpp"

namespace ablate::cli {

namespace {

constexpr const char* kRule =
    "majority vote on answers compared trimmed, whitespace-collapsed and lowercased; a tie goes to the earliest run listed";

std::string vote_key(const std::string& answer) {
  std::string key;
  bool space = false;
  for (unsigned char c : answer) {
    if (std::isspace(c)) {
      space = !key.empty();
      continue;
    }
    if (space) key += ' ';
    space = false;
    key += static_cast<char>(std::tolower(c));
  }
  return key;
}

struct Member {
  store::RunRow run;
  std::int64_t step = 0;
  std::map<std::string, store::SampleRow> samples;  // by sample id
  std::vector<std::string> order;                   // the sample ids as stored
};

// The first run's [eval] metrics, built from its stored configuration.
Metrics metrics_of(const store::RunRow& run, const PluginHost& host, const std::string& where) {
  Metrics out;
  const auto ptr = Json::json_pointer("/eval/metrics");
  if (!run.config.contains(ptr)) return out;
  const auto& list = run.config.at(ptr);
  sdk::BuildContext bctx;
  for (std::size_t i = 0; i < list.size(); ++i) {
    auto o = sdk::Options::of_file(list[i], where);
    PluginRef ref;
    ref.kind = sdk::Kind::metric;
    ref.id = o.require<std::string>("plugin");
    ref.version = host.require(sdk::Kind::metric, ref.id, where + ": eval.metrics[" + std::to_string(i) + "]").version;
    ref.display = "eval.metrics[" + std::to_string(i) + "]";
    ref.pointer = "/eval/metrics/" + std::to_string(i);
    out.emplace_back(ref, host.create_metric(ref.id, o, bctx));
  }
  return out;
}

}  // namespace

int ensemble(const Common& common, const EnsembleArgs& args) {
  if (args.runs.size() < 2) throw sdk::InputError("runner ensemble: give at least two runs (see runner compare)");
  if (std::set<std::int64_t>(args.runs.begin(), args.runs.end()).size() != args.runs.size()) {
    throw sdk::InputError("runner ensemble: a run is listed twice");
  }
  if (!std::filesystem::exists(common.db)) throw sdk::InputError(common.db.string() + ": no results database here");
  store::Store db(common.db, /*create=*/false);

  std::vector<Member> members;
  for (const auto id : args.runs) {
    const auto run = db.run(id);
    if (!run) throw sdk::InputError(common.db.string() + ": no run " + std::to_string(id));
    const auto steps = db.sample_steps(id);
    if (steps.empty()) throw sdk::InputError(common.db.string() + ": run " + std::to_string(id) + " recorded no samples");
    Member m{*run, steps.back(), {}, {}};
    for (auto& s : db.samples(id, m.step)) {
      m.order.push_back(s.sample_id);
      m.samples.emplace(s.sample_id, std::move(s));
    }
    members.push_back(std::move(m));
  }

  // Samples every run stored, in the first run's order; their references must agree (the same eval data).
  std::vector<std::string> ids;
  for (const auto& id : members.front().order) {
    if (std::all_of(members.begin(), members.end(), [&](const Member& m) { return m.samples.count(id) > 0; })) ids.push_back(id);
  }
  if (ids.empty()) {
    throw sdk::InputError("runner ensemble: runs " + report::printable(Json(args.runs).dump()) +
                          " stored no sample in common (compare their [eval] data)");
  }
  for (const auto& id : ids) {
    for (const auto& m : members) {
      if (m.samples.at(id).references != members.front().samples.at(id).references) {
        throw sdk::InputError("runner ensemble: sample " + report::printable(id) + " has other references in run " +
                              std::to_string(m.run.id) + " than in run " + std::to_string(members.front().run.id) +
                              ": they evaluated different data");
      }
    }
  }
  std::size_t most = 0;
  for (const auto& m : members) most = std::max(most, m.samples.size());
  std::cout << "ensemble of " << members.size() << " runs on the " << ids.size() << " samples all of them stored";
  if (most > ids.size()) std::cout << " (" << most - ids.size() << " stored by only some are left out)";
  std::cout << "\n  rule: " << kRule << "\n";

  // The vote.
  std::vector<std::string> voted;
  std::vector<Json> ballots;
  std::vector<std::vector<std::string>> references;
  for (const auto& id : ids) {
    std::map<std::string, std::size_t> votes;  // key -> count
    std::map<std::string, std::size_t> first;  // key -> earliest member that gave it
    for (std::size_t k = 0; k < members.size(); ++k) {
      const auto key = vote_key(members[k].samples.at(id).output);
      ++votes[key];
      first.emplace(key, k);
    }
    const std::string* best = nullptr;
    for (const auto& [key, n] : votes) {
      if (!best || n > votes.at(*best) || (n == votes.at(*best) && first.at(key) < first.at(*best))) best = &key;
    }
    voted.push_back(members[first.at(*best)].samples.at(id).output);
    Json ballot = Json::object();
    for (const auto& [key, n] : votes) ballot[members[first.at(key)].samples.at(id).output] = n;
    ballots.push_back(ballot);
    references.push_back(members.front().samples.at(id).references);
  }

  PluginHost host;
  host.discover(PluginHost::search_path(common.executable, common.plugin_dirs), std::cerr);
  const auto metrics = metrics_of(members.front().run, host, common.db.string() + ": run " + std::to_string(members.front().run.id));
  const auto scored = score(metrics, voted, references);

  // Each member on the same samples, for a fair comparison.
  std::vector<std::string> header{"", "run"};
  for (const auto& [name, value] : scored.values) header.push_back(name);
  std::vector<std::vector<std::string>> table;
  for (const auto& m : members) {
    std::vector<std::string> answers;
    for (const auto& id : ids) answers.push_back(m.samples.at(id).output);
    std::vector<std::string> row{"member", std::to_string(m.run.id) + " [" + report::printable(m.run.label) + "]"};
    for (const auto& [name, value] : score(metrics, answers, references).values) row.push_back(report::fixed(value));
    table.push_back(std::move(row));
  }

  // Stored as a run of the first run's experiment; the same ensemble is stored once.
  std::vector<std::int64_t> run_ids;
  std::vector<std::int64_t> steps;
  for (const auto& m : members) {
    run_ids.push_back(m.run.id);
    steps.push_back(m.step);
  }
  const Json config = {{"ensemble", {{"runs", run_ids}, {"steps", steps}, {"rule", kRule}, {"samples", ids.size()}}},
                       {"eval", {{"metrics", members.front().run.config.value(Json::json_pointer("/eval/metrics"), Json::array())}}}};
  const auto key = "ensemble:" + sdk::sha256_hex(config.dump());
  std::string label = "ensemble of runs";
  for (std::size_t k = 0; k < run_ids.size(); ++k) label += (k ? ", " : " ") + std::to_string(run_ids[k]);
  std::string members_axis;
  for (auto id : run_ids) members_axis += (members_axis.empty() ? "" : "+") + std::to_string(id);
  const auto& first = members.front().run;
  std::int64_t run_id = 0;
  if (const auto existing = db.find_run(first.experiment_id, key)) {
    run_id = existing->id;
    std::cout << "  already stored as run " << run_id << "\n";
  } else {
    store::NewRun nr;
    nr.experiment_id = first.experiment_id;
    nr.cell_key = key;
    nr.cell_index = -1;
    nr.label = label;
    nr.axes = {{"ensemble", members_axis}};
    nr.config = config;
    Json plugins = Json::object();
    for (const auto& [ref, metric] : metrics) plugins[ref.display] = ref.qualified() + "@" + std::to_string(ref.version);
    nr.plugins = plugins;
    nr.stage_name = "ensemble";
    nr.parent_run_id = first.id;
    run_id = db.create_run(nr);
    std::vector<store::SampleRow> rows;
    for (std::size_t j = 0; j < ids.size(); ++j) {
      const auto& model = members.front().samples.at(ids[j]);
      store::SampleRow row;
      row.step = 0;
      row.decoding = {{"ensemble", run_ids}, {"votes", ballots[j]}};
      row.sample_id = ids[j];
      row.prompt = model.prompt;
      row.output = voted[j];
      row.references = references[j];
      row.image_sha256 = model.image_sha256;
      for (const auto& [name, values] : scored.per_sample) row.scores[name] = values[j];
      if (!scored.per_sample.empty()) row.score = scored.per_sample.front().second[j];
      rows.push_back(std::move(row));
    }
    db.record_scores(run_id, 0, scored.values, rows, {});
    db.set_status(run_id, store::Status::done);
    std::cout << "  stored as run " << run_id << " of experiment " << report::printable(first.experiment) << "\n";
  }
  std::vector<std::string> row{"ensemble", std::to_string(run_id)};
  for (const auto& [name, value] : scored.values) row.push_back(report::fixed(value));
  table.push_back(std::move(row));
  report::print_table(std::cout, header, table);
  return 0;
}

}  // namespace ablate::cli
