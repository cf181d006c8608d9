// The batch plan: identical global batches for every world size, complete epochs, resumable order.
#include <gtest/gtest.h>

#include <map>

#include "src/data/sampler.h"

namespace sdt {
namespace {

// 3 buckets with 7, 4 and 1 images (repeats 2, 1, 3), without touching files.
DatasetIndex synthetic_index() {
  DatasetIndex index;
  auto add = [&](int n, Resolution reso, int64_t repeats) {
    for (int i = 0; i < n; ++i) {
      ImageEntry e;
      e.num_repeats = repeats;
      e.bucket = {reso, reso};
      index.images.push_back(e);
    }
  };
  add(7, {64, 64}, 2);
  add(4, {96, 48}, 1);
  add(1, {48, 96}, 3);
  return index;
}

TEST(Sampler, GlobalBatchesAreIdenticalForWorldSizesOneTwoAndThree) {
  DatasetIndex index = synthetic_index();
  const int64_t global = 6;
  std::vector<std::vector<GlobalBatch>> plans;
  for (int world : {1, 2, 3}) {
    BatchPlanner planner({&index}, {global}, 42);
    std::vector<GlobalBatch> epoch = planner.epoch(1);
    // The ranks' shares, concatenated, are the global batch.
    for (const auto& batch : epoch) {
      std::vector<SampleRef> joined;
      for (int r = 0; r < world; ++r) {
        auto share = rank_share(batch, r, world);
        if (batch.samples.size() == static_cast<size_t>(global)) EXPECT_EQ(share.size(), static_cast<size_t>(global / world));
        joined.insert(joined.end(), share.begin(), share.end());
      }
      EXPECT_EQ(joined, batch.samples);
    }
    plans.push_back(std::move(epoch));
  }
  ASSERT_EQ(plans[0].size(), plans[1].size());
  for (size_t b = 0; b < plans[0].size(); ++b) {
    EXPECT_EQ(plans[0][b].samples, plans[1][b].samples);
    EXPECT_EQ(plans[0][b].samples, plans[2][b].samples);
    EXPECT_EQ(plans[0][b].bucket, plans[2][b].bucket);
  }
}

TEST(Sampler, EverySampleAppearsItsRepeatsTimesPerEpochInOneBucketPerBatch) {
  DatasetIndex index = synthetic_index();
  BatchPlanner planner({&index}, {4}, 1);
  // Buckets: 14 samples -> 4 batches, 4 -> 1, 3 -> 1 (short: a bucket smaller than the batch, warned).
  EXPECT_EQ(planner.steps_per_epoch(), 6);
  ASSERT_EQ(planner.warnings().size(), 1u);
  EXPECT_NE(planner.warnings()[0].find("bucket 48x96 holds 3 samples, fewer than the global batch of 4"), std::string::npos);
  for (int64_t epoch : {1, 2}) {
    std::map<uint32_t, int64_t> count;
    auto batches = planner.epoch(epoch);
    ASSERT_EQ(static_cast<int64_t>(batches.size()), planner.steps_per_epoch());
    for (const auto& b : batches) {
      for (const auto& s : b.samples) {
        ++count[s.image];
        EXPECT_EQ(index.images[s.image].bucket.bucket, b.bucket);
      }
    }
    for (uint32_t i = 0; i < index.images.size(); ++i) EXPECT_EQ(count[i], index.images[i].num_repeats) << i;
  }
}

TEST(Sampler, OrderDependsOnSeedAndEpochOnlySoAResumeContinuesIt) {
  DatasetIndex index = synthetic_index();
  BatchPlanner a({&index}, {2}, 5), b({&index}, {2}, 5), other_seed({&index}, {2}, 6);
  auto e1 = a.epoch(1);
  auto again = b.epoch(1);
  for (size_t i = 0; i < e1.size(); ++i) EXPECT_EQ(e1[i].samples, again[i].samples);
  auto e2 = a.epoch(2);
  bool differs = false, differs_seed = false;
  auto s1 = other_seed.epoch(1);
  for (size_t i = 0; i < e1.size(); ++i) {
    differs = differs || e1[i].samples != e2[i].samples;
    differs_seed = differs_seed || e1[i].samples != s1[i].samples;
  }
  EXPECT_TRUE(differs);
  EXPECT_TRUE(differs_seed);
}

TEST(Sampler, ShortBatchIsSplitAsEvenlyAsPossible) {
  GlobalBatch b;
  for (uint32_t i = 0; i < 5; ++i) b.samples.push_back({0, i});
  EXPECT_EQ(rank_share(b, 0, 3).size(), 1u);
  EXPECT_EQ(rank_share(b, 1, 3).size(), 2u);
  EXPECT_EQ(rank_share(b, 2, 3).size(), 2u);
}

}  // namespace
}  // namespace sdt

namespace sdt {
namespace {

// One update of 6 samples is the same 6 samples, in the same places, whether one process takes them at once,
// 3 ranks take 2 each, or one process accumulates 3 micro-batches of 2: the concatenated micro-batches of each update
// equal the unaccumulated plan's batch, and each micro-batch says which micro-step of how many it is and where it sits.
TEST(Sampler, AccumulatedMicroBatchesConcatenateToTheUpdatesBatch) {
  DatasetIndex index = synthetic_index();  // buckets of 14, 4 and 3 samples
  const std::vector<GlobalBatch> whole = BatchPlanner({&index}, {6}, 42).epoch(1);
  BatchPlanner accumulating({&index}, {2}, 42, 3);
  const std::vector<GlobalBatch> micro = accumulating.epoch(1);
  EXPECT_EQ(accumulating.updates_per_epoch(), static_cast<int64_t>(whole.size()));
  EXPECT_EQ(accumulating.steps_per_epoch(), static_cast<int64_t>(micro.size()));
  size_t m = 0;
  for (size_t u = 0; u < whole.size(); ++u) {
    std::vector<SampleRef> joined;
    const int64_t micros = micro.at(m).micros;
    EXPECT_EQ(micros, (static_cast<int64_t>(whole[u].samples.size()) + 1) / 2);
    for (int64_t k = 0; k < micros; ++k, ++m) {
      EXPECT_EQ(micro.at(m).update, static_cast<int64_t>(u));
      EXPECT_EQ(micro.at(m).micro, k);
      EXPECT_EQ(micro.at(m).offset, 2 * k);
      EXPECT_EQ(micro.at(m).bucket, whole[u].bucket);
      joined.insert(joined.end(), micro.at(m).samples.begin(), micro.at(m).samples.end());
    }
    EXPECT_EQ(joined, whole[u].samples) << "update " << u;
  }
  EXPECT_EQ(m, micro.size());
}

}  // namespace
}  // namespace sdt
