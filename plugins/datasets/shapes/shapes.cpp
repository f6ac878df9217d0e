// dataset/shapes: procedurally drawn images of coloured shapes in the four quadrants of a square, with
// captions and questions about colour, shape, count and position. Sample i of a split is drawn from a
// generator seeded by (seed, split, i) alone, so any sample can be made on any thread, in any order, and is
// the same on every machine.

#include <algorithm>
#include <array>
#include <random>
#include <set>
#include <sstream>

#include "ablate/sdk/plugin.hpp"

namespace ablate::plugins {

namespace sdk = ablate::sdk;

namespace {

struct Colour {
  const char* name;
  std::array<int, 3> rgb;
};
constexpr Colour kColours[] = {{"red", {215, 40, 40}},    {"green", {40, 165, 60}},  {"blue", {45, 80, 215}},
                               {"yellow", {225, 195, 35}}, {"purple", {145, 55, 185}}};
constexpr const char* kShapes[] = {"circle", "square", "triangle"};
constexpr const char* kQuadrants[] = {"top left", "top right", "bottom left", "bottom right"};
constexpr const char* kCounts[] = {"zero", "one", "two", "three", "four"};
constexpr const char* kTasks[] = {"caption", "color", "shape", "count", "position", "quadrant"};

// Every fixed phrase the generator writes; the vocabulary is derived from these and the names above.
constexpr const char* kPhrases[] = {"describe the image .", "what color is the", "?", "which shape is",
                                    "how many shapes are there ?", "where is the", "what is at the", "a", "and",
                                    "at the", "nothing"};

struct Item {
  int colour, shape, quadrant;
};

std::uint64_t mix(std::uint64_t h, std::uint64_t v) {
  // splitmix64 step: spreads (seed, split, index) over the generator's seed space.
  h ^= v + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2);
  h += 0x9e3779b97f4a7c15ULL;
  h = (h ^ (h >> 30)) * 0xbf58476d1ce4e5b9ULL;
  h = (h ^ (h >> 27)) * 0x94d049bb133111ebULL;
  return h ^ (h >> 31);
}

}  // namespace

struct ShapesOptions {
  std::string split = "train";
  std::int64_t size = 0;  // 0: 4000 for train, 200 otherwise
  std::int64_t seed = 0;
  std::int64_t image_size = 32;
  std::int64_t max_shapes = 3;
  std::vector<std::string> tasks{"caption", "color", "shape", "count", "position", "quadrant"};

  static ShapesOptions parse(sdk::Options& o) {
    ShapesOptions x;
    x.split = o.get("split", x.split);
    x.size = o.get("size", x.split == "train" ? std::int64_t{4000} : std::int64_t{200});
    x.seed = o.get("seed", x.seed);
    x.image_size = o.get("image_size", x.image_size);
    x.max_shapes = o.get("max_shapes", x.max_shapes);
    x.tasks = o.get("tasks", x.tasks);
    if (x.size <= 0) o.fail("size", "must be positive");
    if (x.image_size < 16 || x.image_size % 2 != 0) o.fail("image_size", "must be even and at least 16");
    if (x.max_shapes < 1 || x.max_shapes > 4) o.fail("max_shapes", "must be between 1 and 4");
    if (x.tasks.empty()) o.fail("tasks", "must name at least one task");
    for (const auto& t : x.tasks) {
      if (std::find(std::begin(kTasks), std::end(kTasks), t) == std::end(kTasks)) {
        o.fail("tasks", "unknown task '" + t + "' (caption, color, shape, count, position, quadrant)");
      }
    }
    return x;
  }
};

class Shapes : public sdk::Dataset {
 public:
  using options_type = ShapesOptions;
  Shapes(const ShapesOptions& o, const sdk::BuildContext&) : o_(o) {}

  std::size_t size() const override { return static_cast<std::size_t>(o_.size); }

  sdk::Sample get(std::size_t index) const override {
    std::uint64_t h = mix(0, static_cast<std::uint64_t>(o_.seed));
    for (char c : o_.split) h = mix(h, static_cast<unsigned char>(c));
    std::mt19937_64 rng(mix(h, index));
    auto uniform = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };

    // Which quadrants hold a shape, and what.
    const int n = uniform(1, static_cast<int>(o_.max_shapes));
    std::array<int, 4> order{0, 1, 2, 3};
    std::shuffle(order.begin(), order.end(), rng);
    std::vector<Item> items;
    for (int i = 0; i < n; ++i) items.push_back({uniform(0, 4), uniform(0, 2), order[i]});
    std::sort(items.begin(), items.end(), [](const Item& a, const Item& b) { return a.quadrant < b.quadrant; });

    sdk::Sample s;
    s.id = o_.split + "-" + std::to_string(index);
    s.image = draw(items, rng);

    // Tasks this image can answer unambiguously, then one of those the options allow.
    std::vector<std::string> possible;
    for (const auto& t : o_.tasks) {
      if (answerable(t, items)) possible.push_back(t);
    }
    if (possible.empty()) possible.push_back("count");  // always answerable
    const std::string task = possible[static_cast<std::size_t>(uniform(0, static_cast<int>(possible.size()) - 1))];
    ask(task, items, rng, s);
    s.references = {s.target};
    s.metadata = {{"task", task}, {"shapes", n}};
    return s;
  }

  std::vector<std::string> vocabulary() const override {
    std::set<std::string> seen;
    std::vector<std::string> words;
    auto add_words = [&](const std::string& text) {
      std::istringstream is(text);
      for (std::string w; is >> w;) {
        if (seen.insert(w).second) words.push_back(w);
      }
    };
    for (const char* p : kPhrases) add_words(p);
    for (const auto& c : kColours) add_words(c.name);
    for (const char* p : kShapes) add_words(p);
    for (const char* p : kQuadrants) add_words(p);
    for (const char* p : kCounts) add_words(p);
    return words;
  }

 private:
  static std::string describe(const Item& it) {
    return std::string("a ") + kColours[it.colour].name + " " + kShapes[it.shape];
  }

  static bool answerable(const std::string& task, const std::vector<Item>& items) {
    auto count_if = [&](auto pred) { return std::count_if(items.begin(), items.end(), pred); };
    if (task == "color") {
      for (const auto& it : items) {
        if (count_if([&](const Item& o) { return o.shape == it.shape; }) == 1) return true;
      }
      return false;
    }
    if (task == "shape") {
      for (const auto& it : items) {
        if (count_if([&](const Item& o) { return o.colour == it.colour; }) == 1) return true;
      }
      return false;
    }
    if (task == "position") {
      for (const auto& it : items) {
        if (count_if([&](const Item& o) { return o.colour == it.colour && o.shape == it.shape; }) == 1) return true;
      }
      return false;
    }
    return true;  // caption, count, quadrant
  }

  static void ask(const std::string& task, const std::vector<Item>& items, std::mt19937_64& rng, sdk::Sample& s) {
    auto pick = [&](auto pred) {
      std::vector<const Item*> c;
      for (const auto& it : items) {
        if (pred(it)) c.push_back(&it);
      }
      return *c[std::uniform_int_distribution<std::size_t>(0, c.size() - 1)(rng)];
    };
    auto unique = [&](auto same) {
      return [&, same](const Item& it) {
        return std::count_if(items.begin(), items.end(), [&](const Item& o) { return same(o, it); }) == 1;
      };
    };
    if (task == "caption") {
      s.prompt = "describe the image .";
      for (std::size_t i = 0; i < items.size(); ++i) {
        s.target += (i ? " and " : "") + describe(items[i]) + " at the " + kQuadrants[items[i].quadrant];
      }
    } else if (task == "color") {
      const Item it = pick(unique([](const Item& a, const Item& b) { return a.shape == b.shape; }));
      s.prompt = std::string("what color is the ") + kShapes[it.shape] + " ?";
      s.target = kColours[it.colour].name;
    } else if (task == "shape") {
      const Item it = pick(unique([](const Item& a, const Item& b) { return a.colour == b.colour; }));
      s.prompt = std::string("which shape is ") + kColours[it.colour].name + " ?";
      s.target = kShapes[it.shape];
    } else if (task == "count") {
      s.prompt = "how many shapes are there ?";
      s.target = kCounts[items.size()];
    } else if (task == "position") {
      const Item it = pick(unique([](const Item& a, const Item& b) { return a.colour == b.colour && a.shape == b.shape; }));
      s.prompt = std::string("where is the ") + kColours[it.colour].name + " " + kShapes[it.shape] + " ?";
      s.target = kQuadrants[it.quadrant];
    } else {  // quadrant
      const int q = std::uniform_int_distribution<int>(0, 3)(rng);
      s.prompt = std::string("what is at the ") + kQuadrants[q] + " ?";
      s.target = "nothing";
      for (const auto& it : items) {
        if (it.quadrant == q) s.target = describe(it);
      }
    }
  }

  sdk::Image draw(const std::vector<Item>& items, std::mt19937_64& rng) const {
    const int size = static_cast<int>(o_.image_size), half = size / 2;
    const int bg = std::uniform_int_distribution<int>(200, 245)(rng);
    std::uniform_int_distribution<int> noise(-6, 6);
    sdk::Image img = xt::zeros<std::uint8_t>({std::size_t(size), std::size_t(size), std::size_t{3}});
    for (int y = 0; y < size; ++y) {
      for (int x = 0; x < size; ++x) {
        for (int c = 0; c < 3; ++c) img(y, x, c) = static_cast<std::uint8_t>(std::clamp(bg + noise(rng), 0, 255));
      }
    }
    const double r_lo = half * 0.36, r_hi = half * 0.46;
    for (const auto& it : items) {
      const double r = std::uniform_real_distribution<double>(r_lo, r_hi)(rng);
      const double jitter = half * 0.5 - r;
      const double cx = (it.quadrant % 2) * half + half * 0.5 + std::uniform_real_distribution<double>(-jitter, jitter)(rng);
      const double cy = (it.quadrant / 2) * half + half * 0.5 + std::uniform_real_distribution<double>(-jitter, jitter)(rng);
      const auto& rgb = kColours[it.colour].rgb;
      for (int y = 0; y < size; ++y) {
        for (int x = 0; x < size; ++x) {
          const double dx = x + 0.5 - cx, dy = y + 0.5 - cy;
          bool inside = false;
          if (it.shape == 0) {
            inside = dx * dx + dy * dy <= r * r;
          } else if (it.shape == 1) {
            inside = std::abs(dx) <= r * 0.85 && std::abs(dy) <= r * 0.85;
          } else {
            inside = dy >= -r && dy <= r * 0.8 && std::abs(dx) <= (dy + r) * 0.6;
          }
          if (inside) {
            for (int c = 0; c < 3; ++c) img(y, x, c) = static_cast<std::uint8_t>(rgb[c]);
          }
        }
      }
    }
    return img;
  }

  ShapesOptions o_;
};

}  // namespace ablate::plugins

namespace {
void register_plugin(ablate::sdk::Registry& registry) {
  registry.add<ablate::plugins::Shapes>("shapes", 1, "Synthetic coloured shapes: captions and questions");
}
}  // namespace

ABLATE_PLUGIN(register_plugin)
