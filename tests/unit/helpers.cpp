#include "helpers.hpp"

#include <iostream>
#include <random>

namespace ablate::test {

namespace fs = std::filesystem;

TempDir::TempDir() {
  std::random_device rd;
  path_ = fs::temp_directory_path() / ("ablate-test-" + std::to_string(rd()) + std::to_string(rd()));
  fs::create_directories(path_);
}

TempDir::~TempDir() {
  std::error_code ec;
  fs::remove_all(path_, ec);
}

fs::path write_file(const fs::path& file, const std::string& text) {
  fs::create_directories(file.parent_path());
  std::ofstream(file) << text;
  return file;
}

std::string read_file(const fs::path& file) {
  std::ifstream in(file);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

const PluginHost& builtin_plugins() {
  static PluginHost host;
  static const bool loaded = (host.discover({ABLATE_BUILTIN_PLUGIN_DIR}, std::cerr), true);
  (void)loaded;
  return host;
}

fs::path fixture_plugin(const std::string& name) { return fs::path(ABLATE_TEST_PLUGIN_DIR) / name; }

std::string tiny_experiment(const std::string& name, int steps, int every, const std::string& extra) {
  std::ostringstream os;
  os << "strategy = [\"full\"]\n\n"
     << "[experiment]\nname = \"" << name << "\"\nseed = 3\n\n"
     << "[model]\nlayout = \"prefix\"\n"
     << "encoder = { plugin = \"clip_vit\", config = { image_size = 16, patch_size = 8, hidden_size = 16, "
        "intermediate_size = 32, num_hidden_layers = 1, num_attention_heads = 2 } }\n"
     << "projector = { plugin = \"git\" }\n"
     << "backbone = { plugin = \"opt\", config = { hidden_size = 16, ffn_dim = 32, num_hidden_layers = 1, "
        "num_attention_heads = 2, max_position_embeddings = 64, dropout = 0.0, tie_word_embeddings = false } }\n\n"
     << "[data]\n"
     << "train = { plugin = \"shapes\", split = \"train\", size = 64, image_size = 16 }\n"
     << "eval = { plugin = \"shapes\", split = \"val\", size = 12, image_size = 16 }\n\n"
     << "[train]\nsteps = " << steps << "\nbatch_size = 4\nlr = 1e-3\ncheckpoint_every = " << every
     << "\nlog_every = 2\n\n"
     << "[eval]\nevery = " << every << "\nsamples = 3\nbatch_size = 6\n"
     << "generate = { max_new_tokens = 4 }\nmetrics = [\"exact_match\", \"rouge_l\"]\n"
     << extra;
  return os.str();
}

}  // namespace ablate::test
