// ABLATE_OP_PROFILE's table (runner/train/op_profile.cpp): the bytes each pass moves, counted once per tensor, at
// the operator that moved them, and the SDK's fused norm recorded under its own name.

#include <catch2/catch.hpp>

#include <cstdlib>
#include <functional>
#include <map>
#include <optional>
#include <regex>
#include <sstream>
#include <string>

#include <torch/torch.h>

#include "ablate/sdk/norms.hpp"
#include "helpers.hpp"
#include "train/op_profile.hpp"

using namespace ablate;

namespace {

// The table's rows of one profiled step, by name: their last column (MiB, or "-" for a composite); "(header)":
// the header line.
std::map<std::string, std::string> profile_one_step(const char* spec, const std::function<void()>& step) {
  ::unsetenv("ABLATE_KERNEL_PROFILE");
  ::setenv("ABLATE_OP_PROFILE", spec, 1);
  auto profile = OpProfile::from_env();
  ::unsetenv("ABLATE_OP_PROFILE");
  REQUIRE(profile);
  profile->before_step(1);
  step();
  std::ostringstream out;
  profile->after_step(1, out);
  // A row: name (with spaces in detail mode), calls, self ms, total ms, MiB; the last: "all operators", self
  // ms, MiB.
  const std::regex row(R"(^  (.*\S)\s+[0-9.]+\s+[0-9.]+\s+[0-9.]+\s+(\S+)$)");
  const std::regex total(R"(^  (all operators)\s+[0-9.]+\s+(\S+)$)");
  std::map<std::string, std::string> rows;
  std::istringstream lines(out.str());
  std::string line;
  std::smatch m;
  while (std::getline(lines, line)) {
    if (line.rfind("  name ", 0) == 0) rows["(header)"] = line;
    if (std::regex_match(line, m, total) || std::regex_match(line, m, row)) rows[m[1]] = m[2];
  }
  return rows;
}

}  // namespace

TEST_CASE("op profile, detail: a pass's bytes once per tensor, none for a view or a composite", "[profile]") {
  const std::int64_t n = 1 << 20;  // 4 MiB in float32
  const auto a = torch::rand({n}), b = torch::rand({n});
  const auto rows = profile_one_step("1:1:detail", [&] {
    const auto c = a + b;                     // reads a and b, writes c: 12 MiB
    auto d = a.clone();                       // reads a, writes d: 8 MiB, counted at the copy_ inside
    d.add_(b);                                // reads d and b, writes d: 8 MiB (d counted once)
    const auto v = d.view({1024, 1024});      // a view: 0
    const auto h = d.to(torch::kBFloat16);    // 4 + 2 MiB, counted at the copy_ inside aten::to and _to_copy
    (void)c, (void)v, (void)h;
  });
  CHECK(rows.at("aten::add [f32,f32] < step") == "12.0");
  CHECK(rows.at("aten::add_ [f32,f32] < step") == "8.0");
  CHECK(rows.at("aten::view [f32] < step") == "0.0");
  CHECK(rows.at("aten::clone [f32] < step") == "-");
  CHECK(rows.at("aten::copy_ [f32,f32] < aten::clone < step") == "8.0");
  CHECK(rows.at("aten::to [f32] < step") == "-");
  CHECK(rows.at("aten::_to_copy [f32] < aten::to < step") == "-");
  CHECK(rows.at("aten::copy_ [bf16,f32] < aten::_to_copy < aten::to < step") == "6.0");
  CHECK(rows.at("all operators") == "34.0");  // each pass once: 12 + 8 + 8 + 6
}

TEST_CASE("op profile, detail: arguments' types, * where not contiguous", "[profile]") {
  const auto m = torch::rand({1024, 1024}), k = torch::rand({1024, 1024});
  const auto rows = profile_one_step("1:1:detail", [&] { (void)torch::add(m.t(), k); });
  CHECK(rows.at("aten::add [f32*,f32] < step") == "12.0");
}

TEST_CASE("op profile: the plain table has no bytes column", "[profile]") {
  const auto a = torch::rand({16});
  const auto rows = profile_one_step("1:1", [&] { (void)(a + a); });
  CHECK(rows.at("(header)").find("total ms") != std::string::npos);
  CHECK(rows.at("(header)").find("MiB") == std::string::npos);
  CHECK(rows.count("aten::add") == 0);  // a row of four columns: the five-column pattern finds none
}

TEST_CASE("op profile: the fused residual add + LayerNorm is an operator of its own, both ways", "[profile][norm]") {
  std::optional<test::ScopedSwitch> fused(std::in_place, sdk::fused_norm, sdk::set_fused_norm, true);
  torch::nn::LayerNorm ln(torch::nn::LayerNormOptions({1024}));
  const auto residual = torch::rand({256, 1024}, torch::requires_grad());  // 1 MiB each
  const auto branch = torch::rand({256, 1024}, torch::requires_grad());
  const auto rows = profile_one_step("1:1:detail", [&] {
    const auto step = sdk::add_layer_norm(residual, branch, *ln, /*post=*/false);
    (step.stream.sum() + step.normed.sum()).backward();
  });
  fused.reset();
  // Forward: residual, branch, the sum and the norm's output (1 MiB each), the norm's parameters and per-row
  // statistics (10 KiB). Backward: the sum, the two incoming gradients and the two outgoing ones (5 MiB) and
  // the same statistics and weight.
  CHECK(rows.at("ablate::add_layer_norm [f32,f32,f32,f32] < step") == "4.0");
  bool backward = false;
  for (const auto& [name, mib] : rows) {
    if (name.rfind("ablate::add_layer_norm_backward [", 0) != 0) continue;
    backward = true;
    CHECK(mib == "5.0");
  }
  CHECK(backward);
}
