// A full tiny run through the runner's run command: a two-cell grid trained, evaluated, checkpointed and
// recorded; re-running skips it; a changed value runs one new cell.

#include <catch2/catch.hpp>

#include "cli/commands.hpp"
#include "helpers.hpp"
#include "store/store.hpp"

using namespace ablate;
using ablate::test::TempDir;
using ablate::test::tiny_experiment;
using ablate::test::write_file;

namespace {

int run(const TempDir& dir, const std::filesystem::path& toml) {
  cli::Common common;
  common.executable = std::filesystem::read_symlink("/proc/self/exe");
  common.db = dir / "results" / "results.db";
  cli::RunArgs args;
  args.experiments = {toml};
  args.device = "cpu";
  return cli::run(common, args);
}

}  // namespace

TEST_CASE("a tiny grid runs end to end and records everything", "[run]") {
  TempDir dir;
  const auto toml = write_file(dir / "tiny.toml",
                               tiny_experiment("tiny", 8, 4, "[grid]\nstrategy = [[\"full\"], [\"projector\", \"head\"]]\n"));
  REQUIRE(run(dir, toml) == 0);

  store::Store db(dir / "results" / "results.db");
  const auto id = db.experiment_id("tiny");
  REQUIRE(id);
  const auto runs = db.runs(*id);
  REQUIRE(runs.size() == 2);
  for (const auto& r : runs) {
    CHECK(r.status == store::Status::done);
    CHECK(r.image_tokens == 5);  // (16 / 8)^2 patches + CLS
    const auto train = db.steps(r.id, "train");
    REQUIRE(train.size() == 8);
    for (std::size_t i = 0; i < train.size(); ++i) {
      CHECK(train[i].step == static_cast<std::int64_t>(i + 1));
      CHECK(train[i].loss_tokens > 0);
      CHECK(train[i].lr.has_value());
    }
    const auto evals = db.steps(r.id, "eval");
    REQUIRE(evals.size() == 3);  // steps 0, 4, 8
    CHECK(evals.front().step == 0);
    CHECK(evals.back().step == 8);
    CHECK(db.metrics_at(r.id, 8).size() == 2);
    const auto samples = db.samples(r.id, 8);
    REQUIRE(samples.size() == 3);
    CHECK_FALSE(samples[0].image_sha256.empty());
    CHECK(db.image(samples[0].image_sha256)->format == "png");
    CHECK(samples[0].scores.contains("exact_match"));
    const auto ck = db.checkpoints(r.id);
    REQUIRE(ck.size() == 2);  // steps 4 and 8 (keep_checkpoints = 2)
    CHECK(std::filesystem::exists(std::filesystem::path(ck.back().path) / "trainable.safetensors"));
    CHECK_FALSE(db.trainables(r.id).empty());
  }
  // What trains differs between the two cells, and is recorded per module.
  auto trainable = [&](std::int64_t run_id) {
    std::int64_t n = 0;
    for (const auto& t : db.trainables(run_id)) n += t.trainable;
    return n;
  };
  CHECK(trainable(runs[0].id) > trainable(runs[1].id));
  bool head_full = false;
  for (const auto& t : db.trainables(runs[1].id)) {
    if (t.module == "backbone.lm_head") head_full = t.mode == "full";
    if (t.module.rfind("encoder.", 0) == 0) CHECK(t.mode == "frozen");
  }
  CHECK(head_full);

  // Again: nothing to do, nothing added.
  auto count_steps = [&] {
    auto st = db.db().prepare("SELECT count(*) FROM steps");
    st.step();
    return st.int64(0);
  };
  const auto before = count_steps();
  REQUIRE(run(dir, toml) == 0);
  CHECK(count_steps() == before);

  // A changed learning rate is a new cell; the old runs stay, the unchanged cell is skipped.
  write_file(toml, tiny_experiment("tiny", 8, 4, "[grid]\nstrategy = [[\"full\"], [\"projector\", \"head\"]]\n"
                                                 "\"train.lr\" = [1e-3, 5e-4]\n"));
  REQUIRE(run(dir, toml) == 0);
  CHECK(db.runs(*id).size() == 4);
  CHECK(db.experiment_cells(*id).size() == 4);

  cli::Common common;
  common.db = dir / "results" / "results.db";
  cli::CompareArgs cmp;
  cmp.experiment = "tiny";
  cmp.groups = true;
  CHECK(cli::compare(common, cmp) == 0);
  cli::ReplayArgs rep;
  rep.runs = {runs[0].id};
  rep.step = 8;
  rep.images = dir / "images";
  CHECK(cli::replay(common, rep) == 0);
  CHECK(std::filesystem::exists(dir / "images" / (db.samples(runs[0].id, 8)[0].image_sha256 + ".png")));
}

TEST_CASE("the same seed gives the same losses, bit for bit, on the CPU", "[run]") {
  TempDir a, b;
  REQUIRE(run(a, write_file(a / "t.toml", tiny_experiment("same", 6, 3))) == 0);
  REQUIRE(run(b, write_file(b / "t.toml", tiny_experiment("same", 6, 3))) == 0);
  store::Store da(a / "results" / "results.db"), dbb(b / "results" / "results.db");
  const auto ra = da.runs(*da.experiment_id("same")).at(0).id, rb = dbb.runs(*dbb.experiment_id("same")).at(0).id;
  const auto la = da.steps(ra, "train"), lb = dbb.steps(rb, "train");
  REQUIRE(la.size() == lb.size());
  for (std::size_t i = 0; i < la.size(); ++i) CHECK(la[i].loss == lb[i].loss);
}

TEST_CASE("the prefix, inline and prefix_lm layouts train and generate", "[run]") {
  TempDir dir;
  const auto toml = write_file(dir / "layouts.toml",
                               tiny_experiment("layouts", 6, 3, "[grid]\n\"model.layout\" = [\"prefix\", \"inline\", \"prefix_lm\"]\n"));
  REQUIRE(run(dir, toml) == 0);
  store::Store db(dir / "results" / "results.db");
  const auto runs = db.runs(*db.experiment_id("layouts"));
  REQUIRE(runs.size() == 3);
  std::set<double> first_losses;
  for (const auto& r : runs) {
    CHECK(r.status == store::Status::done);
    CHECK(db.steps(r.id, "train").size() == 6);
    CHECK(db.samples(r.id, 6).size() == 3);
    first_losses.insert(db.steps(r.id, "train").front().loss);
  }
  // The layouts compute different things from the same weights and batches.
  CHECK(first_losses.size() == 3);
}
