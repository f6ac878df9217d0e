// Attention masks described, not built by plugins: GIT's prefix mask, padding, and the KV cache.

#include <catch2/catch.hpp>

#include <torch/torch.h>

#include "ablate/sdk/attention.hpp"
#include "ablate/sdk/backbone.hpp"
#include "helpers.hpp"

using namespace ablate;

namespace {

// Plain softmax attention with an additive mask built from `allowed` [B, 1, Tq, S].
torch::Tensor reference_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                  const torch::Tensor& allowed, double scale) {
  auto scores = torch::matmul(q, k.transpose(-1, -2)) * scale;
  if (allowed.defined()) scores = scores.masked_fill(~allowed, -std::numeric_limits<float>::infinity());
  return torch::matmul(scores.softmax(-1), v);
}

std::shared_ptr<sdk::Backbone> tiny_opt(std::uint64_t seed) {
  torch::manual_seed(seed);
  sdk::Json table = {{"config",
                      {{"hidden_size", 16}, {"ffn_dim", 32}, {"num_hidden_layers", 2}, {"num_attention_heads", 4},
                       {"max_position_embeddings", 32}, {"dropout", 0.0}}}};
  sdk::Options o(table, "", "model.backbone", nullptr);
  sdk::BuildContext ctx;
  ctx.vocabulary = {"a", "b", "c", "d", "e", "f", "g"};
  auto bb = ablate::test::builtin_plugins().create_backbone("opt", o, ctx);
  bb->module().eval();
  return bb;
}

}  // namespace

TEST_CASE("the prefix mask is GIT's: image tokens see each other, text is causal over image and text", "[attention]") {
  // The 3 image + 4 text token mask of the GIT-LLM write-up, 1 where attention is allowed.
  const std::vector<std::vector<int>> git = {
      {1, 1, 1, 0, 0, 0, 0}, {1, 1, 1, 0, 0, 0, 0}, {1, 1, 1, 0, 0, 0, 0}, {1, 1, 1, 1, 0, 0, 0},
      {1, 1, 1, 1, 1, 0, 0}, {1, 1, 1, 1, 1, 1, 0}, {1, 1, 1, 1, 1, 1, 1}};
  auto mask = sdk::dense_mask(sdk::AttentionMask::with_prefix(torch::tensor({3}, torch::kLong)), 1, 7, 7, 0, torch::kCPU);
  REQUIRE(mask.sizes() == torch::IntArrayRef({1, 1, 7, 7}));
  for (int q = 0; q < 7; ++q) {
    for (int k = 0; k < 7; ++k) CHECK(mask[0][0][q][k].item<bool>() == static_cast<bool>(git[q][k]));
  }
  // Prefix 0 is plain causal; not causal is full.
  auto causal = sdk::dense_mask(sdk::AttentionMask::make_causal(), 1, 4, 4, 0, torch::kCPU);
  CHECK(torch::equal(causal[0][0], torch::ones({4, 4}, torch::kBool).tril()));
  auto full = sdk::dense_mask(sdk::AttentionMask::full(), 1, 4, 4, 0, torch::kCPU);
  CHECK(full.all().item<bool>());
}

TEST_CASE("padding keys are never attended to, and a padding query attends to itself", "[attention]") {
  sdk::AttentionMask m;
  m.key_valid = torch::tensor({0, 0, 1, 1}, torch::kBool).view({1, 4});  // left padding
  auto mask = sdk::dense_mask(m, 1, 4, 4, 0, torch::kCPU)[0][0];
  CHECK_FALSE(mask.index({torch::indexing::Slice(2), torch::indexing::Slice(0, 2)}).any().item<bool>());
  CHECK(mask[3][2].item<bool>());
  CHECK(mask[0][0].item<bool>());   // padding query: only itself
  CHECK_FALSE(mask[1][0].item<bool>());
  CHECK(mask.any(-1).all().item<bool>());
}

TEST_CASE("attend equals plain softmax attention for every mask kind and grouped-query heads", "[attention]") {
  torch::manual_seed(0);
  const double scale = 0.25;
  auto q = torch::randn({2, 4, 5, 8});
  auto k = torch::randn({2, 4, 5, 8});
  auto v = torch::randn({2, 4, 5, 8});
  sdk::AttentionMask prefix = sdk::AttentionMask::with_prefix(torch::tensor({2, 3}, torch::kLong));
  prefix.key_valid = torch::tensor({{1, 1, 1, 1, 0}, {1, 1, 1, 1, 1}}, torch::kBool);
  for (const auto& mask : {sdk::AttentionMask::make_causal(), sdk::AttentionMask::full(), prefix}) {
    auto allowed = sdk::dense_mask(mask, 2, 5, 5, 0, torch::kCPU);
    auto expected = reference_attention(q, k, v, allowed, scale);
    auto got = sdk::attend(q, k, v, mask, 0, scale);
    // Rows of padding queries are not compared: they only exist to keep the softmax finite.
    CHECK(torch::allclose(got.index({0, torch::indexing::Slice(), torch::indexing::Slice(0, 4)}),
                          expected.index({0, torch::indexing::Slice(), torch::indexing::Slice(0, 4)}), 1e-5, 1e-5));
    CHECK(torch::allclose(got[1], expected[1], 1e-5, 1e-5));
  }
  // Two key/value heads serving four query heads, as transformers' repeat_kv pairs them.
  auto k2 = torch::randn({2, 2, 5, 8}), v2 = torch::randn({2, 2, 5, 8});
  auto expected = reference_attention(q, k2.repeat_interleave(2, 1), v2.repeat_interleave(2, 1),
                                      sdk::dense_mask(sdk::AttentionMask::make_causal(), 2, 5, 5, 0, torch::kCPU), scale);
  CHECK(torch::allclose(sdk::attend(q, k2, v2, sdk::AttentionMask::make_causal(), 0, scale), expected, 1e-5, 1e-5));
}

TEST_CASE("decoding token by token with a KV cache gives the full forward's hidden states", "[attention]") {
  auto bb = tiny_opt(1);
  torch::NoGradGuard no_grad;
  auto ids = torch::tensor({{1, 4, 5, 6, 7, 8}, {1, 9, 10, 4, 5, 6}}, torch::kLong);
  const auto b = ids.size(0), t = ids.size(1);
  auto positions = torch::arange(t).expand({b, t});
  auto full = bb->forward(bb->embed(ids), positions, sdk::AttentionMask::make_causal(), nullptr);

  sdk::KvCache cache;
  // A prompt of 3 tokens in one go, then one token at a time.
  auto first = bb->forward(bb->embed(ids.slice(1, 0, 3)), positions.slice(1, 0, 3), sdk::AttentionMask::make_causal(), &cache);
  CHECK(torch::allclose(first, full.slice(1, 0, 3), 1e-5, 1e-6));
  for (std::int64_t i = 3; i < t; ++i) {
    auto step = bb->forward(bb->embed(ids.slice(1, i, i + 1)), positions.slice(1, i, i + 1), sdk::AttentionMask::make_causal(), &cache);
    CHECK(torch::allclose(step, full.slice(1, i, i + 1), 1e-5, 1e-6));
  }
  CHECK(cache.past_length(0) == t);
}

TEST_CASE("a left-padded row computes what the same row computes unpadded", "[attention]") {
  auto bb = tiny_opt(2);
  torch::NoGradGuard no_grad;
  auto unpadded = torch::tensor({{1, 4, 5, 6}}, torch::kLong);
  auto alone = bb->forward(bb->embed(unpadded), torch::arange(4).view({1, 4}), sdk::AttentionMask::make_causal(), nullptr);
  auto padded = torch::tensor({{0, 0, 1, 4, 5, 6}}, torch::kLong);
  sdk::AttentionMask mask;
  mask.key_valid = padded != 0;
  auto positions = torch::tensor({{-1, -1, 0, 1, 2, 3}}, torch::kLong);
  auto in_batch = bb->forward(bb->embed(padded), positions, mask, nullptr);
  CHECK(torch::allclose(in_batch.slice(1, 2), alone, 1e-5, 1e-6));
}

TEST_CASE("a fixed-size KV cache decodes what the full forward computes, padding included", "[attention]") {
  // (Rotary positions and grouped-query heads are checked in tests/parity/test_llava.py, against transformers'
  // generate(): llama builds only from weights.)
  auto bb = tiny_opt(3);
  torch::NoGradGuard no_grad;
  // Row 1 is left-padded by two: its positions start at 0 after the padding, as generation lays prompts out.
  auto ids = torch::tensor({{1, 4, 5, 6, 7, 8, 9}, {0, 0, 1, 9, 10, 4, 5}}, torch::kLong);
  auto valid = ids != 0;
  valid.index_put_({0}, true);
  auto positions = torch::where(valid, valid.to(torch::kLong).cumsum(1) - 1, torch::full_like(ids, -1));
  sdk::AttentionMask full_mask;
  full_mask.key_valid = valid;
  auto full = bb->forward(bb->embed(ids), positions, full_mask, nullptr);

  const std::int64_t prompt = 4, total = ids.size(1), capacity = 9;  // two positions never written
  sdk::KvCache cache;
  sdk::AttentionMask prompt_mask;
  prompt_mask.key_valid = valid.slice(1, 0, prompt);
  bb->forward(bb->embed(ids.slice(1, 0, prompt)), positions.slice(1, 0, prompt), prompt_mask, &cache);
  auto slot = torch::zeros({1}, torch::kLong);
  cache.make_fixed(capacity, slot);
  CHECK(cache.fixed());
  CHECK(cache.past_length(0) == capacity - 1);
  auto key_valid = torch::zeros({2, capacity}, torch::kBool);
  key_valid.slice(1, 0, prompt).copy_(prompt_mask.key_valid);
  sdk::AttentionMask step_mask;
  step_mask.key_valid = key_valid;
  for (std::int64_t i = prompt; i < total; ++i) {
    slot.fill_(i);  // in place, as a replayed graph sees it
    key_valid.select(1, i).fill_(true);
    auto step = bb->forward(bb->embed(ids.slice(1, i, i + 1)), positions.slice(1, i, i + 1), step_mask, &cache);
    CHECK(torch::allclose(step, full.slice(1, i, i + 1), 1e-5, 1e-6));
  }
  CHECK_THROWS_WITH(bb->forward(bb->embed(ids.slice(1, 0, 2)), positions.slice(1, 0, 2), step_mask, &cache),
                    Catch::Contains("one token per step"));
}
