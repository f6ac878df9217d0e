// The results database: schema, versions, RAII transactions, and what runs record.

#include <catch2/catch.hpp>

#include <sqlite3.h>

#include "ablate/sdk/error.hpp"
#include "helpers.hpp"
#include "store/store.hpp"

using namespace ablate;
using ablate::test::TempDir;

namespace {

store::NewRun new_run(std::int64_t experiment, const std::string& key) {
  store::NewRun r;
  r.experiment_id = experiment;
  r.cell_key = key;
  r.label = "strategy=full";
  r.axes = {{"strategy", "full"}};
  r.config = {{"train", {{"lr", 0.001}}}};
  r.plugins = {{"model.encoder", "encoder/clip_vit@1"}};
  r.seed = 1;
  r.steps_total = 10;
  return r;
}

store::StepRow train_step(std::int64_t step, double loss) {
  store::StepRow r;
  r.step = step;
  r.split = "train";
  r.loss = loss;
  r.lr = 1e-3;
  r.grad_norm = 0.5;
  r.tokens = 100;
  r.loss_tokens = 20;
  r.elapsed_s = 0.1 * static_cast<double>(step);
  return r;
}

}  // namespace

TEST_CASE("a new database has the schema, WAL mode, application_id and user_version", "[store]") {
  TempDir dir;
  store::Store db(dir / "r.db");
  auto pragma = [&](const char* p) {
    auto st = db.db().prepare(std::string("PRAGMA ") + p);
    st.step();
    return st.text(0);
  };
  CHECK(pragma("journal_mode") == "wal");
  CHECK(pragma("application_id") == std::to_string(store::kApplicationId));
  CHECK(pragma("user_version") == std::to_string(store::Store::schema_version()));
  CHECK(pragma("foreign_keys") == "1");
  // Opening it again migrates nothing and loses nothing.
  const auto id = db.upsert_experiment("e", "/x.toml", "toml", "sha", nlohmann::json::array(), nlohmann::json::array());
  store::Store again(dir / "r.db");
  CHECK(again.experiment_id("e") == id);
}

TEST_CASE("databases from a newer runner and foreign SQLite files are refused", "[store][errors]") {
  TempDir dir;
  { store::Store db(dir / "new.db"); }
  {
    sqlite3* raw = nullptr;
    sqlite3_open((dir / "new.db").c_str(), &raw);
    sqlite3_exec(raw, "PRAGMA user_version = 999", nullptr, nullptr, nullptr);
    sqlite3_close(raw);
  }
  CHECK_THROWS_WITH(store::Store(dir / "new.db"), Catch::Contains("schema version 999 is newer than this runner"));
  {
    sqlite3* raw = nullptr;
    sqlite3_open((dir / "other.db").c_str(), &raw);
    sqlite3_exec(raw, "CREATE TABLE t (x)", nullptr, nullptr, nullptr);
    sqlite3_close(raw);
  }
  CHECK_THROWS_WITH(store::Store(dir / "other.db"), Catch::Contains("not an ablate results database"));
  ablate::test::write_file(dir / "text.db", "this is not a database at all, just some text that is long enough");
  CHECK_THROWS_AS(store::Store(dir / "text.db"), sdk::InputError);
}

TEST_CASE("runs, steps, evaluations and checkpoints round-trip, and truncate_after drops later rows", "[store]") {
  TempDir dir;
  store::Store db(dir / "r.db");
  const auto exp = db.upsert_experiment("e", "/x.toml", "toml", "sha", nlohmann::json::array({"strategy"}),
                                        nlohmann::json::array({"k1"}));
  const auto run = db.create_run(new_run(exp, "k1"));
  REQUIRE(db.find_run(exp, "k1")->id == run);
  CHECK(db.find_run(exp, "k1")->status == store::Status::pending);
  db.start_run(run, "cpu", "host", "rev", 17);
  CHECK(db.run(run)->status == store::Status::running);
  CHECK(db.run(run)->image_tokens == 17);

  std::vector<store::StepRow> rows;
  for (int s = 1; s <= 6; ++s) rows.push_back(train_step(s, 1.0 / s));
  db.record_steps(run, rows);
  store::StepRow eval;
  eval.step = 4;
  eval.split = "eval";
  eval.loss = 0.7;
  store::SampleRow sample;
  sample.step = 4;
  sample.decoding = {{"max_new_tokens", 4}};
  sample.sample_id = "val-0";
  sample.prompt = "p";
  sample.output = "o";
  sample.references = {"o", "p"};
  sample.scores = {{"exact_match", 1.0}};
  sample.score = 1.0;
  db.record_eval(run, eval, {{"exact_match", 0.5}}, {sample}, {});
  db.record_checkpoint(run, {4, "main", "/ck/4", "abc"}, {});

  CHECK(db.steps(run, "train").size() == 6);
  CHECK(db.steps(run, "eval").front().loss == Approx(0.7));
  CHECK(db.metrics_at(run, 4).front().second == Approx(0.5));
  CHECK(db.samples(run, 4).front().references == std::vector<std::string>{"o", "p"});

  db.truncate_after(run, 3);
  CHECK(db.steps(run, "train").size() == 3);
  CHECK(db.steps(run, "eval").empty());
  CHECK(db.metrics_at(run, 4).empty());
  CHECK(db.sample_steps(run).empty());
  CHECK(db.checkpoints(run).empty());

  // A step row cannot be recorded twice.
  CHECK_THROWS(db.record_steps(run, {train_step(2, 0.1)}));
  CHECK(db.steps(run, "train").size() == 3);

  // Runs left running by a dead process become interrupted.
  CHECK(db.mark_stale_running(exp) == 1);
  CHECK(db.run(run)->status == store::Status::interrupted);
}

TEST_CASE("images are stored once by content hash", "[store]") {
  TempDir dir;
  store::Store db(dir / "r.db");
  const auto exp = db.upsert_experiment("e", "/x.toml", "t", "s", nlohmann::json::array(), nlohmann::json::array());
  const auto run = db.create_run(new_run(exp, "k"));
  store::ImageRow image{"hash1", "png", 2, 2, {1, 2, 3}};
  for (int step : {1, 2}) {
    store::StepRow eval;
    eval.step = step;
    eval.split = "eval";
    store::SampleRow s;
    s.step = step;
    s.decoding = nlohmann::json::object();
    s.sample_id = "a";
    s.image_sha256 = "hash1";
    db.record_eval(run, eval, {}, {s}, {image});
  }
  auto st = db.db().prepare("SELECT count(*) FROM images");
  st.step();
  CHECK(st.int64(0) == 1);
  CHECK(db.image("hash1")->bytes == std::vector<std::uint8_t>{1, 2, 3});
}

TEST_CASE("a transaction that is not committed leaves nothing behind", "[store]") {
  TempDir dir;
  store::Store db(dir / "r.db");
  const auto exp = db.upsert_experiment("e", "/x.toml", "t", "s", nlohmann::json::array(), nlohmann::json::array());
  try {
    store::Transaction tx(db.db());
    db.db().prepare("INSERT INTO runs (experiment_id, cell_key, cell_index, label, axes, config, plugins, status, seed, "
                    "steps_total, created_at, updated_at) VALUES (?1, 'k', 0, '', '{}', '{}', '{}', 'pending', 0, 1, '', '')")
        .bind(1, exp)
        .run();
    throw std::runtime_error("fails before commit");
  } catch (const std::runtime_error&) {
  }
  CHECK(db.runs(exp).empty());
}
