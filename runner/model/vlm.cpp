#include "model/vlm.hpp"

#include <algorithm>

#include <torch/torch.h>

#include "host/plugin_host.hpp"

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

}  // namespace

VlmModel::VlmModel(Part<sdk::Encoder> encoder, Part<sdk::Projector> projector, Part<sdk::Backbone> backbone)
    : encoder_(std::move(encoder)), projector_(std::move(projector)), backbone_(std::move(backbone)) {
  register_module("encoder", module_of(encoder_.object));
  register_module("projector", module_of(projector_.object));
  register_module("backbone", module_of(backbone_.object));
  image_tokens_ = projector_.object->output_tokens(encoder_.object->num_tokens());
}

std::string VlmModel::head() const { return "backbone." + backbone_.object->head_module(); }

void VlmModel::refresh_frozen() {
  encoder_frozen_ = !any_trainable(encoder_.object->module());
  projector_frozen_ = encoder_frozen_ && !any_trainable(projector_.object->module());
}

torch::Tensor VlmModel::image_embeddings(const torch::Tensor& pixels) {
  torch::Tensor features;
  {
    // A frozen encoder needs no graph: no activations are kept for it.
    std::unique_ptr<torch::NoGradGuard> no_grad;
    if (encoder_frozen_) no_grad = std::make_unique<torch::NoGradGuard>();
    features = guarded(encoder_.plugin, "forward", [&] { return encoder_.object->encode(pixels); });
  }
  std::unique_ptr<torch::NoGradGuard> no_grad;
  if (projector_frozen_) no_grad = std::make_unique<torch::NoGradGuard>();
  return guarded(projector_.plugin, "forward", [&] { return projector_.object->project(features); });
}

torch::Tensor VlmModel::loss_sum(const TrainBatch& batch) {
  if (batch.loss_tokens == 0) {
    throw std::runtime_error("a batch has no loss tokens (is max_text_tokens cutting every target?)");
  }
  auto& bb = *backbone_.object;
  const auto device = bb.module().parameters().front().device();
  auto pixels = batch.pixels.to(device, /*non_blocking=*/true);
  auto ids = batch.ids.to(device, true);
  auto targets = batch.targets.to(device, true);
  const auto b = ids.size(0), t = ids.size(1);

  auto image = image_embeddings(pixels);
  const auto n = image.size(1);
  auto text = guarded(backbone_.plugin, "embed", [&] { return bb.embed(ids); });
  auto x = torch::cat({image.to(text.dtype()), text}, 1);
  auto positions = torch::cat({torch::full({b, n}, -1, ids.options()), torch::arange(t, ids.options()).expand({b, t})}, 1);
  auto mask = sdk::AttentionMask::with_prefix(torch::full({b}, n, ids.options()));
  auto hidden = guarded(backbone_.plugin, "forward", [&] { return bb.forward(x, positions, mask, nullptr); });
  // Hidden state at position n + t - 1 predicts text token t; only loss positions go through the head.
  auto predictors = hidden.slice(1, n - 1, n + t - 1);
  auto selected = predictors.index({targets});
  auto logits = guarded(backbone_.plugin, "logits", [&] { return bb.logits(selected); });
  return torch::nn::functional::cross_entropy(logits.to(torch::kFloat32), ids.index({targets}),
                                              torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum));
}

VlmModel::Generated VlmModel::generate(const GenerationBatch& batch, const GenerateConfig& cfg, std::uint64_t seed) {
  torch::NoGradGuard no_grad;
  auto& bb = *backbone_.object;
  const auto& tok = bb.tokenizer();
  const auto device = bb.module().parameters().front().device();
  auto pixels = batch.pixels.to(device);
  auto ids = batch.ids.to(device);
  auto valid = batch.valid.to(device);
  const auto b = ids.size(0);

  auto gen = at::detail::createCPUGenerator(seed);
  auto image = image_embeddings(pixels);
  const auto n = image.size(1);
  auto text = guarded(backbone_.plugin, "embed", [&] { return bb.embed(ids); });
  auto x = torch::cat({image.to(text.dtype()), text}, 1);
  // Left padding: text positions count real tokens only; padding gets no position and is never attended to.
  auto text_pos = valid.to(torch::kLong).cumsum(1) - 1;
  text_pos = torch::where(valid, text_pos, torch::full_like(text_pos, -1));
  auto positions = torch::cat({torch::full({b, n}, -1, ids.options()), text_pos}, 1);
  auto key_valid = torch::cat({torch::ones({b, n}, valid.options()), valid}, 1);
  auto next_pos = std::get<0>(text_pos.max(1)) + 1;

  sdk::KvCache cache;
  sdk::AttentionMask mask = sdk::AttentionMask::with_prefix(torch::full({b}, n, ids.options()));
  mask.key_valid = key_valid;
  auto hidden = guarded(backbone_.plugin, "forward", [&] { return bb.forward(x, positions, mask, &cache); });
  auto last = hidden.select(1, hidden.size(1) - 1);

  Generated out;
  out.ids.assign(static_cast<std::size_t>(b), {});
  std::vector<bool> finished(static_cast<std::size_t>(b), false);
  const auto eos = tok.eos_id();
  for (std::int64_t step = 0; step < cfg.max_new_tokens; ++step) {
    auto logits = guarded(backbone_.plugin, "logits", [&] { return bb.logits(last); });
    logits = logits.to(torch::kFloat32);
    torch::Tensor next;
    if (!cfg.do_sample) {
      next = logits.argmax(-1);
    } else {
      logits = logits / cfg.temperature;
      if (cfg.top_k > 0 && cfg.top_k < logits.size(-1)) {
        auto kth = std::get<0>(logits.topk(cfg.top_k, -1)).select(-1, cfg.top_k - 1).unsqueeze(-1);
        logits = logits.masked_fill(logits < kth, -std::numeric_limits<float>::infinity());
      }
      if (cfg.top_p < 1.0) {
        // As transformers' TopPLogitsWarper: drop the tokens whose cumulative probability, in ascending
        // order, stays within 1 - top_p; the most likely token always survives.
        auto sorted = logits.sort(-1, /*descending=*/false);
        auto probs = std::get<0>(sorted).softmax(-1).cumsum(-1);
        auto remove_sorted = probs <= (1.0 - cfg.top_p);
        remove_sorted.select(-1, remove_sorted.size(-1) - 1).fill_(false);
        auto remove = remove_sorted.scatter(-1, std::get<1>(sorted), remove_sorted);
        logits = logits.masked_fill(remove, -std::numeric_limits<float>::infinity());
      }
      next = torch::multinomial(logits.softmax(-1).cpu(), 1, false, gen).squeeze(-1).to(device);
    }
    auto next_cpu = next.cpu();
    bool all_done = true;
    for (std::int64_t i = 0; i < b; ++i) {
      if (finished[static_cast<std::size_t>(i)]) continue;
      const auto id = next_cpu[i].item<std::int64_t>();
      if (id == eos) {
        finished[static_cast<std::size_t>(i)] = true;
        continue;
      }
      auto& row = out.ids[static_cast<std::size_t>(i)];
      row.push_back(id);
      if (!cfg.stop.empty()) {
        const auto text_so_far = tok.decode(row, true);
        for (const auto& s : cfg.stop) {
          if (text_so_far.find(s) != std::string::npos) finished[static_cast<std::size_t>(i)] = true;
        }
      }
      all_done = all_done && finished[static_cast<std::size_t>(i)];
    }
    if (all_done || step + 1 == cfg.max_new_tokens) break;
    auto step_embeds = guarded(backbone_.plugin, "embed", [&] { return bb.embed(next.unsqueeze(1)); });
    mask.key_valid = torch::cat({mask.key_valid, torch::ones({b, 1}, valid.options())}, 1);
    hidden = guarded(backbone_.plugin, "forward",
                     [&] { return bb.forward(step_embeds, next_pos.unsqueeze(1), mask, &cache); });
    next_pos = next_pos + 1;
    last = hidden.select(1, 0);
  }
  for (const auto& row : out.ids) {
    auto text_out = tok.decode(row, true);
    std::size_t cut = text_out.size();
    for (const auto& s : cfg.stop) cut = std::min(cut, text_out.find(s));
    out.text.push_back(trim(text_out.substr(0, cut)));
  }
  return out;
}

}  // namespace ablate
