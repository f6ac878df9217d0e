#pragma once
// Attention takes a description of the mask, not a dense tensor built by every plugin: the kit turns it into
// scaled_dot_product_attention calls, with no mask at all where the fast causal / full kernels apply.

#include <vector>

#include <torch/types.h>

namespace ablate::sdk {

/// Which keys each query may attend to.
///  - causal, prefix 0: every query sees keys at or before its position (decoders);
///  - causal, prefix P: positions < P see each other both ways, later ones are causal. This is GIT's mask
///    (P = image tokens) and PaliGemma's prefix-LM (P = image + prompt tokens);
///  - not causal: every query sees every key (encoders).
/// Keys marked invalid in key_valid (padding) are never attended to. A query row left with no key (a
/// padding query) attends to itself, so no row is all -inf and no NaN appears.
struct AttentionMask {
  bool causal = true;
  /// [B] int64 per-sample prefix length, or undefined for none.
  torch::Tensor prefix;
  /// [B, S] bool over all keys (cache included), true = real token; undefined means all valid.
  torch::Tensor key_valid;

  static AttentionMask make_causal() { return {}; }
  static AttentionMask full() { AttentionMask m; m.causal = false; return m; }
  static AttentionMask with_prefix(torch::Tensor prefix_len) { AttentionMask m; m.prefix = std::move(prefix_len); return m; }
};

/// Dense boolean mask [B, 1, Tq, S] (true = may attend) for queries at positions [q_offset, q_offset + Tq)
/// over keys [0, S). Returns an undefined tensor when no mask is needed, i.e. when is_causal_only() says
/// the plain causal kernel or no mask at all gives the same result.
torch::Tensor dense_mask(const AttentionMask& mask, std::int64_t batch, std::int64_t q_len, std::int64_t k_len,
                         std::int64_t q_offset, const torch::Device& device);

/// Holds each layer's keys and values as [B, H_kv, S, Dh]. Not thread-safe; owned by the caller of
/// Backbone::forward. Two modes:
///  - growing (the default): each forward() appends its tokens, and attention sees exactly the keys so far;
///  - fixed (after make_fixed): every layer's keys and values sit in buffers of `capacity` positions that never
///    move or change shape, so a decode step can be captured once and replayed as a CUDA graph. Each forward()
///    then brings one token per row, written at the position the `slot` tensor holds when the step runs (a
///    device tensor, so a replayed graph writes where the host last put it), and attention runs over all
///    `capacity` keys: the caller's AttentionMask::key_valid says which of them are real.
class KvCache {
 public:
  /// Stores this step's keys and values for `layer` and returns the keys and values attention should see.
  std::pair<torch::Tensor, torch::Tensor> append(std::size_t layer, const torch::Tensor& k, const torch::Tensor& v);
  /// The query offset for attend(): tokens held before the current forward() began (layer 0's length before
  /// its append). In fixed mode capacity - 1, so the causal rule lets the one new token see every key and
  /// key_valid alone decides.
  std::int64_t past_length(std::size_t layer) const;
  /// Keeps only the given batch rows (used when finished sequences leave a batch).
  void select(const torch::Tensor& rows);
  void clear() {
    layers_.clear();
    fixed_ = false;
    slot_ = torch::Tensor();
  }

  /// Moves what every layer holds so far into buffers of `capacity` positions (the rest zero) and switches to
  /// fixed mode. `slot`: [1] int64 on the cache's device, the position the next token is written at.
  void make_fixed(std::int64_t capacity, torch::Tensor slot);
  bool fixed() const { return fixed_; }
  /// Fixed mode: writes what a growing cache holds (a new prompt, same batch size) into the first positions of
  /// the buffers, in place, so a graph captured over them serves the next generation too. The positions after
  /// it keep old values: the caller's key_valid must mark them invalid.
  void load_prompt(const KvCache& prompt);

 private:
  std::vector<std::pair<torch::Tensor, torch::Tensor>> layers_;
  bool fixed_ = false;
  std::int64_t capacity_ = 0;
  torch::Tensor slot_;
};

/// Forgets the dense mask attend() remembers between the layers of one forward pass (on this thread). Call
/// before capturing a CUDA graph: a mask remembered from an eager run would otherwise be baked into the graph
/// instead of being rebuilt from key_valid at every replay.
void forget_mask_memo();

/// q: [B, H, Tq, Dh]; k, v: [B, H_kv, S, Dh] with S = q_offset + Tq (keys from the cache included).
/// Grouped-query attention when H_kv divides H. `scale`: multiplier of q·k (usually Dh^-0.5).
/// Returns [B, H, Tq, Dh].
torch::Tensor attend(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const AttentionMask& mask,
                     std::int64_t q_offset, double scale, double dropout_p = 0.0);

}  // namespace ablate::sdk
