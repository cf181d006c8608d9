// kohya's dataset keys (train_network.py) for a dataset config with buckets, derived by hand from kohya's code for this
// dataset: resolution 64 with buckets of 32..128 in steps of 32 gives the sorted resolutions (32,96) (32,128) (64,64)
// (96,32) (128,32); a 128x32 image fits (128,32) exactly (index 4), 96x64 and 64x64 go to (64,64) (index 2) with
// aspect-ratio errors 0.5 and 0, so the mean error is 0.5 / 3; 3 repeats make the counts 3 and 6. A second dataset
// without buckets uses the same folder: its images all train at 64x64 (bucket 0, mean error kohya's int 0), its folder
// is "img (2)" in ss_dataset_dirs, and its tags are counted once in ss_tag_frequency. (A folder twice in one dataset is
// dropped, as kohya drops a duplicated subset.)
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "src/core/dataset_config.h"
#include "src/core/train_args.h"
#include "src/data/dataset_index.h"
#include "src/data/image.h"
#include "src/train/dataset_metadata.h"

namespace sdt {
namespace {

namespace fs = std::filesystem;

void write_image(const fs::path& path, int width, int height, const std::string& caption) {
  Image image{.width = width, .height = height, .channels = 3};
  image.data.assign(static_cast<size_t>(width * height * 3), 128);
  write_png(path.string(), image);
  std::ofstream(fs::path(path).replace_extension(".caption")) << caption;
}

TEST(DatasetMetadata, ADatasetConfigIsDescribedAsKohyaDescribesIt) {
  const fs::path root = fs::path(testing::TempDir()) / "sdt_dataset_metadata";
  fs::remove_all(root);
  fs::create_directories(root / "img");
  write_image(root / "img" / "a.png", 128, 32, "A Cat, red");
  write_image(root / "img" / "b.png", 96, 64, "a cat");
  write_image(root / "img" / "c.png", 64, 64, "cat,  ,blue");
  std::ofstream(root / "dataset.toml") << "[general]\nenable_bucket = true\nmin_bucket_reso = 32\nmax_bucket_reso = 128\n"
                                          "bucket_reso_steps = 32\ncaption_extension = \".caption\"\n"
                                          "[[datasets]]\nresolution = 64\nbatch_size = 2\n"
                                          "  [[datasets.subsets]]\n  image_dir = '" + (root / "img").string() + "'\n"
                                          "  num_repeats = 3\n  class_tokens = 'sks'\n"
                                          "[[datasets]]\nresolution = 64\nenable_bucket = false\n"
                                          "  [[datasets.subsets]]\n  image_dir = '" + (root / "img").string() + "'\n"
                                          "  caption_prefix = 'photo'\n";
  TrainArgs args = parse_train_args({"--dataset_config", (root / "dataset.toml").string(), "--train_batch_size", "2"}).args;
  const DatasetBlueprint blueprint = resolve_dataset_config(args);
  std::vector<DatasetIndex> indexes = index_datasets(blueprint, {.use_index_cache = false});
  for (size_t d = 0; d < indexes.size(); ++d) assign_buckets(blueprint.datasets[d], indexes[d]);

  const safetensors::Metadata m = kohya_dataset_metadata(blueprint, indexes, args, 1);
  const std::string subset_common = R"("color_aug": false, "flip_aug": false, "random_crop": false, "shuffle_caption": false, )"
                                    R"("keep_tokens": 0, "keep_tokens_separator": "", "secondary_separator": null, )"
                                    R"("enable_wildcard": false, )";
  const std::string tags = R"({"img": {"a cat": 2, "red": 1, "cat": 1, "blue": 1}})";
  EXPECT_EQ(m.at("ss_datasets"),
            R"([{"is_dreambooth": true, "batch_size_per_device": 2, "num_train_images": 9, "num_reg_images": 0, )"
            R"("resolution": [64, 64], "enable_bucket": true, "min_bucket_reso": 32, "max_bucket_reso": 128, )"
            R"("tag_frequency": )" + tags + ", " +
            R"("bucket_info": {"buckets": {"2": {"resolution": [64, 64], "count": 6}, "4": {"resolution": [128, 32], "count": 3}}, )"
            R"("mean_img_ar_error": 0.16666666666666666}, "resize_interpolation": null, "subsets": [)"
            R"({"img_count": 3, "num_repeats": 3, )" + subset_common +
            R"("caption_prefix": null, "caption_suffix": null, "resize_interpolation": null, "image_dir": "img", )"
            R"("class_tokens": "sks", "is_reg": false}]}, )"
            R"({"is_dreambooth": true, "batch_size_per_device": 2, "num_train_images": 3, "num_reg_images": 0, )"
            R"("resolution": [64, 64], "enable_bucket": false, "min_bucket_reso": 32, "max_bucket_reso": 128, )"
            R"("tag_frequency": )" + tags + ", " +
            R"("bucket_info": {"buckets": {"0": {"resolution": [64, 64], "count": 3}}, "mean_img_ar_error": 0}, )"
            R"("resize_interpolation": null, "subsets": [)"
            R"({"img_count": 3, "num_repeats": 1, )" + subset_common +
            R"("caption_prefix": "photo", "caption_suffix": null, "resize_interpolation": null, "image_dir": "img", )"
            R"("class_tokens": null, "is_reg": false}]}])");
  EXPECT_EQ(m.at("ss_tag_frequency"), tags);
  EXPECT_EQ(m.at("ss_dataset_dirs"), R"x({"img": {"n_repeats": 3, "img_count": 3}, "img (2)": {"n_repeats": 1, "img_count": 3}})x");
  EXPECT_FALSE(m.contains("ss_bucket_info"));  // the flat keys are for folders given on the command line
}

}  // namespace
}  // namespace sdt
