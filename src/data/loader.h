// The training data loader of one rank: worker threads load this rank's share of each global batch
// ahead of training into a bounded queue (memory bounded by the queue depth, not the dataset),
// and hand out batches in order as tensors: images (B, 3, H, W) float in [-1, 1].
#pragma once

#include <condition_variable>
#include <cstdint>
#include <exception>
#include <map>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include <ATen/ATen.h>

#include "src/data/sample.h"
#include "src/data/sampler.h"

namespace sdt {

struct LoaderDataset {
  const DatasetConfig* config;
  const DatasetIndex* index;
};

struct TrainBatch {
  int64_t epoch = 0;
  int64_t step = 0;               // within the epoch
  uint32_t dataset = 0;
  Resolution bucket;
  int64_t global_batch_size = 0;  // samples of the global batch (all ranks)
  int64_t update = 0;             // the optimizer update of the epoch (GlobalBatch::update) ...
  int64_t micro = 0;              // ... its micro-step, of `micros`
  int64_t micros = 1;
  int64_t update_offset = 0;      // position of this rank's first sample among the update's samples
  at::Tensor images;              // (B, 3, H, W) float32 in [-1, 1]; undefined without LoaderOptions::load_pixels
  at::Tensor alpha_masks;         // (B, H, W) float32, ones where a sample has no mask; undefined if no subset uses masks
  at::Tensor conditioning_images; // (B, 3, H, W) for ControlNet datasets, else undefined
  at::Tensor loss_weights;        // (B)
  std::vector<std::string> captions;
  std::vector<std::string> image_paths;
  std::vector<Resolution> original_sizes;
  std::vector<CropLtrb> crop_ltrbs;
  std::vector<bool> flipped;
};

struct LoaderOptions {
  uint64_t seed = 0;
  int rank = 0;
  int world_size = 1;
  int workers = 1;            // max_data_loader_n_workers, capped at the CPU count
  int queue_depth = 4;        // batches loaded ahead
  int64_t max_train_steps = 0;  // for token warm-up ratios
  bool pin_memory = false;    // when training on CUDA
  bool load_pixels = true;    // false: latents come from a cache; batches carry no images (describe_sample)
};

// The batch of `rank` for step `step` of `epoch`: a pure function, used by the workers and by tests.
TrainBatch load_rank_batch(const std::vector<LoaderDataset>& datasets, const GlobalBatch& batch, int64_t epoch, int64_t step,
                           int64_t global_step, const LoaderOptions& options);

class DataLoader {
 public:
  DataLoader(std::vector<LoaderDataset> datasets, const BatchPlanner& planner, LoaderOptions options);
  ~DataLoader();
  DataLoader(const DataLoader&) = delete;
  DataLoader& operator=(const DataLoader&) = delete;

  // Starts (or resumes, at `first_step`) an epoch; `global_step_at_start` counts optimizer steps
  // before it, for token warm-up. Workers persist across epochs.
  void start_epoch(int64_t epoch, int64_t first_step = 0, int64_t global_step_at_start = 0);
  // The next batch in order, or nullopt at the end of the epoch. Rethrows a worker's error.
  std::optional<TrainBatch> next();

 private:
  void work();

  std::vector<LoaderDataset> datasets_;
  const BatchPlanner& planner_;
  LoaderOptions options_;

  std::mutex mutex_;
  std::condition_variable changed_;
  std::vector<GlobalBatch> plan_;
  int64_t epoch_ = 0;
  int64_t global_step_offset_ = 0;  // global step of plan_ index 0
  uint64_t generation_ = 0;         // bumped per epoch; results of an older one are dropped
  size_t next_to_load_ = 0;
  size_t next_to_return_ = 0;
  std::map<size_t, std::pair<std::optional<TrainBatch>, std::exception_ptr>> ready_;
  bool stopping_ = false;
  std::vector<std::thread> workers_;
};

}  // namespace sdt
