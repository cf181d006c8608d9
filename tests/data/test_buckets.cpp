// Buckets against values computed by kohya-ss/sd-scripts' own make_bucket_resolutions and
// BucketManager (tests/fixtures/data/gen_data_fixtures.py).
#include <gtest/gtest.h>

#include <fstream>

#include <nlohmann/json.hpp>

#include "src/data/buckets.h"

namespace sdt {
namespace {

nlohmann::json fixture() {
  std::ifstream in(SDT_FIXTURES "/data/kohya_buckets.json");
  return nlohmann::json::parse(in);
}

Resolution reso(const nlohmann::json& j) { return {j[0].get<int64_t>(), j[1].get<int64_t>()}; }

TEST(Buckets, ResolutionListsEqualKohyasForSeveralAreasAndSteps) {
  auto cases = fixture()["bucket_lists"];
  ASSERT_GE(cases.size(), 5u);
  for (const auto& c : cases) {
    auto got = make_bucket_resolutions(reso(c["max_reso"]), c["min_size"], c["max_size"], c["divisible"]);
    std::vector<Resolution> want;
    for (const auto& r : c["resolutions"]) want.push_back(reso(r));
    EXPECT_EQ(got, want) << c["max_reso"] << " steps " << c["divisible"];
  }
}

TEST(Buckets, SelectedBucketResizeAndCropConditioningEqualKohyasForOddAspectRatios) {
  auto cases = fixture()["selections"];
  ASSERT_GE(cases.size(), 60u);
  for (const auto& c : cases) {
    BucketSelector selector(reso(c["max_reso"]), c["min_size"], c["max_size"], c["steps"], c["no_upscale"]);
    const Resolution image = reso(c["image"]);
    BucketChoice choice = selector.select(image.width, image.height);
    const std::string what = c.dump();
    EXPECT_EQ(choice.bucket, reso(c["bucket"])) << what;
    EXPECT_EQ(choice.resized_size, reso(c["resized_size"])) << what;
    CropLtrb ltrb = BucketSelector::crop_ltrb(choice.bucket, image);
    EXPECT_DOUBLE_EQ(ltrb.left, c["crop_ltrb"][0].get<double>()) << what;
    EXPECT_DOUBLE_EQ(ltrb.top, c["crop_ltrb"][1].get<double>()) << what;
    EXPECT_DOUBLE_EQ(ltrb.right, c["crop_ltrb"][2].get<double>()) << what;
    EXPECT_DOUBLE_EQ(ltrb.bottom, c["crop_ltrb"][3].get<double>()) << what;
  }
}

TEST(Buckets, AnExactBucketSizeIsKeptWithoutResizing) {
  BucketSelector selector({512, 512}, 256, 1024, 64, false);
  BucketChoice c = selector.select(384, 640);
  EXPECT_EQ(c.bucket, (Resolution{384, 640}));
  EXPECT_EQ(c.resized_size, (Resolution{384, 640}));
}

TEST(Buckets, ResolutionOutsideMinMaxBucketIsAnError) {
  EXPECT_ANY_THROW(BucketSelector({512, 512}, 640, 1024, 64, false));
  EXPECT_ANY_THROW(BucketSelector({2048, 2048}, 256, 1024, 64, false));
}

}  // namespace
}  // namespace sdt
