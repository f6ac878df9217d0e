#include "store/store.hpp"

#include <chrono>
#include <ctime>

#include "ablate/sdk/error.hpp"

namespace ablate::store {

namespace {

// Numbered migrations: migration i brings user_version from i to i + 1. Append, never edit.
const char* const kMigrations[] = {
    R"sql(
CREATE TABLE experiments (
  id          INTEGER PRIMARY KEY,
  name        TEXT NOT NULL UNIQUE,
  path        TEXT NOT NULL,
  toml        TEXT NOT NULL,
  toml_sha256 TEXT NOT NULL,
  axes        TEXT NOT NULL,            -- JSON array: the grid axes, in file order
  cells       TEXT NOT NULL,            -- JSON array: cell keys of the current grid, in order
  created_at  TEXT NOT NULL,
  updated_at  TEXT NOT NULL
);
CREATE TABLE runs (
  id              INTEGER PRIMARY KEY,
  experiment_id   INTEGER NOT NULL REFERENCES experiments(id),
  cell_key        TEXT NOT NULL,          -- SHA-256 of the resolved configuration
  cell_index      INTEGER NOT NULL,
  label           TEXT NOT NULL,
  axes            TEXT NOT NULL,          -- JSON object: axis -> value of this cell
  config          TEXT NOT NULL,          -- JSON: the resolved configuration that was hashed
  plugins         TEXT NOT NULL,          -- JSON object: role -> "kind/id@version"
  status          TEXT NOT NULL CHECK (status IN ('pending','running','done','failed','diverged','interrupted')),
  error           TEXT,
  seed            INTEGER NOT NULL,
  steps_total     INTEGER NOT NULL,
  image_tokens    INTEGER,                -- image tokens per sample fed to the backbone
  source_revision TEXT,
  host            TEXT,
  device          TEXT,
  created_at      TEXT NOT NULL,
  started_at      TEXT,
  finished_at     TEXT,
  updated_at      TEXT NOT NULL,
  UNIQUE (experiment_id, cell_key)
);
CREATE TABLE steps (
  run_id        INTEGER NOT NULL REFERENCES runs(id),
  step          INTEGER NOT NULL,
  split         TEXT NOT NULL CHECK (split IN ('train','eval')),
  loss          REAL NOT NULL,
  lr            REAL,
  grad_norm     REAL,
  tokens        INTEGER NOT NULL,         -- text tokens in the step's batches
  loss_tokens   INTEGER NOT NULL,         -- tokens that carried loss
  samples_per_s REAL,
  tokens_per_s  REAL,
  elapsed_s     REAL NOT NULL,            -- wall-clock seconds since the run (or its resumption) began
  PRIMARY KEY (run_id, step, split)
) WITHOUT ROWID;
CREATE TABLE metrics (
  run_id INTEGER NOT NULL REFERENCES runs(id),
  step   INTEGER NOT NULL,
  name   TEXT NOT NULL,
  value  REAL NOT NULL,
  PRIMARY KEY (run_id, step, name)
) WITHOUT ROWID;
CREATE TABLE images (
  sha256 TEXT PRIMARY KEY,                -- of the bytes
  format TEXT NOT NULL,
  width  INTEGER NOT NULL,
  height INTEGER NOT NULL,
  bytes  BLOB NOT NULL
);
CREATE TABLE samples (
  run_id       INTEGER NOT NULL REFERENCES runs(id),
  step         INTEGER NOT NULL,
  decoding     TEXT NOT NULL,             -- JSON: the generation settings
  sample_id    TEXT NOT NULL,
  prompt       TEXT NOT NULL,
  output       TEXT NOT NULL,
  refs         TEXT NOT NULL,             -- JSON array of references
  score        REAL,                      -- the first metric's score
  scores       TEXT NOT NULL,             -- JSON object: metric -> score
  image_sha256 TEXT REFERENCES images(sha256),
  PRIMARY KEY (run_id, step, decoding, sample_id)
);
CREATE TABLE checkpoints (
  run_id     INTEGER NOT NULL REFERENCES runs(id),
  step       INTEGER NOT NULL,
  stage      TEXT NOT NULL,
  path       TEXT NOT NULL,
  sha256     TEXT NOT NULL,               -- of the checkpoint's trainable.safetensors
  created_at TEXT NOT NULL,
  PRIMARY KEY (run_id, step, stage)
);
CREATE TABLE trainables (
  run_id    INTEGER NOT NULL REFERENCES runs(id),
  module    TEXT NOT NULL,
  mode      TEXT NOT NULL CHECK (mode IN ('full','lora','frozen','partial')),
  params    INTEGER NOT NULL,
  trainable INTEGER NOT NULL,
  PRIMARY KEY (run_id, module)
);
CREATE INDEX runs_by_experiment ON runs(experiment_id);
)sql",
    // 2: staged training (a cell's stages are runs chained by parent_run_id; cells that share a prefix of
    // stages share those runs) and each trainable module's optimizer settings.
    R"sql(
ALTER TABLE runs ADD COLUMN stage INTEGER NOT NULL DEFAULT 0;        -- 0-based index in [[stages]]
ALTER TABLE runs ADD COLUMN stages_total INTEGER NOT NULL DEFAULT 1;
ALTER TABLE runs ADD COLUMN stage_name TEXT;                          -- NULL without [[stages]]
ALTER TABLE runs ADD COLUMN parent_run_id INTEGER REFERENCES runs(id); -- the stage this one starts from
ALTER TABLE runs ADD COLUMN final_path TEXT;    -- the weights this stage changed (LoRA merged), for the next
ALTER TABLE runs ADD COLUMN final_sha256 TEXT;
ALTER TABLE trainables ADD COLUMN lr REAL;            -- the module's base learning rate (NULL if frozen)
ALTER TABLE trainables ADD COLUMN weight_decay REAL;
CREATE INDEX runs_by_parent ON runs(parent_run_id);
)sql",
    // 3: decoding sweeps and dataset reports.
    R"sql(
ALTER TABLE samples ADD COLUMN raw_output TEXT;  -- the generation before [eval] postprocess, if that changed it
ALTER TABLE runs ADD COLUMN data_report TEXT;    -- JSON: what the datasets reported when built (counts)
)sql",
    // 4: generation speed at each evaluation.
    R"sql(
ALTER TABLE steps ADD COLUMN gen_first_token_s REAL;  -- eval rows: mean seconds to the first new token, per batch
ALTER TABLE steps ADD COLUMN gen_tokens_per_s REAL;   -- eval rows: new tokens per second of generation (batches added up)
)sql",
};

constexpr int kSchemaVersion = static_cast<int>(sizeof(kMigrations) / sizeof(kMigrations[0]));

std::int64_t pragma_int(Database& db, const char* name) {
  auto st = db.prepare(std::string("PRAGMA ") + name);
  return st.step() ? st.int64(0) : 0;
}

RunRow read_run(Statement& st) {
  RunRow r;
  r.id = st.int64(0);
  r.experiment_id = st.int64(1);
  r.cell_key = st.text(2);
  r.cell_index = st.int64(3);
  r.label = st.text(4);
  r.axes = Json::parse(st.text(5));
  r.config = Json::parse(st.text(6));
  r.status = parse_status(st.text(7));
  r.error = st.text(8);
  r.seed = st.int64(9);
  r.steps_total = st.int64(10);
  r.device = st.text(11);
  r.image_tokens = st.maybe_int64(12);
  r.started_at = st.text(13);
  r.finished_at = st.text(14);
  r.experiment = st.text(15);
  r.stage = st.int64(16);
  r.stages_total = st.int64(17);
  r.stage_name = st.text(18);
  r.parent_run_id = st.maybe_int64(19);
  r.final_path = st.text(20);
  r.final_sha256 = st.text(21);
  return r;
}

constexpr const char* kRunColumns =
    "SELECT r.id, r.experiment_id, r.cell_key, r.cell_index, r.label, r.axes, r.config, r.status, r.error, r.seed, "
    "r.steps_total, r.device, r.image_tokens, r.started_at, r.finished_at, e.name, "
    "r.stage, r.stages_total, r.stage_name, r.parent_run_id, r.final_path, r.final_sha256 "
    "FROM runs r JOIN experiments e ON e.id = r.experiment_id ";

}  // namespace

const char* status_name(Status s) {
  switch (s) {
    case Status::pending: return "pending";
    case Status::running: return "running";
    case Status::done: return "done";
    case Status::failed: return "failed";
    case Status::diverged: return "diverged";
    case Status::interrupted: return "interrupted";
  }
  return "?";
}

Status parse_status(const std::string& s) {
  for (Status st : {Status::pending, Status::running, Status::done, Status::failed, Status::diverged, Status::interrupted}) {
    if (s == status_name(st)) return st;
  }
  throw SqlError("unknown run status '" + s + "' in the database");
}

std::string now_iso8601() {
  const auto t = std::chrono::system_clock::to_time_t(std::chrono::system_clock::now());
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

int Store::schema_version() { return kSchemaVersion; }

Store::Store(const std::filesystem::path& file, bool create) : db_(file, create) { migrate(); }

void Store::migrate() {
  const auto app = pragma_int(db_, "application_id");
  const auto version = pragma_int(db_, "user_version");
  const auto tables = [&] {
    auto st = db_.prepare("SELECT count(*) FROM sqlite_master");
    st.step();
    return st.int64(0);
  }();
  if (app != kApplicationId && !(app == 0 && tables == 0)) {
    throw sdk::InputError(db_.file().string() + ": not an ablate results database (application_id " +
                          std::to_string(app) + ")");
  }
  if (version > kSchemaVersion) {
    throw sdk::InputError(db_.file().string() + ": schema version " + std::to_string(version) +
                          " is newer than this runner knows (" + std::to_string(kSchemaVersion) + "); update the runner");
  }
  db_.use_wal();
  for (auto v = version; v < kSchemaVersion; ++v) {
    Transaction tx(db_);
    db_.exec(kMigrations[v]);
    db_.exec("PRAGMA application_id = " + std::to_string(kApplicationId));
    db_.exec("PRAGMA user_version = " + std::to_string(v + 1));
    tx.commit();
  }
}

std::int64_t Store::upsert_experiment(const std::string& name, const std::string& path, const std::string& toml,
                                      const std::string& toml_sha256, const Json& axes, const Json& cells) {
  const auto now = now_iso8601();
  Transaction tx(db_);
  db_.prepare(
         "INSERT INTO experiments (name, path, toml, toml_sha256, axes, cells, created_at, updated_at) "
         "VALUES (?1, ?2, ?3, ?4, ?5, ?7, ?6, ?6) "
         "ON CONFLICT(name) DO UPDATE SET path = ?2, toml = ?3, toml_sha256 = ?4, axes = ?5, cells = ?7, updated_at = ?6")
      .bind(1, name).bind(2, path).bind(3, toml).bind(4, toml_sha256).bind(5, axes.dump()).bind(6, now)
      .bind(7, cells.dump())
      .run();
  tx.commit();
  return *experiment_id(name);
}

std::optional<std::int64_t> Store::experiment_id(const std::string& name) {
  auto st = db_.prepare("SELECT id FROM experiments WHERE name = ?1");
  st.bind(1, name);
  if (!st.step()) return std::nullopt;
  return st.int64(0);
}

Json Store::experiment_axes(std::int64_t experiment_id) {
  auto st = db_.prepare("SELECT axes FROM experiments WHERE id = ?1");
  st.bind(1, experiment_id);
  return st.step() ? Json::parse(st.text(0)) : Json::array();
}

Json Store::experiment_cells(std::int64_t experiment_id) {
  auto st = db_.prepare("SELECT cells FROM experiments WHERE id = ?1");
  st.bind(1, experiment_id);
  return st.step() ? Json::parse(st.text(0)) : Json::array();
}

std::vector<std::string> Store::experiment_names() {
  auto st = db_.prepare("SELECT name FROM experiments ORDER BY name");
  std::vector<std::string> out;
  while (st.step()) out.push_back(st.text(0));
  return out;
}

std::optional<RunRow> Store::find_run(std::int64_t experiment_id, const std::string& cell_key) {
  auto st = db_.prepare(std::string(kRunColumns) + "WHERE r.experiment_id = ?1 AND r.cell_key = ?2");
  st.bind(1, experiment_id).bind(2, cell_key);
  if (!st.step()) return std::nullopt;
  return read_run(st);
}

std::optional<RunRow> Store::run(std::int64_t run_id) {
  auto st = db_.prepare(std::string(kRunColumns) + "WHERE r.id = ?1");
  st.bind(1, run_id);
  if (!st.step()) return std::nullopt;
  return read_run(st);
}

std::vector<RunRow> Store::runs(std::int64_t experiment_id) {
  auto st = db_.prepare(std::string(kRunColumns) + "WHERE r.experiment_id = ?1 ORDER BY r.cell_index, r.id");
  st.bind(1, experiment_id);
  std::vector<RunRow> out;
  while (st.step()) out.push_back(read_run(st));
  return out;
}

std::int64_t Store::create_run(const NewRun& r) {
  const auto now = now_iso8601();
  Transaction tx(db_);
  db_.prepare(
         "INSERT INTO runs (experiment_id, cell_key, cell_index, label, axes, config, plugins, status, seed, steps_total, "
         "created_at, updated_at, stage, stages_total, stage_name, parent_run_id) "
         "VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'pending', ?8, ?9, ?10, ?10, ?11, ?12, ?13, ?14)")
      .bind(1, r.experiment_id).bind(2, r.cell_key).bind(3, r.cell_index).bind(4, r.label).bind(5, r.axes.dump())
      .bind(6, r.config.dump()).bind(7, r.plugins.dump()).bind(8, r.seed).bind(9, r.steps_total).bind(10, now)
      .bind(11, r.stage).bind(12, r.stages_total)
      .bind(13, r.stage_name.empty() ? std::optional<std::string>() : r.stage_name).bind(14, r.parent_run_id)
      .run();
  const auto id = db_.last_insert_id();
  tx.commit();
  return id;
}

std::int64_t Store::mark_stale_running(std::int64_t experiment_id) {
  Transaction tx(db_);
  db_.prepare("UPDATE runs SET status = 'interrupted', updated_at = ?2 WHERE experiment_id = ?1 AND status = 'running'")
      .bind(1, experiment_id).bind(2, now_iso8601())
      .run();
  const auto n = db_.changes();
  tx.commit();
  return n;
}

void Store::set_status(std::int64_t run_id, Status status, const std::string& error) {
  const auto now = now_iso8601();
  const bool finished = status == Status::done || status == Status::failed || status == Status::diverged;
  Transaction tx(db_);
  db_.prepare("UPDATE runs SET status = ?2, error = ?3, updated_at = ?4, finished_at = CASE WHEN ?5 THEN ?4 ELSE finished_at END "
              "WHERE id = ?1")
      .bind(1, run_id).bind(2, status_name(status)).bind(3, error.empty() ? std::optional<std::string>() : error)
      .bind(4, now).bind(5, finished ? 1 : 0)
      .run();
  tx.commit();
}

void Store::start_run(std::int64_t run_id, const std::string& device, const std::string& host, const std::string& revision,
                      std::int64_t image_tokens) {
  const auto now = now_iso8601();
  Transaction tx(db_);
  db_.prepare(
         "UPDATE runs SET status = 'running', error = NULL, device = ?2, host = ?3, source_revision = ?4, "
         "image_tokens = ?5, started_at = COALESCE(started_at, ?6), finished_at = NULL, updated_at = ?6 WHERE id = ?1")
      .bind(1, run_id).bind(2, device).bind(3, host).bind(4, revision).bind(5, image_tokens).bind(6, now)
      .run();
  tx.commit();
}

void Store::set_final(std::int64_t run_id, const std::string& path, const std::string& sha256) {
  Transaction tx(db_);
  db_.prepare("UPDATE runs SET final_path = ?2, final_sha256 = ?3, updated_at = ?4 WHERE id = ?1")
      .bind(1, run_id).bind(2, path).bind(3, sha256).bind(4, now_iso8601())
      .run();
  tx.commit();
}

void Store::set_data_report(std::int64_t run_id, const Json& report) {
  Transaction tx(db_);
  db_.prepare("UPDATE runs SET data_report = ?2, updated_at = ?3 WHERE id = ?1").bind(1, run_id).bind(2, report.dump()).bind(3, now_iso8601()).run();
  tx.commit();
}

void Store::update_cell(std::int64_t run_id, std::int64_t cell_index, const std::string& label, const Json& axes) {
  Transaction tx(db_);
  db_.prepare("UPDATE runs SET cell_index = ?2, label = ?3, axes = ?4 WHERE id = ?1")
      .bind(1, run_id).bind(2, cell_index).bind(3, label).bind(4, axes.dump())
      .run();
  tx.commit();
}

namespace {
void insert_step(Database& db, std::int64_t run_id, const StepRow& s) {
  db.prepare(
        "INSERT INTO steps (run_id, step, split, loss, lr, grad_norm, tokens, loss_tokens, samples_per_s, tokens_per_s, "
        "elapsed_s, gen_first_token_s, gen_tokens_per_s) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)")
      .bind(1, run_id).bind(2, s.step).bind(3, s.split).bind(4, s.loss).bind(5, s.lr).bind(6, s.grad_norm)
      .bind(7, s.tokens).bind(8, s.loss_tokens).bind(9, s.samples_per_s).bind(10, s.tokens_per_s).bind(11, s.elapsed_s)
      .bind(12, s.gen_first_token_s).bind(13, s.gen_tokens_per_s)
      .run();
}
}  // namespace

void Store::record_steps(std::int64_t run_id, const std::vector<StepRow>& rows) {
  if (rows.empty()) return;
  Transaction tx(db_);
  for (const auto& r : rows) insert_step(db_, run_id, r);
  db_.prepare("UPDATE runs SET updated_at = ?2 WHERE id = ?1").bind(1, run_id).bind(2, now_iso8601()).run();
  tx.commit();
}

void Store::record_eval(std::int64_t run_id, const StepRow& loss_row,
                        const std::vector<std::pair<std::string, double>>& metrics, const std::vector<SampleRow>& samples,
                        const std::vector<ImageRow>& images) {
  Transaction tx(db_);
  insert_step(db_, run_id, loss_row);
  insert_scores(run_id, loss_row.step, metrics, samples, images);
  tx.commit();
}

void Store::record_scores(std::int64_t run_id, std::int64_t step, const std::vector<std::pair<std::string, double>>& metrics,
                          const std::vector<SampleRow>& samples, const std::vector<ImageRow>& images) {
  Transaction tx(db_);
  insert_scores(run_id, step, metrics, samples, images);
  tx.commit();
}

void Store::insert_scores(std::int64_t run_id, std::int64_t step, const std::vector<std::pair<std::string, double>>& metrics,
                          const std::vector<SampleRow>& samples, const std::vector<ImageRow>& images) {
  auto metric = db_.prepare("INSERT INTO metrics (run_id, step, name, value) VALUES (?1, ?2, ?3, ?4)");
  for (const auto& [name, value] : metrics) {
    metric.bind(1, run_id).bind(2, step).bind(3, name).bind(4, value);
    metric.run();
    metric.reset();
  }
  // Images are stored once, by content hash; runs and steps that show the same image share the row.
  auto image = db_.prepare(
      "INSERT INTO images (sha256, format, width, height, bytes) VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT(sha256) DO NOTHING");
  for (const auto& im : images) {
    image.bind(1, im.sha256).bind(2, im.format).bind(3, im.width).bind(4, im.height).bind(5, im.bytes);
    image.run();
    image.reset();
  }
  auto sample = db_.prepare(
      "INSERT INTO samples (run_id, step, decoding, sample_id, prompt, output, refs, score, scores, image_sha256, raw_output) "
      "VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)");
  for (const auto& s : samples) {
    sample.bind(1, run_id).bind(2, s.step).bind(3, s.decoding.dump()).bind(4, s.sample_id).bind(5, s.prompt)
        .bind(6, s.output).bind(7, Json(s.references).dump()).bind(8, s.score).bind(9, s.scores.dump())
        .bind(10, s.image_sha256.empty() ? std::optional<std::string>() : s.image_sha256).bind(11, s.raw_output);
    sample.run();
    sample.reset();
  }
}

void Store::record_checkpoint(std::int64_t run_id, const CheckpointRow& row, const std::vector<std::string>& dropped_paths) {
  Transaction tx(db_);
  db_.prepare("INSERT OR REPLACE INTO checkpoints (run_id, step, stage, path, sha256, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)")
      .bind(1, run_id).bind(2, row.step).bind(3, row.stage).bind(4, row.path).bind(5, row.sha256).bind(6, now_iso8601())
      .run();
  for (const auto& p : dropped_paths) {
    db_.prepare("DELETE FROM checkpoints WHERE run_id = ?1 AND path = ?2").bind(1, run_id).bind(2, p).run();
  }
  tx.commit();
}

void Store::record_trainables(std::int64_t run_id, const std::vector<TrainableRow>& rows) {
  Transaction tx(db_);
  db_.prepare("DELETE FROM trainables WHERE run_id = ?1").bind(1, run_id).run();
  auto st = db_.prepare(
      "INSERT INTO trainables (run_id, module, mode, params, trainable, lr, weight_decay) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)");
  for (const auto& r : rows) {
    st.bind(1, run_id).bind(2, r.module).bind(3, r.mode).bind(4, r.params).bind(5, r.trainable).bind(6, r.lr).bind(7, r.weight_decay);
    st.run();
    st.reset();
  }
  tx.commit();
}

void Store::truncate_after(std::int64_t run_id, std::int64_t step) {
  Transaction tx(db_);
  for (const char* table : {"steps", "metrics", "samples", "checkpoints"}) {
    db_.prepare(std::string("DELETE FROM ") + table + " WHERE run_id = ?1 AND step > ?2").bind(1, run_id).bind(2, step).run();
  }
  tx.commit();
}

std::vector<StepRow> Store::steps(std::int64_t run_id, const std::string& split) {
  auto st = db_.prepare(
      "SELECT step, split, loss, lr, grad_norm, tokens, loss_tokens, samples_per_s, tokens_per_s, elapsed_s, "
      "gen_first_token_s, gen_tokens_per_s FROM steps WHERE run_id = ?1 AND split = ?2 ORDER BY step");
  st.bind(1, run_id).bind(2, split);
  std::vector<StepRow> out;
  while (st.step()) {
    StepRow r;
    r.step = st.int64(0);
    r.split = st.text(1);
    r.loss = st.real(2);
    r.lr = st.maybe_real(3);
    r.grad_norm = st.maybe_real(4);
    r.tokens = st.int64(5);
    r.loss_tokens = st.int64(6);
    r.samples_per_s = st.maybe_real(7);
    r.tokens_per_s = st.maybe_real(8);
    r.elapsed_s = st.real(9);
    r.gen_first_token_s = st.maybe_real(10);
    r.gen_tokens_per_s = st.maybe_real(11);
    out.push_back(r);
  }
  return out;
}

std::vector<std::pair<std::string, double>> Store::metrics_at(std::int64_t run_id, std::int64_t step) {
  auto st = db_.prepare("SELECT name, value FROM metrics WHERE run_id = ?1 AND step = ?2 ORDER BY name");
  st.bind(1, run_id).bind(2, step);
  std::vector<std::pair<std::string, double>> out;
  while (st.step()) out.emplace_back(st.text(0), st.real(1));
  return out;
}

std::vector<std::pair<std::int64_t, double>> Store::metric_history(std::int64_t run_id, const std::string& name) {
  auto st = db_.prepare("SELECT step, value FROM metrics WHERE run_id = ?1 AND name = ?2 ORDER BY step");
  st.bind(1, run_id).bind(2, name);
  std::vector<std::pair<std::int64_t, double>> out;
  while (st.step()) out.emplace_back(st.int64(0), st.real(1));
  return out;
}

std::optional<std::int64_t> Store::last_metrics_step(std::int64_t run_id) {
  auto st = db_.prepare("SELECT max(step) FROM metrics WHERE run_id = ?1");
  st.bind(1, run_id);
  st.step();
  return st.maybe_int64(0);
}

std::vector<CheckpointRow> Store::checkpoints(std::int64_t run_id) {
  auto st = db_.prepare("SELECT step, stage, path, sha256 FROM checkpoints WHERE run_id = ?1 ORDER BY step");
  st.bind(1, run_id);
  std::vector<CheckpointRow> out;
  while (st.step()) out.push_back({st.int64(0), st.text(1), st.text(2), st.text(3)});
  return out;
}

std::vector<TrainableRow> Store::trainables(std::int64_t run_id) {
  auto st = db_.prepare(
      "SELECT module, mode, params, trainable, lr, weight_decay FROM trainables WHERE run_id = ?1 ORDER BY rowid");
  st.bind(1, run_id);
  std::vector<TrainableRow> out;
  while (st.step()) out.push_back({st.text(0), st.text(1), st.int64(2), st.int64(3), st.maybe_real(4), st.maybe_real(5)});
  return out;
}

std::vector<std::int64_t> Store::sample_steps(std::int64_t run_id) {
  auto st = db_.prepare("SELECT DISTINCT step FROM samples WHERE run_id = ?1 ORDER BY step");
  st.bind(1, run_id);
  std::vector<std::int64_t> out;
  while (st.step()) out.push_back(st.int64(0));
  return out;
}

std::vector<SampleRow> Store::samples(std::int64_t run_id, std::int64_t step) {
  auto st = db_.prepare(
      "SELECT step, decoding, sample_id, prompt, output, refs, score, scores, image_sha256, raw_output FROM samples "
      "WHERE run_id = ?1 AND step = ?2 ORDER BY rowid");
  st.bind(1, run_id).bind(2, step);
  std::vector<SampleRow> out;
  while (st.step()) {
    SampleRow s;
    s.step = st.int64(0);
    s.decoding = Json::parse(st.text(1));
    s.sample_id = st.text(2);
    s.prompt = st.text(3);
    s.output = st.text(4);
    s.references = Json::parse(st.text(5)).get<std::vector<std::string>>();
    s.score = st.maybe_real(6);
    s.scores = Json::parse(st.text(7));
    s.image_sha256 = st.text(8);
    if (!st.is_null(9)) s.raw_output = st.text(9);
    out.push_back(std::move(s));
  }
  return out;
}

std::optional<ImageRow> Store::image(const std::string& sha256) {
  auto st = db_.prepare("SELECT sha256, format, width, height, bytes FROM images WHERE sha256 = ?1");
  st.bind(1, sha256);
  if (!st.step()) return std::nullopt;
  return ImageRow{st.text(0), st.text(1), st.int64(2), st.int64(3), st.blob(4)};
}

}  // namespace ablate::store
