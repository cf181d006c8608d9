// Indexing DreamBooth folders, fine-tuning metadata and ControlNet pairs; bad inputs; the index cache.
#include <gtest/gtest.h>

#include <algorithm>

#include <sys/stat.h>
#include <fcntl.h>

#include <filesystem>
#include <fstream>

#include <opencv2/imgcodecs.hpp>

#include "src/core/error.h"
#include "src/data/dataset_index.h"
#include "src/data/image.h"
#include "src/data/rng.h"
#include "src/data/sampler.h"

namespace sdt {
namespace {

namespace fs = std::filesystem;

struct TempDir {
  fs::path path;
  TempDir() {
    path = fs::path(testing::TempDir()) / (std::string("sdt_") + testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() { fs::remove_all(path); }
};

void write_image(const fs::path& path, int w, int h, int value = 100) {
  fs::create_directories(path.parent_path());
  cv::imwrite(path.string(), cv::Mat(h, w, CV_8UC3, cv::Scalar(value, value / 2, 255 - value)));
}

void write_text(const fs::path& path, const std::string& text) { std::ofstream(path) << text; }

SubsetConfig db_subset(const fs::path& dir, int64_t repeats = 1, bool is_reg = false) {
  SubsetConfig s;
  s.image_dir = dir.string();
  s.num_repeats = repeats;
  s.is_reg = is_reg;
  s.caption_extension = ".txt";
  s.class_tokens = "sks dog";
  return s;
}

DatasetConfig dataset_of(std::vector<SubsetConfig> subsets) {
  DatasetConfig d;
  d.width = d.height = 64;
  d.enable_bucket = true;
  d.min_bucket_reso = 32;
  d.max_bucket_reso = 128;
  d.bucket_reso_steps = 16;
  d.subsets = std::move(subsets);
  return d;
}

TEST(DatasetIndex, DreamBoothCaptionsClassTokenFallbackAndFaceCropNames) {
  TempDir t;
  write_image(t.path / "img/a.png", 64, 64);
  write_text(t.path / "img/a.txt", "a photo of sks dog, grass\nsecond line ignored\n");
  write_image(t.path / "img/b.jpg", 80, 48);  // no caption: class token, warned
  write_image(t.path / "img/face_10_20_30_40.png", 64, 64);
  write_text(t.path / "img/face.txt", "face caption");
  write_text(t.path / "img/skip.gif", "GIF89a");  // not a kohya extension: ignored
  DatasetIndex index = build_dataset_index(dataset_of({db_subset(t.path / "img", 3)}));
  ASSERT_EQ(index.images.size(), 3u);
  EXPECT_EQ(index.images[0].caption, "a photo of sks dog, grass");
  EXPECT_EQ(index.images[1].caption, "sks dog");
  EXPECT_EQ(index.images[1].width, 80);
  EXPECT_EQ(index.images[1].height, 48);
  EXPECT_EQ(index.images[2].caption, "face caption");
  EXPECT_EQ(index.num_train_images, 9);
  bool warned = false;
  for (const auto& w : index.warnings) warned = warned || w.find("have no caption file") != std::string::npos;
  EXPECT_TRUE(warned);
}

TEST(DatasetIndex, RegularizationImagesAreBalancedAsKohyaDoes) {
  TempDir t;
  for (const char* n : {"x.png", "y.png"}) write_image(t.path / "train" / n, 64, 64);
  for (const char* n : {"r0.png", "r1.png", "r2.png"}) write_image(t.path / "reg" / n, 64, 64);
  DatasetIndex index = build_dataset_index(dataset_of({db_subset(t.path / "train", 10), db_subset(t.path / "reg", 1, true)}));
  // 20 training samples; 3 reg images registered once, then one repeat at a time: 7, 7, 6.
  ASSERT_EQ(index.images.size(), 5u);
  EXPECT_EQ(index.images[2].num_repeats, 7);
  EXPECT_EQ(index.images[3].num_repeats, 7);
  EXPECT_EQ(index.images[4].num_repeats, 6);
  EXPECT_TRUE(index.images[4].is_reg);
}

TEST(DatasetIndex, SurplusRegularizationImagesAreNotUsed) {
  TempDir t;
  write_image(t.path / "train/x.png", 64, 64);
  for (const char* n : {"r0.png", "r1.png", "r2.png"}) write_image(t.path / "reg" / n, 64, 64);
  DatasetIndex index = build_dataset_index(dataset_of({db_subset(t.path / "train", 2), db_subset(t.path / "reg", 1, true)}));
  EXPECT_EQ(index.images.size(), 3u);  // 1 training image + the 2 reg images that balance its 2 repeats
}

TEST(DatasetIndex, FineTuningMetadataCaptionsTagsAndSizes) {
  TempDir t;
  write_image(t.path / "img/one.png", 96, 64);
  write_image(t.path / "img/two.jpg", 64, 64);
  write_text(t.path / "meta.json", R"({"one": {"caption": "a cat", "tags": "cute, small"}, "two.jpg": {"tags": "dog", "image_size": [64, 64]}})");
  SubsetConfig s;
  s.image_dir = (t.path / "img").string();
  s.metadata_file = (t.path / "meta.json").string();
  DatasetConfig d = dataset_of({s});
  d.kind = DatasetKind::FineTuning;
  DatasetIndex index = build_dataset_index(d);
  ASSERT_EQ(index.images.size(), 2u);
  EXPECT_EQ(index.images[0].caption, "a cat,cute, small");  // caption + caption_separator + tags
  EXPECT_EQ(index.images[0].width, 96);
  EXPECT_EQ(index.images[1].caption, "dog");
}

TEST(DatasetIndex, ControlNetPairsImagesByStem) {
  TempDir t;
  write_image(t.path / "img/a.png", 64, 64);
  write_image(t.path / "cond/a.jpg", 64, 64);
  SubsetConfig s = db_subset(t.path / "img");
  s.conditioning_data_dir = (t.path / "cond").string();
  DatasetConfig d = dataset_of({s});
  d.kind = DatasetKind::ControlNet;
  DatasetIndex index = build_dataset_index(d);
  EXPECT_EQ(index.images.at(0).conditioning_path, (t.path / "cond/a.jpg").string());
  write_image(t.path / "img/b.png", 64, 64);
  EXPECT_THROW(build_dataset_index(d), Error);  // b has no conditioning image
}

TEST(DatasetIndex, MissingFolderCorruptImageAndEmptyDatasetAreClearErrors) {
  TempDir t;
  try {
    build_dataset_index(dataset_of({db_subset(t.path / "nope")}));
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("image folder not found"), std::string::npos) << e.what();
  }
  write_image(t.path / "img/good.png", 64, 64);
  write_text(t.path / "img/bad.png", "not a png");
  try {
    build_dataset_index(dataset_of({db_subset(t.path / "img")}));
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("bad.png"), std::string::npos) << e.what();
  }
  DatasetIndex skipped = build_dataset_index(dataset_of({db_subset(t.path / "img")}), {.use_index_cache = false, .skip_bad_images = true});
  EXPECT_EQ(skipped.images.size(), 1u);
  fs::create_directories(t.path / "empty");
  EXPECT_THROW(build_dataset_index(dataset_of({db_subset(t.path / "empty")})), Error);
}

// A truncated image has a whole header, so the index takes it and the run would die at the step that decodes it (and
// again on every resume). --skip_bad_images decodes every image when indexing, leaves the truncated one out with a
// warning, and remembers in the index cache which images it verified. A header claiming more pixels than a decoder may
// allocate is refused at once; a symbolic link to nothing is left out.
TEST(DatasetIndex, TruncatedImagesHugeHeadersAndDanglingLinks) {
  TempDir t;
  write_image(t.path / "img/good.png", 64, 64);
  write_image(t.path / "img/cut.png", 64, 64);
  fs::resize_file(t.path / "img/cut.png", fs::file_size(t.path / "img/cut.png") / 2);
  fs::create_symlink(t.path / "img/gone.png", t.path / "img/dangling.png");
  DatasetIndex unchecked = build_dataset_index(dataset_of({db_subset(t.path / "img")}));
  EXPECT_EQ(unchecked.images.size(), 2u);  // good and cut: only the header is read
  try {
    decode_image((t.path / "img/cut.png").string(), false);
    FAIL() << "a truncated image decodes";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("--skip_bad_images"), std::string::npos) << e.what();
  }
  DatasetIndex checked = build_dataset_index(dataset_of({db_subset(t.path / "img")}), {.skip_bad_images = true});
  ASSERT_EQ(checked.images.size(), 1u);
  EXPECT_EQ(fs::path(checked.images[0].path).filename(), "good.png");
  EXPECT_TRUE(std::any_of(checked.warnings.begin(), checked.warnings.end(), [](const std::string& w) {
    return w.starts_with("skipping unreadable image") && w.find("cut.png") != std::string::npos;
  }));
  // The next run with the flag reads the verified record instead of decoding again, and still leaves the image out.
  EXPECT_EQ(build_dataset_index(dataset_of({db_subset(t.path / "img")}), {.skip_bad_images = true}).images.size(), 1u);

  // A PNG header of 100000 x 100000 pixels.
  std::string png = {'\x89', 'P', 'N', 'G', '\r', '\n', '\x1a', '\n', 0, 0, 0, 13, 'I', 'H', 'D', 'R'};
  for (uint32_t side : {100000u, 100000u}) {
    for (int shift : {24, 16, 8, 0}) png += static_cast<char>((side >> shift) & 0xff);
  }
  png += std::string("\x08\x02\x00\x00\x00", 5) + std::string(4, '\0');
  fs::create_directories(t.path / "huge");
  std::ofstream(t.path / "huge/bomb.png", std::ios::binary) << png;
  try {
    read_image_size((t.path / "huge/bomb.png").string());
    FAIL() << "a 100000x100000 header is accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("100000x100000"), std::string::npos) << e.what();
  }
}

TEST(DatasetIndex, TheIndexCacheIsReusedAndNoticesEditedCaptions) {
  TempDir t;
  write_image(t.path / "img/a.png", 64, 48);
  write_text(t.path / "img/a.txt", "first");
  build_dataset_index(dataset_of({db_subset(t.path / "img")}));
  ASSERT_TRUE(fs::exists(t.path / "img/sdt_index.json"));
  // Same size and mtime but other pixels: the cached size is used, the image is not reopened.
  struct stat before{};
  ::stat((t.path / "img/a.png").c_str(), &before);
  write_image(t.path / "img/a.png", 64, 48, 7);
  struct timespec times[2] = {before.st_atim, before.st_mtim};
  ::utimensat(AT_FDCWD, (t.path / "img/a.png").c_str(), times, 0);
  write_text(t.path / "img/a.txt", "edited");
  DatasetIndex index = build_dataset_index(dataset_of({db_subset(t.path / "img")}));
  EXPECT_EQ(index.images.at(0).caption, "edited");
  EXPECT_EQ(index.images.at(0).height, 48);
}

TEST(DatasetIndex, BucketsAreAssignedPerImage) {
  TempDir t;
  write_image(t.path / "img/wide.png", 128, 64);
  write_image(t.path / "img/square.png", 64, 64);
  DatasetConfig d = dataset_of({db_subset(t.path / "img")});
  DatasetIndex index = build_dataset_index(d);
  assign_buckets(d, index);
  EXPECT_EQ(index.images[0].bucket.bucket, (Resolution{64, 64}));  // square.png sorts first
  EXPECT_GT(index.images[1].bucket.bucket.width, index.images[1].bucket.bucket.height);
}

}  // namespace
}  // namespace sdt

namespace sdt {
namespace {

// Expected orders printed by CPython 3.11: l = list(range(n)); random.Random(seed).shuffle(l).
TEST(DatasetIndex, PythonShuffleOrderIsCPythons) {
  EXPECT_EQ(python_shuffle_order(10, 42), (std::vector<size_t>{7, 3, 2, 8, 5, 6, 9, 4, 0, 1}));
  EXPECT_EQ(python_shuffle_order(10, 7), (std::vector<size_t>{8, 3, 1, 4, 7, 0, 9, 6, 2, 5}));
  EXPECT_EQ(python_shuffle_order(10, (uint64_t{1} << 40) + 3), (std::vector<size_t>{8, 5, 6, 7, 9, 2, 4, 1, 0, 3}));
  const std::vector<size_t> long_order = python_shuffle_order(300, 42);
  EXPECT_EQ(std::vector<size_t>(long_order.begin(), long_order.begin() + 12),
            (std::vector<size_t>{106, 239, 37, 89, 32, 250, 192, 120, 19, 225, 24, 295}));
}

// kohya's split_train_val: 10 images, split 0.2, seed 42 -> the shuffled order 7 3 2 8 5 6 9 4 | 0 1: images 0 and 1
// are held out (1 repeat, no regularization); training keeps 8 images with their repeats and balances reg images to them.
TEST(DatasetIndex, ValidationSplitHoldsOutKohyasImages) {
  TempDir t;
  for (int i = 0; i < 10; ++i) write_image(t.path / "train" / fmt::format("img{:02d}.png", i), 64, 64, 10 * i);
  for (int i = 0; i < 3; ++i) write_image(t.path / "reg" / fmt::format("reg{}.png", i), 64, 64);
  DatasetConfig d = dataset_of({db_subset(t.path / "train", 3), db_subset(t.path / "reg", 1, true)});
  d.validation_split = 0.2;
  d.validation_seed = 42;
  IndexOptions options;
  options.use_index_cache = false;
  options.part = DatasetPart::validation;
  const DatasetIndex validation = build_dataset_index(d, options);
  ASSERT_EQ(validation.images.size(), 2u);
  EXPECT_EQ(fs::path(validation.images[0].path).filename(), "img00.png");
  EXPECT_EQ(fs::path(validation.images[1].path).filename(), "img01.png");
  EXPECT_EQ(validation.images[0].num_repeats, 1);
  EXPECT_EQ(validation.num_reg_images, 0);

  options.part = DatasetPart::training;
  const DatasetIndex training = build_dataset_index(d, options);
  EXPECT_EQ(training.num_train_images, 24);
  int64_t reg = 0;
  for (const auto& e : training.images) {
    if (e.is_reg) {
      reg += e.num_repeats;
    } else {
      EXPECT_NE(fs::path(e.path).filename(), "img00.png");
      EXPECT_NE(fs::path(e.path).filename(), "img01.png");
    }
  }
  EXPECT_EQ(reg, 24);

  d.validation_split = 0;
  options.part = DatasetPart::validation;
  EXPECT_TRUE(build_dataset_index(d, options).images.empty());
}

}  // namespace
}  // namespace sdt
