// The runner's edge: command-line parsing and exit codes. Everything below throws; this is where exceptions
// become a one-line message and a status (0 ok, 1 failure, 2 bad input, 130 interrupted).

#include <iostream>
#include <sstream>

#include <boost/program_options.hpp>
#include <c10/util/Logging.h>

#include "ablate/sdk/error.hpp"
#include "cli/commands.hpp"
#include "host/plugin_host.hpp"
#include "revision.hpp"

namespace po = boost::program_options;
using namespace ablate;

namespace {

constexpr const char* kUsage = R"(runner: VLM finetuning ablations on libtorch

usage:
  runner EXPERIMENT.toml... [options]   run every cell of the experiments' grids (alias: runner run ...)
  runner plugins                        list the plugins found: kind, id, version, file
  runner compare EXPERIMENT             one row per run: grid axes, eval loss, metrics (table, CSV, JSON,
                                        Markdown; --summary: mean and std over seeds, best cell)
  runner curves EXPERIMENT [-o DIR]     loss and metric curves of its runs, PNG and SVG
  runner replay RUN... [--step N]       the samples a run generated at a step; several runs side by side
  runner report EXPERIMENT [-o FILE]    one self-contained HTML file: runs, curves, what trained, samples
  runner serve [DB]                     the same pages in a local web view, live while a grid runs
  runner ensemble RUN RUN...            majority vote of the runs' answers, scored and stored as a run

Re-running an experiment skips finished cells, resumes interrupted ones from their last checkpoint and runs
cells whose configuration changed. Results go to one SQLite file (--db), readable with sqlite3 or pandas.
)";

po::options_description common_options(cli::Common& c) {
  po::options_description o("common options");
  o.add_options()
      ("help,h", "show this help")
      ("version", "show the version and source revision")
      ("db", po::value<std::string>()->default_value(c.db.string()), "results database (checkpoints go beside it)")
      ("plugins", po::value<std::vector<std::string>>()->composing(),
       "extra folder of plugin libraries (repeatable; searched before ABLATE_PLUGIN_PATH and the built-in folder)");
  return o;
}

int dispatch(int argc, char** argv) {
  cli::Common common;
  common.executable = std::filesystem::absolute(std::filesystem::path(argv[0]));
  if (std::filesystem::exists("/proc/self/exe")) common.executable = std::filesystem::read_symlink("/proc/self/exe");

  std::vector<std::string> args(argv + 1, argv + argc);
  std::string command = "run";
  if (!args.empty() && (args[0] == "run" || args[0] == "plugins" || args[0] == "compare" || args[0] == "replay" || args[0] == "ensemble" ||
                         args[0] == "curves" || args[0] == "report" || args[0] == "serve")) {
    command = args[0];
    args.erase(args.begin());
  }

  auto opts = common_options(common);
  po::options_description specific(command + " options");
  po::positional_options_description positional;
  cli::RunArgs run;
  cli::CompareArgs cmp;
  cli::ReplayArgs rep;
  cli::EnsembleArgs ens;
  cli::CurvesArgs crv;
  cli::ReportArgs rpt;
  cli::ServeArgs srv;
  std::string out_path;
  std::int64_t report_samples = 24;
  // Which runs: the same options for compare, curves and report.
  auto add_filter = [&](cli::RunFilter& f) {
    specific.add_options()
        ("all", po::bool_switch(&f.all), "also runs of cells no longer in the grid")
        ("where", po::value<std::vector<std::string>>(&f.where)->composing(),
         "AXIS=VALUE: only runs with that axis value, as compare prints it (repeatable: all must hold)")
        ("status", po::value<std::vector<std::string>>(&f.status)->composing(),
         "only runs with this status: done, failed, diverged, interrupted, running, pending (repeatable)");
  };
  std::string images;
  if (command == "run") {
    specific.add_options()
        ("experiment", po::value<std::vector<std::string>>()->composing(), "experiment TOML file(s)")
        ("dry-run", po::bool_switch(&run.dry_run), "print the grid's cells and their keys; run nothing")
        ("device", po::value<std::string>(&run.device)->default_value("auto"), "cpu, cuda, cuda:N or auto")
        ("workers", po::value<int>(&run.workers)->default_value(0),
         "data worker threads, 0 to 256 (0: half the machine's cores, at most 8; the batch order is the same for any count)")
        ("threads", po::value<int>(&run.threads)->default_value(0), "libtorch intra-op threads, 0 to 1024 (0: its default)")
        ("feature-cache", po::value<std::string>(&run.feature_cache)->default_value("auto"),
         "with a frozen encoder, encode each image once and reuse its features across epochs, evaluations and "
         "cells: auto (evaluation sets, and training sets the run passes over at least once), on, off")
        ("feature-cache-gib", po::value<double>(&run.feature_cache_gib)->default_value(-1, "a quarter of the device's"),
         "memory the cached features may take on the device (main memory on the CPU); beyond it they go to disk "
         "next to the results database")
        ("decode-graph", po::value<std::string>(&run.decode_graph)->default_value("auto"),
         "generation's steps after the prompt: on = a KV cache sized for the whole generation, each step a "
         "replayed CUDA graph on CUDA (checked once against the eager step; eager steps on the CPU); off = a "
         "growing cache, eager steps; auto = on for CUDA generations of at least 9 tokens, else off")
        ("train-graph", po::value<std::string>(&run.train_graph)->default_value("auto"),
         "training steps: on = each step padded to one of a few fixed shapes, its forward and backward passes a "
         "replayed CUDA graph per shape on CUDA (checked once against the eager passes; eager on the CPU); off = "
         "eager steps, as collated; auto = on for CUDA (unless gradient checkpointing, which cannot be captured), off "
         "on the CPU")
        ("fused-norm", po::value<std::string>(&run.fused_norm)->default_value("auto"),
         "on = each block's residual add, LayerNorm (or LLaMA's RMSNorm) and the cast of its output run as one "
         "pass each way (OPT, GPT-2, LLaMA, the CLIP and SigLIP encoders; our CUDA kernels on CUDA, a loop over "
         "rows on the CPU), float32 sums in another order; off = torch's ops; auto = on for CUDA (an H100 training "
         "step at batch 256 12% faster, bench/README.md), off on the CPU")
        ("fused-relu", po::value<std::string>(&run.fused_relu)->default_value("off"),
         "on = OPT's fc1 -> ReLU -> fc2 as one autograd step where neither layer has an adapter: on CUDA in bf16 "
         "or f16, fc1's product writes the ReLU's mask as bits and fc2's backward product applies it (cuBLASLt "
         "epilogues: no ReLU backward pass, 1 bit per element kept for backward); elsewhere torch's ops, the "
         "same numbers; off = torch's ops. Off by default: on an H100 at batch 256 it held 10 GiB less but made "
         "the step 9% slower (bench/README.md)");
    positional.add("experiment", -1);
  } else if (command == "compare") {
    specific.add_options()
        ("experiment", po::value<std::string>(&cmp.experiment), "experiment name or TOML file")
        ("groups", po::bool_switch(&cmp.groups), "also show per-group metrics ([eval] group_by)")
        ("metrics", po::value<std::vector<std::string>>(&cmp.metrics)->multitoken()->composing(),
         "metric columns to show, in this order (default: every metric of the whole set)")
        ("summary", po::bool_switch(&cmp.summary),
         "cells over seeds (axes named seed or *.seed): mean and standard deviation of finished runs, the best "
         "cell per column, and each axis's values averaged over the other axes")
        ("sort", po::value<std::string>(&cmp.sort), "sort rows by this column: an axis, run, step, eval_loss or a metric")
        ("desc", po::bool_switch(&cmp.desc), "sort in descending order")
        ("format", po::value<std::string>(&cmp.format)->default_value("table"), "table, csv, json or markdown");
    add_filter(cmp.filter);
    positional.add("experiment", 1);
  } else if (command == "replay") {
    specific.add_options()
        ("run", po::value<std::vector<std::int64_t>>(&rep.runs)->composing(),
         "run id(s) (see runner compare); several: their samples side by side, as a decoding sweep's")
        ("step", po::value<std::int64_t>(&rep.step)->default_value(-1), "step (default: the last with samples)")
        ("images", po::value<std::string>(&images), "write the samples' images into this folder")
        ("sample", po::value<std::vector<std::string>>(&rep.samples)->composing(),
         "only this sample id (repeatable): one question across every run given");
    positional.add("run", -1);
  } else if (command == "curves") {
    specific.add_options()
        ("experiment", po::value<std::string>(&crv.experiment), "experiment name or TOML file")
        ("runs", po::value<std::vector<std::int64_t>>(&crv.runs)->multitoken()->composing(), "only these runs (ids, see compare)")
        ("metrics", po::value<std::vector<std::string>>(&crv.metrics)->multitoken()->composing(),
         "metric curves to draw (default: every metric of the whole set)")
        ("out,o", po::value<std::string>(&out_path)->default_value("curves"),
         "folder for train_loss, eval_loss and one file per metric, each .png and .svg");
    add_filter(crv.filter);
    positional.add("experiment", 1);
  } else if (command == "report") {
    specific.add_options()
        ("experiment", po::value<std::string>(&rpt.experiment), "experiment name or TOML file")
        ("out,o", po::value<std::string>(&out_path)->default_value("report.html"), "the HTML file to write")
        ("samples", po::value<std::int64_t>(&report_samples)->default_value(24), "sample ids in the gallery");
    add_filter(rpt.filter);
    positional.add("experiment", 1);
  } else if (command == "serve") {
    specific.add_options()
        ("database", po::value<std::string>(&srv.db), "results database (default: --db)")
        ("host", po::value<std::string>(&srv.host)->default_value("127.0.0.1"),
         "address to listen on; the default is reachable from this machine only (0.0.0.0: from anywhere)")
        ("port", po::value<int>(&srv.port)->default_value(8765), "port (0: any free one, printed)")
        ("refresh", po::value<int>(&srv.refresh)->default_value(10), "seconds between an experiment page's reloads (0: never)")
        ("verbose,v", po::bool_switch(&srv.verbose), "log each request to stderr");
    positional.add("database", 1);
  } else if (command == "ensemble") {
    specific.add_options()
        ("run", po::value<std::vector<std::int64_t>>(&ens.runs)->composing(),
         "run ids, most trusted first: each sample's answer is the one most runs gave, a tie going to the earliest "
         "run listed; the vote is scored with the first run's metrics and stored as a run (stage \"ensemble\")");
    positional.add("run", -1);
  }
  opts.add(specific);

  po::variables_map vm;
  try {
    po::store(po::command_line_parser(args).options(opts).positional(positional).run(), vm);
    po::notify(vm);
  } catch (const po::error& e) {
    std::cerr << "runner: " << e.what() << " (see runner --help)\n";
    return 2;
  }
  if (vm.count("help")) {
    std::cout << kUsage << "\n" << opts << "\n";
    return 0;
  }
  if (vm.count("version")) {
    std::cout << "runner " << kVersion << " (" << kSourceRevision << ")\n";
    return 0;
  }
  // Numbers that parse but cannot be meant: refused like any other bad input, before anything runs. (Tens of
  // thousands of threads do not fail; they stall the machine.)
  const auto within = [](const char* flag, auto value, auto lo, auto hi) {
    if (!(value >= lo && value <= hi)) {
      std::ostringstream m;
      m << "--" << flag << " " << value << ": expected " << lo << " to " << hi;
      throw sdk::InputError(m.str());
    }
  };
  if (command == "run") {
    within("threads", run.threads, 0, 1024);
    within("workers", run.workers, 0, 256);
    // -1, the default, is the device's quarter.
    if (run.feature_cache_gib != -1.0) within("feature-cache-gib", run.feature_cache_gib, 0.0, 1e6);
  }
  if (command == "report") within("samples", report_samples, std::int64_t{0}, std::int64_t{100000});
  rpt.samples = static_cast<std::size_t>(report_samples);
  if (command == "serve") {
    within("port", srv.port, 0, 65535);
    within("refresh", srv.refresh, 0, 86400);
  }
  common.db = vm["db"].as<std::string>();
  if (vm.count("plugins")) common.plugin_dirs = vm["plugins"].as<std::vector<std::string>>();
  rep.images = images;

  if (command == "plugins") return cli::plugins(common);
  if (command == "compare") {
    if (cmp.experiment.empty()) {
      std::cerr << "runner compare: name an experiment (or its TOML file)\n";
      return 2;
    }
    return cli::compare(common, cmp);
  }
  if (command == "replay") {
    if (!vm.count("run")) {
      std::cerr << "runner replay: give a run id (see runner compare)\n";
      return 2;
    }
    return cli::replay(common, rep);
  }
  if (command == "ensemble") return cli::ensemble(common, ens);
  if (command == "curves" || command == "report") {
    const auto& experiment = command == "curves" ? crv.experiment : rpt.experiment;
    if (experiment.empty()) {
      std::cerr << "runner " << command << ": name an experiment (or its TOML file)\n";
      return 2;
    }
    if (command == "curves") {
      crv.out = out_path;
      return cli::curves(common, crv);
    }
    rpt.out = out_path;
    return cli::report(common, rpt);
  }
  if (command == "serve") return cli::serve(common, srv);
  if (!vm.count("experiment")) {
    std::cerr << "runner: name an experiment TOML file (runner --help for the commands and options)\n";
    return 2;
  }
  for (const auto& e : vm["experiment"].as<std::vector<std::string>>()) run.experiments.emplace_back(e);
  return cli::run(common, run);
}

}  // namespace

int main(int argc, char** argv) {
  FLAGS_caffe2_use_fatal_for_enforce = false;
  try {
    return dispatch(argc, argv);
  } catch (const sdk::InputError& e) {
    std::cerr << "runner: " << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "runner: " << describe_exception(e) << "\n";
    return 1;
  }
}
