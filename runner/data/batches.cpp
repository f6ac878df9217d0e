#include "data/batches.hpp"

#include <algorithm>
#include <random>
#include <set>

#include "ablate/sdk/error.hpp"
#include "ablate/sdk/image.hpp"

namespace ablate {

Collator::Collator(const sdk::Tokenizer& tokenizer, const sdk::ImageSpec& spec, std::int64_t max_text_tokens,
                   bool loss_on_text, std::int64_t vocab_size, std::string vocab_origin, std::int64_t image_token)
    : tokenizer_(tokenizer),
      spec_(spec),
      max_text_tokens_(max_text_tokens),
      loss_on_text_(loss_on_text),
      vocab_size_(vocab_size),
      vocab_origin_(std::move(vocab_origin)),
      image_token_(image_token) {
  // Padding is embedded too (its positions are masked, not skipped).
  if (const auto pad = tokenizer_.pad_id(); pad >= vocab_size_) refuse_id("the padding token '" + tokenizer_.token(pad) + "' has", pad);
}

void Collator::refuse_id(const std::string& what, std::int64_t id) const {
  throw sdk::InputError(vocab_origin_ + ": " + what + " id " + std::to_string(id) + ", past the backbone's vocab_size " +
                        std::to_string(vocab_size_) + " (the tokenizer and config.json disagree)");
}

torch::Tensor to_device_async(const torch::Tensor& t, const torch::Device& device) {
  if (t.device() == device) return t;
  return device.is_cuda() && t.is_cpu() ? (t.is_pinned() ? t : t.pin_memory()).to(device, /*non_blocking=*/true) : t.to(device);
}

torch::Tensor Collator::pixels(const sdk::Image& image) const {
  // A text-only sample (an empty image, as LLaVA's instruction mixes have) still goes through the image
  // tokens of the layout: it gets zeros after normalisation, the dataset's mean colour.
  return image.size() == 0 ? torch::zeros({3, spec_.height, spec_.width}) : sdk::prepare_image(image, spec_);
}

Example Collator::prepare(sdk::Sample sample, bool with_pixels) const {
  Example ex;
  if (with_pixels) ex.pixels = pixels(sample.image);
  ex.prompt_ids = tokenizer_.encode(sample.prompt, /*add_special_tokens=*/true);
  ex.target_ids = tokenizer_.encode(sample.target, false);
  if (tokenizer_.eos_id() >= 0) ex.target_ids.push_back(tokenizer_.eos_id());
  // transformers would stop here with an IndexError from the embedding; this says which token and why. A
  // negative id can only come from a tokenizer.json post-processor's special token.
  for (const auto* ids : {&ex.prompt_ids, &ex.target_ids}) {
    for (const auto id : *ids) {
      if ((id < 0 || id >= vocab_size_) && (id != image_token_ || image_token_ < 0)) {
        refuse_id("sample '" + sample.id + "': the tokenizer gives '" + tokenizer_.token(id) + "'", id);
      }
    }
  }
  ex.sample = std::move(sample);
  return ex;
}

TrainBatch Collator::train_batch(const std::vector<Example>& examples) const {
  TrainBatch b;
  b.samples = static_cast<std::int64_t>(examples.size());
  std::vector<std::vector<std::int64_t>> rows;
  std::vector<std::vector<bool>> loss;
  std::int64_t width = 0;
  for (const auto& ex : examples) {
    std::vector<std::int64_t> ids = ex.prompt_ids;
    ids.insert(ids.end(), ex.target_ids.begin(), ex.target_ids.end());
    // The first token carries loss only when it is already the target (no BOS, no prompt): it is then
    // predicted from the image. A BOS never does, as in GIT-LLM.
    std::vector<bool> carries(ids.size(), false);
    for (std::size_t t = 0; t < ids.size(); ++t) {
      carries[t] = t >= ex.prompt_ids.size() || (loss_on_text_ && t > 0);
    }
    if (static_cast<std::int64_t>(ids.size()) > max_text_tokens_) {
      ids.resize(static_cast<std::size_t>(max_text_tokens_));
      carries.resize(ids.size());
      ++b.truncated;
      if (std::none_of(carries.begin(), carries.end(), [](bool c) { return c; })) {
        b.no_loss.push_back(ex.sample.id + " (prompt " + std::to_string(ex.prompt_ids.size()) + " tokens, target " +
                            std::to_string(ex.target_ids.size()) + ")");
      }
    }
    width = std::max<std::int64_t>(width, static_cast<std::int64_t>(ids.size()));
    rows.push_back(std::move(ids));
    loss.push_back(std::move(carries));
  }
  const auto pad = std::max<std::int64_t>(tokenizer_.pad_id(), 0);
  b.ids = torch::full({b.samples, width}, pad, torch::kLong);
  b.targets = torch::zeros({b.samples, width}, torch::kBool);
  b.valid = torch::zeros({b.samples, width}, torch::kBool);
  b.prompt_len = torch::zeros({b.samples}, torch::kLong);
  auto ids = b.ids.accessor<std::int64_t, 2>();
  auto targets = b.targets.accessor<bool, 2>();
  auto valid = b.valid.accessor<bool, 2>();
  for (std::size_t i = 0; i < rows.size(); ++i) {
    b.prompt_len[static_cast<std::int64_t>(i)] =
        std::min<std::int64_t>(static_cast<std::int64_t>(examples[i].prompt_ids.size()), static_cast<std::int64_t>(rows[i].size()));
    for (std::size_t t = 0; t < rows[i].size(); ++t) {
      ids[static_cast<std::int64_t>(i)][static_cast<std::int64_t>(t)] = rows[i][t];
      valid[static_cast<std::int64_t>(i)][static_cast<std::int64_t>(t)] = true;
      targets[static_cast<std::int64_t>(i)][static_cast<std::int64_t>(t)] = loss[i][t];
      b.loss_tokens += loss[i][t] ? 1 : 0;
    }
    b.text_tokens += static_cast<std::int64_t>(rows[i].size());
  }
  std::vector<torch::Tensor> pixels;
  for (const auto& ex : examples) {
    if (ex.pixels.defined()) pixels.push_back(ex.pixels);
  }
  if (pixels.size() == examples.size()) b.pixels = torch::stack(pixels);  // else the feature cache stands in
  return b;
}

GenerationBatch Collator::generation_batch(std::vector<Example> examples) const {
  GenerationBatch b;
  std::int64_t width = 0;
  for (auto& ex : examples) {
    // Keep the end of long prompts: the question is usually last.
    if (static_cast<std::int64_t>(ex.prompt_ids.size()) > max_text_tokens_) {
      ex.prompt_ids.erase(ex.prompt_ids.begin(), ex.prompt_ids.end() - max_text_tokens_);
    }
    width = std::max<std::int64_t>(width, static_cast<std::int64_t>(ex.prompt_ids.size()));
  }
  const auto n = static_cast<std::int64_t>(examples.size());
  b.ids = torch::full({n, width}, std::max<std::int64_t>(tokenizer_.pad_id(), 0), torch::kLong);
  b.valid = torch::zeros({n, width}, torch::kBool);
  auto ids = b.ids.accessor<std::int64_t, 2>();
  auto valid = b.valid.accessor<bool, 2>();
  std::vector<torch::Tensor> pixels;
  for (std::int64_t i = 0; i < n; ++i) {
    const auto& p = examples[static_cast<std::size_t>(i)].prompt_ids;
    const auto offset = width - static_cast<std::int64_t>(p.size());
    for (std::size_t t = 0; t < p.size(); ++t) {
      ids[i][offset + static_cast<std::int64_t>(t)] = p[t];
      valid[i][offset + static_cast<std::int64_t>(t)] = true;
    }
    pixels.push_back(examples[static_cast<std::size_t>(i)].pixels);
  }
  b.pixels = torch::stack(pixels);
  b.examples = std::move(examples);
  return b;
}

SampleOrder::SampleOrder(std::size_t count, std::uint64_t seed) : count_(count), seed_(seed) {}

std::size_t SampleOrder::at(std::uint64_t n) {
  const std::uint64_t epoch = n / count_;
  if (epoch != epoch_) {
    perm_.resize(count_);
    for (std::size_t i = 0; i < count_; ++i) perm_[i] = i;
    // std::shuffle's algorithm is fixed by libstdc++; mt19937_64's sequence is fixed by the standard.
    std::mt19937_64 rng(seed_ * 0x9e3779b97f4a7c15ULL + epoch + 1);
    for (std::size_t i = count_; i > 1; --i) {
      std::swap(perm_[i - 1], perm_[static_cast<std::size_t>(rng() % i)]);
    }
    epoch_ = epoch;
  }
  return perm_[n % count_];
}

std::string make_sample_ids_unique(std::vector<Example>& examples) {
  std::set<std::string> seen;
  std::size_t renamed = 0;
  std::string first;
  for (auto& e : examples) {
    auto& id = e.sample.id;
    if (seen.insert(id).second) continue;
    std::string unique;
    for (int k = 2; !seen.insert(unique = id + "~" + std::to_string(k)).second; ++k) {
    }
    if (renamed++ == 0) first = "'" + id + "' -> '" + unique + "'";
    id = unique;
  }
  if (renamed == 0) return {};
  return std::to_string(renamed) + " repeated sample ids stored with a suffix (" + first + (renamed > 1 ? ", ..." : "") + ")";
}

}  // namespace ablate
