// The plugin host with negative fixture plugins: wrong ABI, missing entry point, throwing register and
// throwing forward; and library lifetime.

#include <catch2/catch.hpp>

#include <sstream>

#include <torch/torch.h>

#include "ablate/sdk/error.hpp"
#include "helpers.hpp"

using namespace ablate;
using ablate::test::builtin_plugins;
using ablate::test::fixture_plugin;

namespace {

std::filesystem::path library_in(const std::string& fixture) {
  for (const auto& e : std::filesystem::directory_iterator(fixture_plugin(fixture))) {
    if (e.path().extension() == ".so") return e.path();
  }
  FAIL("no library in " << fixture_plugin(fixture));
  return {};
}

}  // namespace

TEST_CASE("discovery registers every built-in plugin with kind, id, version and file", "[host]") {
  const auto plugins = builtin_plugins().list();
  std::set<std::string> ids;
  for (const auto& p : plugins) {
    ids.insert(p.qualified());
    CHECK(p.version >= 1);
    CHECK(std::filesystem::exists(p.file));
  }
  for (const char* id : {"encoder/clip_vit", "projector/linear", "projector/git", "projector/mlp2x_gelu", "backbone/opt",
                         "strategy/full", "strategy/head", "strategy/projector", "strategy/encoder", "strategy/lora",
                         "encoder/siglip", "backbone/llama", "backbone/gpt2", "dataset/shapes", "dataset/llava_json",
                         "dataset/m3it", "dataset/vqa", "dataset/coco_captions", "metric/exact_match", "metric/rouge_l",
                         "metric/bleu", "metric/cider", "metric/vqa_accuracy"}) {
    CHECK(ids.count(id) == 1);
  }
}

TEST_CASE("a plugin with another SDK ABI is skipped before any of its code runs", "[host][errors]") {
  PluginHost host;
  std::ostringstream log;
  CHECK_FALSE(host.load(library_in("bad_abi"), log));
  CHECK_THAT(log.str(), Catch::Contains("ABI mismatch in sdk_abi: plugin " + std::to_string(ablate::sdk::kSdkAbiVersion + 998) + ", runner " + std::to_string(ablate::sdk::kSdkAbiVersion) + ""));
  CHECK(host.find(sdk::Kind::metric, "must_not_load") == nullptr);
}

TEST_CASE("a plugin built against another libtorch is skipped, naming torch_version", "[host][errors]") {
  PluginHost host;
  std::ostringstream log;
  CHECK_FALSE(host.load(library_in("bad_torch"), log));
  CHECK_THAT(log.str(), Catch::Contains("ABI mismatch in torch_version: plugin 1.13.0, runner " TORCH_VERSION));
}

TEST_CASE("abi_mismatch compares every field of the record", "[host]") {
  sdk::AbiRecord r = ABLATE_ABI_RECORD_VALUE;
  CHECK(abi_mismatch(r).empty());
  auto changed = r;
  changed.cxx11_abi = 1 - r.cxx11_abi;
  CHECK_THAT(abi_mismatch(changed), Catch::StartsWith("cxx11_abi"));
  changed = r;
  std::snprintf(changed.compiler, sizeof changed.compiler, "clang 99");
  CHECK_THAT(abi_mismatch(changed), Catch::StartsWith("compiler"));
  changed = r;
  changed.magic = 7;
  CHECK_THAT(abi_mismatch(changed), Catch::StartsWith("magic"));
}

TEST_CASE("a library without the entry point is skipped", "[host][errors]") {
  PluginHost host;
  std::ostringstream log;
  CHECK_FALSE(host.load(library_in("no_entry"), log));
  CHECK_THAT(log.str(), Catch::Contains("not an ablate plugin"));
}

TEST_CASE("a register function that throws registers nothing", "[host][errors]") {
  PluginHost host;
  std::ostringstream log;
  CHECK_FALSE(host.load(library_in("throws_register"), log));
  CHECK_THAT(log.str(), Catch::Contains("its register function threw: boom in register"));
  CHECK(host.find(sdk::Kind::metric, "half_registered") == nullptr);
}

TEST_CASE("discovery reports and skips bad files and keeps the good ones", "[host][errors]") {
  PluginHost host;
  std::ostringstream log;
  std::vector<std::filesystem::path> dirs;
  for (const char* f : {"bad_abi", "no_entry", "throws_register", "throws_forward"}) dirs.push_back(fixture_plugin(f));
  CHECK_NOTHROW(host.discover(dirs, log));
  CHECK(host.find(sdk::Kind::projector, "explode") != nullptr);
  CHECK(host.list().size() == 2);  // explode, explode_construct
  const auto text = log.str();
  CHECK(std::count(text.begin(), text.end(), '\n') == 3);  // one line per skipped file
}

TEST_CASE("exceptions from plugin code name the plugin and the stage", "[host][errors]") {
  PluginHost host;
  std::ostringstream log;
  REQUIRE(host.load(library_in("throws_forward"), log));
  sdk::Json table = sdk::Json::object();
  sdk::Options o(table, "", "model.projector", nullptr);
  sdk::BuildContext ctx;
  ctx.in_features = 4;
  ctx.out_features = 4;
  auto projector = host.create_projector("explode", o, ctx);
  CHECK_THROWS_AS(guarded("projector/explode", "forward", [&] { return projector->project(torch::zeros({1, 2, 4})); }),
                  PluginError);
  CHECK_THROWS_WITH(guarded("projector/explode", "forward", [&] { return projector->project(torch::zeros({1, 2, 4})); }),
                    "projector/explode: forward: boom in forward");
  CHECK_THROWS_WITH(host.create_projector("explode_construct", o, ctx),
                    "projector/explode_construct: construct: boom in construct");
}

TEST_CASE("objects a plugin made keep its library loaded after the host is gone", "[host]") {
  std::shared_ptr<sdk::Projector> projector;
  {
    PluginHost host;
    std::ostringstream log;
    host.discover({ABLATE_BUILTIN_PLUGIN_DIR}, log);
    sdk::Json table = sdk::Json::object();
    sdk::Options o(table, "", "model.projector", nullptr);
    sdk::BuildContext ctx;
    ctx.in_features = 3;
    ctx.out_features = 5;
    projector = host.create_projector("mlp2x_gelu", o, ctx);
  }
  // The host, its registry and its handles to the libraries are gone; the object's code must still be there.
  auto out = projector->project(torch::ones({2, 4, 3}));
  CHECK(out.sizes() == torch::IntArrayRef({2, 4, 5}));
  projector.reset();  // unloads the library last
}

TEST_CASE("unknown plugin ids list the known ones", "[host][errors]") {
  CHECK_THROWS_WITH(builtin_plugins().require(sdk::Kind::projector, "nope", "x.toml:3"),
                    Catch::Contains("no projector plugin 'nope' (found: git, linear, mlp2x_gelu)"));
}
