#include "ablate/sdk/rope.hpp"

#include <cmath>

#include <ATen/ATen.h>

#include "ablate/sdk/error.hpp"

namespace ablate::sdk {

RopeConfig RopeConfig::from_hf(Options& o) {
  RopeConfig c;
  const auto top_theta = o.maybe<double>("rope_theta");
  const auto& scaling = o.raw("rope_scaling");
  const auto& params = o.raw("rope_parameters");
  if (!scaling.is_null() && !scaling.is_object()) o.fail("rope_scaling", "expected a table, got " + scaling.dump());
  if (!params.is_null() && !params.is_object()) o.fail("rope_parameters", "expected a table, got " + params.dump());
  const char* section = scaling.is_object() ? "rope_scaling" : "rope_parameters";
  const Json& j = scaling.is_object() ? scaling : params;
  auto bad = [&](const char* key, const char* want) {
    o.fail(section, std::string(key) + ": expected " + want + ", got " + j[key].dump());
  };
  // Absent and null both mean "the default", as transformers reads them.
  auto given = [&](const char* key) { return j.is_object() && j.contains(key) && !j[key].is_null(); };
  auto num = [&](const char* key) -> std::optional<double> {
    if (!given(key)) return std::nullopt;
    if (!j[key].is_number()) bad(key, "a number");
    return j[key].get<double>();
  };
  auto above_zero = [&](const char* key, double v) {
    if (!(v > 0.0)) o.fail(section, std::string(key) + ": must be above 0, got " + Json(v).dump());
    return v;
  };
  // Except the type: transformers has no rotary embedding for a rope_type of None (KeyError), so null is refused.
  for (const char* key : {"rope_type", "type"}) {
    if (j.is_object() && j.contains(key) && !j[key].is_string()) bad(key, "a string");
  }
  if (j.is_object()) c.type = j.value("rope_type", j.value("type", std::string("default")));
  c.theta = num("rope_theta").value_or(top_theta.value_or(10000.0));
  // A theta of 0 or less gives infinite or NaN frequencies, and transformers trains on NaN without a word.
  if (num("rope_theta")) above_zero("rope_theta", c.theta);
  else if (!(c.theta > 0.0)) o.fail("rope_theta", "must be above 0, got " + Json(c.theta).dump());
  c.factor = above_zero("factor", num("factor").value_or(1.0));
  c.partial_rotary_factor = num("partial_rotary_factor").value_or(o.get("partial_rotary_factor", 1.0));
  if (!(c.partial_rotary_factor > 0.0 && c.partial_rotary_factor <= 1.0)) {
    o.fail("partial_rotary_factor", "must be above 0 and at most 1, got " + Json(c.partial_rotary_factor).dump());
  }
  const auto original = num("original_max_position_embeddings").value_or(0);
  if (!(original >= 0.0 && original == std::floor(original))) bad("original_max_position_embeddings", "a whole number of positions");
  c.original_max_position_embeddings = static_cast<std::int64_t>(original);
  c.low_freq_factor = above_zero("low_freq_factor", num("low_freq_factor").value_or(c.low_freq_factor));
  c.high_freq_factor = above_zero("high_freq_factor", num("high_freq_factor").value_or(c.high_freq_factor));
  c.attention_factor = num("attention_factor");
  c.mscale = num("mscale");
  c.mscale_all_dim = num("mscale_all_dim");
  // transformers reads beta_fast / beta_slow with `or`: zero or null gives the default.
  if (auto v = num("beta_fast"); v && *v != 0) c.beta_fast = *v;
  if (auto v = num("beta_slow"); v && *v != 0) c.beta_slow = *v;
  if (given("truncate")) {
    if (!j["truncate"].is_boolean()) bad("truncate", "a boolean");
    c.truncate = j["truncate"].get<bool>();
  }
  if (c.type != "default" && c.type != "linear" && c.type != "dynamic" && c.type != "yarn" && c.type != "llama3") {
    o.fail(section, "rope_type \"" + c.type + "\" is not supported (default, linear, dynamic, yarn, llama3)");
  }
  if ((c.type == "linear" || c.type == "dynamic" || c.type == "llama3") && !num("factor")) {
    o.fail(section, "rope_type \"" + c.type + "\" needs a factor");
  }
  return c;
}

Json RopeConfig::to_json() const {
  Json j = {{"rope_type", type}, {"rope_theta", theta}};
  if (type != "default") j["factor"] = factor;
  if (partial_rotary_factor != 1.0) j["partial_rotary_factor"] = partial_rotary_factor;
  if (original_max_position_embeddings > 0) j["original_max_position_embeddings"] = original_max_position_embeddings;
  if (type == "llama3") {
    j["low_freq_factor"] = low_freq_factor;
    j["high_freq_factor"] = high_freq_factor;
  }
  if (type == "yarn") {
    if (attention_factor) j["attention_factor"] = *attention_factor;
    if (mscale) j["mscale"] = *mscale;
    if (mscale_all_dim) j["mscale_all_dim"] = *mscale_all_dim;
    j["beta_fast"] = beta_fast;
    j["beta_slow"] = beta_slow;
    j["truncate"] = truncate;
  }
  return j;
}

namespace {
// 1 / base ^ (arange(0, dim, 2) / dim), in float32 as transformers computes it.
torch::Tensor default_inv_freq(double base, std::int64_t dim) {
  auto exponent = torch::arange(0, dim, 2, torch::kLong).to(torch::kFloat32) / static_cast<double>(dim);
  return 1.0 / torch::pow(base, exponent);
}
}  // namespace

Rotary::Rotary(const RopeConfig& c, std::int64_t head_dim, std::int64_t max_position_embeddings)
    : config_(c), max_positions_(max_position_embeddings), max_seq_len_cached_(max_position_embeddings) {
  // transformers' default rope ignores partial_rotary_factor; the scaled kinds honour it.
  dim_ = c.type == "default" ? head_dim : static_cast<std::int64_t>(static_cast<double>(head_dim) * c.partial_rotary_factor);
  if (dim_ != head_dim) throw InputError("partial_rotary_factor below 1 is not supported for LLaMA-style models");
  const std::int64_t original = c.original_max_position_embeddings > 0 ? c.original_max_position_embeddings : max_position_embeddings;
  if (c.type == "default" || c.type == "dynamic") {
    inv_freq_ = default_inv_freq(c.theta, dim_);
  } else if (c.type == "linear") {
    inv_freq_ = default_inv_freq(c.theta, dim_) / c.factor;
  } else if (c.type == "llama3") {
    auto inv_freq = default_inv_freq(c.theta, dim_);
    const double low_wavelen = static_cast<double>(original) / c.low_freq_factor;
    const double high_wavelen = static_cast<double>(original) / c.high_freq_factor;
    auto wavelen = 2 * M_PI / inv_freq;
    auto llama = torch::where(wavelen > low_wavelen, inv_freq / c.factor, inv_freq);
    auto smooth = (static_cast<double>(original) / wavelen - c.low_freq_factor) / (c.high_freq_factor - c.low_freq_factor);
    auto smoothed = (1 - smooth) * llama / c.factor + smooth * llama;
    auto medium = (~(wavelen < high_wavelen)) * (~(wavelen > low_wavelen));
    inv_freq_ = torch::where(medium, smoothed, llama);
  } else {  // yarn
    const double factor = c.factor;
    auto mscale_of = [](double scale, double m) { return scale <= 1 ? 1.0 : 0.1 * m * std::log(scale) + 1.0; };
    attention_scaling_ = c.attention_factor ? *c.attention_factor
                         : (c.mscale && c.mscale_all_dim && *c.mscale != 0 && *c.mscale_all_dim != 0)
                             ? mscale_of(factor, *c.mscale) / mscale_of(factor, *c.mscale_all_dim)
                             : mscale_of(factor, 1.0);
    auto pos_freqs = torch::pow(c.theta, torch::arange(0, dim_, 2, torch::kLong).to(torch::kFloat32) / static_cast<double>(dim_));
    auto extrapolation = 1.0 / pos_freqs;
    auto interpolation = 1.0 / (factor * pos_freqs);
    auto correction = [&](double rotations) {
      return (static_cast<double>(dim_) * std::log(static_cast<double>(original) / (rotations * 2 * M_PI))) / (2 * std::log(c.theta));
    };
    double low = correction(c.beta_fast), high = correction(c.beta_slow);
    if (c.truncate) {
      low = std::floor(low);
      high = std::ceil(high);
    }
    low = std::max(low, 0.0);
    high = std::min(high, static_cast<double>(dim_ - 1));
    if (low == high) high += 0.001;
    auto ramp = ((torch::arange(dim_ / 2, torch::kFloat32) - low) / (high - low)).clamp(0, 1);
    auto extrapolation_factor = 1 - ramp;
    inv_freq_ = interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor;
  }
  original_inv_freq_ = inv_freq_;
}

torch::Tensor Rotary::inv_freq_for(const torch::Tensor& seq_len) const {
  // transformers' dynamic NTK: the base grows with the sequence, computed in float32 tensors.
  auto len = torch::maximum(seq_len, torch::tensor(max_positions_, seq_len.options()));
  auto base = config_.theta * torch::pow((config_.factor * len / static_cast<double>(max_positions_)) - (config_.factor - 1),
                                         static_cast<double>(dim_) / static_cast<double>(dim_ - 2));
  return 1.0 / torch::pow(base, torch::arange(0, dim_, 2, torch::kLong).to(torch::kFloat32) / static_cast<double>(dim_));
}

std::pair<torch::Tensor, torch::Tensor> Rotary::cos_sin(const torch::Tensor& positions) {
  if (config_.type == "dynamic") {
    auto seq_len = positions.max().cpu() + 1;
    const auto len = seq_len.item<std::int64_t>();
    if (len > max_seq_len_cached_) {
      inv_freq_ = inv_freq_for(seq_len);
      inv_freq_on_device_ = torch::Tensor();
      max_seq_len_cached_ = len;
    }
    if (len < max_positions_ && max_seq_len_cached_ > max_positions_) {
      inv_freq_ = original_inv_freq_;
      inv_freq_on_device_ = torch::Tensor();
      max_seq_len_cached_ = max_positions_;
    }
  }
  if (!inv_freq_on_device_.defined() || inv_freq_on_device_.device() != positions.device()) {
    inv_freq_on_device_ = inv_freq_.to(positions.device());
  }
  const auto& inv = inv_freq_on_device_;
  auto freqs = positions.clamp_min(0).to(torch::kFloat32).unsqueeze(-1) * inv;
  auto emb = torch::cat({freqs, freqs}, -1);
  return {emb.cos() * attention_scaling_, emb.sin() * attention_scaling_};
}

torch::Tensor Rotary::apply(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin) {
  const auto half = x.size(-1) / 2;
  auto rotated = torch::cat({-x.slice(-1, half), x.slice(-1, 0, half)}, -1);
  auto c = cos.unsqueeze(1).to(x.dtype()), s = sin.unsqueeze(1).to(x.dtype());
  return x * c + rotated * s;
}

}  // namespace ablate::sdk
