#include "ablate/sdk/attention.hpp"

#include <ATen/ATen.h>

namespace ablate::sdk {

torch::Tensor dense_mask(const AttentionMask& mask, std::int64_t batch, std::int64_t q_len, std::int64_t k_len,
                         std::int64_t q_offset, const torch::Device& device) {
  auto opts = torch::TensorOptions().dtype(torch::kLong).device(device);
  auto q_pos = torch::arange(q_offset, q_offset + q_len, opts).view({1, q_len, 1});
  auto k_pos = torch::arange(k_len, opts).view({1, 1, k_len});
  torch::Tensor allowed = mask.causal ? (k_pos <= q_pos) : torch::ones({1, q_len, k_len}, opts.dtype(torch::kBool));
  if (mask.prefix.defined()) {
    auto p = mask.prefix.to(device, torch::kLong).view({-1, 1, 1});
    allowed = allowed | ((q_pos < p) & (k_pos < p));
  }
  allowed = allowed.expand({batch, q_len, k_len});
  if (mask.key_valid.defined()) {
    TORCH_CHECK(mask.key_valid.size(-1) == k_len, "key_valid covers ", mask.key_valid.size(-1), " keys, expected ",
                k_len);
    allowed = allowed & mask.key_valid.to(device, torch::kBool).view({batch, 1, k_len});
  }
  // A query that may see nothing (padding) attends to itself instead of producing NaN.
  auto empty = ~allowed.any(-1, /*keepdim=*/true);
  allowed = allowed | (empty & (k_pos == q_pos));
  return allowed.unsqueeze(1);
}

namespace {

// Every layer of a forward pass is given the same AttentionMask, and building its dense form takes about ten
// small operations: done once per pass, not once per layer, by remembering the last one built on this thread.
// The memo holds the mask's tensors, so their addresses cannot be reused by other tensors while it is kept,
// and compares their version counters, so an in-place change to them is seen.
struct MaskMemo {
  torch::Tensor prefix, key_valid;
  std::uint32_t prefix_version = 0, key_valid_version = 0;
  bool causal = true;
  std::int64_t batch = 0, q_len = 0, k_len = 0, q_offset = 0;
  torch::Device device{torch::kCPU};
  torch::Tensor dense;

  static std::uint32_t version(const torch::Tensor& t) { return t.defined() ? t._version() : 0; }
  bool same(const AttentionMask& m, std::int64_t b, std::int64_t q, std::int64_t k, std::int64_t off,
            const torch::Device& dev) const {
    return dense.defined() && m.causal == causal && b == batch && q == q_len && k == k_len && off == q_offset &&
           dev == device && m.prefix.unsafeGetTensorImpl() == prefix.unsafeGetTensorImpl() &&
           m.key_valid.unsafeGetTensorImpl() == key_valid.unsafeGetTensorImpl() && version(m.prefix) == prefix_version &&
           version(m.key_valid) == key_valid_version;
  }
};

thread_local MaskMemo memo;

torch::Tensor layer_mask(const AttentionMask& mask, std::int64_t batch, std::int64_t q_len, std::int64_t k_len,
                         std::int64_t q_offset, const torch::Device& device) {
  if (!memo.same(mask, batch, q_len, k_len, q_offset, device)) {
    memo = {mask.prefix, mask.key_valid, MaskMemo::version(mask.prefix), MaskMemo::version(mask.key_valid),
            mask.causal, batch, q_len, k_len, q_offset, device,
            dense_mask(mask, batch, q_len, k_len, q_offset, device)};
  }
  return memo.dense;
}

}  // namespace

void forget_mask_memo() { memo = MaskMemo{}; }

std::pair<torch::Tensor, torch::Tensor> KvCache::append(std::size_t layer, const torch::Tensor& k,
                                                        const torch::Tensor& v) {
  if (fixed_) {
    TORCH_CHECK(layer < layers_.size() && layers_[layer].first.defined(), "fixed KV cache: layer ", layer,
                " held nothing when it was fixed");
    TORCH_CHECK(k.size(2) == 1, "fixed KV cache: one token per step, got ", k.size(2));
    auto& [ck, cv] = layers_[layer];
    // index_copy_ reads the position from the device, so a captured graph writes where slot_ points at replay.
    ck.index_copy_(2, slot_, k.to(ck.scalar_type()));
    cv.index_copy_(2, slot_, v.to(cv.scalar_type()));
    return {ck, cv};
  }
  if (layers_.size() <= layer) layers_.resize(layer + 1);
  auto& [ck, cv] = layers_[layer];
  if (!ck.defined()) {
    ck = k;
    cv = v;
  } else {
    ck = torch::cat({ck, k}, 2);
    cv = torch::cat({cv, v}, 2);
  }
  return {ck, cv};
}

std::int64_t KvCache::past_length(std::size_t layer) const {
  if (fixed_) return capacity_ - 1;
  if (layer >= layers_.size() || !layers_[layer].first.defined()) return 0;
  return layers_[layer].first.size(2);
}

void KvCache::make_fixed(std::int64_t capacity, torch::Tensor slot) {
  TORCH_CHECK(!fixed_, "the KV cache is fixed already");
  TORCH_CHECK(slot.defined() && slot.numel() == 1 && slot.scalar_type() == torch::kLong, "fixed KV cache: slot must be one int64");
  const KvCache held = *this;  // the same tensors, as a growing cache to load from
  for (auto& [k, v] : layers_) {
    if (!k.defined()) continue;
    TORCH_CHECK(k.size(2) <= capacity, "fixed KV cache: ", k.size(2), " tokens held, capacity ", capacity);
    auto shape = k.sizes().vec();
    shape[2] = capacity;
    k = torch::zeros(shape, k.options());
    v = torch::zeros(shape, v.options());
  }
  fixed_ = true;
  capacity_ = capacity;
  slot_ = slot.view({1});
  load_prompt(held);
}

void KvCache::load_prompt(const KvCache& prompt) {
  TORCH_CHECK(fixed_ && !prompt.fixed_, "load_prompt: from a growing KV cache into a fixed one");
  TORCH_CHECK(prompt.layers_.size() == layers_.size(), "load_prompt: ", prompt.layers_.size(), " layers into ",
              layers_.size());
  for (std::size_t i = 0; i < layers_.size(); ++i) {
    const auto& [pk, pv] = prompt.layers_[i];
    auto& [k, v] = layers_[i];
    TORCH_CHECK(pk.defined() == k.defined(), "load_prompt: layer ", i, " held in one cache only");
    if (!k.defined()) continue;
    TORCH_CHECK(pk.size(0) == k.size(0) && pk.size(2) <= capacity_, "load_prompt: ", pk.sizes(), " into ", k.sizes());
    k.narrow(2, 0, pk.size(2)).copy_(pk);
    v.narrow(2, 0, pv.size(2)).copy_(pv);
  }
}

void KvCache::select(const torch::Tensor& rows) {
  for (auto& [k, v] : layers_) {
    if (!k.defined()) continue;
    k = k.index_select(0, rows);
    v = v.index_select(0, rows);
  }
}

torch::Tensor attend(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const AttentionMask& mask,
                     std::int64_t q_offset, double scale, double dropout_p) {
  const auto heads = q.size(1), kv_heads = k.size(1);
  torch::Tensor key = k, value = v;
  if (kv_heads != heads) {
    TORCH_CHECK(heads % kv_heads == 0, "query heads ", heads, " not a multiple of key/value heads ", kv_heads);
    // Same order as Hugging Face's repeat_kv: each key/value head serves heads/kv_heads consecutive queries.
    key = k.repeat_interleave(heads / kv_heads, 1);
    value = v.repeat_interleave(heads / kv_heads, 1);
  }
  const auto q_len = q.size(2), k_len = key.size(2);
  const bool plain = !mask.prefix.defined() && !mask.key_valid.defined();
  if (plain && (!mask.causal || q_len == 1)) {
    // No mask: every key is visible (encoders, or one new token at the end of a causal sequence).
    return at::scaled_dot_product_attention(q, key, value, std::nullopt, dropout_p, false, scale);
  }
  if (plain && q_offset == 0 && q_len == k_len) {
    return at::scaled_dot_product_attention(q, key, value, std::nullopt, dropout_p, true, scale);
  }
  return at::scaled_dot_product_attention(q, key, value, layer_mask(mask, q.size(0), q_len, k_len, q_offset, q.device()),
                                         dropout_p, false, scale);
}

}  // namespace ablate::sdk
