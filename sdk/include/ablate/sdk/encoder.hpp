#pragma once
// Image encoders: pixels in, a sequence of features out.

#include <array>

#include <torch/types.h>

#include "ablate/sdk/component.hpp"

namespace ablate::sdk {

/// How the host must prepare pixels for an encoder, mirroring Hugging Face image processors.
struct ImageSpec {
  std::int64_t height = 224;      ///< final size fed to the encoder
  std::int64_t width = 224;
  /// Resize so that the shorter side is this long, keeping the aspect ratio (CLIP); 0: resize straight to
  /// height x width (SigLIP).
  std::int64_t shortest_edge = 224;
  bool center_crop = true;        ///< crop height x width from the centre after resizing
  int resample = 3;               ///< PIL filter code: 2 bilinear, 3 bicubic
  double rescale_factor = 1.0 / 255.0;
  std::array<double, 3> mean{0.48145466, 0.4578275, 0.40821073};
  std::array<double, 3> std{0.26862954, 0.26130258, 0.27577711};
};

class Encoder : public Component {
 public:
  ~Encoder() override;
  /// pixels: [B, 3, H, W] float32 (or the module's dtype), already prepared per image_spec(), on the module's
  /// device. Returns features [B, N, hidden_size()], N == num_tokens().
  virtual torch::Tensor encode(const torch::Tensor& pixels) = 0;
  virtual ImageSpec image_spec() const = 0;
  virtual std::int64_t hidden_size() const = 0;
  virtual std::int64_t num_tokens() const = 0;
};

}  // namespace ablate::sdk
