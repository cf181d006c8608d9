// Which samples make up each global batch of an epoch, and which share of it each rank loads.
//
// A global batch holds batch_size x world_size samples of one bucket of one dataset. With gradient
// accumulation over A micro-steps, one optimizer update takes A consecutive global batches cut from
// one planned batch of batch_size x world_size x A samples of one bucket. The plan of an epoch
// depends only on (seed, epoch, samples per update): one process with the whole batch, N ranks
// holding one share each, and one process accumulating N micro-batches all see exactly the same
// samples per update, in the same order, and a resumed run at (epoch, step) continues the same order.
//
// (kohya cuts batch_size x world_size batches and lets an update span A of them, possibly from
// different buckets; the number of updates per epoch differs from kohya's only when a bucket's
// sample count is not a multiple of the update's.)
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "src/data/buckets.h"
#include "src/data/dataset_index.h"

namespace sdt {

struct SampleRef {
  uint32_t dataset = 0;
  uint32_t image = 0;  // into that dataset's DatasetIndex::images
  bool operator==(const SampleRef&) const = default;
};

struct GlobalBatch {
  uint32_t dataset = 0;
  Resolution bucket;
  std::vector<SampleRef> samples;  // the last batch of a bucket may be short
  int64_t update = 0;              // the optimizer update of the epoch it belongs to (0-based)
  int64_t micro = 0;               // which micro-step of its update this batch is ...
  int64_t micros = 1;              // ... of how many (fewer than the accumulation steps when the update is short)
  int64_t offset = 0;              // position of samples[0] among the update's samples
};

class BatchPlanner {
 public:
  // `global_batch_sizes[d]` = batch_size of dataset d x world size; `accumulation` micro-steps per update.
  BatchPlanner(std::vector<const DatasetIndex*> datasets, std::vector<int64_t> global_batch_sizes, uint64_t seed,
               int64_t accumulation = 1);
  // The datasets of a blueprint (indexes[d] of blueprint.datasets[d]) on `world_size` ranks.
  BatchPlanner(const std::vector<DatasetIndex>& indexes, const DatasetBlueprint& blueprint, int world_size, uint64_t seed,
               int64_t accumulation = 1);

  // Every global batch of `epoch` (1-based) in training order: each bucket's samples (every image
  // num_repeats times) shuffled, cut into update batches, all update batches of all datasets
  // shuffled, and each cut into its micro-steps' global batches.
  std::vector<GlobalBatch> epoch(int64_t epoch) const;
  int64_t steps_per_epoch() const { return steps_per_epoch_; }      // global (micro-)batches
  int64_t updates_per_epoch() const { return updates_per_epoch_; }  // optimizer updates

  // Buckets of dataset d with their sample counts (repeats included), in resolution order.
  std::vector<std::pair<Resolution, int64_t>> bucket_counts(uint32_t dataset) const;
  // Buckets too small for one global batch (their only batch is short); also logged.
  const std::vector<std::string>& warnings() const { return warnings_; }

 private:
  struct Bucket {
    uint32_t dataset;
    Resolution reso;
    std::vector<SampleRef> samples;
  };
  std::vector<Bucket> buckets_;
  std::vector<int64_t> global_batch_sizes_;
  uint64_t seed_;
  int64_t accumulation_ = 1;
  int64_t steps_per_epoch_ = 0;
  int64_t updates_per_epoch_ = 0;
  std::vector<std::string> warnings_;
};

// The samples of `batch` that `rank` of `world_size` loads: a contiguous, balanced slice (sizes
// differ by at most one; a full batch gives each rank exactly batch_size).
std::vector<SampleRef> rank_share(const GlobalBatch& batch, int rank, int world_size);

}  // namespace sdt
