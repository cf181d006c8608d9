// The loader: tensors in kohya's layout, identical samples for 1 rank or N ranks, ordered output from
// worker threads, resume.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include <opencv2/imgcodecs.hpp>
#include <torch/torch.h>

#include "src/data/loader.h"

namespace sdt {
namespace {

namespace fs = std::filesystem;

struct Fixture {
  fs::path dir;
  DatasetConfig config;
  DatasetIndex index;
  Fixture() {
    dir = fs::path(testing::TempDir()) / (std::string("sdt_loader_") + testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir);
    fs::create_directories(dir);
    cv::RNG rng(3);
    for (int i = 0; i < 6; ++i) {
      cv::Mat m(40 + 8 * i, 72 - 4 * i, CV_8UC3);
      rng.fill(m, cv::RNG::UNIFORM, 0, 255);
      const std::string stem = (dir / ("img" + std::to_string(i))).string();
      cv::imwrite(stem + ".png", m);
      std::ofstream(stem + ".txt") << "tag" << i << ", red, green, blue, yellow";
    }
    SubsetConfig s;
    s.image_dir = dir.string();
    s.caption_extension = ".txt";
    s.num_repeats = 2;
    s.flip_aug = true;
    s.random_crop = true;
    s.color_aug = true;
    s.shuffle_caption = true;
    s.keep_tokens = 1;
    config.width = config.height = 48;
    config.enable_bucket = true;
    config.min_bucket_reso = 32;
    config.max_bucket_reso = 96;
    config.bucket_reso_steps = 16;
    config.subsets = {s};
    index = build_dataset_index(config);
    assign_buckets(config, index);
  }
  ~Fixture() { fs::remove_all(dir); }
};

TEST(Loader, OneRankAndTwoRanksLoadExactlyTheSameSamples) {
  Fixture f;
  std::vector<LoaderDataset> datasets = {{&f.config, &f.index}};
  BatchPlanner planner({&f.index}, {4}, 11);
  for (const auto& global : planner.epoch(1)) {
    TrainBatch whole = load_rank_batch(datasets, global, 1, 0, 0, {.seed = 11, .rank = 0, .world_size = 1});
    TrainBatch r0 = load_rank_batch(datasets, global, 1, 0, 0, {.seed = 11, .rank = 0, .world_size = 2});
    TrainBatch r1 = load_rank_batch(datasets, global, 1, 0, 0, {.seed = 11, .rank = 1, .world_size = 2});
    EXPECT_TRUE(at::equal(whole.images, at::cat({r0.images, r1.images})));
    std::vector<std::string> captions = r0.captions;
    captions.insert(captions.end(), r1.captions.begin(), r1.captions.end());
    EXPECT_EQ(whole.captions, captions);
  }
}

TEST(Loader, TensorsHaveKohyasLayoutAndRange) {
  Fixture f;
  std::vector<LoaderDataset> datasets = {{&f.config, &f.index}};
  BatchPlanner planner({&f.index}, {3}, 1);
  auto global = planner.epoch(1).at(0);
  TrainBatch b = load_rank_batch(datasets, global, 1, 0, 0, {.seed = 1});
  EXPECT_EQ(b.images.sizes(), at::IntArrayRef({static_cast<int64_t>(global.samples.size()), 3, global.bucket.height, global.bucket.width}));
  EXPECT_GE(b.images.min().item<float>(), -1.0f);
  EXPECT_LE(b.images.max().item<float>(), 1.0f);
  EXPECT_TRUE(at::equal(b.loss_weights, at::ones_like(b.loss_weights)));
  for (const auto& c : b.captions) EXPECT_TRUE(c.starts_with("tag")) << c;  // keep_tokens = 1
}

TEST(Loader, WorkersDeliverInOrderWhatADirectLoadGivesAndResumeContinues) {
  Fixture f;
  std::vector<LoaderDataset> datasets = {{&f.config, &f.index}};
  BatchPlanner planner({&f.index}, {2}, 9);
  LoaderOptions options{.seed = 9, .workers = 2, .queue_depth = 2};
  DataLoader loader(datasets, planner, options);
  auto plan = planner.epoch(2);
  loader.start_epoch(2);
  int64_t step = 0;
  while (auto batch = loader.next()) {
    TrainBatch direct = load_rank_batch(datasets, plan.at(static_cast<size_t>(step)), 2, step, step, options);
    EXPECT_EQ(batch->step, step);
    EXPECT_TRUE(at::equal(batch->images, direct.images)) << step;
    EXPECT_EQ(batch->captions, direct.captions);
    ++step;
  }
  EXPECT_EQ(step, planner.steps_per_epoch());
  loader.start_epoch(2, 3, 3);  // resume at step 3
  auto resumed = loader.next();
  ASSERT_TRUE(resumed.has_value());
  EXPECT_EQ(resumed->step, 3);
  EXPECT_TRUE(at::equal(resumed->images, load_rank_batch(datasets, plan.at(3), 2, 3, 3, options).images));
}

}  // namespace
}  // namespace sdt

namespace sdt {
namespace {

// Training from cached latents loads no pixels, yet decides exactly what loading the image decides: the same
// captions, flips, original sizes, crop conditioning and loss weights (for subsets a cache accepts).
TEST(Loader, WithoutPixelsTheSamplesDecisionsAreTheSame) {
  Fixture f;
  f.config.subsets[0].random_crop = false;
  f.config.subsets[0].color_aug = false;
  std::vector<LoaderDataset> datasets = {{&f.config, &f.index}};
  BatchPlanner planner({&f.index}, {4}, 5);
  int flipped = 0;
  for (const auto& global : planner.epoch(2)) {
    const TrainBatch pixels = load_rank_batch(datasets, global, 2, 0, 0, {.seed = 5});
    const TrainBatch described = load_rank_batch(datasets, global, 2, 0, 0, {.seed = 5, .load_pixels = false});
    EXPECT_FALSE(described.images.defined());
    EXPECT_EQ(described.captions, pixels.captions);
    EXPECT_EQ(described.flipped, pixels.flipped);
    EXPECT_EQ(described.image_paths, pixels.image_paths);
    EXPECT_TRUE(at::equal(described.loss_weights, pixels.loss_weights));
    for (size_t i = 0; i < pixels.original_sizes.size(); ++i) {
      EXPECT_EQ(described.original_sizes[i], pixels.original_sizes[i]);
      EXPECT_EQ(described.crop_ltrbs[i].left, pixels.crop_ltrbs[i].left);
      EXPECT_EQ(described.crop_ltrbs[i].right, pixels.crop_ltrbs[i].right);
    }
    for (bool b : pixels.flipped) flipped += b;
  }
  EXPECT_GT(flipped, 0);  // flip_aug is on: some samples are flipped
}

}  // namespace
}  // namespace sdt
