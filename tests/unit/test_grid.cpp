// Grid expansion, option resolution and cell keys.

#include <catch2/catch.hpp>

#include <torch/torch.h>

#include "ablate/sdk/error.hpp"
#include "ablate/sdk/weights.hpp"
#include "grid/experiment.hpp"
#include "helpers.hpp"

using namespace ablate;
using ablate::test::TempDir;
using ablate::test::builtin_plugins;
using ablate::test::tiny_experiment;
using ablate::test::write_file;

namespace {

Experiment load(const TempDir& dir, const std::string& text) {
  return load_experiment(write_file(dir / "x.toml", text), builtin_plugins());
}

// The message of the InputError that loading `text` throws ("" if none).
std::string error_of(const TempDir& dir, const std::string& text) {
  try {
    auto ex = load(dir, text);
    compute_keys(ex);
  } catch (const sdk::InputError& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST_CASE("grid axes expand to their cartesian product, first axis slowest", "[grid]") {
  TempDir dir;
  auto ex = load(dir, tiny_experiment("g", 8, 4,
                                      "[grid]\n"
                                      "strategy = [[\"projector\"], [\"projector\", \"head\"], [\"full\"]]\n"
                                      "\"train.lr\" = [1e-3, 3e-4]\n"));
  compute_keys(ex);
  REQUIRE(ex.cells.size() == 6);
  REQUIRE(ex.axes == std::vector<std::string>{"strategy", "train.lr"});
  CHECK(ex.cells[0].label == "strategy=projector, train.lr=0.001");
  CHECK(ex.cells[1].label == "strategy=projector, train.lr=0.0003");
  CHECK(ex.cells[2].label == "strategy=projector+head, train.lr=0.001");
  CHECK(ex.cells[5].label == "strategy=full, train.lr=0.0003");
  CHECK(ex.cells[1].train.lr == Approx(3e-4));
  CHECK(ex.cells[2].strategies.size() == 2);
  CHECK(ex.cells[2].strategies[1].id == "head");
  // Every cell has its own key.
  std::set<std::string> keys;
  for (const auto& c : ex.cells) keys.insert(c.key);
  CHECK(keys.size() == 6);
}

TEST_CASE("a dotted axis overrides one nested value and keeps its siblings", "[grid]") {
  TempDir dir;
  auto ex = load(dir, tiny_experiment("g", 8, 4, "[grid]\n\"model.backbone.config.num_hidden_layers\" = [1, 2]\n"));
  REQUIRE(ex.cells.size() == 2);
  const auto& cfg = ex.cells[1].resolved["model"]["backbone"]["config"];
  CHECK(cfg["num_hidden_layers"] == 2);
  CHECK(cfg["hidden_size"] == 16);  // from the base file
  CHECK(cfg["ffn_dim"] == 32);
  // Plugin defaults are resolved into the configuration that is hashed and stored.
  CHECK(cfg["activation_function"] == "relu");
  CHECK(ex.cells[0].resolved["train"]["grad_accum"] == 1);
}

TEST_CASE("table values in a grid address plugin options", "[grid]") {
  TempDir dir;
  auto ex = load(dir, tiny_experiment("g", 8, 4,
                                      "[grid]\nstrategy = [[\"projector\", { plugin = \"lora\", r = 4 }]]\n"));
  REQUIRE(ex.cells.size() == 1);
  CHECK(ex.cells[0].label == "strategy=projector+lora(r=4)");
  CHECK(ex.cells[0].resolved["strategy"][1]["r"] == 4);
  CHECK(ex.cells[0].resolved["strategy"][1]["alpha"] == 8.0);  // PEFT's default, resolved
}

TEST_CASE("cell keys: equal configurations agree, changed values differ, bookkeeping is ignored", "[grid]") {
  TempDir a, b, c, d;
  auto key = [](const TempDir& dir, const std::string& text) {
    auto ex = load(dir, text);
    compute_keys(ex);
    return ex.cells[0].key;
  };
  const auto base = key(a, tiny_experiment("k"));
  CHECK(base.size() == 64);
  CHECK(key(b, tiny_experiment("k")) == base);
  // A different name or log interval does not change what is computed.
  std::string renamed = tiny_experiment("another-name");
  CHECK(key(c, renamed) == base);
  std::string relog = tiny_experiment("k");
  relog.replace(relog.find("log_every = 2"), 13, "log_every = 7");
  CHECK(key(d, relog) == base);
  // An explicit default is the same configuration as the default itself.
  TempDir e, f, g;
  std::string explicit_default = tiny_experiment("k");
  explicit_default.replace(explicit_default.find("batch_size = 4"), 14, "batch_size = 4\ngrad_accum = 1");
  CHECK(key(e, explicit_default) == base);
  // A value that changes the computation does.
  std::string lr = tiny_experiment("k");
  lr.replace(lr.find("lr = 1e-3"), 9, "lr = 2e-3");
  CHECK(key(f, lr) != base);
  std::string seed = tiny_experiment("k");
  seed.replace(seed.find("seed = 3"), 8, "seed = 4");
  CHECK(key(g, seed) != base);
  // tf32 came after runs were recorded: at its default it leaves the key as it was; on, it is a new cell.
  TempDir h, i;
  std::string tf32 = tiny_experiment("k");
  tf32.replace(tf32.find("batch_size = 4"), 14, "batch_size = 4\ntf32 = false");
  CHECK(key(h, tf32) == base);
  tf32.replace(tf32.find("tf32 = false"), 12, "tf32 = true");
  CHECK(key(i, tf32) != base);
}

TEST_CASE("cell keys follow the contents of the weights folders they read", "[grid]") {
  TempDir dir;
  write_file(dir / "w" / "config.json", "{\"hidden_size\": 16}");
  sdk::write_safetensors(dir / "w" / "model.safetensors", {{"a", torch::zeros({2})}});
  std::string text = tiny_experiment("k");
  const auto from = text.find("encoder = {");
  text.replace(from, text.find('\n', from) - from, "encoder = { plugin = \"clip_vit\", weights = \"w\" }");
  auto first = load(dir, text);
  compute_keys(first);
  sdk::write_safetensors(dir / "w" / "model.safetensors", {{"a", torch::ones({2})}});
  auto second = load(dir, text);
  compute_keys(second);
  CHECK(first.cells[0].key != second.cells[0].key);
  write_file(dir / "w" / "config.json", "{\"hidden_size\": ");
  auto malformed = load(dir, text);
  CHECK_THROWS_WITH(compute_keys(malformed), Catch::Contains("config.json: malformed JSON"));
  std::filesystem::remove_all(dir / "w");
  auto missing = load(dir, text);
  CHECK_THROWS_WITH(compute_keys(missing), Catch::Contains("model.encoder.weights: no "));
}

TEST_CASE("unknown keys fail with file, line and key", "[grid][errors]") {
  TempDir dir;
  std::string text = tiny_experiment("e");
  text.replace(text.find("lr = 1e-3"), 9, "lr = 1e-3\nlearning_rate = 1");
  const auto msg = error_of(dir, text);
  CHECK_THAT(msg, Catch::StartsWith((dir / "x.toml").string() + ":"));
  CHECK_THAT(msg, Catch::EndsWith("train.learning_rate: unknown key"));
  // The line is the key's own.
  const auto line = std::count(text.begin(), text.begin() + static_cast<std::ptrdiff_t>(text.find("learning_rate")), '\n') + 1;
  CHECK_THAT(msg, Catch::Contains(":" + std::to_string(line) + ":"));

  // Inside a plugin's options and its nested config.
  std::string plugin = tiny_experiment("e");
  plugin.replace(plugin.find("ffn_dim = 32"), 12, "ffn_dim = 32, ffn_size = 3");
  CHECK_THAT(error_of(dir, plugin), Catch::EndsWith("model.backbone.config.ffn_size: unknown key"));
  // A grid axis that addresses a key nobody reads names the grid's line.
  const auto grid = error_of(dir, tiny_experiment("e", 8, 4, "[grid]\n\"train.warmup\" = [1, 2]\n"));
  CHECK_THAT(grid, Catch::EndsWith("train.warmup: unknown key"));
  CHECK_THAT(grid, Catch::Contains("x.toml:"));
}

TEST_CASE("bad values fail with file, line and key", "[grid][errors]") {
  TempDir dir;
  auto with = [&](const std::string& from, const std::string& to) {
    std::string t = tiny_experiment("e");
    t.replace(t.find(from), from.size(), to);
    return error_of(dir, t);
  };
  CHECK_THAT(with("steps = 8", "steps = -1"), Catch::EndsWith("train.steps: must be from 1 to 1000000000"));
  CHECK_THAT(with("lr = 1e-3", "lr = \"fast\""), Catch::EndsWith("train.lr: expected a number, got a string"));
  CHECK_THAT(with("plugin = \"git\"", "plugin = \"gti\""), Catch::Contains("no projector plugin 'gti'"));
  CHECK_THAT(with("layout = \"prefix\"", "layout = \"sideways\""), Catch::Contains("model.layout"));
  CHECK_THAT(with("strategy = [\"full\"]", ""), Catch::Contains("strategy: missing"));
  CHECK_THAT(with("[train]", "[train\n"), Catch::StartsWith((dir / "x.toml").string() + ":"));
  const auto lora = with("strategy = [\"full\"]", "strategy = [{ plugin = \"lora\", r = 0 }]");
  CHECK_THAT(lora, Catch::EndsWith("strategy[0].r: must be positive"));
}

TEST_CASE("a grid of several cells cannot export to one folder", "[grid][errors]") {
  TempDir dir;
  const auto msg = error_of(dir, tiny_experiment("e", 8, 4,
                                                 "[export]\nbackbone = \"out\"\n[grid]\n\"train.lr\" = [1e-3, 2e-3]\n"));
  CHECK_THAT(msg, Catch::Contains("export: a grid of several cells"));
}

namespace {
const char* kStages = R"(
[[stages]]
name = "align"
strategy = ["projector"]
train = { steps = 6, lr = 2e-3 }

[[stages]]
name = "tune"
strategy = ["projector", "head"]
data.train = { plugin = "shapes", split = "train", size = 32, image_size = 16, tasks = ["color"] }
train = { steps = 4 }
)";
}  // namespace

TEST_CASE("stages: each merges over the file's tables, a cell is its last stage with the earlier ones before it", "[grid][stages]") {
  TempDir dir;
  auto ex = load(dir, tiny_experiment("s", 8, 4, kStages));
  compute_keys(ex);
  REQUIRE(ex.cells.size() == 1);
  const auto& cell = ex.cells[0];
  REQUIRE(cell.before.size() == 1);
  const auto& align = cell.before[0];
  CHECK(align.stage_name == "align");
  CHECK(align.stage_index == 0);
  CHECK(cell.stage_name == "tune");
  CHECK(cell.stage_index == 1);
  CHECK(cell.stage_count == 2);
  // A stage's strategy replaces the file's; its train table merges key by key over [train].
  REQUIRE(align.strategies.size() == 1);
  CHECK(align.strategies[0].id == "projector");
  CHECK(align.train.steps == 6);
  CHECK(align.train.lr == Approx(2e-3));
  CHECK(cell.train.steps == 4);
  CHECK(cell.train.lr == Approx(1e-3));       // [train]'s, not the previous stage's
  CHECK(cell.train.batch_size == 4);          // [train]'s
  CHECK(cell.strategies.size() == 2);
  CHECK(cell.config["data"]["train"]["tasks"] == sdk::Json::array({"color"}));
  CHECK(align.config["data"]["train"]["size"] == 64);  // the file's [data]
}

TEST_CASE("stages: keys chain, so a shared prefix has one key and a changed stage changes its successors only", "[grid][stages]") {
  TempDir dir;
  auto ex = load(dir, tiny_experiment("s", 8, 4, std::string(kStages) + "[grid]\n\"stages.tune.train.lr\" = [1e-3, 3e-3]\n"));
  compute_keys(ex);
  REQUIRE(ex.cells.size() == 2);
  CHECK(ex.cells[0].before[0].key == ex.cells[1].before[0].key);  // stage 1 shared
  CHECK(ex.cells[0].key != ex.cells[1].key);
  CHECK(ex.cells[1].train.lr == Approx(3e-3));
  CHECK(ex.cells[0].before[0].label == "stage 1/2 align");  // the axis does not reach stage 1
  CHECK(ex.cells[1].label == "stages.tune.train.lr=0.003");

  // By index, on the first stage: nothing is shared, and the second stage's key follows the first's.
  auto by_index = load(dir, tiny_experiment("s", 8, 4, std::string(kStages) + "[grid]\n\"stages.0.train.lr\" = [1e-3, 3e-3]\n"));
  compute_keys(by_index);
  CHECK(by_index.cells[0].before[0].key != by_index.cells[1].before[0].key);
  CHECK(by_index.cells[0].key != by_index.cells[1].key);
  CHECK(by_index.cells[1].before[0].train.lr == Approx(3e-3));
  CHECK(by_index.cells[1].train.lr == Approx(1e-3));
  // The same stage 1 in another file (bookkeeping changed) has the same key.
  std::string other = std::string(kStages) + "[grid]\n\"stages.tune.train.lr\" = [1e-3, 3e-3]\n";
  auto renamed = load(dir, tiny_experiment("s", 8, 4, other).replace(tiny_experiment("s", 8, 4, other).find("log_every = 2"), 13, "log_every = 1"));
  compute_keys(renamed);
  CHECK(renamed.cells[0].before[0].key == ex.cells[0].before[0].key);
}

TEST_CASE("stages: what a stage may not set, duplicate names and unknown stages are errors with their line", "[grid][stages][errors]") {
  TempDir dir;
  CHECK_THAT(error_of(dir, tiny_experiment("s", 8, 4, "[[stages]]\nname = \"a\"\nmodel = { layout = \"prefix\" }\n")),
             Catch::Contains("the model and export belong to the whole cell"));
  CHECK_THAT(error_of(dir, tiny_experiment("s", 8, 4, "[[stages]]\nname = \"a\"\n[[stages]]\nname = \"a\"\n")),
             Catch::Contains("two stages are called 'a'"));
  const auto unknown = error_of(dir, tiny_experiment("s", 8, 4, std::string(kStages) + "[grid]\n\"stages.finetune.train.lr\" = [1e-3]\n"));
  CHECK_THAT(unknown, Catch::Contains("x.toml:"));
  CHECK_THAT(unknown, Catch::Contains("finetune"));
  CHECK_THAT(error_of(dir, tiny_experiment("s", 8, 4, "[[stages]]\nname = \"a\"\ntrain = { stepz = 3 }\n")),
             Catch::EndsWith("stepz: unknown key"));
}
