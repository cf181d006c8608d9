#include "src/data/sampler.h"

#include <map>

#include <spdlog/spdlog.h>

#include "src/core/error.h"
#include "src/data/rng.h"

namespace sdt {

BatchPlanner::BatchPlanner(std::vector<const DatasetIndex*> datasets, std::vector<int64_t> global_batch_sizes, uint64_t seed,
                           int64_t accumulation)
    : global_batch_sizes_(std::move(global_batch_sizes)), seed_(seed), accumulation_(accumulation) {
  if (datasets.size() != global_batch_sizes_.size()) fail("sampler", "one global batch size per dataset is needed");
  if (accumulation < 1) fail("--gradient_accumulation_steps", "must be at least 1, got {}", accumulation);
  for (uint32_t d = 0; d < datasets.size(); ++d) {
    if (global_batch_sizes_[d] < 1) fail("sampler", "batch size must be at least 1");
    std::map<Resolution, std::vector<SampleRef>> by_reso;
    const auto& images = datasets[d]->images;
    for (uint32_t i = 0; i < images.size(); ++i) {
      auto& list = by_reso[images[i].bucket.bucket];
      for (int64_t r = 0; r < images[i].num_repeats; ++r) list.push_back({d, i});
    }
    for (auto& [reso, samples] : by_reso) {
      if (static_cast<int64_t>(samples.size()) < global_batch_sizes_[d]) {
        warnings_.push_back(fmt::format("dataset {}: bucket {}x{} holds {} samples, fewer than the global batch of {}; its only batch is short",
                                        d + 1, reso.width, reso.height, samples.size(), global_batch_sizes_[d]));
        spdlog::warn("{}", warnings_.back());
      }
      const int64_t n = static_cast<int64_t>(samples.size());
      const int64_t micro = global_batch_sizes_[d];
      const int64_t update = micro * accumulation_;
      updates_per_epoch_ += (n + update - 1) / update;
      steps_per_epoch_ += (n / update) * accumulation_ + (n % update + micro - 1) / micro;
      buckets_.push_back({d, reso, std::move(samples)});
    }
  }
}

namespace {

std::vector<const DatasetIndex*> pointers(const std::vector<DatasetIndex>& indexes) {
  std::vector<const DatasetIndex*> out;
  for (const auto& index : indexes) out.push_back(&index);
  return out;
}

std::vector<int64_t> global_sizes(const DatasetBlueprint& blueprint, int world_size) {
  std::vector<int64_t> out;
  for (const auto& d : blueprint.datasets) out.push_back(d.batch_size * world_size);
  return out;
}

}  // namespace

BatchPlanner::BatchPlanner(const std::vector<DatasetIndex>& indexes, const DatasetBlueprint& blueprint, int world_size, uint64_t seed,
                           int64_t accumulation)
    : BatchPlanner(pointers(indexes), global_sizes(blueprint, world_size), seed, accumulation) {}

std::vector<GlobalBatch> BatchPlanner::epoch(int64_t epoch) const {
  std::vector<GlobalBatch> batches;
  for (size_t b = 0; b < buckets_.size(); ++b) {
    std::vector<SampleRef> samples = buckets_[b].samples;
    Rng rng(seed_, static_cast<uint64_t>(epoch), b, RngPurpose::Shuffle);
    rng.shuffle(samples);
    const auto size = static_cast<size_t>(global_batch_sizes_[buckets_[b].dataset] * accumulation_);
    for (size_t start = 0; start < samples.size(); start += size) {
      GlobalBatch batch{buckets_[b].dataset, buckets_[b].reso, {}};
      batch.samples.assign(samples.begin() + static_cast<std::ptrdiff_t>(start),
                           samples.begin() + static_cast<std::ptrdiff_t>(std::min(samples.size(), start + size)));
      batches.push_back(std::move(batch));
    }
  }
  Rng order(seed_, static_cast<uint64_t>(epoch), UINT64_MAX, RngPurpose::Shuffle);
  order.shuffle(batches);
  for (size_t u = 0; u < batches.size(); ++u) batches[u].update = static_cast<int64_t>(u);
  if (accumulation_ == 1) return batches;
  std::vector<GlobalBatch> micro_batches;
  for (const GlobalBatch& update : batches) {
    const auto micro = static_cast<size_t>(global_batch_sizes_[update.dataset]);
    const auto micros = static_cast<int64_t>((update.samples.size() + micro - 1) / micro);
    for (int64_t k = 0; k < micros; ++k) {
      const size_t begin = static_cast<size_t>(k) * micro;
      GlobalBatch batch{update.dataset, update.bucket, {}, update.update, k, micros, static_cast<int64_t>(begin)};
      batch.samples.assign(update.samples.begin() + static_cast<std::ptrdiff_t>(begin),
                           update.samples.begin() + static_cast<std::ptrdiff_t>(std::min(update.samples.size(), begin + micro)));
      micro_batches.push_back(std::move(batch));
    }
  }
  return micro_batches;
}

std::vector<std::pair<Resolution, int64_t>> BatchPlanner::bucket_counts(uint32_t dataset) const {
  std::vector<std::pair<Resolution, int64_t>> out;
  for (const auto& b : buckets_) {
    if (b.dataset == dataset) out.emplace_back(b.reso, static_cast<int64_t>(b.samples.size()));
  }
  return out;
}

std::vector<SampleRef> rank_share(const GlobalBatch& batch, int rank, int world_size) {
  const size_t n = batch.samples.size();
  const size_t begin = n * static_cast<size_t>(rank) / static_cast<size_t>(world_size);
  const size_t end = n * static_cast<size_t>(rank + 1) / static_cast<size_t>(world_size);
  return {batch.samples.begin() + static_cast<std::ptrdiff_t>(begin), batch.samples.begin() + static_cast<std::ptrdiff_t>(end)};
}

}  // namespace sdt
