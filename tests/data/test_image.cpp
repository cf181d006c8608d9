// Image decoding of every format and layout, header sizes, and Pillow-exact resampling.
#include <gtest/gtest.h>

#include <fstream>

#include <nlohmann/json.hpp>

#include "src/core/error.h"
#include "src/data/image.h"

namespace sdt {
namespace {

const std::string kImages = SDT_FIXTURES "/data/images/";

std::vector<uint8_t> from_hex(const std::string& hex) {
  std::vector<uint8_t> out(hex.size() / 2);
  for (size_t i = 0; i < out.size(); ++i) out[i] = static_cast<uint8_t>(std::stoi(hex.substr(2 * i, 2), nullptr, 16));
  return out;
}

TEST(Image, LanczosAndBoxResizeEqualPillowByteForByte) {
  std::ifstream in(SDT_FIXTURES "/data/pillow_resize.json");
  auto cases = nlohmann::json::parse(in)["cases"];
  ASSERT_GE(cases.size(), 20u);
  for (const auto& c : cases) {
    Image image{c["width"], c["height"], c["channels"], from_hex(c["pixels"])};
    const Interpolation how = c["filter"] == "lanczos" ? Interpolation::Lanczos : Interpolation::Box;
    Image out = resize_image(image, c["out_width"], c["out_height"], &how);
    EXPECT_EQ(out.data, from_hex(c["out"])) << c["filter"] << " " << c["width"] << "x" << c["height"] << " -> "
                                            << c["out_width"] << "x" << c["out_height"];
  }
}

TEST(Image, DefaultFilterIsAreaWhenShrinkingAndLanczosWhenEnlarging) {
  Image image{4, 4, 3, std::vector<uint8_t>(48)};
  for (size_t i = 0; i < image.data.size(); ++i) image.data[i] = static_cast<uint8_t>(i * 5);
  const Interpolation area = Interpolation::Area, lanczos = Interpolation::Lanczos;
  EXPECT_EQ(resize_image(image, 2, 2).data, resize_image(image, 2, 2, &area).data);
  EXPECT_EQ(resize_image(image, 6, 3).data, resize_image(image, 6, 3, &lanczos).data);
}

TEST(Image, EveryFormatDecodesToRgbWithHeaderSizesThatMatch) {
  for (const char* name : {"plain.png", "lossless.webp", "plain.bmp", "cmyk.jpg", "gray16.png", "alpha.png"}) {
    Image image = decode_image(kImages + name, false);
    EXPECT_EQ(image.channels, 3) << name;
    EXPECT_EQ(image.width, 40) << name;
    EXPECT_EQ(image.height, 20) << name;
    ImageSize size = read_image_size(kImages + name);
    EXPECT_EQ(size.width, 40) << name;
    EXPECT_EQ(size.height, 20) << name;
  }
  // Lossless formats hold the exact pixels.
  EXPECT_EQ(decode_image(kImages + "plain.png", false).data, decode_image(kImages + "lossless.webp", false).data);
  EXPECT_EQ(decode_image(kImages + "plain.png", false).data, decode_image(kImages + "plain.bmp", false).data);
}

TEST(Image, ExifOrientationIsAppliedToPixelsAndHeaderSize) {
  Image image = decode_image(kImages + "exif_rotate6.jpg", false);
  EXPECT_EQ(image.width, 20);
  EXPECT_EQ(image.height, 40);
  ImageSize size = read_image_size(kImages + "exif_rotate6.jpg");
  EXPECT_EQ(size.width, 20);
  EXPECT_EQ(size.height, 40);
}

TEST(Image, SixteenBitGrayBecomesEightBitRgb) {
  Image image = decode_image(kImages + "gray16.png", false);
  // gen_data_fixtures.py: value (y * 40 + x) * 80, scaled to 8 bits.
  const int v = (1 * 40 + 3) * 80;
  EXPECT_NEAR(image.row(1)[3 * 3], v / 257.0, 1.0);
  EXPECT_EQ(image.row(1)[3 * 3], image.row(1)[3 * 3 + 1]);
}

TEST(Image, AlphaIsKeptWhenAskedAndOpaqueOtherwise) {
  Image rgba = decode_image(kImages + "alpha.png", true);
  EXPECT_EQ(rgba.channels, 4);
  EXPECT_EQ(rgba.row(0)[3], 0);         // x < 10 transparent
  EXPECT_EQ(rgba.row(0)[20 * 4 + 3], 128);
  Image opaque = decode_image(kImages + "plain.png", true);
  EXPECT_EQ(opaque.channels, 4);
  EXPECT_EQ(opaque.row(5)[7 * 4 + 3], 255);
}

TEST(Image, CorruptOrMissingImagesNameTheFile) {
  for (const char* name : {"truncated.png", "not_an_image.jpg", "missing.png"}) {
    try {
      decode_image(kImages + name, false);
      ADD_FAILURE() << name << " decoded";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(name), std::string::npos) << e.what();
    }
  }
}

TEST(Image, CropAndFlip) {
  Image image{3, 2, 3, {1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 5, 5, 5, 6, 6, 6}};
  EXPECT_EQ(flip_horizontal(image).data, (std::vector<uint8_t>{3, 3, 3, 2, 2, 2, 1, 1, 1, 6, 6, 6, 5, 5, 5, 4, 4, 4}));
  EXPECT_EQ(crop_image(image, 1, 1, 2, 1).data, (std::vector<uint8_t>{5, 5, 5, 6, 6, 6}));
}

TEST(Image, ExtensionsAreKohyas) {
  EXPECT_TRUE(has_image_extension("a/b.JPG"));
  EXPECT_TRUE(has_image_extension("x.webp"));
  EXPECT_FALSE(has_image_extension("x.gif"));
  EXPECT_FALSE(has_image_extension("x.txt"));
}

}  // namespace
}  // namespace sdt
