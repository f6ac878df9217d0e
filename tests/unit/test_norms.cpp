// sdk::add_layer_norm: its fused path (here the CPU's loop over rows, the CUDA kernels' algorithm) against the
// modules it stands in for, `residual + branch`, torch's LayerNorm (or sdk's RMSNorm) and autocast's cast, values
// and gradients.

#include <catch2/catch.hpp>

#include <torch/torch.h>

#include "ablate/sdk/linear.hpp"
#include "ablate/sdk/norms.hpp"
#include "helpers.hpp"
#include "train/precision.hpp"

using namespace ablate;

namespace {

struct Result {
  torch::Tensor stream, normed;
  torch::Tensor d_residual, d_branch, d_weight, d_bias;
  std::string node;  ///< the autograd node that made `normed`
};

// One step on fresh leaves: the outputs, then the gradients of a loss that reads both outputs (each with its own
// random weights), as a block's stream and its next products do.
Result run(bool fused, bool post, bool with_branch, torch::ScalarType branch_type, const std::string& precision,
           bool train_norm, bool rms = false) {
  torch::manual_seed(7);
  const std::int64_t rows = 37, hidden = 48;  // rows and width that no power of two divides
  torch::nn::LayerNorm ln(torch::nn::LayerNormOptions({hidden}));
  sdk::RMSNorm rms_norm(hidden, 1e-6);
  {
    torch::NoGradGuard no_grad;
    ln->weight.normal_(1.0, 0.3);
    ln->bias.normal_(0.0, 0.2);
    rms_norm->weight.normal_(1.0, 0.3);
  }
  ln->weight.set_requires_grad(train_norm);
  ln->bias.set_requires_grad(train_norm);
  rms_norm->weight.set_requires_grad(train_norm);
  auto residual = (torch::randn({2, rows, hidden}) * 3 + 1).requires_grad_();
  auto branch = with_branch ? torch::randn({2, rows, hidden}).to(branch_type).requires_grad_() : torch::Tensor();
  const auto w_stream = torch::randn({2, rows, hidden}), w_normed = torch::randn({2, rows, hidden});

  test::ScopedSwitch switch_(sdk::fused_norm, sdk::set_fused_norm, fused);
  Result r;
  {
    AutocastGuard autocast(torch::kCPU, precision);
    auto out = rms ? sdk::add_layer_norm(residual, branch, *rms_norm, post) : sdk::add_layer_norm(residual, branch, *ln, post);
    r.stream = out.stream;
    r.normed = out.normed;
    r.node = out.normed.grad_fn() ? out.normed.grad_fn()->name() : "";
  }
  auto loss = (r.stream * w_stream).sum() + (r.normed.to(torch::kFloat32) * w_normed).sum();
  loss.backward();
  r.d_residual = residual.grad();
  if (with_branch) r.d_branch = branch.grad();
  if (train_norm) {
    r.d_weight = rms ? rms_norm->weight.grad() : ln->weight.grad();
    if (!rms) r.d_bias = ln->bias.grad();
  }
  return r;
}

double max_diff(const torch::Tensor& a, const torch::Tensor& b) {
  return (a.to(torch::kFloat64) - b.to(torch::kFloat64)).abs().max().item<double>();
}

void check_same(const Result& fused, const Result& ref, double tol, double tol_low) {
  CHECK(fused.stream.scalar_type() == ref.stream.scalar_type());
  CHECK(fused.normed.scalar_type() == ref.normed.scalar_type());
  CHECK(max_diff(fused.stream, ref.stream) <= tol);
  // Values in the products' type may round to neighbouring bf16 numbers where float32 sums differ.
  CHECK(max_diff(fused.normed, ref.normed) <= (ref.normed.scalar_type() == torch::kFloat32 ? tol : tol_low));
  CHECK(max_diff(fused.d_residual, ref.d_residual) <= tol);
  REQUIRE(fused.d_branch.defined() == ref.d_branch.defined());
  if (ref.d_branch.defined()) {
    CHECK(fused.d_branch.scalar_type() == ref.d_branch.scalar_type());
    CHECK(max_diff(fused.d_branch, ref.d_branch) <= (ref.d_branch.scalar_type() == torch::kFloat32 ? tol : tol_low));
  }
  REQUIRE(fused.d_weight.defined() == ref.d_weight.defined());
  if (ref.d_weight.defined()) {
    CHECK(max_diff(fused.d_weight, ref.d_weight) <= tol * 40);  // sums over 74 rows
    REQUIRE(fused.d_bias.defined() == ref.d_bias.defined());
    if (ref.d_bias.defined()) CHECK(max_diff(fused.d_bias, ref.d_bias) <= tol * 40);
  }
}

}  // namespace

TEST_CASE("add_layer_norm fused equals the add, LayerNorm and cast it replaces, in float32", "[norms]") {
  for (bool post : {false, true}) {
    for (bool with_branch : {true, false}) {
      for (bool train_norm : {false, true}) {
        CAPTURE(post, with_branch, train_norm);
        const auto ref = run(false, post, with_branch, torch::kFloat32, "fp32", train_norm);
        const auto fused = run(true, post, with_branch, torch::kFloat32, "fp32", train_norm);
        check_same(fused, ref, 2e-5, 2e-5);
        // The reference really is the modules: stream and norm as transformers' blocks compute them.
        CHECK(ref.normed.scalar_type() == torch::kFloat32);
      }
    }
  }
}

TEST_CASE("add_layer_norm fused under bf16 autocast: a bf16 branch in, the products' input out in bf16", "[norms]") {
  for (bool post : {false, true}) {
    CAPTURE(post);
    const auto ref = run(false, post, true, torch::kBFloat16, "bf16", true);
    const auto fused = run(true, post, true, torch::kBFloat16, "bf16", true);
    CHECK(ref.normed.scalar_type() == torch::kBFloat16);
    CHECK(ref.stream.scalar_type() == torch::kFloat32);
    check_same(fused, ref, 2e-5, 0.0625);  // one bf16 step at the values' size (|y| < 8)
    // Most bf16 values agree exactly: they are the same float32 numbers rounded once.
    const double equal = (fused.normed == ref.normed).to(torch::kFloat32).mean().item<double>();
    CHECK(equal > 0.99);
  }
}

TEST_CASE("add_layer_norm fused with an RMSNorm equals the add, LLaMA's RMSNorm and the cast", "[norms]") {
  for (bool with_branch : {true, false}) {
    for (bool train_norm : {false, true}) {
      CAPTURE(with_branch, train_norm);
      const auto ref = run(false, false, with_branch, torch::kFloat32, "fp32", train_norm, /*rms=*/true);
      const auto fused = run(true, false, with_branch, torch::kFloat32, "fp32", train_norm, /*rms=*/true);
      check_same(fused, ref, 2e-5, 2e-5);
      if (train_norm) CHECK_FALSE(ref.d_bias.defined());
    }
  }
  // Under bf16 autocast, as LLaMA's layers run on a GPU: a bf16 branch in, the products' bf16 input out.
  const auto ref = run(false, false, true, torch::kBFloat16, "bf16", true, /*rms=*/true);
  const auto fused = run(true, false, true, torch::kBFloat16, "bf16", true, /*rms=*/true);
  CHECK(ref.normed.scalar_type() == torch::kBFloat16);
  check_same(fused, ref, 2e-5, 0.0625);
  CHECK((fused.normed == ref.normed).to(torch::kFloat32).mean().item<double>() > 0.99);
  // The fused path did run (and the reference did not).
  CHECK(fused.node.find("FusedAddLayerNorm") != std::string::npos);
  CHECK(ref.node.find("FusedAddLayerNorm") == std::string::npos);
}

TEST_CASE("add_layer_norm with the switch off is the modules themselves, bit for bit", "[norms]") {
  torch::manual_seed(3);
  torch::nn::LayerNorm ln(torch::nn::LayerNormOptions({16}));
  auto r = torch::randn({4, 16}), b = torch::randn({4, 16});
  test::ScopedSwitch off(sdk::fused_norm, sdk::set_fused_norm, false);
  auto pre = sdk::add_layer_norm(r, b, *ln, false);
  CHECK(torch::equal(pre.stream, r + b));
  CHECK(torch::equal(pre.normed, ln(r + b)));
  auto post = sdk::add_layer_norm(r, b, *ln, true);
  CHECK(torch::equal(post.stream, ln(r + b)));
  CHECK(torch::equal(post.normed, post.stream));
  sdk::RMSNorm rms(16, 1e-6);
  auto pre_rms = sdk::add_layer_norm(r, b, *rms, false);
  CHECK(torch::equal(pre_rms.stream, r + b));
  CHECK(torch::equal(pre_rms.normed, rms(r + b)));
}

TEST_CASE("add_layer_norm leaves to torch what its fused path does not take", "[norms]") {
  // float64, and a LayerNorm over two dimensions: the composite path, with the same results as the modules.
  test::ScopedSwitch on(sdk::fused_norm, sdk::set_fused_norm, true);
  torch::nn::LayerNorm ln(torch::nn::LayerNormOptions({16}));
  auto r = torch::randn({4, 16}, torch::kFloat64), b = torch::randn({4, 16}, torch::kFloat64);
  ln->to(torch::kFloat64);
  CHECK(torch::equal(sdk::add_layer_norm(r, b, *ln, false).normed, ln(r + b)));
  torch::nn::LayerNorm ln2(torch::nn::LayerNormOptions({2, 8}));
  auto r2 = torch::randn({4, 2, 8}), b2 = torch::randn({4, 2, 8});
  CHECK(torch::equal(sdk::add_layer_norm(r2, b2, *ln2, true).stream, ln2(r2 + b2)));
}
