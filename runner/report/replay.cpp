// runner replay: what runs generated at a recorded step: prompt, output, references, scores and image. With
// several runs (the cells of a decoding sweep, say), each sample is shown once with every run's output
// under it, matched on the sample id.

#include <algorithm>
#include <fstream>
#include <iostream>
#include <map>
#include <optional>

#include "ablate/sdk/error.hpp"
#include "cli/commands.hpp"
#include "report/text.hpp"
#include "store/store.hpp"

namespace ablate::cli {

namespace {

std::string scores_text(const store::SampleRow& s) {
  std::string scores;
  for (auto it = s.scores.begin(); it != s.scores.end(); ++it) {
    scores += (scores.empty() ? "" : ", ") + it.key() + " " + report::fixed(it.value().get<double>(), 3);
  }
  return scores.empty() ? "-" : scores;
}

struct Shown {
  store::RunRow run;
  std::int64_t step = 0;
  std::vector<store::SampleRow> samples;
};

}  // namespace

int replay(const Common& common, const ReplayArgs& args) {
  if (!std::filesystem::exists(common.db)) throw sdk::InputError(common.db.string() + ": no results database here");
  store::Store db(common.db, /*create=*/false);
  std::vector<Shown> shown;
  for (const auto id : args.runs) {
    const auto run = db.run(id);
    if (!run) throw sdk::InputError(common.db.string() + ": no run " + std::to_string(id));
    const auto steps = db.sample_steps(run->id);
    if (steps.empty()) {
      std::cout << "run " << run->id << " recorded no samples\n";
      continue;
    }
    const auto step = args.step >= 0 ? args.step : steps.back();
    if (std::find(steps.begin(), steps.end(), step) == steps.end()) {
      std::string have;
      for (auto s : steps) have += (have.empty() ? "" : ", ") + std::to_string(s);
      throw sdk::InputError("run " + std::to_string(run->id) + " has no samples at step " + std::to_string(step) +
                            " (steps with samples: " + have + ")");
    }
    shown.push_back({*run, step, db.samples(run->id, step)});
  }
  if (shown.empty()) return 0;
  if (!args.images.empty()) report::make_output_folder(args.images);
  const bool side_by_side = shown.size() > 1;
  for (const auto& r : shown) {
    std::cout << "run " << r.run.id << " of " << report::printable(r.run.experiment) << " [" << report::printable(r.run.label)
              << "], " << store::status_name(r.run.status) << ", samples at step " << r.step;
    if (side_by_side && !r.samples.empty()) std::cout << ", decoding " << r.samples.front().decoding.dump();
    std::cout << "\n";
  }
  // Samples in the first run's order, then any that only later runs have.
  std::vector<std::string> order;
  std::vector<std::map<std::string, const store::SampleRow*>> by_id(shown.size());
  for (std::size_t k = 0; k < shown.size(); ++k) {
    for (const auto& s : shown[k].samples) {
      if (by_id[k].emplace(s.sample_id, &s).second &&
          std::none_of(by_id.begin(), by_id.begin() + static_cast<std::ptrdiff_t>(k), [&](const auto& m) { return m.count(s.sample_id) > 0; })) {
        order.push_back(s.sample_id);
      }
    }
  }
  if (!args.samples.empty()) {  // --sample: one question across every run given
    for (const auto& want : args.samples) {
      if (std::find(order.begin(), order.end(), want) == order.end()) {
        throw sdk::InputError("--sample " + report::printable(want) + ": none of the runs stored it at the step shown");
      }
    }
    order = args.samples;
  }
  for (const auto& id : order) {
    const store::SampleRow* first = nullptr;
    for (const auto& m : by_id) {
      if (!first && m.count(id)) first = m.at(id);
    }
    const auto& s = *first;
    std::cout << "\n" << report::printable(s.sample_id) << (side_by_side ? "" : "  decoding " + s.decoding.dump()) << "\n";
    std::cout << "  prompt:     " << report::printable(s.prompt) << "\n";
    if (!side_by_side) {
      std::cout << "  output:     " << report::printable(s.output) << "\n";
      if (s.raw_output) std::cout << "  raw output: " << report::printable(*s.raw_output) << "\n";
    }
    std::string refs;
    for (const auto& r : s.references) refs += (refs.empty() ? "" : " | ") + report::printable(r);
    std::cout << "  references: " << refs << "\n";
    if (side_by_side) {
      for (std::size_t k = 0; k < shown.size(); ++k) {
        const auto it = by_id[k].find(id);
        std::cout << "  run " << shown[k].run.id << ":  "
                  << (it == by_id[k].end() ? "(not sampled)" : report::printable(it->second->output) + "   [" + scores_text(*it->second) + "]")
                  << "\n";
      }
    } else {
      std::cout << "  scores:     " << scores_text(s) << "\n";
    }
    if (!s.image_sha256.empty()) {
      auto image = db.image(s.image_sha256);
      std::cout << "  image:      sha256:" << s.image_sha256.substr(0, 16);
      if (image) {
        std::cout << "  " << image->width << "x" << image->height << " " << image->format;
        if (!args.images.empty()) {
          const auto file = args.images / (s.image_sha256 + "." + image->format);
          std::ofstream(file, std::ios::binary).write(reinterpret_cast<const char*>(image->bytes.data()),
                                                      static_cast<std::streamsize>(image->bytes.size()));
          std::cout << "  -> " << file.string();
        }
      }
      std::cout << "\n";
    }
  }
  return 0;
}

}  // namespace ablate::cli
