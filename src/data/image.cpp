#include "src/data/image.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <numbers>

#include <opencv2/core.hpp>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include "src/core/atomic_file.h"
#include "src/core/error.h"

namespace sdt {
namespace {

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
  return s;
}

std::vector<uint8_t> read_file(const std::string& path, size_t max_bytes = SIZE_MAX) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(path, "cannot open image: {}", std::strerror(errno));
  std::vector<uint8_t> bytes;
  if (max_bytes == SIZE_MAX) {
    bytes.assign(std::istreambuf_iterator<char>(in), {});
  } else {
    bytes.resize(max_bytes);
    in.read(reinterpret_cast<char*>(bytes.data()), static_cast<std::streamsize>(max_bytes));
    bytes.resize(static_cast<size_t>(in.gcount()));
  }
  return bytes;
}

uint32_t be16(const uint8_t* p) { return (p[0] << 8) | p[1]; }
uint32_t be32(const uint8_t* p) { return (uint32_t(p[0]) << 24) | (p[1] << 16) | (p[2] << 8) | p[3]; }
uint32_t le16(const uint8_t* p) { return p[0] | (p[1] << 8); }
uint32_t le32(const uint8_t* p) { return p[0] | (p[1] << 8) | (p[2] << 16) | (uint32_t(p[3]) << 24); }

// EXIF orientation from a JPEG APP1 segment; 1 when absent. Orientations 5-8 swap width and height.
int exif_orientation(const uint8_t* p, size_t n) {
  if (n < 14 || std::memcmp(p, "Exif\0\0", 6) != 0) return 1;
  const uint8_t* tiff = p + 6;
  size_t tn = n - 6;
  bool little = tiff[0] == 'I';
  auto u16 = [&](size_t off) -> uint32_t { return off + 2 <= tn ? (little ? le16(tiff + off) : be16(tiff + off)) : 0; };
  auto u32 = [&](size_t off) -> uint32_t { return off + 4 <= tn ? (little ? le32(tiff + off) : be32(tiff + off)) : 0; };
  uint32_t ifd = u32(4);
  uint32_t count = u16(ifd);
  for (uint32_t i = 0; i < count; ++i) {
    size_t entry = ifd + 2 + 12 * i;
    if (entry + 12 > tn) break;
    if (u16(entry) == 0x0112) return static_cast<int>(u16(entry + 8));
  }
  return 1;
}

bool jpeg_size(const std::vector<uint8_t>& b, ImageSize& size) {
  if (b.size() < 4 || b[0] != 0xFF || b[1] != 0xD8) return false;
  int orientation = 1;
  size_t i = 2;
  while (i + 4 <= b.size()) {
    if (b[i] != 0xFF) return false;
    uint8_t marker = b[i + 1];
    if (marker == 0xFF) {
      ++i;
      continue;
    }
    size_t len = be16(&b[i + 2]);
    if (marker == 0xE1 && i + 4 + len - 2 <= b.size()) orientation = exif_orientation(&b[i + 4], len - 2);
    bool sof = marker >= 0xC0 && marker <= 0xCF && marker != 0xC4 && marker != 0xC8 && marker != 0xCC;
    if (sof) {
      if (i + 9 > b.size()) return false;
      size.height = static_cast<int>(be16(&b[i + 5]));
      size.width = static_cast<int>(be16(&b[i + 7]));
      if (orientation >= 5 && orientation <= 8) std::swap(size.width, size.height);
      return size.width > 0 && size.height > 0;
    }
    i += 2 + len;
  }
  return false;
}

bool png_size(const std::vector<uint8_t>& b, ImageSize& size) {
  static const uint8_t sig[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1A, '\n'};
  if (b.size() < 24 || std::memcmp(b.data(), sig, 8) != 0 || std::memcmp(&b[12], "IHDR", 4) != 0) return false;
  size.width = static_cast<int>(be32(&b[16]));
  size.height = static_cast<int>(be32(&b[20]));
  return size.width > 0 && size.height > 0;
}

bool webp_size(const std::vector<uint8_t>& b, ImageSize& size) {
  if (b.size() < 30 || std::memcmp(b.data(), "RIFF", 4) != 0 || std::memcmp(&b[8], "WEBP", 4) != 0) return false;
  const uint8_t* c = &b[12];
  if (std::memcmp(c, "VP8 ", 4) == 0) {
    size.width = static_cast<int>(le16(&c[14]) & 0x3FFF);
    size.height = static_cast<int>(le16(&c[16]) & 0x3FFF);
  } else if (std::memcmp(c, "VP8L", 4) == 0) {
    uint32_t bits = le32(&c[9]);
    size.width = static_cast<int>((bits & 0x3FFF) + 1);
    size.height = static_cast<int>(((bits >> 14) & 0x3FFF) + 1);
  } else if (std::memcmp(c, "VP8X", 4) == 0) {
    size.width = static_cast<int>((c[12] | (c[13] << 8) | (c[14] << 16)) + 1);
    size.height = static_cast<int>((c[15] | (c[16] << 8) | (c[17] << 16)) + 1);
  } else {
    return false;
  }
  return size.width > 0 && size.height > 0;
}

bool bmp_size(const std::vector<uint8_t>& b, ImageSize& size) {
  if (b.size() < 26 || b[0] != 'B' || b[1] != 'M') return false;
  size.width = static_cast<int>(static_cast<int32_t>(le32(&b[18])));
  size.height = std::abs(static_cast<int>(static_cast<int32_t>(le32(&b[22]))));  // negative: top-down rows
  return size.width > 0 && size.height > 0;
}

// ------------------------------------------------------------------ Pillow's resampling
// Pillow (src/libImaging/Resample.c): per output pixel, filter weights over the input window,
// normalised, turned into fixed-point integers with 22 fractional bits; 8-bit rows are filtered
// horizontally into an 8-bit intermediate, then vertically.
constexpr int kPrecisionBits = 32 - 8 - 2;

double sinc(double x) {
  if (x == 0.0) return 1.0;
  x *= std::numbers::pi;
  return std::sin(x) / x;
}
double lanczos_filter(double x) { return (-3.0 <= x && x < 3.0) ? sinc(x) * sinc(x / 3) : 0.0; }
double box_filter(double x) { return (x > -0.5 && x <= 0.5) ? 1.0 : 0.0; }

struct Coefficients {
  int ksize = 0;
  std::vector<int> bounds;  // (xmin, count) per output pixel
  std::vector<int32_t> k;   // ksize per output pixel
};

Coefficients precompute(int in_size, int out_size, double (*filter)(double), double filter_support) {
  const double scale = static_cast<double>(in_size) / out_size;
  const double filterscale = std::max(scale, 1.0);
  const double support = filter_support * filterscale;
  Coefficients c;
  c.ksize = static_cast<int>(std::ceil(support)) * 2 + 1;
  c.bounds.resize(2 * out_size);
  c.k.assign(static_cast<size_t>(out_size) * c.ksize, 0);
  std::vector<double> w(c.ksize);
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
      w[x] = filter((x + xmin - center + 0.5) * ss);
      ww += w[x];
    }
    for (int x = 0; x < xmax; ++x) {
      double v = ww != 0.0 ? w[x] / ww : w[x];
      c.k[static_cast<size_t>(xx) * c.ksize + x] =
          static_cast<int32_t>(v < 0 ? -0.5 + v * (1 << kPrecisionBits) : 0.5 + v * (1 << kPrecisionBits));
    }
    c.bounds[2 * xx] = xmin;
    c.bounds[2 * xx + 1] = xmax;
  }
  return c;
}

uint8_t clip8(int32_t v) {
  v >>= kPrecisionBits;
  return static_cast<uint8_t>(std::clamp(v, 0, 255));
}

Image resample_horizontal(const Image& in, int out_width, const Coefficients& c) {
  Image out{out_width, in.height, in.channels, std::vector<uint8_t>(static_cast<size_t>(out_width) * in.height * in.channels)};
  for (int y = 0; y < in.height; ++y) {
    const uint8_t* src = in.row(y);
    uint8_t* dst = out.row(y);
    for (int xx = 0; xx < out_width; ++xx) {
      const int xmin = c.bounds[2 * xx], count = c.bounds[2 * xx + 1];
      const int32_t* k = &c.k[static_cast<size_t>(xx) * c.ksize];
      for (int ch = 0; ch < in.channels; ++ch) {
        int32_t ss = 1 << (kPrecisionBits - 1);
        for (int x = 0; x < count; ++x) ss += src[(x + xmin) * in.channels + ch] * k[x];
        dst[xx * in.channels + ch] = clip8(ss);
      }
    }
  }
  return out;
}

Image resample_vertical(const Image& in, int out_height, const Coefficients& c) {
  Image out{in.width, out_height, in.channels, std::vector<uint8_t>(static_cast<size_t>(in.width) * out_height * in.channels)};
  const size_t row_bytes = static_cast<size_t>(in.width) * in.channels;
  for (int yy = 0; yy < out_height; ++yy) {
    const int ymin = c.bounds[2 * yy], count = c.bounds[2 * yy + 1];
    const int32_t* k = &c.k[static_cast<size_t>(yy) * c.ksize];
    uint8_t* dst = out.row(yy);
    for (size_t i = 0; i < row_bytes; ++i) {
      int32_t ss = 1 << (kPrecisionBits - 1);
      for (int y = 0; y < count; ++y) ss += in.data[(ymin + y) * row_bytes + i] * k[y];
      dst[i] = clip8(ss);
    }
  }
  return out;
}

Image pillow_resize(const Image& image, int width, int height, double (*filter)(double), double support) {
  Image out = image;
  if (width != image.width) out = resample_horizontal(out, width, precompute(image.width, width, filter, support));
  if (height != image.height) out = resample_vertical(out, height, precompute(image.height, height, filter, support));
  return out;
}

cv::Mat as_mat(const Image& image) {
  return cv::Mat(image.height, image.width, CV_8UC(image.channels), const_cast<uint8_t*>(image.data.data()));
}

Image from_mat(const cv::Mat& m) {
  Image out{m.cols, m.rows, m.channels(), {}};
  out.data.resize(static_cast<size_t>(m.cols) * m.rows * m.channels());
  cv::Mat dst(m.rows, m.cols, m.type(), out.data.data());
  m.copyTo(dst);
  return out;
}

}  // namespace

bool has_image_extension(const std::string& path) {
  std::string p = lower(path);
  for (const char* ext : {".png", ".jpg", ".jpeg", ".webp", ".bmp"}) {
    if (p.ends_with(ext)) return true;
  }
  return false;
}

Image decode_image(const std::string& path, bool keep_alpha) {
  std::vector<uint8_t> bytes = read_file(path);
  if (bytes.empty()) fail(path, "image file is empty");
  // ANYCOLOR|ANYDEPTH keeps 16-bit samples and applies the EXIF orientation, but drops alpha;
  // IMREAD_UNCHANGED keeps alpha but ignores EXIF, which images with alpha (PNG, WebP) rarely
  // carry. OpenCV's JPEG decoder turns CMYK into BGR.
  cv::Mat m;
  try {
    if (keep_alpha) m = cv::imdecode(bytes, cv::IMREAD_UNCHANGED);
    if (m.empty() || m.channels() != 4) m = cv::imdecode(bytes, cv::IMREAD_ANYCOLOR | cv::IMREAD_ANYDEPTH);
  } catch (const cv::Exception& e) {
    fail(path, "cannot decode image: {}", e.what());
  }
  if (m.empty()) {
    fail(path, "cannot decode image (corrupt, truncated or not a JPEG/PNG/WebP/BMP file); --skip_bad_images checks every "
               "image when the dataset is indexed and leaves such files out");
  }
  if (m.depth() == CV_16U) {
    m.convertTo(m, CV_8U, 1.0 / 257.0);
  } else if (m.depth() != CV_8U) {
    fail(path, "unsupported sample type (expected 8 or 16 bits per channel)");
  }
  cv::Mat rgb;
  switch (m.channels()) {
    case 1: cv::cvtColor(m, rgb, keep_alpha ? cv::COLOR_GRAY2RGBA : cv::COLOR_GRAY2RGB); break;
    case 3: cv::cvtColor(m, rgb, keep_alpha ? cv::COLOR_BGR2RGBA : cv::COLOR_BGR2RGB); break;
    case 4: cv::cvtColor(m, rgb, keep_alpha ? cv::COLOR_BGRA2RGBA : cv::COLOR_BGRA2RGB); break;
    default: fail(path, "unsupported channel count {}", m.channels());
  }
  return from_mat(rgb);
}

ImageSize read_image_size(const std::string& path) {
  // 64 KiB covers JPEG EXIF blocks in front of the frame header in practice.
  std::vector<uint8_t> head = read_file(path, 64 * 1024);
  ImageSize size;
  if (!(png_size(head, size) || jpeg_size(head, size) || webp_size(head, size) || bmp_size(head, size))) {
    const Image image = decode_image(path, false);
    size = {image.width, image.height};
  }
  // Pillow's decompression-bomb limit (Image.MAX_IMAGE_PIXELS, doubled: where it refuses rather than warns): a header
  // beyond it is a corrupt file or a bomb, and would fail only when a training step decodes it.
  constexpr int64_t kMaxPixels = 2 * 89'478'485;
  if (static_cast<int64_t>(size.width) * size.height > kMaxPixels || size.width <= 0 || size.height <= 0) {
    fail(path, "the header says {}x{} pixels, more than the {} any image decoder here may allocate (Pillow refuses it "
         "too): a corrupt file or a decompression bomb", size.width, size.height, kMaxPixels);
  }
  return size;
}

Interpolation interpolation_from_name(const std::string& name) {
  if (name == "area") return Interpolation::Area;
  if (name == "lanczos") return Interpolation::Lanczos;
  if (name == "box") return Interpolation::Box;
  if (name == "nearest") return Interpolation::Nearest;
  if (name == "bilinear" || name == "linear") return Interpolation::Linear;
  if (name == "bicubic" || name == "cubic") return Interpolation::Cubic;
  fail("resize_interpolation", "'{}' is not one of lanczos, box, nearest, bilinear, linear, bicubic, cubic, area", name);
}

Image resize_image(const Image& image, int width, int height, const Interpolation* interpolation) {
  Interpolation how = interpolation ? *interpolation
                                    : (image.width >= width && image.height >= height ? Interpolation::Area : Interpolation::Lanczos);
  switch (how) {
    case Interpolation::Lanczos: return pillow_resize(image, width, height, lanczos_filter, 3.0);
    case Interpolation::Box: return pillow_resize(image, width, height, box_filter, 0.5);
    default: break;
  }
  const int cv_flag = how == Interpolation::Area      ? cv::INTER_AREA
                      : how == Interpolation::Nearest ? cv::INTER_NEAREST_EXACT
                      : how == Interpolation::Linear  ? cv::INTER_LINEAR
                                                      : cv::INTER_CUBIC;
  cv::Mat out;
  cv::resize(as_mat(image), out, cv::Size(width, height), 0, 0, cv_flag);
  return from_mat(out);
}

Image crop_image(const Image& image, int left, int top, int width, int height) {
  Image out{width, height, image.channels, std::vector<uint8_t>(static_cast<size_t>(width) * height * image.channels)};
  for (int y = 0; y < height; ++y) {
    std::memcpy(out.row(y), image.row(top + y) + static_cast<size_t>(left) * image.channels,
                static_cast<size_t>(width) * image.channels);
  }
  return out;
}

Image flip_horizontal(const Image& image) {
  Image out = image;
  for (int y = 0; y < image.height; ++y) {
    const uint8_t* src = image.row(y);
    uint8_t* dst = out.row(y);
    for (int x = 0; x < image.width; ++x) {
      std::memcpy(dst + static_cast<size_t>(image.width - 1 - x) * image.channels, src + static_cast<size_t>(x) * image.channels,
                  image.channels);
    }
  }
  return out;
}

void write_png(const std::string& path, const Image& image) {
  if (image.channels != 3 && image.channels != 4) fail(path, "a PNG of {} channels: expected RGB or RGBA", image.channels);
  const cv::Mat view(image.height, image.width, image.channels == 3 ? CV_8UC3 : CV_8UC4, const_cast<uint8_t*>(image.data.data()));
  cv::Mat bgr;
  cv::cvtColor(view, bgr, image.channels == 3 ? cv::COLOR_RGB2BGR : cv::COLOR_RGBA2BGRA);
  std::vector<uchar> png;
  if (!cv::imencode(".png", bgr, png)) fail(path, "OpenCV cannot encode the image as PNG");

  write_file_atomically(path, std::string_view(reinterpret_cast<const char*>(png.data()), png.size()));
}


}  // namespace sdt
