#include "model/vlm.hpp"

#include <algorithm>
#include <chrono>
#include <limits>
#include <sstream>

#include <ATen/autocast_mode.h>
#include <torch/torch.h>

#include "ablate/sdk/error.hpp"
#include "host/plugin_host.hpp"
#include "model/cuda_graph.hpp"

namespace ablate {

namespace {

// The module of a plugin object, owned together with the object (and so with its library): registering it
// as a child keeps the plugin alive for as long as the model holds it.
template <class T>
std::shared_ptr<torch::nn::Module> module_of(const std::shared_ptr<T>& object) {
  return std::shared_ptr<torch::nn::Module>(object, &object->module());
}

bool any_trainable(torch::nn::Module& m) {
  for (const auto& p : m.parameters()) {
    if (p.requires_grad()) return true;
  }
  return false;
}

std::string trim(const std::string& s) {
  const auto b = s.find_first_not_of(" \t\r\n");
  if (b == std::string::npos) return {};
  const auto e = s.find_last_not_of(" \t\r\n");
  return s.substr(b, e - b + 1);
}

// Positions that count real tokens from 0; -1 elsewhere.
torch::Tensor count_positions(const torch::Tensor& valid) {
  auto pos = valid.to(torch::kLong).cumsum(1) - 1;
  return torch::where(valid, pos, torch::full_like(pos, -1));
}

// The inline layout's placement, on the host: per row, an index into [image (n) | text (t) | blank] for each
// output position. A row's image token is replaced by the n image tokens; a row without one gets them after its
// first token if that is BOS, else at its start. Rows keep their padding side: right for training, left for
// generation. The output is as wide as the widest row, or t + n columns with `full_width` (a fixed shape).
torch::Tensor inline_index(const torch::Tensor& ids_cpu, const torch::Tensor& valid_cpu, std::int64_t n, bool training,
                           std::int64_t bos, std::int64_t image_token, bool full_width) {
  const auto b = ids_cpu.size(0), t = ids_cpu.size(1);
  const auto width = t + n;
  auto ia = ids_cpu.accessor<std::int64_t, 2>();
  auto va = valid_cpu.accessor<bool, 2>();
  auto index = torch::full({b, width}, n + t, torch::kLong);  // blank by default
  auto ia_out = index.accessor<std::int64_t, 2>();
  std::int64_t used = 0;  // the widest row, so that the output has no all-blank column
  for (std::int64_t r = 0; r < b; ++r) {
    std::vector<std::int64_t> row;  // indices into [image | text]
    std::int64_t first = -1, placeholder = -1;
    for (std::int64_t j = 0; j < t; ++j) {
      if (!va[r][j]) continue;
      if (first < 0) first = j;
      if (ia[r][j] == image_token && image_token >= 0) {
        if (placeholder >= 0) throw sdk::InputError("a prompt holds more than one image token (one image per sample so far)");
        placeholder = j;
      }
    }
    const std::int64_t insert_at = placeholder >= 0 ? placeholder : (first >= 0 && ia[r][first] == bos ? first + 1 : std::max<std::int64_t>(first, 0));
    bool inserted = false;
    for (std::int64_t j = 0; j < t; ++j) {
      if (!va[r][j]) continue;
      if (j == insert_at) {
        for (std::int64_t k = 0; k < n; ++k) row.push_back(k);
        inserted = true;
      }
      if (j != placeholder) row.push_back(n + j);
    }
    if (!inserted) {  // a prompt of BOS alone, or an empty row: the image goes last
      for (std::int64_t k = 0; k < n; ++k) row.push_back(k);
    }
    used = std::max<std::int64_t>(used, static_cast<std::int64_t>(row.size()));
    const auto offset = training ? 0 : width - static_cast<std::int64_t>(row.size());
    for (std::size_t k = 0; k < row.size(); ++k) ia_out[r][offset + static_cast<std::int64_t>(k)] = row[k];
  }
  if (full_width) return index;
  return (training ? index.slice(1, 0, used) : index.slice(1, width - used)).contiguous();
}

}  // namespace

Layout parse_layout(const std::string& name) {
  if (name == "prefix") return Layout::prefix;
  if (name == "inline") return Layout::inline_;
  if (name == "prefix_lm") return Layout::prefix_lm;
  throw sdk::InputError("unknown layout '" + name + "' (prefix, inline, prefix_lm)");
}

VlmModel::VlmModel(Part<sdk::Encoder> encoder, Part<sdk::Projector> projector, Part<sdk::Backbone> backbone, Layout layout,
                   std::int64_t image_token)
    : encoder_(std::move(encoder)),
      projector_(std::move(projector)),
      backbone_(std::move(backbone)),
      layout_(layout),
      image_token_(image_token) {
  register_module("encoder", module_of(encoder_.object));
  register_module("projector", module_of(projector_.object));
  register_module("backbone", module_of(backbone_.object));
  image_tokens_ = projector_.object->output_tokens(encoder_.object->num_tokens());
}

std::string VlmModel::head() const { return "backbone." + backbone_.object->head_module(); }

torch::Device VlmModel::device() const { return backbone_.object->module().parameters().front().device(); }

void VlmModel::refresh_frozen() {
  encoder_frozen_ = !any_trainable(encoder_.object->module());
  projector_frozen_ = encoder_frozen_ && !any_trainable(projector_.object->module());
}

torch::Tensor VlmModel::encode(const torch::Tensor& pixels) {
  // A frozen encoder needs no graph: no activations are kept for it.
  std::unique_ptr<torch::NoGradGuard> no_grad;
  if (encoder_frozen_) no_grad = std::make_unique<torch::NoGradGuard>();
  const auto on_device = to_device_async(pixels, device());
  return guarded(encoder_.plugin, "forward", [&] { return encoder_.object->encode(on_device); });
}

torch::Tensor VlmModel::image_embeddings(const torch::Tensor& pixels, const torch::Tensor& cached) {
  const auto features = cached.defined() ? cached.to(device(), true) : encode(pixels);
  std::unique_ptr<torch::NoGradGuard> no_grad;
  if (projector_frozen_) no_grad = std::make_unique<torch::NoGradGuard>();
  return guarded(projector_.plugin, "forward", [&] { return projector_.object->project(features); });
}

Sequence VlmModel::assemble(const torch::Tensor& pixels, const torch::Tensor& ids_in, const torch::Tensor& valid_in,
                            const torch::Tensor& prompt_len_in, const torch::Tensor& features,
                            const torch::Tensor& index_in) {
  auto& bb = *backbone_.object;
  const auto dev = device();
  // Training batches come pinned from the data threads on CUDA: these copies queue behind the device's work.
  auto ids = to_device_async(ids_in, dev);
  auto valid = to_device_async(valid_in, dev);
  const bool training = prompt_len_in.defined();
  const auto b = ids.size(0), t = ids.size(1);

  auto image = image_embeddings(pixels, features);
  // In the inline layout the image token's own embedding is dropped below (the image takes its place). An added
  // "<image>" may lie past the embedding's rows; it is then embedded as id 0, as transformers' LLaVA does.
  const bool image_token_past_rows = layout_ == Layout::inline_ && image_token_ >= bb.vocab_size();
  auto text = guarded(backbone_.plugin, "embed", [&] { return bb.embed(image_token_past_rows ? ids.masked_fill(ids == image_token_, 0) : ids); });
  image = image.to(text.dtype());
  const auto n = image.size(1);
  auto long_opts = ids.options();

  Sequence s;
  if (layout_ != Layout::inline_) {
    s.embeds = torch::cat({image, text}, 1);
    s.ids = torch::cat({torch::full({b, n}, -1, long_opts), ids}, 1);
    auto key_valid = torch::cat({torch::ones({b, n}, valid.options()), valid}, 1);
    if (layout_ == Layout::prefix) {
      s.positions = torch::cat({torch::full({b, n}, -1, long_opts), count_positions(valid)}, 1);
      s.mask = sdk::AttentionMask::with_prefix(torch::full({b}, n, long_opts));
    } else {
      // Generation: every prompt token is in the bidirectional prefix. Training: image + BOS + prompt.
      s.positions = count_positions(key_valid);
      s.mask = sdk::AttentionMask::with_prefix(training ? to_device_async(prompt_len_in, dev) + n : torch::full({b}, n + t, long_opts));
    }
    s.mask.key_valid = key_valid;
    return s;
  }

  // inline: the placement decided on the host (inline_index), from the host's copies of ids: no device read.
  const auto index = to_device_async(index_in.defined() ? index_in
                                                      : inline_index(ids_in.to(torch::kCPU), valid_in.to(torch::kCPU), n, training,
                                                                     bb.tokenizer().bos_id(), image_token_, /*full_width=*/false),
                                     dev);

  const auto d = text.size(2);
  auto source = torch::cat({image, text, torch::zeros({b, 1, d}, text.options())}, 1);
  s.embeds = source.gather(1, index.unsqueeze(-1).expand({b, index.size(1), d}));
  auto blank = torch::full({b, 1}, -1, long_opts);
  s.ids = torch::cat({torch::full({b, n}, -1, long_opts), ids, blank}, 1).gather(1, index);
  auto source_valid = torch::cat({torch::ones({b, n}, valid.options()), valid, torch::zeros({b, 1}, valid.options())}, 1);
  auto valid_out = source_valid.gather(1, index);
  s.positions = count_positions(valid_out);
  s.mask = sdk::AttentionMask::make_causal();
  s.mask.key_valid = valid_out;
  return s;
}

void VlmModel::check_length(std::int64_t positions) const {
  const auto limit = backbone_.object->max_positions();
  if (limit > 0 && positions > limit) {
    throw sdk::InputError(backbone_.plugin + ": " + std::to_string(positions) + " positions (image and text) exceed the " +
                          std::to_string(limit) + " the model has; lower train.max_text_tokens or eval.generate.max_new_tokens");
  }
}

torch::Tensor VlmModel::logits(const Sequence& s) {
  auto& bb = *backbone_.object;
  auto hidden = guarded(backbone_.plugin, "forward", [&] { return bb.forward(s.embeds, s.positions, s.mask, nullptr); });
  return guarded(backbone_.plugin, "logits", [&] { return bb.logits(hidden); });
}

std::int64_t VlmModel::max_text_width() const {
  const auto limit = backbone_.object->max_positions();
  if (limit <= 0) return std::numeric_limits<std::int64_t>::max();
  // prefix: text positions only; otherwise the image's positions come first (inline: t + n columns at full width).
  return layout_ == Layout::prefix ? limit : limit - image_tokens_;
}

LossInputs VlmModel::loss_inputs(const TrainBatch& batch, std::int64_t text_width, std::int64_t loss_slots) const {
  LossInputs in;
  in.pixels = batch.pixels;
  in.features = batch.features;
  in.prompt_len = batch.prompt_len;
  auto ids = batch.ids.to(torch::kCPU), valid = batch.valid.to(torch::kCPU), targets = batch.targets.to(torch::kCPU);
  const auto b = ids.size(0), t = ids.size(1), n = image_tokens_;
  if (text_width > 0 && text_width < t) throw std::logic_error("loss_inputs: text width below the batch's");
  if (text_width > t) {  // more right padding: never attended to, never a loss position
    ids = torch::constant_pad_nd(ids, {0, text_width - t}, 0);
    valid = torch::constant_pad_nd(valid, {0, text_width - t}, 0);
    targets = torch::constant_pad_nd(targets, {0, text_width - t}, 0);
  }
  in.ids = ids;
  in.valid = valid;
  // Which positions of the placed sequence carry loss, as assemble() places them.
  torch::Tensor placed;
  if (layout_ == Layout::inline_) {
    in.index = inline_index(ids, valid, n, /*training=*/true, backbone_.object->tokenizer().bos_id(), image_token_,
                            /*full_width=*/text_width > 0);
    placed = torch::cat({torch::zeros({b, n}, targets.options()), targets, torch::zeros({b, 1}, targets.options())}, 1).gather(1, in.index);
  } else {
    placed = torch::cat({torch::zeros({b, n}, targets.options()), targets}, 1);
  }
  // The hidden state at position j predicts the token at j + 1, so a token at (row r, j) that carries loss is
  // predicted from flat position r * S + j - 1. A row's first position has no predictor: it never carries loss.
  placed.select(1, 0).fill_(false);
  const auto carried = placed.reshape({-1}).nonzero().squeeze(1);
  in.loss_tokens = carried.size(0);
  in.predictors = carried - 1;
  in.labels = carried;
  if (loss_slots > 0) {
    if (loss_slots < in.loss_tokens) throw std::logic_error("loss_inputs: fewer loss slots than loss tokens");
    // A padding slot predicts, from position 0, an image position of row 0: it holds no token (-1), and the
    // cross-entropy ignores it.
    std::int64_t no_token = 0;
    if (layout_ == Layout::inline_) {
      const auto row = in.index[0];
      no_token = (row < n).to(torch::kLong).argmax().item<std::int64_t>();  // the host's tensor: no device read
    }
    in.predictors = torch::constant_pad_nd(in.predictors, {0, loss_slots - in.loss_tokens}, 0);
    in.labels = torch::constant_pad_nd(in.labels, {0, loss_slots - in.loss_tokens}, static_cast<double>(no_token));
  }
  return in;
}

torch::Tensor VlmModel::loss_sum(const LossInputs& in) {
  auto& bb = *backbone_.object;
  auto s = assemble(in.pixels, in.ids, in.valid, in.prompt_len, in.features, in.index);
  // Positions count from 0 over the (right-padded) sequence, so its length bounds them; no device read.
  check_length(layout_ == Layout::prefix ? in.ids.size(1) : s.embeds.size(1));
  auto hidden = guarded(backbone_.plugin, "forward", [&] { return bb.forward(s.embeds, s.positions, s.mask, nullptr); });
  // Only the loss positions go through the head.
  const auto predictors = to_device_async(in.predictors, hidden.device());
  const auto labels = to_device_async(in.labels, hidden.device());
  auto selected = hidden.reshape({-1, hidden.size(2)}).index_select(0, predictors);
  auto logits = guarded(backbone_.plugin, "logits", [&] { return bb.logits(selected); });
  return torch::nn::functional::cross_entropy(logits.to(torch::kFloat32), s.ids.reshape({-1}).index_select(0, labels),
                                              torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum).ignore_index(-1));
}

torch::Tensor VlmModel::loss_sum(const TrainBatch& batch) {
  if (batch.loss_tokens == 0) {
    throw std::runtime_error("a batch has no loss tokens (is max_text_tokens cutting every target?)");
  }
  return loss_sum(loss_inputs(batch));
}

torch::Tensor sample_next(const torch::Tensor& scores, const GenerateConfig& cfg, at::Generator& generator) {
  if (!cfg.do_sample) return scores.argmax(-1);
  auto logits = scores / cfg.temperature;
  if (cfg.top_k > 0 && cfg.top_k < logits.size(-1)) {
    auto kth = std::get<0>(logits.topk(cfg.top_k, -1)).select(-1, cfg.top_k - 1).unsqueeze(-1);
    logits = logits.masked_fill(logits < kth, -std::numeric_limits<float>::infinity());
  }
  if (cfg.top_p < 1.0) {
    // As transformers' TopPLogitsWarper: drop the tokens whose cumulative probability, in ascending order,
    // stays within 1 - top_p; the most likely token always survives.
    auto sorted = logits.sort(-1, /*descending=*/false);
    auto probs = std::get<0>(sorted).softmax(-1).cumsum(-1);
    auto remove_sorted = probs <= (1.0 - cfg.top_p);
    remove_sorted.select(-1, remove_sorted.size(-1) - 1).fill_(false);
    auto remove = remove_sorted.scatter(-1, std::get<1>(sorted), remove_sorted);
    logits = logits.masked_fill(remove, -std::numeric_limits<float>::infinity());
  }
  // Drawn on the CPU generator, as transformers' sampling draws with a seeded torch generator.
  return torch::multinomial(logits.softmax(-1).cpu(), 1, false, generator).squeeze(-1).to(scores.device());
}

// Decode steps whose every tensor stays where it is: a KV cache with room for the whole generation
// (sdk::KvCache::make_fixed), and the step's inputs (token, position, write slot, valid keys) in tensors that
// are refilled in place. On CUDA the first step runs eagerly, is then captured as a graph, replayed on the same
// inputs and compared with the eager result; every later step is one graph launch instead of a few hundred
// kernel launches. A graph that cannot be captured, or computes something else, is dropped, the reason goes to
// `refused` (the model tries no graph again), and the steps go on eagerly over the same tensors.
//
// The object outlives one generate(): the next batch of an evaluation with the same batch size that fits in
// the capacity loads its prompt into the same cache (sdk::KvCache::load_prompt) and replays the same graph, so
// the batches of an evaluation that share a size capture once between them. The capacity is rounded up for
// that; the model's weights,
// their types and the autocast state must be those the graph was captured with (fingerprint()).
class DecodeSteps {
 public:
  DecodeSteps(sdk::Backbone& backbone, const std::string& plugin, sdk::KvCache prompt_cache, const Sequence& prompt,
              std::int64_t capacity, bool graph, std::string& refused, std::size_t fingerprint)
      : bb_(backbone), plugin_(plugin), cache_(std::move(prompt_cache)), want_graph_(graph), refused_(refused),
        fingerprint_(fingerprint), capacity_(capacity) {
    const auto b = prompt.embeds.size(0);
    auto on = torch::TensorOptions().device(prompt.embeds.device());
    slot_ = torch::zeros({1}, on.dtype(torch::kLong));
    cache_.make_fixed(capacity, slot_);
    key_valid_ = torch::zeros({b, capacity}, on.dtype(torch::kBool));
    // The new token comes after every prompt token (a prefix included), so key_valid is the whole mask.
    mask_.key_valid = key_valid_;
    ids_ = torch::zeros({b, 1}, on.dtype(torch::kLong));
    positions_ = torch::zeros({b, 1}, on.dtype(torch::kLong));
    start(prompt);
  }

  /// The weights' addresses and types and the autocast state: what a captured graph has baked in.
  static std::size_t fingerprint(torch::nn::Module& model, const torch::Device& device) {
    std::size_t h = std::hash<bool>{}(at::autocast::is_autocast_enabled(device.type())) ^
                    (static_cast<std::size_t>(at::autocast::get_autocast_dtype(device.type())) << 1);
    auto mix = [&h](const torch::Tensor& t) {
      const auto v = reinterpret_cast<std::uintptr_t>(t.data_ptr()) ^ (static_cast<std::uintptr_t>(t.scalar_type()) << 56);
      h ^= std::hash<std::uintptr_t>{}(v) + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2);
    };
    for (const auto& p : model.parameters()) mix(p);
    for (const auto& b : model.buffers()) mix(b);
    return h;
  }

  /// This object can decode `batch` rows needing `positions` cache positions, with weights as `fingerprint`.
  bool fits(std::int64_t batch, std::int64_t positions, std::size_t fingerprint) const {
    return batch == ids_.size(0) && positions <= capacity_ && fingerprint == fingerprint_;
  }

  /// A new prompt, held by `prompt_cache` (growing), for the same batch size.
  void load(const sdk::KvCache& prompt_cache, const Sequence& prompt) {
    cache_.load_prompt(prompt_cache);
    start(prompt);
  }

  /// Float32 scores [B, V] for the tokens `next` [B] at positions `positions` [B]. The tensor is rewritten by
  /// the next call.
  torch::Tensor step(const torch::Tensor& next, const torch::Tensor& positions) {
    TORCH_CHECK(next_slot_ < capacity_, "decode steps: the fixed KV cache is full");
    ids_.copy_(next.view(ids_.sizes()));
    positions_.copy_(positions.view(positions_.sizes()));
    slot_.fill_(next_slot_);
    key_valid_.select(1, next_slot_).fill_(true);
    ++next_slot_;
    if (graph_ && graph_->captured()) {
      graph_->replay();
      return scores_;
    }
    run();
    if (want_graph_ && !graph_) try_graph();
    return scores_;
  }

  /// "CUDA graph" or "fixed-size KV cache".
  std::string decoding() const { return graph_ && graph_->captured() ? "CUDA graph" : "fixed-size KV cache"; }

 private:
  void start(const Sequence& prompt) {
    const auto len = prompt.embeds.size(1);
    key_valid_.fill_(false);
    if (prompt.mask.key_valid.defined()) key_valid_.narrow(1, 0, len).copy_(prompt.mask.key_valid);
    else key_valid_.narrow(1, 0, len).fill_(true);
    next_slot_ = len;
  }

  void run() {
    auto embeds = guarded(plugin_, "embed", [&] { return bb_.embed(ids_); });
    auto hidden = guarded(plugin_, "forward", [&] { return bb_.forward(embeds, positions_, mask_, &cache_); });
    scores_ = guarded(plugin_, "logits", [&] { return bb_.logits(hidden.select(1, 0)); }).to(torch::kFloat32);
  }

  void try_graph() {
    auto eager = scores_;
    graph_ = std::make_unique<CudaGraph>();
    std::string refused;
    try {
      graph_->capture(eager.device(), [this] { run(); });
      graph_->replay();  // the same inputs once more: it rewrites the same cache slot with the same values
      const auto scale = std::max(1.0, eager.abs().max().item<double>());
      const auto diff = (scores_ - eager).abs().max().item<double>();
      if (!(diff <= 1e-3 * scale) || !torch::equal(scores_.argmax(-1), eager.argmax(-1))) {
        std::ostringstream why;
        why << "the replayed step differs from the eager one by up to " << diff;
        refused = why.str();
      }
    } catch (const std::exception& e) {
      const std::string what = e.what();
      refused = what.substr(0, what.find('\n'));
    }
    if (!refused.empty()) {
      graph_.reset();
      want_graph_ = false;
      refused_ = refused;
      run();  // again eagerly: a replay that was refused may have written its own keys and values into the cache
    }
  }

  sdk::Backbone& bb_;
  const std::string& plugin_;
  sdk::KvCache cache_;
  bool want_graph_;
  std::string& refused_;
  std::size_t fingerprint_;
  std::int64_t capacity_;
  sdk::AttentionMask mask_;
  torch::Tensor slot_, key_valid_, ids_, positions_, scores_;
  std::int64_t next_slot_ = 0;
  std::unique_ptr<CudaGraph> graph_;
};

namespace {

// A capture costs about two steps (the eager warm-up and the check): below this many steps a graph cannot pay.
constexpr std::int64_t kMinStepsForGraph = 8;
// Cache capacity is rounded up to a multiple of this, so that the batches of an evaluation, whose prompts
// differ in length, share one fixed cache and one graph.
constexpr std::int64_t kCapacityStep = 32;

}  // namespace

VlmModel::~VlmModel() = default;

void VlmModel::release_decode_steps() { decode_steps_.reset(); }

VlmModel::Generated VlmModel::generate(const GenerationBatch& batch, const GenerateConfig& cfg, std::uint64_t seed) {
  torch::NoGradGuard no_grad;
  const auto t0 = std::chrono::steady_clock::now();
  auto seconds = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(); };
  auto& bb = *backbone_.object;
  const auto& tok = bb.tokenizer();
  auto s = assemble(batch.pixels, batch.ids, batch.valid, torch::Tensor(), batch.features);
  check_length((layout_ == Layout::prefix ? batch.ids.size(1) : s.embeds.size(1)) + cfg.max_new_tokens - 1);
  const auto b = s.embeds.size(0);
  auto gen = at::detail::createCPUGenerator(seed);

  sdk::KvCache cache;
  auto hidden = guarded(backbone_.plugin, "forward", [&] { return bb.forward(s.embeds, s.positions, s.mask, &cache); });
  auto scores = guarded(backbone_.plugin, "logits", [&] { return bb.logits(hidden.select(1, hidden.size(1) - 1)); })
                    .to(torch::kFloat32);
  auto next_pos = std::get<0>(s.positions.max(1)) + 1;

  const auto steps = cfg.max_new_tokens - 1;  // forward passes after the prompt's
  const bool graph_possible = CudaGraph::available(s.embeds.device()) && graph_refused_.empty();
  const bool fixed = steps > 0 && (decode_graph_ == DecodeGraphMode::on ||
                                   (decode_graph_ == DecodeGraphMode::automatic && graph_possible && steps >= kMinStepsForGraph));
  DecodeSteps* fixed_steps = nullptr;
  if (fixed) {
    const auto needed = s.embeds.size(1) + steps;
    const auto fingerprint = DecodeSteps::fingerprint(bb.module(), s.embeds.device());
    if (decode_steps_ && decode_steps_->fits(b, needed, fingerprint)) {
      decode_steps_->load(cache, s);
    } else {
      decode_steps_.reset();  // its memory first
      const auto capacity = (needed + kCapacityStep - 1) / kCapacityStep * kCapacityStep;
      decode_steps_ = std::make_unique<DecodeSteps>(bb, backbone_.plugin, std::move(cache), s, capacity, graph_possible,
                                                    graph_refused_, fingerprint);
    }
    fixed_steps = decode_steps_.get();
  } else {
    decode_steps_.reset();  // (after a refused graph, say) its cache is not needed any more
  }
  // Growing cache: a token appended at the end may see every key before it, so without padding it needs no
  // mask at all and takes the unmasked attention kernel, instead of a dense mask in every layer for every token.
  const bool padded = !fixed && s.mask.key_valid.defined() && !s.mask.key_valid.all().item<bool>();
  sdk::AttentionMask step_mask = padded ? s.mask : sdk::AttentionMask::make_causal();

  Generated out;
  out.ids.assign(static_cast<std::size_t>(b), {});
  std::vector<bool> finished(static_cast<std::size_t>(b), false);
  // The tokenizer's EOS (which every training target ends with) and every eos_token_id transformers' generate()
  // would stop at for these weights (generation_config.json or config.json: Llama 3.1 has three).
  auto stops = guarded(backbone_.plugin, "stop_ids", [&] { return bb.stop_ids(); });
  if (tok.eos_id() >= 0) stops.push_back(tok.eos_id());
  const auto is_stop = [&stops](std::int64_t id) { return std::find(stops.begin(), stops.end(), id) != stops.end(); };
  for (std::int64_t step = 0; step < cfg.max_new_tokens; ++step) {
    auto next = sample_next(scores, cfg, gen);
    auto next_cpu = next.cpu();  // waits for the device: the times below are real
    if (step == 0) out.first_token_s = seconds();
    auto na = next_cpu.accessor<std::int64_t, 1>();
    bool all_done = true;
    for (std::int64_t i = 0; i < b; ++i) {
      const auto r = static_cast<std::size_t>(i);
      if (finished[r]) continue;
      ++out.new_tokens;
      if (is_stop(na[i])) {
        finished[r] = true;
        continue;
      }
      out.ids[r].push_back(na[i]);
      if (!cfg.stop.empty()) {
        const auto so_far = tok.decode(out.ids[r], true);
        for (const auto& stop : cfg.stop) {
          if (so_far.find(stop) != std::string::npos) finished[r] = true;
        }
      }
      all_done = all_done && finished[r];
    }
    if (all_done || step + 1 == cfg.max_new_tokens) break;
    if (fixed_steps) {
      scores = fixed_steps->step(next, next_pos);
    } else {
      auto step_embeds = guarded(backbone_.plugin, "embed", [&] { return bb.embed(next.unsqueeze(1)); });
      if (padded) step_mask.key_valid = torch::cat({step_mask.key_valid, torch::ones({b, 1}, step_mask.key_valid.options())}, 1);
      hidden = guarded(backbone_.plugin, "forward", [&] { return bb.forward(step_embeds, next_pos.unsqueeze(1), step_mask, &cache); });
      scores = guarded(backbone_.plugin, "logits", [&] { return bb.logits(hidden.select(1, 0)); }).to(torch::kFloat32);
    }
    next_pos = next_pos + 1;
  }
  for (const auto& row : out.ids) {
    auto text_out = tok.decode(row, true);
    std::size_t cut = text_out.size();
    for (const auto& stop : cfg.stop) cut = std::min(cut, text_out.find(stop));
    out.text.push_back(trim(text_out.substr(0, cut)));
  }
  out.decoding = fixed_steps ? fixed_steps->decoding() : "growing KV cache";
  if (!graph_refused_.empty() && decode_graph_ != DecodeGraphMode::off) out.decoding += ", no CUDA graph: " + graph_refused_;
  out.total_s = seconds();
  return out;
}

}  // namespace ablate
