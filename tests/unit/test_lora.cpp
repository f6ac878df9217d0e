// LoRA in the SDK's linear layer, and the lora strategy's targeting.

#include <catch2/catch.hpp>

#include <algorithm>
#include <optional>

#include <torch/torch.h>

#include "ablate/sdk/linear.hpp"
#include "ablate/sdk/strategy.hpp"
#include "grid/experiment.hpp"
#include "helpers.hpp"
#include "model/vlm.hpp"
#include "train/precision.hpp"
#include "train/train_steps.hpp"

using namespace ablate;

namespace {

// The tiny VLM the grid tests use, built from scratch, every parameter frozen.
std::shared_ptr<VlmModel> tiny_model() {
  const auto& host = ablate::test::builtin_plugins();
  sdk::BuildContext ctx;
  ctx.vocabulary = {"a", "b", "c"};
  sdk::Json enc = {{"config", {{"image_size", 16}, {"patch_size", 8}, {"hidden_size", 16}, {"intermediate_size", 32},
                               {"num_hidden_layers", 2}, {"num_attention_heads", 2}}}};
  sdk::Json bb = {{"config", {{"hidden_size", 16}, {"ffn_dim", 32}, {"num_hidden_layers", 2}, {"num_attention_heads", 2}}}};
  sdk::Json proj = sdk::Json::object();
  sdk::Options eo(enc, "", "encoder", nullptr), bo(bb, "", "backbone", nullptr), po(proj, "", "projector", nullptr);
  auto encoder = host.create_encoder("clip_vit", eo, ctx);
  auto backbone = host.create_backbone("opt", bo, ctx);
  ctx.in_features = 16;
  ctx.out_features = 16;
  auto projector = host.create_projector("git", po, ctx);
  auto model = std::make_shared<VlmModel>(Part<sdk::Encoder>{encoder, "encoder/clip_vit"},
                                          Part<sdk::Projector>{projector, "projector/git"},
                                          Part<sdk::Backbone>{backbone, "backbone/opt"});
  for (auto& p : model->parameters()) p.set_requires_grad(false);
  return model;
}

void apply_lora(VlmModel& model, sdk::Json options) {
  options["plugin"] = "lora";
  sdk::Options o(options, "", "strategy[0]", nullptr);
  auto strategy = ablate::test::builtin_plugins().create_strategy("lora", o, {});
  sdk::TrainTarget target(model, model.head());
  strategy->apply(target);
}

}  // namespace

TEST_CASE("an attached adapter leaves the output unchanged: B starts at zero, as in PEFT", "[lora]") {
  torch::manual_seed(0);
  sdk::Linear layer(6, 5);
  auto x = torch::randn({3, 6});
  auto before = layer(x);
  layer->attach_lora({4, 8.0, 0.0, false});
  CHECK(torch::equal(layer(x), before));
  CHECK(layer->lora_A->weight.abs().sum().item<double>() > 0);
  CHECK(layer->lora_B->weight.abs().sum().item<double>() == 0);
  CHECK_FALSE(layer->weight.requires_grad());
  CHECK(layer->lora_A->weight.requires_grad());
  CHECK_THROWS(layer->attach_lora({4, 8.0, 0.0, false}));
}

TEST_CASE("merged and unmerged adapters give the same outputs, and unmerge restores the weight", "[lora]") {
  torch::manual_seed(1);
  sdk::Linear layer(8, 7);
  layer->attach_lora({3, 6.0, 0.0, false});
  {
    torch::NoGradGuard no_grad;
    layer->lora_B->weight.normal_();  // as if trained
  }
  const auto original = layer->weight.clone();
  auto x = torch::randn({4, 8});
  auto unmerged = layer(x);
  CHECK_FALSE(torch::allclose(unmerged, torch::nn::functional::linear(x, layer->weight, layer->bias)));
  layer->merge();
  CHECK(layer->merged());
  CHECK(torch::allclose(layer(x), unmerged, 1e-5, 1e-6));
  layer->unmerge();
  CHECK(torch::allclose(layer->weight, original, 1e-6, 1e-7));
  CHECK(torch::allclose(layer(x), unmerged, 1e-5, 1e-6));
}

TEST_CASE("scaling is alpha / r, or alpha / sqrt(r) with rsLoRA", "[lora]") {
  sdk::Linear a(4, 4), b(4, 4);
  a->attach_lora({16, 32.0, 0.0, false});
  b->attach_lora({16, 32.0, 0.0, true});
  CHECK(a->lora_scaling() == Approx(2.0));
  CHECK(b->lora_scaling() == Approx(8.0));
}

namespace {

// Three projections of one input, as a block's q/k/v: adapters on the first and last (trained B, so that they
// count), the middle one without an adapter but trained in full (weight and bias get gradients), the last in
// GPT-2's [in, out] layout.
struct SharedInputLayers {
  sdk::Linear q{12, 10}, k{12, 6}, v{12, 8, true, /*fan_in_fan_out=*/true};
  SharedInputLayers() {
    q->attach_lora({4, 8.0, 0.0, false});
    v->attach_lora({2, 6.0, 0.0, true});
    torch::NoGradGuard no_grad;
    q->lora_B->weight.normal_();
    v->lora_B->weight.normal_();
  }
  std::vector<sdk::LinearImpl*> all() { return {q.get(), k.get(), v.get()}; }
  std::vector<torch::Tensor> trained() {
    return {q->lora_A->weight, q->lora_B->weight, k->weight, k->bias, v->lora_A->weight, v->lora_B->weight};
  }
  // What each layer computes as PEFT writes it, op by op: y = linear(x) + lora_B(lora_A(x)) * scaling.
  std::vector<torch::Tensor> reference(const torch::Tensor& x, bool relu = false) {
    std::vector<torch::Tensor> ys;
    for (auto* l : all()) {
      // GPT-2's Conv1D: addmm over the flattened batch, bias included.
      auto y = l->fan_in_fan_out
                   ? torch::addmm(l->bias, x.reshape({-1, l->in_features}), l->weight).view({x.size(0), x.size(1), -1})
                   : torch::linear(x, l->weight, l->bias);
      if (l->has_lora()) y = y + torch::linear(torch::linear(x, l->lora_A->weight), l->lora_B->weight) * l->lora_scaling();
      ys.push_back(relu ? torch::relu(y) : y);
    }
    return ys;
  }
};

// Output values and the gradients of x and of every trained tensor, for a loss that reads the outputs `read`.
std::vector<torch::Tensor> outputs_and_grads(const std::vector<torch::Tensor>& ys, const torch::Tensor& x,
                                             const std::vector<torch::Tensor>& trained, const std::vector<bool>& read) {
  torch::manual_seed(7);
  torch::Tensor loss = torch::zeros({}, torch::kFloat32);
  for (std::size_t i = 0; i < ys.size(); ++i) {
    if (read[i]) loss = loss + (ys[i].to(torch::kFloat32) * torch::randn(ys[i].sizes())).sum();
  }
  std::vector<torch::Tensor> all{x};
  all.insert(all.end(), trained.begin(), trained.end());
  auto grads = torch::autograd::grad({loss}, all, {}, false, false, /*allow_unused=*/true);
  std::vector<torch::Tensor> out;
  for (const auto& y : ys) out.push_back(y.detach());
  for (auto& g : grads) out.push_back(g.defined() ? g : torch::Tensor());
  return out;
}

}  // namespace

TEST_CASE("layers that share an input give PEFT's outputs and gradients when computed together", "[lora][shared]") {
  torch::manual_seed(3);
  SharedInputLayers layers;
  layers.k->weight.set_requires_grad(true);
  layers.k->bias.set_requires_grad(true);
  auto x = torch::randn({2, 5, 12}, torch::requires_grad());
  const bool relu = GENERATE(false, true);
  for (const auto& read : {std::vector<bool>{true, true, true}, std::vector<bool>{true, false, true},
                           std::vector<bool>{false, true, false}}) {
    INFO("outputs read: " << read[0] << read[1] << read[2] << ", relu " << relu);
    const auto got = outputs_and_grads(sdk::forward_shared(layers.all(), x, relu), x, layers.trained(), read);
    const auto want = outputs_and_grads(layers.reference(x, relu), x, layers.trained(), read);
    REQUIRE(got.size() == want.size());
    for (std::size_t i = 0; i < got.size(); ++i) {
      INFO("tensor " << i);
      REQUIRE(got[i].defined() == want[i].defined());
      if (!got[i].defined()) continue;
      CHECK(got[i].sizes() == want[i].sizes());
      CHECK(torch::allclose(got[i], want[i], 1e-5, 1e-5));
    }
  }
  // A single adapted layer's forward() takes the same path, and is PEFT's too.
  CHECK(torch::allclose(layers.q(x), layers.reference(x)[0], 1e-5, 1e-5));
}

TEST_CASE("shared products keep their input for backward only when a weight or adapter gradient reads it", "[lora][shared]") {
  // x is an intermediate (leaf * 2, whose backward keeps nothing), so once the caller drops it, only the products'
  // autograd record can hold its storage: x2 is a view of it in float32.
  torch::manual_seed(6);
  SharedInputLayers layers;
  auto leaf = torch::randn({2, 5, 12}, torch::requires_grad());
  const auto relu = GENERATE(false, true);
  const bool frozen = GENERATE(true, false);  // frozen: k alone, no adapter, weight and bias frozen
  INFO("relu " << relu << ", frozen " << frozen);
  layers.k->weight.set_requires_grad(false);
  layers.k->bias.set_requires_grad(false);
  std::vector<sdk::LinearImpl*> which = frozen ? std::vector<sdk::LinearImpl*>{layers.k.get()} : layers.all();
  std::vector<torch::Tensor> ys;
  std::optional<c10::weak_intrusive_ptr<c10::StorageImpl>> held;
  {
    auto x = leaf * 2;
    held.emplace(x.storage().getWeakStorageImpl());
    ys = sdk::forward_shared(which, x, relu);
  }
  CHECK(held->expired() == frozen);
  // And x's gradient is still PEFT's.
  auto loss = torch::zeros({});
  for (const auto& y : ys) loss = loss + (y * y).sum();
  loss.backward();
  auto want_leaf = leaf.detach().clone().requires_grad_(true);
  auto want = layers.reference(want_leaf * 2, relu);
  auto want_loss = torch::zeros({});
  for (std::size_t i = 0; i < want.size(); ++i) {
    if (!frozen || i == 1) want_loss = want_loss + (want[i] * want[i]).sum();
  }
  want_loss.backward();
  CHECK(torch::allclose(leaf.grad(), want_leaf.grad(), 1e-5, 1e-5));
}

TEST_CASE("under bf16 autocast, layers that share an input cast it once and keep autocast's types", "[lora][shared][precision]") {
  torch::manual_seed(4);
  SharedInputLayers layers;
  auto x = torch::randn({3, 7, 12}, torch::requires_grad());
  std::vector<torch::Tensor> got_ys, want_ys;
  {
    AutocastGuard autocast(torch::kCPU, "bf16");
    got_ys = sdk::forward_shared(layers.all(), x);
    want_ys = layers.reference(x);
  }
  const std::vector<bool> read{true, true, true};
  const auto got = outputs_and_grads(got_ys, x, layers.trained(), read);
  const auto want = outputs_and_grads(want_ys, x, layers.trained(), read);
  for (std::size_t i = 0; i < got.size(); ++i) {
    INFO("tensor " << i);
    REQUIRE(got[i].defined() == want[i].defined());
    if (!got[i].defined()) continue;
    // Outputs in bf16 as autocast gives them; gradients in their tensor's own type (x and adapters float32).
    CHECK(got[i].scalar_type() == want[i].scalar_type());
    // bf16 keeps 8 bits: the sums differ in order and rounding, not beyond a few units of the last place.
    const double scale = want[i].to(torch::kDouble).abs().max().item<double>();
    const double diff = (got[i].to(torch::kDouble) - want[i].to(torch::kDouble)).abs().max().item<double>();
    INFO("max difference " << diff << " of max " << scale);
    CHECK(diff <= 2e-2 * scale);
  }
  CHECK(got_ys[0].scalar_type() == torch::kBFloat16);
}

TEST_CASE("an adapter with dropout keeps its own path while training, and joins the others in evaluation", "[lora][shared]") {
  torch::manual_seed(5);
  sdk::Linear q(8, 8), v(8, 8);
  q->attach_lora({2, 4.0, 0.5, false});
  v->attach_lora({2, 4.0, 0.5, false});
  {
    torch::NoGradGuard no_grad;
    q->lora_B->weight.normal_();
    v->lora_B->weight.normal_();
  }
  auto x = torch::randn({4, 8});
  torch::manual_seed(9);
  const auto shared = sdk::forward_shared({q.get(), v.get()}, x);
  torch::manual_seed(9);
  const auto one_by_one = std::vector<torch::Tensor>{q(x), v(x)};
  CHECK(torch::equal(shared[0], one_by_one[0]));  // the same masks, drawn in the same order
  CHECK(torch::equal(shared[1], one_by_one[1]));
  const auto no_dropout = torch::linear(x, q->weight, q->bias) +
                          torch::linear(torch::linear(x, q->lora_A->weight), q->lora_B->weight) * q->lora_scaling();
  CHECK_FALSE(torch::allclose(shared[0], no_dropout));  // dropout did act
  q->eval();
  v->eval();
  CHECK(torch::allclose(sdk::forward_shared({q.get(), v.get()}, x)[0], no_dropout, 1e-5, 1e-6));
}

TEST_CASE("lora targets are scoped to one component: v_proj in the backbone leaves the vision tower alone", "[lora]") {
  auto model = tiny_model();
  apply_lora(*model, {{"target_modules", {"v_proj"}}});
  int backbone = 0, encoder = 0;
  for (const auto& item : model->named_modules()) {
    auto* linear = dynamic_cast<sdk::LinearImpl*>(item.value().get());
    if (!linear || !linear->has_lora()) continue;
    if (item.key().rfind("backbone.", 0) == 0) ++backbone;
    if (item.key().rfind("encoder.", 0) == 0) ++encoder;
  }
  CHECK(backbone == 2);  // one v_proj per decoder layer
  CHECK(encoder == 0);
  // Only adapter weights train.
  for (const auto& p : model->named_parameters()) {
    CHECK(p.value().requires_grad() == (p.key().find(".lora_") != std::string::npos));
  }
  auto other = tiny_model();
  apply_lora(*other, {{"target_modules", {"v_proj"}}, {"component", "encoder"}});
  CHECK(dynamic_cast<sdk::LinearImpl*>(other->named_modules()["encoder.encoder.layers.0.self_attn.v_proj"].get())->has_lora());
}

namespace {
std::vector<std::string> adapted_layers(VlmModel& model) {
  std::vector<std::string> out;
  for (const auto& item : model.named_modules()) {
    if (auto* l = dynamic_cast<sdk::LinearImpl*>(item.value().get()); l && l->has_lora()) out.push_back(item.key());
  }
  std::sort(out.begin(), out.end());
  return out;
}
}  // namespace

TEST_CASE("lora targets that match nothing are an error, each entry on its own", "[lora][errors]") {
  auto model = tiny_model();
  CHECK_THROWS_WITH(apply_lora(*model, {{"target_modules", {"w_proj"}}}),
                    Catch::Contains("target_modules [\"w_proj\"] match no linear layer in backbone (its linear layers end with: "
                                    "fc1, fc2, k_proj, out_proj, q_proj, v_proj)"));
  // LLaMA's o_proj in an OPT model: the other entries match, but a typo'd or foreign name is still an error.
  auto partly = tiny_model();
  CHECK_THROWS_WITH(apply_lora(*partly, {{"target_modules", {"q_proj", "o_proj"}}}),
                    Catch::Contains("target_modules entry 'o_proj' matches no linear layer in backbone"));
  auto container = tiny_model();
  CHECK_THROWS_WITH(apply_lora(*container, {{"target_modules", {"self_attn"}}}), Catch::Contains("is not an adaptable linear layer"));
}

TEST_CASE("lora selects modules by PEFT's rules: name suffixes, a regular expression, all-linear, exclude", "[lora]") {
  auto by_list = tiny_model();
  apply_lora(*by_list, {{"target_modules", {"q_proj", "v_proj"}}, {"exclude", {"layers.0.self_attn.q_proj"}}});
  CHECK(adapted_layers(*by_list) == std::vector<std::string>{"backbone.model.decoder.layers.0.self_attn.v_proj",
                                                             "backbone.model.decoder.layers.1.self_attn.q_proj",
                                                             "backbone.model.decoder.layers.1.self_attn.v_proj"});
  // A string is a regular expression the whole name (within the component) must match.
  auto by_regex = tiny_model();
  apply_lora(*by_regex, {{"target_modules", ".*layers\\.1\\..*(fc1|fc2)"}});
  CHECK(adapted_layers(*by_regex) == std::vector<std::string>{"backbone.model.decoder.layers.1.fc1", "backbone.model.decoder.layers.1.fc2"});
  auto excluded = tiny_model();
  apply_lora(*excluded, {{"target_modules", {"q_proj", "v_proj"}}, {"exclude", ".*layers\\.0\\..*"}});
  CHECK(adapted_layers(*excluded).size() == 2);
  // all-linear: every linear layer but the output layer (tied here, so every linear in the decoder).
  auto all = tiny_model();
  apply_lora(*all, {{"target_modules", "all-linear"}});
  CHECK(adapted_layers(*all).size() == 12);
  CHECK_THROWS_WITH(apply_lora(*tiny_model(), {{"target_modules", "([unclosed"}}), Catch::Contains("not a regular expression"));
}

TEST_CASE("lora's modules_to_save train in full next to the adapters and are never adapted", "[lora]") {
  auto model = tiny_model();
  apply_lora(*model, {{"target_modules", {"q_proj", "fc1"}}, {"modules_to_save", {"layers.1.fc1"}}});
  const auto adapted = adapted_layers(*model);
  CHECK(std::find(adapted.begin(), adapted.end(), "backbone.model.decoder.layers.1.fc1") == adapted.end());
  CHECK(std::find(adapted.begin(), adapted.end(), "backbone.model.decoder.layers.0.fc1") != adapted.end());
  auto params = model->named_parameters();
  CHECK(params["backbone.model.decoder.layers.1.fc1.weight"].requires_grad());
  CHECK(params["backbone.model.decoder.layers.1.fc1.bias"].requires_grad());
  CHECK_FALSE(params["backbone.model.decoder.layers.0.fc1.weight"].requires_grad());
  CHECK_THROWS_WITH(apply_lora(*tiny_model(), {{"modules_to_save", {"no_such_module"}}}),
                    Catch::Contains("modules_to_save entry 'no_such_module' matches no module in backbone"));
}

TEST_CASE("the layouts place image and text as GIT, LLaVA and PaliGemma do", "[layout]") {
  auto model = tiny_model();  // 16x16 images, patch 8: 4 patches + CLS = 5 image tokens
  torch::NoGradGuard no_grad;
  auto pixels = torch::zeros({1, 3, 16, 16});
  // BOS, two prompt tokens, two target tokens; right-padded by one.
  auto ids = torch::tensor({{1, 4, 5, 6, 2, 0}}, torch::kLong);
  auto valid = torch::tensor({{1, 1, 1, 1, 1, 0}}, torch::kBool);
  auto targets = torch::tensor({{0, 0, 0, 1, 1, 0}}, torch::kBool);
  auto prompt_len = torch::tensor({3}, torch::kLong);
  TrainBatch batch;
  batch.pixels = pixels;
  batch.ids = ids;
  batch.valid = valid;
  batch.targets = targets;
  batch.prompt_len = prompt_len;
  std::vector<std::int64_t> labels;  // where the loss tokens are in the placed sequence (loss_inputs)
  auto build = [&](Layout layout) {
    VlmModel m(model->encoder_part(), model->projector_part(), model->backbone_part(), layout, -1);
    const auto in = m.loss_inputs(batch);
    labels.assign(in.labels.data_ptr<std::int64_t>(), in.labels.data_ptr<std::int64_t>() + in.labels.numel());
    return m.assemble(pixels, ids, valid, prompt_len);
  };
  auto row = [](const torch::Tensor& t) {
    std::vector<std::int64_t> v;
    for (std::int64_t i = 0; i < t.size(1); ++i) v.push_back(t[0][i].item<std::int64_t>());
    return v;
  };
  const std::vector<std::int64_t> image_first{-1, -1, -1, -1, -1, 1, 4, 5, 6, 2, 0};

  auto prefix = build(Layout::prefix);
  CHECK(row(prefix.ids) == image_first);
  CHECK(row(prefix.positions) == std::vector<std::int64_t>{-1, -1, -1, -1, -1, 0, 1, 2, 3, 4, -1});  // text only
  CHECK(prefix.mask.prefix[0].item<std::int64_t>() == 5);  // bidirectional over the image
  CHECK(labels == std::vector<std::int64_t>{8, 9});  // the two target tokens, after the image

  auto lm = build(Layout::prefix_lm);
  CHECK(row(lm.positions) == std::vector<std::int64_t>{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, -1});  // over everything
  CHECK(lm.mask.prefix[0].item<std::int64_t>() == 8);  // image + BOS + prompt

  auto inline_ = build(Layout::inline_);  // no image token: the image goes right after BOS
  CHECK(row(inline_.ids) == std::vector<std::int64_t>{1, -1, -1, -1, -1, -1, 4, 5, 6, 2});
  CHECK(row(inline_.positions) == std::vector<std::int64_t>{0, 1, 2, 3, 4, 5, 6, 7, 8, 9});
  CHECK_FALSE(inline_.mask.prefix.defined());  // causal throughout
  CHECK(labels == std::vector<std::int64_t>{8, 9});
}

TEST_CASE("frozen linear weights held in bf16 change no number under autocast, and come back exactly", "[precision]") {
  torch::manual_seed(0);
  auto model = tiny_model();
  apply_lora(*model, {{"r", 4}});
  for (auto& p : model->projector().module().parameters()) p.set_requires_grad(true);
  model->refresh_frozen();
  // B starts at zero; give the adapters values so that they count in the output.
  for (auto& p : model->named_parameters()) {
    if (p.key().find("lora_B") != std::string::npos) {
      torch::NoGradGuard no_grad;
      p.value().normal_(0.0, 0.5);
    }
  }
  TrainBatch batch;
  batch.pixels = torch::randn({2, 3, 16, 16});
  batch.ids = torch::tensor({{1, 4, 5, 6, 2, 0}, {1, 5, 4, 2, 0, 0}}, torch::kLong);
  batch.valid = batch.ids != 0;
  batch.targets = torch::tensor({{0, 0, 0, 1, 1, 0}, {0, 0, 1, 1, 0, 0}}, torch::kBool);
  batch.prompt_len = torch::tensor({3, 2}, torch::kLong);
  batch.loss_tokens = 4;
  auto loss_and_grads = [&] {
    torch::manual_seed(1);  // the same dropout masks (the tiny OPT keeps transformers' default dropout 0.1)
    for (auto& p : model->parameters()) p.mutable_grad() = torch::Tensor();
    torch::Tensor loss;
    {
      AutocastGuard autocast(torch::kCPU, "bf16");
      loss = model->loss_sum(batch);
    }
    loss.backward();
    std::vector<torch::Tensor> out{loss.detach()};
    for (auto& p : model->parameters()) {
      if (p.requires_grad()) out.push_back(p.grad().clone());
    }
    return out;
  };
  std::map<std::string, torch::Tensor> original;
  for (const auto& p : model->named_parameters()) original[p.key()] = p.value().detach().clone();

  const auto as_autocast_does = loss_and_grads();
  FrozenInLowPrecision held(*model, "bf16");
  CHECK(held.count() > 20);  // every frozen weight and bias of the encoder's, projector's and backbone's linears
  CHECK(model->named_parameters()["backbone.model.decoder.layers.0.fc1.weight"].scalar_type() == torch::kBFloat16);
  CHECK(model->named_parameters()["backbone.model.decoder.layers.0.self_attn_layer_norm.weight"].scalar_type() == torch::kFloat32);
  CHECK(model->named_parameters()["projector.visual_projection.0.weight"].scalar_type() == torch::kFloat32);  // trains
  const auto held_low = loss_and_grads();
  REQUIRE(held_low.size() == as_autocast_does.size());
  for (std::size_t i = 0; i < held_low.size(); ++i) {
    INFO("tensor " << i << " max difference " << (held_low[i].to(torch::kDouble) - as_autocast_does[i].to(torch::kDouble)).abs().max().item<double>());
    CHECK(torch::equal(held_low[i], as_autocast_does[i]));
  }

  held.restore();
  for (const auto& p : model->named_parameters()) {
    INFO(p.key());
    CHECK(p.value().scalar_type() == original[p.key()].scalar_type());
    CHECK(torch::equal(p.value(), original[p.key()]));
  }
  CHECK(held.count() == 0);
}

TEST_CASE("frozen weights a half-precision type holds exactly keep no float32 copy, and come back exactly", "[precision]") {
  torch::manual_seed(0);
  auto model = tiny_model();
  apply_lora(*model, {{"r", 4}});
  model->refresh_frozen();
  // As a bf16 checkpoint loads into float32: the backbone's frozen linears hold values bf16 represents; the
  // encoder's hold random float32 values (biases too: the tiny model's start at zero, which bf16 holds).
  {
    torch::NoGradGuard no_grad;
    for (auto& p : model->backbone().module().named_parameters()) {
      if (!p.value().requires_grad()) p.value().copy_(p.value().to(torch::kBFloat16).to(torch::kFloat32));
    }
    for (auto& p : model->encoder().module().parameters()) p.normal_(0.0, 0.1);
  }
  std::map<std::string, torch::Tensor> original;
  for (const auto& p : model->named_parameters()) original[p.key()] = p.value().detach().clone();
  std::size_t backbone_held = 0;
  for (const auto& m : model->backbone().module().modules()) {
    if (auto* l = dynamic_cast<ablate::sdk::LinearImpl*>(m.get())) {
      for (const auto* t : {&l->weight, &l->bias}) backbone_held += t->defined() && !t->requires_grad();
    }
  }
  REQUIRE(backbone_held > 10);

  FrozenInLowPrecision held(*model, "bf16");
  const auto encoder_held = held.count() - backbone_held;
  CHECK(held.count() > backbone_held);  // the encoder's too
  CHECK(held.originals() == encoder_held);  // only the encoder's, which bf16 rounds
  held.restore();
  for (const auto& p : model->named_parameters()) {
    INFO(p.key());
    CHECK(p.value().scalar_type() == torch::kFloat32);
    CHECK(torch::equal(p.value(), original[p.key()]));
  }

  // fp16 has bf16's 8 bits of precision and more, so the backbone's values (all well inside its range) are
  // exact in it too; the encoder's random float32 ones are not.
  FrozenInLowPrecision half(*model, "fp16");
  CHECK(half.count() == backbone_held + encoder_held);
  CHECK(half.originals() == encoder_held);
  half.restore();
  for (const auto& p : model->named_parameters()) CHECK(torch::equal(p.value(), original[p.key()]));
}

TEST_CASE("a training batch padded to a fixed shape gives the same loss and gradients, in every layout", "[layout][train_graph]") {
  torch::manual_seed(0);
  auto model = tiny_model();
  apply_lora(*model, {{"r", 4}});
  for (auto& p : model->projector().module().parameters()) p.set_requires_grad(true);
  for (auto& p : model->named_parameters()) {
    if (p.key().find("lora_B") != std::string::npos) {
      torch::NoGradGuard no_grad;
      p.value().normal_(0.0, 0.5);  // B starts at zero; the adapters must count for their gradients to mean much
    }
  }
  TrainBatch batch;
  batch.pixels = torch::randn({3, 3, 16, 16});
  // Rows of different lengths, right-padded; only the third row's prompt holds token 6, the image token of the
  // second inline model below.
  batch.ids = torch::tensor({{1, 4, 5, 4, 2, 0, 0}, {1, 5, 4, 2, 0, 0, 0}, {1, 6, 5, 4, 3, 5, 2}}, torch::kLong);
  batch.valid = batch.ids != 0;
  batch.targets = torch::tensor({{0, 0, 0, 1, 1, 0, 0}, {0, 0, 1, 1, 0, 0, 0}, {0, 0, 0, 0, 1, 1, 1}}, torch::kBool);
  batch.prompt_len = torch::tensor({3, 2, 4}, torch::kLong);
  batch.loss_tokens = 7;
  for (const auto& [layout, image_token] : std::vector<std::pair<Layout, std::int64_t>>{
           {Layout::prefix, -1}, {Layout::prefix_lm, -1}, {Layout::inline_, -1}, {Layout::inline_, 6}}) {
    VlmModel m(model->encoder_part(), model->projector_part(), model->backbone_part(), layout, image_token);
    m.refresh_frozen();
    m.eval();  // no dropout: padding changes the shapes its masks are drawn in
    auto loss_and_grads = [&](const LossInputs& in) {
      for (auto& p : m.parameters()) p.mutable_grad() = torch::Tensor();
      auto loss = m.loss_sum(in);
      loss.backward();
      std::vector<torch::Tensor> out{loss.detach()};
      for (auto& p : m.parameters()) {
        if (p.requires_grad()) out.push_back(p.grad().clone());
      }
      return out;
    };
    const auto as_collated = m.loss_inputs(batch);
    const auto padded = m.loss_inputs(batch, TrainSteps::bucket(7, 64), TrainSteps::bucket(7, 1000));
    INFO("layout " << static_cast<int>(layout) << ", image token " << image_token);
    CHECK(as_collated.loss_tokens == 7);
    CHECK(padded.loss_tokens == 7);
    CHECK(padded.ids.size(1) == 16);
    CHECK(padded.predictors.size(0) == 16);
    const auto a = loss_and_grads(as_collated), b = loss_and_grads(padded);
    REQUIRE(a.size() == b.size());
    CHECK(a.size() > 10);
    for (std::size_t i = 0; i < a.size(); ++i) {
      const double diff = (a[i] - b[i]).abs().max().item<double>(), size = a[i].abs().max().item<double>();
      INFO("tensor " << i << ": difference " << diff << " of " << size);
      CHECK(diff <= 1e-5 * std::max(size, 1e-6));
    }
    // The collated batch's loss as the trainer's evaluation computes it, from the batch itself.
    CHECK(m.loss_sum(batch).item<double>() == Approx(a[0].item<double>()).epsilon(1e-6));
  }
}

TEST_CASE("a batch that fills the backbone's positions is not padded past them", "[layout][train_graph]") {
  torch::manual_seed(0);
  auto model = tiny_model();
  VlmModel m(model->encoder_part(), model->projector_part(), model->backbone_part(), Layout::inline_, /*image_token=*/6);
  m.refresh_frozen();
  m.eval();
  // Inline with an image token in the prompt, the n image positions replace that token's column, which gives an
  // eager batch one text column more than a padded one (t - 1 + n positions against t + n): this batch fills
  // every position of the backbone eagerly.
  const auto t = m.max_text_width() + 1;
  TrainBatch batch;
  batch.pixels = torch::randn({1, 3, 16, 16});
  batch.ids = torch::randint(4, 6, {1, t}, torch::kLong);
  batch.ids.index_put_({0, 0}, 1);
  batch.ids.index_put_({0, 1}, 6);
  batch.valid = torch::ones({1, t}, torch::kBool);
  batch.targets = torch::zeros({1, t}, torch::kBool);
  batch.targets.narrow(1, t - 3, 3).fill_(true);
  batch.prompt_len = torch::tensor({t - 3}, torch::kLong);
  batch.loss_tokens = 3;
  TrainConfig config;
  config.max_text_tokens = t;
  TrainSteps steps(m, {}, config, torch::Device(torch::kCPU), TrainGraphMode::on);
  REQUIRE(steps.fixed_shapes());
  const auto inputs = steps.prepare({batch});
  REQUIRE(inputs.size() == 1);
  CHECK(inputs[0].ids.size(1) == t);  // as collated
  CHECK(m.loss_sum(inputs[0]).item<double>() == Approx(m.loss_sum(batch).item<double>()).epsilon(1e-6));
  // A batch one column shorter is padded as usual, to the limit.
  const auto shorter = steps.prepare({[&] {
    TrainBatch b = batch;
    b.ids = batch.ids.narrow(1, 0, t - 1).contiguous();
    b.valid = batch.valid.narrow(1, 0, t - 1).contiguous();
    b.targets = batch.targets.narrow(1, 1, t - 1).contiguous();
    return b;
  }()});
  CHECK(shorter[0].ids.size(1) == t - 1);
  CHECK(shorter[0].predictors.size(0) >= 16);
}

TEST_CASE("fixed shapes round up to 16, 24, 32, 48, 64... and never past their limit", "[train_graph]") {
  std::vector<std::int64_t> got;
  for (std::int64_t n : {1, 16, 17, 24, 25, 33, 49, 65, 97, 129, 200}) got.push_back(TrainSteps::bucket(n, 1 << 20));
  CHECK(got == std::vector<std::int64_t>{16, 16, 24, 24, 32, 48, 64, 96, 128, 192, 256});
  CHECK(TrainSteps::bucket(17, 20) == 20);  // the limit when the ladder's next size is past it
  CHECK(TrainSteps::bucket(30, 20) == 30);  // never below what the batch needs
}
