#pragma once
// The results database: one SQLite file (WAL, application_id and user_version set, numbered migrations,
// unknown versions refused). This class holds every query the runner makes; nothing else writes SQL.

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "store/sqlite.hpp"

namespace ablate::store {

using Json = nlohmann::json;

/// "ABLT": marks a file as an ablate results database.
inline constexpr std::int32_t kApplicationId = 0x41424c54;

/// Run status, as stored. `interrupted` is what a run that was running when its process died becomes.
enum class Status { pending, running, done, failed, diverged, interrupted };
const char* status_name(Status s);
Status parse_status(const std::string& s);

struct RunRow {
  std::int64_t id = 0;
  std::int64_t experiment_id = 0;
  std::string experiment;
  std::string cell_key;
  std::int64_t cell_index = 0;
  std::string label;
  Json axes;
  Json config;
  Status status = Status::pending;
  std::string error;
  std::int64_t seed = 0;
  std::int64_t steps_total = 0;
  std::string device;
  std::optional<std::int64_t> image_tokens;
  std::string started_at, finished_at;
  std::int64_t stage = 0, stages_total = 1;
  std::string stage_name;  ///< "" without [[stages]]
  std::optional<std::int64_t> parent_run_id;
  std::string final_path, final_sha256;  ///< a stage's changed weights, once it is done
};

struct StepRow {
  std::int64_t step = 0;
  std::string split;  ///< "train" or "eval"
  double loss = 0;
  std::optional<double> lr, grad_norm;
  std::int64_t tokens = 0, loss_tokens = 0;
  std::optional<double> samples_per_s, tokens_per_s;
  double elapsed_s = 0;
  /// Eval rows: generation speed (mean time to the first new token per batch; new tokens per second).
  std::optional<double> gen_first_token_s, gen_tokens_per_s;
};

struct SampleRow {
  std::int64_t step = 0;
  Json decoding;
  std::string sample_id, prompt, output;
  std::optional<std::string> raw_output;  ///< the generated text before [eval] postprocess, when that changed it
  std::vector<std::string> references;
  Json scores = Json::object();
  std::optional<double> score;
  std::string image_sha256;
};

struct ImageRow {
  std::string sha256, format;
  std::int64_t width = 0, height = 0;
  std::vector<std::uint8_t> bytes;
};

struct CheckpointRow {
  std::int64_t step = 0;
  std::string stage, path, sha256;
};

struct TrainableRow {
  std::string module;
  std::string mode;  ///< full, lora, frozen, partial
  std::int64_t params = 0, trainable = 0;
  std::optional<double> lr, weight_decay;  ///< the module's optimizer group, when it trains
};

struct NewRun {
  std::int64_t experiment_id = 0;
  std::string cell_key;
  std::int64_t cell_index = 0;
  std::string label;
  Json axes, config, plugins;
  std::int64_t seed = 0, steps_total = 0;
  std::int64_t stage = 0, stages_total = 1;
  std::string stage_name;
  std::optional<std::int64_t> parent_run_id;
};

class Store {
 public:
  /// Opens or creates the database and brings its schema up to date. Throws sdk::InputError when the file
  /// is not an ablate database or was written by a newer runner.
  Store(const std::filesystem::path& file, bool create = true);

  Database& db() { return db_; }
  static int schema_version();

  // ---- experiments and runs
  std::int64_t upsert_experiment(const std::string& name, const std::string& path, const std::string& toml,
                                 const std::string& toml_sha256, const Json& axes, const Json& cells);
  std::optional<std::int64_t> experiment_id(const std::string& name);
  Json experiment_axes(std::int64_t experiment_id);
  /// Cell keys of the experiment's grid as it was last run, in order.
  Json experiment_cells(std::int64_t experiment_id);
  std::vector<std::string> experiment_names();
  std::optional<RunRow> find_run(std::int64_t experiment_id, const std::string& cell_key);
  std::optional<RunRow> run(std::int64_t run_id);
  std::vector<RunRow> runs(std::int64_t experiment_id);
  std::int64_t create_run(const NewRun& run);
  /// Marks runs left `running` by a process that died as `interrupted`; returns how many.
  std::int64_t mark_stale_running(std::int64_t experiment_id);
  void set_status(std::int64_t run_id, Status status, const std::string& error = {});
  void start_run(std::int64_t run_id, const std::string& device, const std::string& host, const std::string& revision,
                 std::int64_t image_tokens);
  /// Records the file of weights a finished stage changed, for the stages after it.
  void set_final(std::int64_t run_id, const std::string& path, const std::string& sha256);
  /// What the run's datasets reported when built (sdk::Dataset::report()), keyed "train" / "eval".
  void set_data_report(std::int64_t run_id, const Json& report);
  void update_cell(std::int64_t run_id, std::int64_t cell_index, const std::string& label, const Json& axes);

  // ---- what a run records as it goes (each call is one transaction)
  void record_steps(std::int64_t run_id, const std::vector<StepRow>& rows);
  void record_eval(std::int64_t run_id, const StepRow& loss_row, const std::vector<std::pair<std::string, double>>& metrics,
                   const std::vector<SampleRow>& samples, const std::vector<ImageRow>& images);
  /// Metrics and samples with no loss row: what `runner ensemble` scores.
  void record_scores(std::int64_t run_id, std::int64_t step, const std::vector<std::pair<std::string, double>>& metrics,
                     const std::vector<SampleRow>& samples, const std::vector<ImageRow>& images);
  void record_checkpoint(std::int64_t run_id, const CheckpointRow& row, const std::vector<std::string>& dropped_paths);
  void record_trainables(std::int64_t run_id, const std::vector<TrainableRow>& rows);
  /// Deletes everything a run recorded after `step` (steps, metrics, samples, checkpoints): a resumed run
  /// continues from its checkpoint without duplicated or stale rows.
  void truncate_after(std::int64_t run_id, std::int64_t step);

  // ---- reading
  std::vector<StepRow> steps(std::int64_t run_id, const std::string& split);
  std::vector<std::pair<std::string, double>> metrics_at(std::int64_t run_id, std::int64_t step);
  std::optional<std::int64_t> last_metrics_step(std::int64_t run_id);
  /// One metric of a run at every step it was recorded.
  std::vector<std::pair<std::int64_t, double>> metric_history(std::int64_t run_id, const std::string& name);
  std::vector<CheckpointRow> checkpoints(std::int64_t run_id);
  std::vector<TrainableRow> trainables(std::int64_t run_id);
  std::vector<std::int64_t> sample_steps(std::int64_t run_id);
  std::vector<SampleRow> samples(std::int64_t run_id, std::int64_t step);
  std::optional<ImageRow> image(const std::string& sha256);

 private:
  void migrate();
  void insert_scores(std::int64_t run_id, std::int64_t step, const std::vector<std::pair<std::string, double>>& metrics,
                     const std::vector<SampleRow>& samples, const std::vector<ImageRow>& images);
  Database db_;
};

std::string now_iso8601();

}  // namespace ablate::store
