// kohya's .npz caches as NumPy writes them (tests/fixtures/cache/gen_npz_fixtures.py): every array
// type a cache holds, stored and deflated archives, kohya's latent file names and keys; and our
// writer read back.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "src/cache/npz.h"
#include "src/core/error.h"

namespace sdt {
namespace {

namespace fs = std::filesystem;

const std::string kDir = SDT_FIXTURES "/cache/";

at::Tensor find(const NamedTensors& arrays, const std::string& name) {
  for (const auto& [n, t] : arrays) {
    if (n == name) return t;
  }
  ADD_FAILURE() << "no array " << name;
  return {};
}

TEST(Npz, ReadsKohyasLatentCacheFile) {
  const KohyaLatents k = read_kohya_latents_npz(kDir + "image_0040x0030_sd.npz");
  const at::Tensor latents = ((at::arange(4 * 4 * 6, at::kFloat) - 40) / 8).reshape({4, 4, 6});
  EXPECT_TRUE(at::equal(k.latents, latents));
  ASSERT_TRUE(k.flipped.defined());
  EXPECT_TRUE(at::equal(k.flipped, latents.flip({2})));
  EXPECT_EQ(k.original_size, (Resolution{40, 30}));
  EXPECT_EQ(k.crop_ltrb.left, 4);
  EXPECT_EQ(k.crop_ltrb.top, 1);
  EXPECT_EQ(k.crop_ltrb.right, 44);
  EXPECT_EQ(k.crop_ltrb.bottom, 31);
  ASSERT_TRUE(k.alpha_mask.defined());
  EXPECT_EQ(k.alpha_mask.sizes(), (at::IntArrayRef{32, 48}));
  EXPECT_FLOAT_EQ(k.alpha_mask[0][0].item<float>(), 0.0f);
  EXPECT_FLOAT_EQ(k.alpha_mask[31][47].item<float>(), 1.0f);
}

TEST(Npz, ReadsKohyasTextEncoderOutputsFile) {
  const NamedTensors arrays = read_npz(kDir + "image_te_outputs.npz");
  ASSERT_EQ(arrays.size(), 3u);
  EXPECT_EQ(arrays[0].first, "hidden_state1");
  EXPECT_TRUE(at::equal(arrays[0].second, (at::arange(40, at::kFloat) / 10).reshape({5, 8})));
  EXPECT_TRUE(at::equal(find(arrays, "hidden_state2"), (at::arange(60, at::kFloat) / -7).reshape({5, 12})));
  EXPECT_TRUE(at::equal(find(arrays, "pool2"), at::arange(12, at::kFloat) * 0.5));
}

TEST(Npz, ReadsEveryArrayTypeFromADeflatedArchive) {
  const NamedTensors arrays = read_npz(kDir + "mixed_compressed.npz");
  EXPECT_TRUE(at::equal(find(arrays, "input_ids"), at::arange(10, at::kLong) * 3));
  EXPECT_TRUE(at::equal(find(arrays, "attn_mask"), at::arange(10, at::kLong).remainder(3) == 0));
  EXPECT_TRUE(at::equal(find(arrays, "int32s"), (at::arange(6, at::kInt) - 2).reshape({2, 3})));
  EXPECT_TRUE(at::equal(find(arrays, "halves"), at::arange(8, at::kHalf) / 4));
  const at::Tensor scalar = find(arrays, "scalar");
  EXPECT_EQ(scalar.dim(), 0);
  EXPECT_EQ(scalar.item<float>(), 0.25f);
  EXPECT_TRUE(at::equal(find(arrays, "uint8s"), at::arange(5, at::kByte) * 50));
  EXPECT_TRUE(at::equal(find(arrays, "doubles"), at::arange(3, at::kDouble) / 3));
}

TEST(Npz, WrittenArchiveReadsBack) {
  const fs::path path = fs::path(testing::TempDir()) / "sdt_npz_round_trip.npz";
  const NamedTensors arrays{{"latents", at::randn({4, 8, 6})},
                            {"original_size", at::tensor({40, 30}, at::kLong)},
                            {"flag", at::ones({}, at::kBool)},
                            {"half", at::randn({3}).to(at::kHalf)}};
  write_npz(path.string(), arrays);
  const NamedTensors back = read_npz(path.string());
  ASSERT_EQ(back.size(), arrays.size());
  for (size_t i = 0; i < arrays.size(); ++i) {
    EXPECT_EQ(back[i].first, arrays[i].first);
    EXPECT_TRUE(at::equal(back[i].second, arrays[i].second)) << arrays[i].first;
  }
  fs::remove(path);
}

TEST(Npz, KohyaLatentFileNames) {
  const fs::path dir = fs::path(testing::TempDir()) / "sdt_npz_names";
  fs::remove_all(dir);
  fs::create_directories(dir);
  const std::string image = (dir / "cat.01.png").string();
  EXPECT_EQ(kohya_latents_npz_path(image, {640, 480}, "_sd"), (dir / "cat.01_0640x0480_sd.npz").string());
  std::ofstream(dir / "cat.01.npz") << "legacy";
  EXPECT_EQ(kohya_latents_npz_path(image, {640, 480}, "_sd"), (dir / "cat.01.npz").string());
  fs::remove_all(dir);
}

TEST(Npz, NotAnArchiveIsAnErrorNamingTheFile) {
  const fs::path path = fs::path(testing::TempDir()) / "sdt_npz_not_zip.npz";
  std::ofstream(path) << "not a zip archive";
  try {
    read_npz(path.string());
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_EQ(e.where(), path.string());
  }
  EXPECT_THROW(read_kohya_latents_npz(kDir + "image_te_outputs.npz"), Error);  // no 'latents'
  fs::remove(path);
}

}  // namespace
}  // namespace sdt
