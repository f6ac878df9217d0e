// runner replay: what a run generated at a recorded step: prompt, output, references, scores and image.

#include <algorithm>
#include <fstream>
#include <optional>
#include <iostream>

#include "ablate/sdk/error.hpp"
#include "cli/commands.hpp"
#include "report/text.hpp"
#include "store/store.hpp"

namespace ablate::cli {

int replay(const Common& common, const ReplayArgs& args) {
  if (!std::filesystem::exists(common.db)) throw sdk::InputError(common.db.string() + ": no results database here");
  store::Store db(common.db, /*create=*/false);
  const auto run = db.run(args.run);
  if (!run) throw sdk::InputError(common.db.string() + ": no run " + std::to_string(args.run));
  const auto steps = db.sample_steps(run->id);
  if (steps.empty()) {
    std::cout << "run " << run->id << " recorded no samples\n";
    return 0;
  }
  const auto step = args.step >= 0 ? args.step : steps.back();
  if (std::find(steps.begin(), steps.end(), step) == steps.end()) {
    std::string have;
    for (auto s : steps) have += (have.empty() ? "" : ", ") + std::to_string(s);
    throw sdk::InputError("run " + std::to_string(run->id) + " has no samples at step " + std::to_string(step) +
                          " (steps with samples: " + have + ")");
  }
  if (!args.images.empty()) std::filesystem::create_directories(args.images);
  std::cout << "run " << run->id << " of " << report::printable(run->experiment) << " [" << report::printable(run->label)
            << "], " << store::status_name(run->status) << ", samples at step " << step << "\n";
  for (const auto& s : db.samples(run->id, step)) {
    std::cout << "\n" << report::printable(s.sample_id) << "  decoding " << s.decoding.dump() << "\n";
    std::cout << "  prompt:     " << report::printable(s.prompt) << "\n";
    std::cout << "  output:     " << report::printable(s.output) << "\n";
    std::string refs;
    for (const auto& r : s.references) refs += (refs.empty() ? "" : " | ") + report::printable(r);
    std::cout << "  references: " << refs << "\n";
    std::string scores;
    for (auto it = s.scores.begin(); it != s.scores.end(); ++it) {
      scores += (scores.empty() ? "" : ", ") + it.key() + " " + report::fixed(it.value().get<double>(), 3);
    }
    std::cout << "  scores:     " << (scores.empty() ? "-" : scores) << "\n";
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
