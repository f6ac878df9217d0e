// sdk::relu_mlp: with --fused-relu, OPT's fc1 -> ReLU -> fc2 as one autograd node. On the CPU it runs torch's
// ops, so its values and gradients must be exactly those of the two layers called one after the other; on CUDA
// its cuBLASLt products (tests/gpu) are described here, without a GPU, as far as cuBLASLt goes without one.

#include <catch2/catch.hpp>

#include <torch/torch.h>

#include "../../sdk/src/cuda/relu_gemm.hpp"
#include "ablate/sdk/linear.hpp"
#include "helpers.hpp"
#include "train/precision.hpp"

using namespace ablate;

namespace {

struct Step {
  torch::Tensor y, dx, dw1, db1, dw2, db2;
  std::string node;
};

// One forward and backward pass of fresh layers (the same seed each time) with the switch as given.
Step step(bool fused, const std::string& precision, bool train1, bool train2, bool bias, bool lora = false) {
  torch::manual_seed(11);
  const std::int64_t hidden = 24, features = 40;
  sdk::Linear fc1(hidden, features, bias), fc2(features, hidden, bias);
  if (lora) fc1->attach_lora({4, 8.0, 0.0, false});
  for (auto* l : {fc1.get(), fc2.get()}) {
    const bool train = l == fc1.get() ? train1 : train2;
    l->weight.set_requires_grad(train && !l->has_lora());
    if (l->bias.defined()) l->bias.set_requires_grad(train && !l->has_lora());
  }
  if (lora) {
    torch::NoGradGuard no_grad;
    fc1->lora_B->weight.normal_(0.0, 0.1);
  }
  auto x = torch::randn({3, 7, hidden}).requires_grad_();
  const auto w = torch::randn({3, 7, hidden});
  test::ScopedSwitch on(sdk::fused_relu, sdk::set_fused_relu, fused);
  Step s;
  {
    AutocastGuard autocast(torch::kCPU, precision);
    s.y = sdk::relu_mlp(*fc1, *fc2, x);
  }
  s.node = s.y.grad_fn() ? s.y.grad_fn()->name() : "";
  (s.y.to(torch::kFloat32) * w).sum().backward();
  const auto grad = [](const torch::Tensor& t) { return t.defined() && t.grad().defined() ? t.grad() : torch::Tensor(); };
  s.dx = x.grad();
  s.dw1 = grad(fc1->weight);
  s.db1 = grad(fc1->bias);
  s.dw2 = grad(fc2->weight);
  s.db2 = grad(fc2->bias);
  return s;
}

void same(const torch::Tensor& a, const torch::Tensor& b, const std::string& what) {
  INFO(what);
  REQUIRE(a.defined() == b.defined());
  if (!a.defined()) return;
  CHECK(a.scalar_type() == b.scalar_type());
  CHECK(torch::equal(a, b));
}

}  // namespace

TEST_CASE("relu_mlp on the CPU: the values and gradients of fc2(relu(fc1(x))), bit for bit") {
  for (const std::string precision : {"fp32", "bf16"}) {
    for (const bool bias : {true, false}) {
      for (const auto& [train1, train2] : {std::pair{false, false}, {true, false}, {false, true}, {true, true}}) {
        INFO(precision << " bias " << bias << " fc1 trains " << train1 << " fc2 trains " << train2);
        const auto ref = step(false, precision, train1, train2, bias);
        const auto got = step(true, precision, train1, train2, bias);
        CHECK(got.node.find("ReluMlp") != std::string::npos);  // the fused node ran
        CHECK(ref.node.find("ReluMlp") == std::string::npos);
        same(got.y, ref.y, "output");
        same(got.dx, ref.dx, "x's gradient");
        same(got.dw1, ref.dw1, "fc1.weight's gradient");
        same(got.db1, ref.db1, "fc1.bias's gradient");
        same(got.dw2, ref.dw2, "fc2.weight's gradient");
        same(got.db2, ref.db2, "fc2.bias's gradient");
      }
    }
  }
}

TEST_CASE("relu_mlp leaves a layer with an adapter to the usual path") {
  const auto ref = step(false, "fp32", false, false, true, /*lora=*/true);
  const auto got = step(true, "fp32", false, false, true, /*lora=*/true);
  CHECK(got.node.find("ReluMlp") == std::string::npos);
  same(got.y, ref.y, "output");
  same(got.dx, ref.dx, "x's gradient");
}

TEST_CASE("relu_mlp without gradients: the same output, no autograd node") {
  torch::NoGradGuard no_grad;
  sdk::Linear fc1(16, 32, true), fc2(32, 16, true);
  const auto x = torch::randn({5, 16});
  const auto ref = fc2(torch::relu(fc1(x)));
  test::ScopedSwitch on(sdk::fused_relu, sdk::set_fused_relu, true);
  const auto got = sdk::relu_mlp(*fc1, *fc2, x);
  CHECK(!got.grad_fn());
  CHECK(torch::allclose(got, ref, 1e-6, 1e-6));
}

TEST_CASE("cuBLASLt's ReLU-mask products: torch's library found, every descriptor attribute accepted") {
  // No GPU here: cuBLASLt creates no handle, but it builds and checks descriptors. This catches an attribute
  // of the wrong size or value before a GPU run would.
  REQUIRE(sdk::cuda::relu_gemm_available());
  using sdk::cuda::GemmType;
  CHECK(sdk::cuda::relu_gemm_describe(57094, 1024, 4096, GemmType::bf16) == 0);  // the benchmark's batch 256
  CHECK(sdk::cuda::relu_gemm_describe(37, 48, 300, GemmType::f16) == 0);  // a width of no whole 128 bits
  CHECK(sdk::cuda::relu_mask_bytes(3, 300) == 3 * 384 / 8);  // each row's bits at a stride of 128
  CHECK(sdk::cuda::relu_mask_bytes(2, 4096) == 2 * 512);
}
