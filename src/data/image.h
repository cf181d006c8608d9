// Images as kohya's data pipeline sees them: decoded to 8-bit RGB (or RGBA for alpha masks), resized
// with the same filters (OpenCV's for area/linear/cubic/nearest, Pillow's algorithm for lanczos and
// box), cropped and flipped. Pixels are HWC uint8; tensors are made later, by the loader.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace sdt {

struct Image {
  int width = 0;
  int height = 0;
  int channels = 0;           // 3 (RGB) or 4 (RGBA)
  std::vector<uint8_t> data;  // (H, W, C)
  uint8_t* row(int y) { return data.data() + static_cast<size_t>(y) * width * channels; }
  const uint8_t* row(int y) const { return data.data() + static_cast<size_t>(y) * width * channels; }
};

struct ImageSize {
  int width = 0;
  int height = 0;
};

// The extensions kohya collects (case-insensitive): .png .jpg .jpeg .webp .bmp
bool has_image_extension(const std::string& path);

// Decodes JPEG, PNG, WebP or BMP with EXIF orientation applied; grayscale, 16-bit and CMYK become
// 8-bit RGB; the alpha channel is kept (RGBA) when `keep_alpha`, and an image without one then gets
// an opaque alpha. Throws sdt::Error naming the file when it cannot be read or decoded.
Image decode_image(const std::string& path, bool keep_alpha);

// Width and height after EXIF orientation, read from the file header without decoding the pixels
// (PNG, JPEG, WebP, BMP); other or unusual files fall back to a full decode.
ImageSize read_image_size(const std::string& path);

enum class Interpolation { Area, Lanczos, Box, Nearest, Linear, Cubic };
// kohya's names: lanczos, box, nearest, bilinear/linear, bicubic/cubic, area.
Interpolation interpolation_from_name(const std::string& name);

// kohya's resize_image: without an explicit filter, area when shrinking in both dimensions, else
// lanczos. Lanczos and box follow Pillow's resampling exactly (fixed-point, horizontal then vertical).
Image resize_image(const Image& image, int width, int height, const Interpolation* interpolation = nullptr);

Image crop_image(const Image& image, int left, int top, int width, int height);
Image flip_horizontal(const Image& image);

// Writes an RGB or RGBA image as PNG, whole or not at all (write_file_atomically). sdt::Error naming `path` (and the
// reason: a full disk, no permission) when it cannot.
void write_png(const std::string& path, const Image& image);

}  // namespace sdt
