#pragma once
// Images as xtensor arrays (height x width x 3, RGB, uint8), their codecs, and preparation for encoders
// the way Hugging Face image processors do it (PIL resampling, centre crop, rescale, normalise).

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include <xtensor/xtensor.hpp>

#include <torch/types.h>

namespace ablate::sdk {

struct ImageSpec;

using Image = xt::xtensor<std::uint8_t, 3>;

/// PNG bytes of an image (8-bit RGB, no ancillary chunks, so equal images give equal bytes).
std::vector<std::uint8_t> encode_png(const Image& image);
/// Decodes PNG or JPEG (told apart by their signatures) into RGB; grey and palette images are converted.
/// Throws InputError naming `origin` when the bytes are not a readable image.
Image decode_image(const std::vector<std::uint8_t>& bytes, const std::string& origin);
Image read_image(const std::filesystem::path& file);

/// Resizes as PIL's Image.resize does (separable convolution, 8-bit intermediate, same rounding), so that
/// results match PIL within one grey level. filter: PIL codes 0 nearest, 2 bilinear, 3 bicubic.
Image resize(const Image& image, std::int64_t width, std::int64_t height, int filter);
/// Crops height x width from the centre (as transformers' center_crop: top = (H - h) / 2, floor).
Image center_crop(const Image& image, std::int64_t height, std::int64_t width);

/// Resize, crop, rescale and normalise per `spec`: returns [3, H, W] float32.
torch::Tensor prepare_image(const Image& image, const ImageSpec& spec);

}  // namespace ablate::sdk
