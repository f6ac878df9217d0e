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

/// Grows per layer with each forward() that is given it. Holds keys and values as [B, H_kv, S, Dh].
/// Not thread-safe; owned by the caller of Backbone::forward.
class KvCache {
 public:
  /// Appends this step's keys and values for `layer` and returns all keys and values so far.
  std::pair<torch::Tensor, torch::Tensor> append(std::size_t layer, const torch::Tensor& k, const torch::Tensor& v);
  /// Tokens held before the current forward() began (layer 0's length before its append).
  std::int64_t past_length(std::size_t layer) const;
  /// Keeps only the given batch rows (used when finished sequences leave a batch).
  void select(const torch::Tensor& rows);
  void clear() { layers_.clear(); }

 private:
  std::vector<std::pair<torch::Tensor, torch::Tensor>> layers_;
};

/// q: [B, H, Tq, Dh]; k, v: [B, H_kv, S, Dh] with S = q_offset + Tq (keys from the cache included).
/// Grouped-query attention when H_kv divides H. `scale`: multiplier of q·k (usually Dh^-0.5).
/// Returns [B, H, Tq, Dh].
torch::Tensor attend(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const AttentionMask& mask,
                     std::int64_t q_offset, double scale, double dropout_p = 0.0);

}  // namespace ablate::sdk
