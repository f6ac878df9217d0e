#pragma once
// From dataset samples to tensors: tokenisation, image preparation and collation, and a prefetcher that
// builds batches on worker threads, in order, while the model computes.

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <torch/types.h>

#include "ablate/sdk/dataset.hpp"
#include "ablate/sdk/encoder.hpp"
#include "ablate/sdk/tokenizer.hpp"

namespace ablate {

/// One sample, tokenised and with its pixels prepared for the encoder.
struct Example {
  sdk::Sample sample;
  torch::Tensor pixels;  ///< [3, H, W] float32; undefined when the feature cache stands in
  std::vector<std::int64_t> prompt_ids;  ///< BOS + prompt
  std::vector<std::int64_t> target_ids;  ///< target + EOS
};

/// Teacher-forced batch. Text is right-padded, so causal attention never reaches padding from a real token.
struct TrainBatch {
  torch::Tensor pixels;   ///< [B, 3, H, W]; undefined when `features` stand in
  torch::Tensor ids;      ///< [B, T] int64, padded with the pad id
  torch::Tensor targets;  ///< [B, T] bool: ids[:, t] carries loss (predicted from the position before it)
  torch::Tensor valid;    ///< [B, T] bool: real tokens (not padding)
  torch::Tensor prompt_len;  ///< [B] int64: tokens of BOS + prompt (the prefix_lm layout's bidirectional part)
  torch::Tensor features;    ///< [B, N, D] the frozen encoder's output from the feature cache; undefined: encode pixels
  std::vector<std::pair<std::size_t, std::size_t>> rows;  ///< (dataset, index) of each sample, for the feature cache
  std::int64_t samples = 0, text_tokens = 0, loss_tokens = 0;
  std::int64_t truncated = 0;  ///< samples whose text max_text_tokens cut
  std::vector<std::string> no_loss;  ///< "ID (prompt P tokens, target T)" of samples truncation left without loss tokens
};

/// A training batch as the loss reads it (VlmModel::loss_inputs), with the host's decisions made: where the image
/// goes among the text, and which positions carry loss, as indices the device reads without the host waiting
/// for it. Built on the data threads. Padded to a fixed shape (train/train_steps.hpp), it is the same batch with
/// more text padding and more loss slots that hold no token.
struct LossInputs {
  torch::Tensor pixels, features, ids, valid, prompt_len;  ///< as TrainBatch, ids and valid perhaps wider
  torch::Tensor index;       ///< inline layout: [B, S] where each position's embedding comes from; else undefined
  torch::Tensor predictors;  ///< [L] flat positions in [B * S] whose hidden states predict a token
  torch::Tensor labels;      ///< [L] flat positions of the tokens they predict; a padding slot's holds no token
  std::int64_t loss_tokens = 0;  ///< slots that carry loss (the rest are padding)
  /// Every tensor above, for moving, pinning or filling them all alike.
  std::vector<torch::Tensor*> tensors() { return {&pixels, &features, &ids, &valid, &prompt_len, &index, &predictors, &labels}; }
};

/// Prompts for generation, left-padded so that every row's next token is at the same position.
struct GenerationBatch {
  torch::Tensor pixels;  ///< [B, 3, H, W]
  torch::Tensor ids;     ///< [B, P] int64
  torch::Tensor valid;   ///< [B, P] bool
  torch::Tensor features;  ///< as TrainBatch::features
  std::vector<Example> examples;
};

class Collator {
 public:
  /// `vocab_size`: the backbone's embedding rows; an id the tokenizer gives past them is bad input, named
  /// after `vocab_origin` (the backbone's weights folder, or the experiment file), not an indexing error.
  /// `image_token`: the inline layout's image token id (-1 if none); the image takes its place before the
  /// embedding, so it may lie past the rows (a tokenizer's added "<image>").
  Collator(const sdk::Tokenizer& tokenizer, const sdk::ImageSpec& spec, std::int64_t max_text_tokens, bool loss_on_text,
           std::int64_t vocab_size, std::string vocab_origin, std::int64_t image_token);
  /// `with_pixels` false: the encoder's features come from the feature cache, the image is not prepared.
  Example prepare(sdk::Sample sample, bool with_pixels = true) const;
  /// An image resized, cropped and normalised for the encoder: [3, H, W] float32.
  torch::Tensor pixels(const sdk::Image& image) const;
  TrainBatch train_batch(const std::vector<Example>& examples) const;
  GenerationBatch generation_batch(std::vector<Example> examples) const;

 private:
  const sdk::Tokenizer& tokenizer_;
  sdk::ImageSpec spec_;
  std::int64_t max_text_tokens_;
  bool loss_on_text_;
  std::int64_t vocab_size_;
  std::string vocab_origin_;
  std::int64_t image_token_;

  /// Throws the InputError for an id past the embedding: "ORIGIN: <what> id N, past the backbone's vocab_size".
  [[noreturn]] void refuse_id(const std::string& what, std::int64_t id) const;
};

/// Stored generations are keyed by sample id, and real instruction mixes repeat ids (LLaVA's, or two datasets of
/// an eval mixture): a repeat gets "~2", "~3"... in order, the same in every run of the same data. Returns a line
/// saying what was renamed (empty if nothing was).
std::string make_sample_ids_unique(std::vector<Example>& examples);

/// A host tensor on `device`. On CUDA it is pinned first, so that the copy is queued behind the device's work
/// instead of waiting for it (a copy from pageable memory synchronises the stream).
torch::Tensor to_device_async(const torch::Tensor& t, const torch::Device& device);

/// Which dataset index the n-th training sample is: a fresh permutation per epoch, seeded by (seed, epoch),
/// so that any step's batch can be rebuilt exactly after a resume.
class SampleOrder {
 public:
  SampleOrder(std::size_t count, std::uint64_t seed);
  std::size_t at(std::uint64_t n);

 private:
  std::size_t count_;
  std::uint64_t seed_;
  std::uint64_t epoch_ = ~0ull;
  std::vector<std::size_t> perm_;
};

/// Runs produce(i) for i in [first, last) on worker threads, at most `depth` items ahead of the consumer, and
/// hands the results out in order. An exception in produce() is rethrown by next().
template <class T>
class Prefetcher {
 public:
  Prefetcher(std::int64_t first, std::int64_t last, int workers, int depth, std::function<T(std::int64_t)> produce)
      : next_(first), last_(last), depth_(depth), produce_(std::move(produce)) {
    for (int w = 0; w < workers; ++w) {
      threads_.emplace_back([this, w, workers, first] {
        for (std::int64_t i = first + w; i < last_; i += workers) {
          {
            std::unique_lock<std::mutex> lock(mu_);
            cv_.wait(lock, [&] { return stop_ || i < next_ + depth_; });
            if (stop_) return;
          }
          T item;
          std::exception_ptr error;
          try {
            item = produce_(i);
          } catch (...) {
            error = std::current_exception();
          }
          std::lock_guard<std::mutex> lock(mu_);
          ready_.emplace(i, std::make_pair(std::move(item), error));
          cv_.notify_all();
          if (error) return;
        }
      });
    }
  }
  ~Prefetcher() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : threads_) t.join();
  }
  Prefetcher(const Prefetcher&) = delete;
  Prefetcher& operator=(const Prefetcher&) = delete;

  bool done() const { return next_ >= last_; }
  T next() {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return ready_.count(next_) > 0; });
    auto node = ready_.extract(next_);
    ++next_;
    cv_.notify_all();
    if (node.mapped().second) std::rethrow_exception(node.mapped().second);
    return std::move(node.mapped().first);
  }

 private:
  std::int64_t next_, last_;
  int depth_;
  std::function<T(std::int64_t)> produce_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::map<std::int64_t, std::pair<T, std::exception_ptr>> ready_;
  bool stop_ = false;
  std::vector<std::thread> threads_;
};

}  // namespace ablate
