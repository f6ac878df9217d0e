// runner EXPERIMENT.toml: expand the grid and run every cell, skipping finished ones, resuming interrupted
// ones from their last checkpoint, and running cells whose configuration changed (they have a new key).

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <csignal>
#include <optional>
#include <iostream>
#include <memory>
#include <set>
#include <thread>

#include <torch/torch.h>

#include "ablate/sdk/error.hpp"
#include "ablate/sdk/hash.hpp"
#include "ablate/sdk/linear.hpp"
#include "ablate/sdk/norms.hpp"
#include "cli/commands.hpp"
#include "grid/experiment.hpp"
#include "host/plugin_host.hpp"
#include "model/device.hpp"
#include "model/feature_cache.hpp"
#include "revision.hpp"
#include "store/store.hpp"
#include "train/op_profile.hpp"
#include "train/trainer.hpp"

namespace ablate::cli {

namespace fs = std::filesystem;

namespace {

enum class FusedNormMode { automatic, on, off };  // --fused-norm

std::atomic<bool> g_interrupted{false};
extern "C" void on_signal(int) { g_interrupted.store(true); }

/// One runner per results database at a time: an exclusive lock on DB.lock, released when the process
/// ends however it ends.
class DbLock {
 public:
  explicit DbLock(const fs::path& db) : file_(db.string() + ".lock") {
    fd_ = ::open(file_.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    created_ = fd_ >= 0;
    if (!created_ && errno == EEXIST) fd_ = ::open(file_.c_str(), O_RDWR | O_CLOEXEC);
    if (fd_ < 0) throw sdk::InputError(file_ + ": cannot create the lock file");
    if (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
      ::close(fd_);
      throw sdk::InputError(db.string() + ": in use by another runner (wait for it, or use --db elsewhere)");
    }
  }
  ~DbLock() {
    if (fd_ >= 0) ::close(fd_);
  }
  /// The database was refused (not SQLite, another program's, a newer schema): a lock file this runner
  /// made is removed, so a refused run leaves the folder as it found it. Unlinked while still held, so a
  /// runner that opened it meanwhile has been told "in use" rather than locking a file no one else sees.
  void abandon() {
    if (created_) ::unlink(file_.c_str());
    created_ = false;
  }

 private:
  std::string file_;
  int fd_ = -1;
  bool created_ = false;
};

// Every experiment in the `requires` chain, requirements first, each once; cycles are an error.
void collect(const fs::path& file, const PluginHost& host, std::vector<Experiment>& out, std::vector<fs::path>& stack) {
  const auto canonical = fs::weakly_canonical(file);
  for (const auto& e : out) {
    if (fs::weakly_canonical(e.file) == canonical) return;
  }
  if (std::find(stack.begin(), stack.end(), canonical) != stack.end()) {
    throw sdk::InputError(file.string() + ": [experiment] requires forms a cycle");
  }
  stack.push_back(canonical);
  auto ex = load_experiment(file, host);
  for (const auto& r : ex.requires) collect(r, host, out, stack);
  stack.pop_back();
  out.push_back(std::move(ex));
}

std::string short_key(const std::string& key) { return key.substr(0, 12); }

// The checkpoint a decoding sweep evaluates: the last one of its training run (a finished run always has
// one at its final step).
fs::path trained_checkpoint(store::Store& db, std::int64_t run_id) {
  const auto cks = db.checkpoints(run_id);
  if (cks.empty()) throw std::runtime_error("run " + std::to_string(run_id) + " has no checkpoint to evaluate");
  return cks.back().path;
}

void print_cells(const Experiment& ex, std::ostream& out) {
  out << "experiment " << ex.name << " (" << ex.file.string() << "): " << ex.cells.size() << " cell"
      << (ex.cells.size() == 1 ? "" : "s") << "\n";
  for (const auto& c : ex.cells) {
    out << "  [" << c.index + 1 << "/" << ex.cells.size() << "] " << (c.key.empty() ? "(key after requires)" : short_key(c.key))
        << "  " << c.label << "\n";
    // Stages: equal keys across cells are one run, trained once.
    auto stage_line = [&](const Cell& s) {
      out << "        stage " << s.stage_index + 1 << "/" << s.stage_count << " " << s.stage_name << "  "
          << (s.key.empty() ? "" : short_key(s.key)) << "\n";
    };
    for (const auto& s : c.before) stage_line(s);
    if (!c.before.empty()) stage_line(c);
  }
}

// A cell is a chain of runs: its earlier stages (or the training run before a decoding sweep), then itself.
std::vector<const Cell*> chain_of(const Cell& cell) {
  std::vector<const Cell*> chain;
  for (const auto& stage : cell.before) chain.push_back(&stage);
  chain.push_back(&cell);
  return chain;
}

store::NewRun new_run(std::int64_t exp_id, const Cell& cell, std::optional<std::int64_t> parent) {
  store::NewRun nr;
  nr.experiment_id = exp_id;
  nr.cell_key = cell.key;
  nr.cell_index = cell.index;
  nr.label = cell.label;
  nr.axes = cell.axes;
  nr.config = cell.resolved;
  Json plugins = Json::object();
  for (const PluginRef* r : cell.plugins()) plugins[r->display] = r->qualified() + "@" + std::to_string(r->version);
  nr.plugins = plugins;
  nr.seed = static_cast<std::int64_t>(cell.seed);
  nr.steps_total = cell.train.steps;
  nr.stage = cell.stage_index;
  nr.stages_total = cell.stage_count;
  nr.stage_name = cell.stage_name;
  nr.parent_run_id = parent;
  return nr;
}

}  // namespace

int run(const Common& common, const RunArgs& args) {
  PluginHost host;
  host.discover(PluginHost::search_path(common.executable, common.plugin_dirs), std::cerr);

  // Every experiment is read and checked before anything runs or is recorded.
  std::vector<Experiment> chain;
  for (const auto& file : args.experiments) {
    std::vector<fs::path> stack;
    collect(file, host, chain, stack);
  }
  if (args.dry_run) {
    for (auto& ex : chain) {
      try {
        compute_keys(ex);
      } catch (const sdk::InputError&) {
        if (ex.requires.empty()) throw;  // weights that a required experiment will write do not exist yet
      }
      print_cells(ex, std::cout);
    }
    return 0;
  }

  const auto device = pick_device(args.device);
  const auto cache_mode = parse_auto_on_off<FeatureCacheMode>("--feature-cache", args.feature_cache);
  const auto decode_graph = parse_auto_on_off<DecodeGraphMode>("--decode-graph", args.decode_graph);
  const auto train_graph = parse_auto_on_off<TrainGraphMode>("--train-graph", args.train_graph);
  const auto fused_norm = parse_auto_on_off<FusedNormMode>("--fused-norm", args.fused_norm);
  if (args.fused_relu != "on" && args.fused_relu != "off") {
    throw sdk::InputError("--fused-relu " + args.fused_relu + ": expected on or off");
  }
  OpProfile::from_env();  // a malformed ABLATE_OP_PROFILE or ABLATE_KERNEL_PROFILE: refused before anything is recorded
  if (args.threads > 0) torch::set_num_threads(args.threads);
  if (!common.db.parent_path().empty()) fs::create_directories(common.db.parent_path());
  DbLock lock(common.db);
  const auto opened = [&] {
    try {
      return std::make_unique<store::Store>(common.db);
    } catch (...) {
      lock.abandon();
      throw;
    }
  }();
  store::Store& db = *opened;
  std::signal(SIGINT, on_signal);
  std::signal(SIGTERM, on_signal);

  char hostname[256] = {};
  ::gethostname(hostname, sizeof hostname - 1);
  RunContext ctx(db, host);
  ctx.device = device;
  ctx.device_label = describe_device(device);
  ctx.results_dir = common.db.parent_path().empty() ? fs::path(".") : common.db.parent_path();
  // One data thread starved a GPU at batch 32 (bench/: 174 ms a step against 84 ms with 12); the batches and
  // their order do not depend on the count.
  ctx.workers = args.workers > 0 ? args.workers : std::clamp(static_cast<int>(std::thread::hardware_concurrency()) / 2, 1, 8);
  ctx.interrupted = &g_interrupted;
  ctx.revision = kSourceRevision;
  ctx.hostname = hostname;
  ctx.interactive = ::isatty(STDERR_FILENO) != 0;
  FeatureCache features(cache_mode,
                        args.feature_cache_gib < 0 ? FeatureCache::default_budget(device)
                                                   : static_cast<std::int64_t>(args.feature_cache_gib * double(1 << 30)),
                        ctx.results_dir / ("feature-cache-" + std::to_string(::getpid())));
  ctx.features = &features;
  ctx.decode_graph = decode_graph;
  ctx.train_graph = train_graph;
  // auto: the kernels on CUDA, where an H100 measured them faster (bench/README.md); on the CPU the loop over
  // rows was never measured faster than torch's ops, so they stay.
  sdk::set_fused_norm(fused_norm == FusedNormMode::on || (fused_norm == FusedNormMode::automatic && device.is_cuda()));
  if (sdk::fused_norm()) {
    std::cerr << "--fused-norm " << args.fused_norm << ": residual add + LayerNorm (RMSNorm) as one pass each way ("
              << (device.is_cuda() ? "CUDA kernels" : "the CPU's loop over rows") << ")\n";
  }
  sdk::set_fused_relu(args.fused_relu == "on");
  if (sdk::fused_relu()) {
    std::cerr << "--fused-relu on: OPT's fc1 -> ReLU -> fc2 as one step each way ("
              << (device.is_cuda() ? "cuBLASLt's ReLU-mask epilogues in bf16 and f16" : "torch's ops on the CPU") << ")\n";
  }

  int failed = 0, done = 0, skipped = 0;
  for (auto& ex : chain) {
    compute_keys(ex);  // after the experiments it requires have written their weights
    Json axes = ex.axes, keys = Json::array();
    for (const auto& c : ex.cells) keys.push_back(c.key);
    const auto exp_id = db.upsert_experiment(ex.name, fs::absolute(ex.file).string(), ex.text, ex.text_sha256, axes, keys);
    if (auto stale = db.mark_stale_running(exp_id)) {
      std::cerr << ex.name << ": " << stale << " run(s) were cut off last time; resuming from their checkpoints\n";
    }
    print_cells(ex, std::cerr);
    // The grid's progress counts the train steps still to run: stages shared by cells once, finished runs not
    // at all, a resumed run from its last recorded step.
    ctx.grid = GridProgress{};
    std::set<std::string> planned;
    for (const auto& cell : ex.cells) {
      for (const Cell* link : chain_of(cell)) {
        if (link->decode_only || !planned.insert(link->key).second) continue;
        const auto run = db.find_run(exp_id, link->key);
        if (run && (run->status == store::Status::done || run->status == store::Status::diverged)) continue;
        const auto steps = run ? db.steps(run->id, "train") : std::vector<store::StepRow>{};
        ctx.grid.planned += link->train.steps - (steps.empty() ? 0 : steps.back().step);
      }
    }
    for (const auto& cell : ex.cells) {
      // A cell is a chain of stages (one without [[stages]]); each is a run, found by its key, so that a
      // stage another cell already trained is reused rather than trained again.
      const auto chain = chain_of(cell);
      std::vector<fs::path> finals;  // what the stages so far changed
      std::optional<std::int64_t> parent;
      const std::string cell_id = ex.name + " " + std::to_string(cell.index + 1) + "/" + std::to_string(ex.cells.size());
      // Staged cells: the label once, then "[name k/N | stage i/M stage-name]" on every line, which says
      // which stage without repeating axes that can be long.
      if (cell.stage_count > 1) std::cerr << "[" << cell_id << "] " << (cell.label == ex.name ? "(no grid axes)" : cell.label) << "\n";
      const std::string cell_prefix = "[" + cell_id + (cell.label == ex.name || cell.stage_count > 1 ? "" : " " + cell.label) + "]";
      for (const Cell* stage_ptr : chain) {
        const Cell& stage = *stage_ptr;
        const bool last = stage_ptr == &cell;
        auto run = db.find_run(exp_id, stage.key);
        std::int64_t run_id;
        if (run) {
          run_id = run->id;
          // A shared stage keeps the first cell that needed it.
          if (last || run->cell_index >= cell.index) db.update_cell(run_id, cell.index, stage.label, stage.axes);
        } else {
          run_id = db.create_run(new_run(exp_id, stage, parent));
        }
        std::string part;  // which link of the chain: a stage, the training before a decoding sweep, or the sweep
        if (stage.decode_only) {
          part = "decode";
        } else if (stage.stage_count > 1) {
          part = "stage " + std::to_string(stage.stage_index + 1) + "/" + std::to_string(stage.stage_count) + " " + stage.stage_name;
        } else if (chain.size() > 1) {
          part = "train";
        }
        const std::string prefix = part.empty() ? cell_prefix : cell_prefix.substr(0, cell_prefix.size() - 1) + " | " + part + "]";
        // A stage that is done but whose weights file is gone (or damaged) resumes from its last checkpoint,
        // which rewrites the file.
        const Cell* next = last ? nullptr : *(std::find(chain.begin(), chain.end(), stage_ptr) + 1);
        const bool feeds_stage = next && !next->decode_only;  // the next link starts from this one's final weights
        if (run && run->status == store::Status::done && feeds_stage &&
            (run->final_path.empty() || !fs::exists(run->final_path) || sdk::sha256_file(run->final_path) != run->final_sha256)) {
          std::cerr << prefix << " run " << run_id << " is done but its weights file is missing or damaged; rebuilding it\n";
          db.set_status(run_id, store::Status::interrupted, "final weights missing");
          run->status = store::Status::interrupted;
        }
        if (run && (run->status == store::Status::done || run->status == store::Status::diverged)) {
          const bool shared = !last && run->cell_index < cell.index;
          std::cerr << prefix << " " << store::status_name(run->status) << " already (run " << run_id << ")"
                    << (run->status == store::Status::done && !last ? (shared ? ", reused from an earlier cell" : ", reused") : ", skipping")
                    << "\n";
          if (last) ++skipped;
          if (run->status == store::Status::diverged) {
            if (!last) ++skipped;
            break;  // the stages after a diverged one cannot run
          }
          if (feeds_stage) finals.push_back(run->final_path);
          parent = run_id;
          continue;
        }
        std::cerr << prefix << " run " << run_id << " key " << short_key(stage.key) << " on " << ctx.device_label << "\n";
        ctx.progress_prefix = prefix;
        Outcome outcome;
        try {
          outcome = run_cell(ex, stage, run_id, ctx, finals, stage.decode_only ? trained_checkpoint(db, *parent) : fs::path());
        } catch (const sdk::InputError& e) {
          db.set_status(run_id, store::Status::failed, e.what());
          throw;
        } catch (const std::exception& e) {
          const auto why = describe_exception(e);
          db.set_status(run_id, store::Status::failed, why);
          std::cerr << (ctx.interactive ? "\n" : "") << prefix << " failed: " << why << "\n";
          ++failed;
          break;
        }
        if (outcome == Outcome::interrupted) {
          std::cerr << "\ninterrupted: run " << run_id << " resumes from its last checkpoint next time\n";
          return 130;
        }
        ++done;
        if (outcome == Outcome::diverged) break;
        if (feeds_stage) finals.push_back(db.run(run_id)->final_path);
        parent = run_id;
      }
    }
  }
  std::cerr << "finished: " << done << " run, " << skipped << " skipped, " << failed << " failed ("
            << common.db.string() << ")\n";
  return failed > 0 ? 1 : 0;
}

int plugins(const Common& common) {
  PluginHost host;
  host.discover(PluginHost::search_path(common.executable, common.plugin_dirs), std::cerr);
  std::vector<std::vector<std::string>> rows;
  for (const auto& p : host.list()) {
    rows.push_back({sdk::kind_name(p.kind), p.id, std::to_string(p.version), p.file.string(), p.summary});
  }
  std::sort(rows.begin(), rows.end());
  std::size_t w[4] = {4, 2, 7, 4};
  for (const auto& r : rows) {
    for (int i = 0; i < 4; ++i) w[i] = std::max(w[i], r[static_cast<std::size_t>(i)].size());
  }
  auto pad = [](const std::string& s, std::size_t n) { return s + std::string(n > s.size() ? n - s.size() : 0, ' '); };
  std::cout << pad("kind", w[0]) << "  " << pad("id", w[1]) << "  " << pad("version", w[2]) << "  " << pad("file", w[3])
            << "  summary\n";
  for (const auto& r : rows) {
    std::cout << pad(r[0], w[0]) << "  " << pad(r[1], w[1]) << "  " << pad(r[2], w[2]) << "  " << pad(r[3], w[3]) << "  "
              << r[4] << "\n";
  }
  return 0;
}

}  // namespace ablate::cli
