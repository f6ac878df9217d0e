#include "ablate/sdk/image.hpp"

#include <algorithm>
#include <csetjmp>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>

#include <jpeglib.h>
#include <png.h>

#include "ablate/sdk/encoder.hpp"
#include "ablate/sdk/error.hpp"
#include "ablate/sdk/weights.hpp"

namespace ablate::sdk {

// ---------------------------------------------------------------- codecs

std::vector<std::uint8_t> encode_png(const Image& image) {
  png_image png{};
  png.version = PNG_IMAGE_VERSION;
  png.width = static_cast<png_uint_32>(image.shape(1));
  png.height = static_cast<png_uint_32>(image.shape(0));
  png.format = PNG_FORMAT_RGB;
  png_alloc_size_t size = 0;
  const Image contiguous = image;  // xtensor row-major, HWC: exactly libpng's layout
  if (!png_image_write_get_memory_size(png, size, 0, contiguous.data(), 0, nullptr)) {
    throw std::runtime_error(std::string("PNG encoding failed: ") + png.message);
  }
  std::vector<std::uint8_t> out(size);
  if (!png_image_write_to_memory(&png, out.data(), &size, 0, contiguous.data(), 0, nullptr)) {
    throw std::runtime_error(std::string("PNG encoding failed: ") + png.message);
  }
  out.resize(size);
  return out;
}

namespace {

// PNG as PIL's Image.open(...).convert("RGB") reads it: palettes expanded, grey replicated, 16-bit samples
// cut to their high byte, alpha dropped (not composited), gamma chunks ignored. libpng reports errors with
// longjmp: nothing with a destructor is created between setjmp and the end of decoding in this function.
struct PngSource {
  const std::uint8_t* data;
  std::size_t size, offset;
};

void png_read_from_memory(png_structp png, png_bytep out, png_size_t n) {
  auto* src = static_cast<PngSource*>(png_get_io_ptr(png));
  if (src->offset + n > src->size) png_error(png, "truncated file");
  std::memcpy(out, src->data + src->offset, n);
  src->offset += n;
}

void png_error_to_jump(png_structp png, png_const_charp message) {
  auto* error = static_cast<std::string*>(png_get_error_ptr(png));
  if (error) *error = message;
  png_longjmp(png, 1);
}

void png_ignore_warning(png_structp, png_const_charp) {}

// Pillow refuses an image of more than twice its MAX_IMAGE_PIXELS (1024^3 / 4 / 3 = 89,478,485) as a possible
// decompression bomb. The same limit here keeps a forged header (a few bytes that claim 100000 x 100000) from
// asking for 40 GB, and keeps the samples we cannot read the ones the Python references cannot read either.
constexpr std::uint64_t kMaxPixels = 2 * (std::uint64_t{1024} * 1024 * 1024 / 4 / 3);

// Empty when the size is readable, else the problem, for the caller to prefix with the image's origin.
std::string too_many_pixels(std::uint64_t width, std::uint64_t height) {
  if (width * height <= kMaxPixels) return {};
  return "image of " + std::to_string(width) + " x " + std::to_string(height) + " pixels, over the " +
         std::to_string(kMaxPixels) + " that Pillow refuses as a possible decompression bomb";
}

// Each decoder returns the problem (empty on success).
std::string decode_png_into(const std::vector<std::uint8_t>& bytes, Image& out) {
  PngSource src{bytes.data(), bytes.size(), 0};
  std::string error;
  png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, &error, png_error_to_jump, png_ignore_warning);
  if (!png) return "corrupt PNG (out of memory)";
  png_infop info = png_create_info_struct(png);
  std::vector<png_bytep> rows;
  std::vector<std::uint8_t> rgba;
  if (!info || setjmp(png_jmpbuf(png))) {
    png_destroy_read_struct(&png, info ? &info : nullptr, nullptr);
    return "corrupt PNG (" + error + ")";
  }
  png_set_read_fn(png, &src, png_read_from_memory);
  png_read_info(png, info);
  if (auto problem = too_many_pixels(png_get_image_width(png, info), png_get_image_height(png, info)); !problem.empty()) {
    png_destroy_read_struct(&png, &info, nullptr);
    return problem;
  }
  const auto type = png_get_color_type(png, info);
  if (type == PNG_COLOR_TYPE_PALETTE) png_set_palette_to_rgb(png);
  if (type == PNG_COLOR_TYPE_GRAY || type == PNG_COLOR_TYPE_GRAY_ALPHA) {
    if (png_get_bit_depth(png, info) < 8) png_set_expand_gray_1_2_4_to_8(png);
    png_set_gray_to_rgb(png);
  }
  if (png_get_valid(png, info, PNG_INFO_tRNS)) png_set_tRNS_to_alpha(png);
  png_set_strip_16(png);
  png_set_add_alpha(png, 0xFF, PNG_FILLER_AFTER);  // every row becomes RGBA; alpha is dropped below
  png_set_interlace_handling(png);
  png_read_update_info(png, info);
  const auto width = png_get_image_width(png, info), height = png_get_image_height(png, info);
  rgba.resize(static_cast<std::size_t>(width) * height * 4);
  rows.resize(height);
  for (png_uint_32 y = 0; y < height; ++y) rows[y] = rgba.data() + static_cast<std::size_t>(y) * width * 4;
  png_read_image(png, rows.data());
  png_read_end(png, nullptr);
  png_destroy_read_struct(&png, &info, nullptr);
  out.resize({static_cast<std::size_t>(height), static_cast<std::size_t>(width), std::size_t{3}});
  for (std::size_t i = 0, n = static_cast<std::size_t>(width) * height; i < n; ++i) {
    for (std::size_t c = 0; c < 3; ++c) out.data()[i * 3 + c] = rgba[i * 4 + c];
  }
  return {};
}

struct JpegError {
  jpeg_error_mgr mgr;
  std::jmp_buf jump;
  char message[JMSG_LENGTH_MAX];
};

void jpeg_error_exit(j_common_ptr cinfo) {
  auto* err = reinterpret_cast<JpegError*>(cinfo->err);
  (*cinfo->err->format_message)(cinfo, err->message);
  std::longjmp(err->jump, 1);
}

// Pillow's CMYK JPEG -> RGB, for the same pixels: it reads the samples inverted (rawmode "CMYK;I", Adobe's
// convention, which it assumes for every CMYK JPEG), then cmyk2rgb gives each channel
// (255 - k) - c * (255 - k) / 255 with its rounded division by 255.
void cmyk_to_rgb(const std::uint8_t* cmyk, std::uint8_t* rgb, std::size_t width) {
  auto muldiv255 = [](int a, int b) {
    const int t = a * b + 128;
    return ((t >> 8) + t) >> 8;
  };
  for (std::size_t x = 0; x < width; ++x, cmyk += 4, rgb += 3) {
    const int nk = cmyk[3];  // 255 - k, k being the inverted sample
    for (int c = 0; c < 3; ++c) rgb[c] = static_cast<std::uint8_t>(std::clamp(nk - muldiv255(255 - cmyk[c], nk), 0, 255));
  }
}

// libjpeg reports errors through longjmp: nothing with a destructor is created between setjmp and the end
// of decoding in this function (the buffers are the caller's), so the jump skips no C++ clean-up.
std::string decode_jpeg_into(const std::vector<std::uint8_t>& bytes, Image& out, std::vector<std::uint8_t>& cmyk_row) {
  jpeg_decompress_struct cinfo{};
  JpegError err{};
  cinfo.err = jpeg_std_error(&err.mgr);
  err.mgr.error_exit = jpeg_error_exit;
  if (setjmp(err.jump)) {
    jpeg_destroy_decompress(&cinfo);
    return std::string("corrupt JPEG (") + err.message + ")";
  }
  jpeg_create_decompress(&cinfo);
  jpeg_mem_src(&cinfo, bytes.data(), static_cast<unsigned long>(bytes.size()));
  jpeg_read_header(&cinfo, TRUE);
  const std::uint64_t width = cinfo.image_width, height = cinfo.image_height;
  if (width * height > kMaxPixels) {
    jpeg_destroy_decompress(&cinfo);
    return too_many_pixels(width, height);
  }
  // Grey and YCbCr come out as RGB, as PIL's convert("RGB") gives. CMYK and YCCK (print workflows, Photoshop)
  // come out as CMYK and are converted below as Pillow does.
  const bool cmyk = cinfo.jpeg_color_space == JCS_CMYK || cinfo.jpeg_color_space == JCS_YCCK;
  cinfo.out_color_space = cmyk ? JCS_CMYK : JCS_RGB;
  jpeg_start_decompress(&cinfo);
  out.resize({static_cast<std::size_t>(cinfo.output_height), static_cast<std::size_t>(cinfo.output_width), std::size_t{3}});
  // One CMYK row at a time, in the caller's buffer (like `out`, so that a jump destroys nothing).
  cmyk_row.resize(cmyk ? static_cast<std::size_t>(cinfo.output_width) * 4 : 0);
  while (cinfo.output_scanline < cinfo.output_height) {
    std::uint8_t* rgb = out.data() + static_cast<std::size_t>(cinfo.output_scanline) * cinfo.output_width * 3;
    JSAMPROW row = cmyk ? cmyk_row.data() : rgb;
    jpeg_read_scanlines(&cinfo, &row, 1);
    if (cmyk) cmyk_to_rgb(cmyk_row.data(), rgb, cinfo.output_width);
  }
  jpeg_finish_decompress(&cinfo);
  jpeg_destroy_decompress(&cinfo);
  return {};
}

}  // namespace

Image decode_image(const std::vector<std::uint8_t>& bytes, const std::string& origin) {
  static const std::uint8_t kPng[] = {0x89, 'P', 'N', 'G'};
  if (bytes.size() >= 4 && std::equal(kPng, kPng + 4, bytes.begin())) {
    Image out;
    if (auto problem = decode_png_into(bytes, out); !problem.empty()) throw InputError(origin + ": " + problem);
    return out;
  }
  if (bytes.size() >= 3 && bytes[0] == 0xFF && bytes[1] == 0xD8 && bytes[2] == 0xFF) {
    Image out;
    std::vector<std::uint8_t> cmyk_row;
    if (auto problem = decode_jpeg_into(bytes, out, cmyk_row); !problem.empty()) throw InputError(origin + ": " + problem);
    return out;
  }
  throw InputError(origin + ": not a PNG or JPEG image");
}

Image read_image(const std::filesystem::path& file) {
  // A FIFO would block the open; a link to /dev/zero would be read until memory runs out.
  if (std::error_code ec; std::filesystem::exists(file, ec)) require_regular_file(file);
  std::ifstream in(file, std::ios::binary);
  if (!in) throw InputError(file.string() + ": cannot open image (missing or unreadable)");
  std::vector<std::uint8_t> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  return decode_image(bytes, file.string());
}

// ---------------------------------------------------------------- resampling, as Pillow's Resample.c

namespace {

constexpr int kPrecisionBits = 32 - 8 - 2;

struct Filter {
  double support;
  double (*fn)(double);
};

double box_filter(double x) { return (x > -0.5 && x <= 0.5) ? 1.0 : 0.0; }
double bilinear_filter(double x) {
  if (x < 0.0) x = -x;
  return x < 1.0 ? 1.0 - x : 0.0;
}
double hamming_filter(double x) {
  if (x < 0.0) x = -x;
  if (x == 0.0) return 1.0;
  if (x >= 1.0) return 0.0;
  x = x * M_PI;
  return std::sin(x) / x * (0.54 + 0.46 * std::cos(x));
}
double bicubic_filter(double x) {
  constexpr double a = -0.5;
  if (x < 0.0) x = -x;
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
  if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
  return 0.0;
}
double sinc_filter(double x) {
  if (x == 0.0) return 1.0;
  x = x * M_PI;
  return std::sin(x) / x;
}
double lanczos_filter(double x) {
  if (-3.0 <= x && x < 3.0) return sinc_filter(x) * sinc_filter(x / 3);
  return 0.0;
}

Filter filter_for(int code) {
  switch (code) {
    case 1: return {3.0, lanczos_filter};
    case 2: return {1.0, bilinear_filter};
    case 3: return {2.0, bicubic_filter};
    case 4: return {0.5, box_filter};
    case 5: return {1.0, hamming_filter};
    default: throw InputError("unsupported resampling filter " + std::to_string(code));
  }
}

// Integer coefficients per output pixel; bounds[2i] = first input pixel, bounds[2i+1] = how many.
struct Coeffs {
  int ksize = 0;
  std::vector<int> bounds;
  std::vector<int> k;
};

Coeffs precompute(int in_size, int out_size, const Filter& filter) {
  const double scale = static_cast<double>(in_size) / out_size;
  const double filterscale = std::max(scale, 1.0);
  const double support = filter.support * filterscale;
  Coeffs c;
  c.ksize = static_cast<int>(std::ceil(support)) * 2 + 1;
  c.bounds.resize(static_cast<std::size_t>(out_size) * 2);
  c.k.assign(static_cast<std::size_t>(out_size) * c.ksize, 0);
  std::vector<double> kk(static_cast<std::size_t>(c.ksize));
  for (int xx = 0; xx < out_size; ++xx) {
    const double center = (xx + 0.5) * scale;
    const double ss = 1.0 / filterscale;
    int xmin = static_cast<int>(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    int xmax = static_cast<int>(center + support + 0.5);
    if (xmax > in_size) xmax = in_size;
    xmax -= xmin;
    double ww = 0.0;
    for (int x = 0; x < xmax; ++x) {
      kk[x] = filter.fn((x + xmin - center + 0.5) * ss);
      ww += kk[x];
    }
    for (int x = 0; x < c.ksize; ++x) {
      double w = x < xmax ? (ww != 0.0 ? kk[x] / ww : kk[x]) : 0.0;
      c.k[static_cast<std::size_t>(xx) * c.ksize + x] =
          static_cast<int>(w < 0 ? -0.5 + w * (1 << kPrecisionBits) : 0.5 + w * (1 << kPrecisionBits));
    }
    c.bounds[2 * xx] = xmin;
    c.bounds[2 * xx + 1] = xmax;
  }
  return c;
}

inline std::uint8_t clip8(int v) {
  v >>= kPrecisionBits;
  return static_cast<std::uint8_t>(v < 0 ? 0 : (v > 255 ? 255 : v));
}

}  // namespace

Image resize(const Image& image, std::int64_t width, std::int64_t height, int filter_code) {
  const int in_h = static_cast<int>(image.shape(0)), in_w = static_cast<int>(image.shape(1));
  const int out_w = static_cast<int>(width), out_h = static_cast<int>(height);
  if (out_w <= 0 || out_h <= 0) throw InputError("cannot resize to " + std::to_string(width) + "x" + std::to_string(height));
  if (out_w == in_w && out_h == in_h) return image;
  if (filter_code == 0) {
    // PIL's NEAREST resize samples the source pixel under each output pixel's centre.
    Image out = xt::zeros<std::uint8_t>({std::size_t(out_h), std::size_t(out_w), std::size_t{3}});
    for (int y = 0; y < out_h; ++y) {
      int sy = std::min(in_h - 1, static_cast<int>((y + 0.5) * in_h / out_h));
      for (int x = 0; x < out_w; ++x) {
        int sx = std::min(in_w - 1, static_cast<int>((x + 0.5) * in_w / out_w));
        for (int c = 0; c < 3; ++c) out(y, x, c) = image(sy, sx, c);
      }
    }
    return out;
  }
  const Filter f = filter_for(filter_code);
  const Coeffs horiz = precompute(in_w, out_w, f);
  const Coeffs vert = precompute(in_h, out_h, f);
  const bool need_h = out_w != in_w, need_v = out_h != in_h;

  // One pass along a row (horizontal) of `rows` rows of src starting at src row `row0`.
  auto horizontal = [&](const Image& src, int row0, int rows) {
    const int w = static_cast<int>(src.shape(1));
    Image out = xt::zeros<std::uint8_t>({std::size_t(rows), std::size_t(out_w), std::size_t{3}});
    for (int y = 0; y < rows; ++y) {
      const std::uint8_t* in_row = src.data() + static_cast<std::size_t>(y + row0) * w * 3;
      std::uint8_t* out_row = out.data() + static_cast<std::size_t>(y) * out_w * 3;
      for (int xx = 0; xx < out_w; ++xx) {
        const int xmin = horiz.bounds[2 * xx], xmax = horiz.bounds[2 * xx + 1];
        const int* k = &horiz.k[static_cast<std::size_t>(xx) * horiz.ksize];
        int s0 = 1 << (kPrecisionBits - 1), s1 = s0, s2 = s0;
        for (int x = 0; x < xmax; ++x) {
          const std::uint8_t* px = in_row + static_cast<std::size_t>(x + xmin) * 3;
          s0 += px[0] * k[x];
          s1 += px[1] * k[x];
          s2 += px[2] * k[x];
        }
        out_row[xx * 3] = clip8(s0);
        out_row[xx * 3 + 1] = clip8(s1);
        out_row[xx * 3 + 2] = clip8(s2);
      }
    }
    return out;
  };
  // One pass along columns; src row 0 is source row `row0` (the horizontal pass may have kept only the
  // rows the vertical pass reads).
  auto vertical = [&](const Image& src, int row0) {
    const int w = static_cast<int>(src.shape(1));
    Image out = xt::zeros<std::uint8_t>({std::size_t(out_h), std::size_t(w), std::size_t{3}});
    for (int yy = 0; yy < out_h; ++yy) {
      const int ymin = vert.bounds[2 * yy] - row0, ymax = vert.bounds[2 * yy + 1];
      const int* k = &vert.k[static_cast<std::size_t>(yy) * vert.ksize];
      std::uint8_t* out_row = out.data() + static_cast<std::size_t>(yy) * w * 3;
      for (int xx = 0; xx < w; ++xx) {
        int s0 = 1 << (kPrecisionBits - 1), s1 = s0, s2 = s0;
        for (int y = 0; y < ymax; ++y) {
          const std::uint8_t* px = src.data() + (static_cast<std::size_t>(y + ymin) * w + xx) * 3;
          s0 += px[0] * k[y];
          s1 += px[1] * k[y];
          s2 += px[2] * k[y];
        }
        out_row[xx * 3] = clip8(s0);
        out_row[xx * 3 + 1] = clip8(s1);
        out_row[xx * 3 + 2] = clip8(s2);
      }
    }
    return out;
  };

  // Pillow (13) runs the vertical pass first when the height shrinks by more than twice what the width
  // does; the order changes the 8-bit intermediate, so it is followed exactly.
  const bool horizontal_first = !((in_h - out_h) > 0 && (in_h - out_h) > (in_w - out_w) * 2);
  if (horizontal_first) {
    if (!need_h) return vertical(image, 0);
    // Only the source rows the vertical pass will read.
    const int first = need_v ? vert.bounds[0] : 0;
    const int last = need_v ? vert.bounds[2 * out_h - 2] + vert.bounds[2 * out_h - 1] : in_h;
    Image temp = horizontal(image, first, last - first);
    return need_v ? vertical(temp, first) : temp;
  }
  if (!need_v) return horizontal(image, 0, in_h);
  Image temp = vertical(image, 0);
  return need_h ? horizontal(temp, 0, out_h) : temp;
}

Image center_crop(const Image& image, std::int64_t height, std::int64_t width) {
  const std::int64_t h = static_cast<std::int64_t>(image.shape(0)), w = static_cast<std::int64_t>(image.shape(1));
  if (h == height && w == width) return image;
  // transformers pads with zeros when the image is smaller than the crop, centring it (ceil on the pad).
  const std::int64_t nh = std::max(height, h), nw = std::max(width, w);
  const std::int64_t top_pad = (nh - h + 1) / 2, left_pad = (nw - w + 1) / 2;
  const std::int64_t top = (h - height) / 2 + top_pad, left = (w - width) / 2 + left_pad;
  Image out = xt::zeros<std::uint8_t>({std::size_t(height), std::size_t(width), std::size_t{3}});
  for (std::int64_t y = 0; y < height; ++y) {
    const std::int64_t sy = top + y - top_pad;  // row in the source image
    if (sy < 0 || sy >= h) continue;
    for (std::int64_t x = 0; x < width; ++x) {
      const std::int64_t sx = left + x - left_pad;
      if (sx < 0 || sx >= w) continue;
      for (int c = 0; c < 3; ++c) out(y, x, c) = image(sy, sx, c);
    }
  }
  return out;
}

torch::Tensor prepare_image(const Image& image, const ImageSpec& spec) {
  Image resized;
  if (spec.shortest_edge > 0) {
    const std::int64_t h = static_cast<std::int64_t>(image.shape(0)), w = static_cast<std::int64_t>(image.shape(1));
    const std::int64_t shorter = std::min(h, w), longer = std::max(h, w);
    const std::int64_t new_long = static_cast<std::int64_t>(static_cast<double>(spec.shortest_edge) * longer / shorter);
    resized = w <= h ? resize(image, spec.shortest_edge, new_long, spec.resample)
                     : resize(image, new_long, spec.shortest_edge, spec.resample);
  } else {
    resized = resize(image, spec.width, spec.height, spec.resample);
  }
  if (spec.center_crop) resized = center_crop(resized, spec.height, spec.width);
  const auto h = static_cast<std::int64_t>(resized.shape(0)), w = static_cast<std::int64_t>(resized.shape(1));
  auto t = torch::from_blob(const_cast<std::uint8_t*>(resized.data()), {h, w, 3}, torch::kUInt8)
               .permute({2, 0, 1})
               .to(torch::kFloat64)
               .mul(spec.rescale_factor)
               .to(torch::kFloat32);
  auto mean = torch::tensor({spec.mean[0], spec.mean[1], spec.mean[2]}, torch::kFloat32).view({3, 1, 1});
  auto std = torch::tensor({spec.std[0], spec.std[1], spec.std[2]}, torch::kFloat32).view({3, 1, 1});
  return ((t - mean) / std).contiguous();
}

}  // namespace ablate::sdk
