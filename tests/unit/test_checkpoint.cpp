// Gradient checkpointing: the recomputation in backward draws the dropout masks the forward pass drew, so
// gradients do not change; the training's random stream is not shifted; and a component with it switched on
// really does go through the checkpoint (its graph holds the checkpoint node, not the layers' activations).

#include <catch2/catch.hpp>

#include <functional>
#include <set>

#include <torch/torch.h>

#include "ablate/sdk/checkpoint.hpp"
#include "ablate/sdk/backbone.hpp"
#include "helpers.hpp"

using namespace ablate;

namespace {

// How many nodes of the autograd graph below `t` are checkpoint nodes.
int checkpoint_nodes(const torch::Tensor& t) {
  int found = 0;
  std::set<torch::autograd::Node*> seen;
  std::function<void(torch::autograd::Node*)> walk = [&](torch::autograd::Node* n) {
    if (!n || !seen.insert(n).second) return;
    if (n->name().find("CheckpointFunction") != std::string::npos) ++found;
    for (const auto& e : n->next_edges()) walk(e.function.get());
  };
  walk(t.grad_fn().get());
  return found;
}

struct Outcome {
  std::vector<torch::Tensor> grads;
  torch::Tensor after;  // a draw from the generator once forward and backward are done
  int checkpoints = 0;
};

}  // namespace

TEST_CASE("checkpoint: the recomputed layer draws the same dropout masks, gradients are bit for bit equal", "[checkpoint]") {
  torch::manual_seed(1);
  auto w1 = torch::randn({8, 8}).requires_grad_(), b1 = torch::randn({8}).requires_grad_();
  auto w2 = torch::randn({8, 8}).requires_grad_();
  auto x = torch::randn({4, 8});  // needs no gradient, as a frozen embedding's output: params still get theirs
  auto run = [&](bool checkpointed) {
    for (auto* p : {&w1, &b1, &w2}) p->mutable_grad() = torch::Tensor();
    torch::manual_seed(7);
    auto first = [&](const torch::Tensor& h) { return torch::dropout(torch::relu(h.matmul(w1) + b1), 0.3, true); };
    auto second = [&](const torch::Tensor& h) { return torch::dropout(torch::tanh(h.matmul(w2)), 0.5, true); };
    torch::Tensor h = checkpointed ? sdk::checkpoint(first, x, {w1, b1}) : first(x);
    h = checkpointed ? sdk::checkpoint(second, h, {w2}) : second(h);
    Outcome o;
    o.checkpoints = checkpoint_nodes(h);
    (h * h).sum().backward();
    o.grads = {w1.grad().clone(), b1.grad().clone(), w2.grad().clone()};
    o.after = torch::rand({3});
    return o;
  };
  const auto plain = run(false), checkpointed = run(true);
  CHECK(plain.checkpoints == 0);
  CHECK(checkpointed.checkpoints == 2);
  for (std::size_t i = 0; i < plain.grads.size(); ++i) {
    CHECK(plain.grads[i].abs().sum().item<double>() > 0);
    CHECK(torch::equal(plain.grads[i], checkpointed.grads[i]));
  }
  CHECK(torch::equal(plain.after, checkpointed.after));  // the recomputation put the generator back
}

TEST_CASE("checkpoint: an OPT backbone with dropout trains to the same gradients with it on, and uses it", "[checkpoint]") {
  torch::manual_seed(3);
  sdk::Json table = {{"config",
                      {{"hidden_size", 16}, {"ffn_dim", 32}, {"num_hidden_layers", 3}, {"num_attention_heads", 4},
                       {"max_position_embeddings", 32}, {"dropout", 0.2}, {"attention_dropout", 0.1}}}};
  sdk::Options o(table, "", "model.backbone", nullptr);
  sdk::BuildContext ctx;
  ctx.vocabulary = {"a", "b", "c", "d", "e", "f", "g"};
  auto bb = ablate::test::builtin_plugins().create_backbone("opt", o, ctx);
  bb->module().train();
  auto ids = torch::randint(0, 7, {2, 6});
  auto pos = torch::arange(6).unsqueeze(0).expand({2, 6}).contiguous();
  sdk::AttentionMask mask;
  mask.key_valid = torch::ones({2, 6}, torch::kBool);
  auto run = [&](bool on) {
    REQUIRE(bb->set_gradient_checkpointing(on));
    bb->module().zero_grad();
    torch::manual_seed(11);
    auto logits = bb->logits(bb->forward(bb->embed(ids), pos, mask, nullptr));
    Outcome out;
    out.checkpoints = checkpoint_nodes(logits);
    logits.log_softmax(-1).mean().backward();
    for (const auto& p : bb->module().parameters()) out.grads.push_back(p.grad().clone());
    out.after = torch::rand({3});
    return out;
  };
  const auto plain = run(false), checkpointed = run(true);
  CHECK(plain.checkpoints == 0);
  CHECK(checkpointed.checkpoints == 3);  // one per decoder layer
  REQUIRE(plain.grads.size() == checkpointed.grads.size());
  for (std::size_t i = 0; i < plain.grads.size(); ++i) CHECK(torch::equal(plain.grads[i], checkpointed.grads[i]));
  CHECK(torch::equal(plain.after, checkpointed.after));
  // Evaluation (no gradients) never checkpoints.
  torch::NoGradGuard no_grad;
  CHECK(checkpoint_nodes(bb->logits(bb->forward(bb->embed(ids), pos, mask, nullptr))) == 0);
}
