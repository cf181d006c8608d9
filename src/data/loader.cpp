#include "src/data/loader.h"

#include <algorithm>

namespace sdt {
namespace {

// (H, W, C) uint8 -> (C, H, W) float in [-1, 1], written into `out` (kohya: ToTensor + Normalize(0.5, 0.5)).
void to_chw(const Image& image, at::Tensor out) {
  float* dst = out.data_ptr<float>();
  const size_t plane = static_cast<size_t>(image.width) * image.height;
  for (size_t i = 0; i < plane; ++i) {
    for (int c = 0; c < 3; ++c) dst[c * plane + i] = image.data[i * image.channels + c] / 127.5f - 1.0f;
  }
}

}  // namespace

TrainBatch load_rank_batch(const std::vector<LoaderDataset>& datasets, const GlobalBatch& global, int64_t epoch, int64_t step,
                           int64_t global_step, const LoaderOptions& options) {
  const LoaderDataset& ds = datasets.at(global.dataset);
  // Where this rank's share starts in the global batch: samples are keyed by their global place.
  const size_t begin = global.samples.size() * static_cast<size_t>(options.rank) / static_cast<size_t>(options.world_size);
  std::vector<SampleRef> share = rank_share(global, options.rank, options.world_size);

  TrainBatch b;
  b.epoch = epoch;
  b.step = step;
  b.dataset = global.dataset;
  b.bucket = global.bucket;
  b.global_batch_size = static_cast<int64_t>(global.samples.size());
  b.update = global.update;
  b.micro = global.micro;
  b.micros = global.micros;
  b.update_offset = global.offset + static_cast<int64_t>(begin);
  const auto n = static_cast<int64_t>(share.size());
  const auto options_f = at::TensorOptions().dtype(at::kFloat).pinned_memory(options.pin_memory);
  if (options.load_pixels) b.images = at::empty({n, 3, global.bucket.height, global.bucket.width}, options_f);
  b.loss_weights = at::empty({n}, options_f);
  bool any_mask = false;
  for (const auto& s : ds.config->subsets) any_mask = any_mask || s.alpha_mask;
  if (any_mask && options.load_pixels) b.alpha_masks = at::ones({n, global.bucket.height, global.bucket.width}, options_f);
  if (ds.config->kind == DatasetKind::ControlNet && options.load_pixels) b.conditioning_images = at::empty_like(b.images);

  const CaptionContext caption_context{epoch, global_step, options.max_train_steps};
  for (int64_t i = 0; i < n; ++i) {
    const ImageEntry& entry = ds.index->images.at(share[static_cast<size_t>(i)].image);
    // Keyed by the sample's place in its optimizer update, so that how the update is split among
    // ranks and micro-steps changes nothing.
    const SampleKey key{options.seed, epoch, global.update, static_cast<uint32_t>(b.update_offset + i)};
    if (!options.load_pixels) {
      ProcessedSample s = describe_sample(*ds.config, entry, key, caption_context);
      b.loss_weights[i] = s.loss_weight;
      b.captions.push_back(std::move(s.caption));
      b.image_paths.push_back(entry.path);
      b.original_sizes.push_back(s.original_size);
      b.crop_ltrbs.push_back(s.crop_ltrb);
      b.flipped.push_back(s.flipped);
      continue;
    }
    ProcessedSample s = load_sample(*ds.config, entry, key, caption_context);
    to_chw(s.image, b.images[i]);
    if (!s.alpha_mask.empty()) std::memcpy(b.alpha_masks[i].data_ptr<float>(), s.alpha_mask.data(), s.alpha_mask.size() * sizeof(float));
    if (s.conditioning) to_chw(*s.conditioning, b.conditioning_images[i]);
    b.loss_weights[i] = s.loss_weight;
    b.captions.push_back(std::move(s.caption));
    b.image_paths.push_back(entry.path);
    b.original_sizes.push_back(s.original_size);
    b.crop_ltrbs.push_back(s.crop_ltrb);
    b.flipped.push_back(s.flipped);
  }
  return b;
}

DataLoader::DataLoader(std::vector<LoaderDataset> datasets, const BatchPlanner& planner, LoaderOptions options)
    : datasets_(std::move(datasets)), planner_(planner), options_(options) {
  const int cpus = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  const int workers = std::clamp(options_.workers, 1, cpus);
  options_.queue_depth = std::max(1, options_.queue_depth);
  for (int w = 0; w < workers; ++w) workers_.emplace_back([this] { work(); });
}

DataLoader::~DataLoader() {
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
  }
  changed_.notify_all();
  for (auto& t : workers_) t.join();
}

void DataLoader::start_epoch(int64_t epoch, int64_t first_step, int64_t global_step_at_start) {
  std::vector<GlobalBatch> plan = planner_.epoch(epoch);
  {
    std::lock_guard lock(mutex_);
    plan_ = std::move(plan);
    epoch_ = epoch;
    global_step_offset_ = global_step_at_start - first_step;
    ++generation_;
    next_to_load_ = next_to_return_ = static_cast<size_t>(std::clamp<int64_t>(first_step, 0, static_cast<int64_t>(plan_.size())));
    ready_.clear();
  }
  changed_.notify_all();
}

std::optional<TrainBatch> DataLoader::next() {
  std::unique_lock lock(mutex_);
  if (next_to_return_ >= plan_.size()) return std::nullopt;
  changed_.wait(lock, [&] { return ready_.count(next_to_return_) > 0; });
  auto node = ready_.extract(next_to_return_);
  ++next_to_return_;
  lock.unlock();
  changed_.notify_all();
  if (node.mapped().second) std::rethrow_exception(node.mapped().second);
  return std::move(node.mapped().first);
}

void DataLoader::work() {
  while (true) {
    std::unique_lock lock(mutex_);
    changed_.wait(lock, [&] {
      return stopping_ || (next_to_load_ < plan_.size() && next_to_load_ < next_to_return_ + static_cast<size_t>(options_.queue_depth));
    });
    if (stopping_) return;
    const size_t step = next_to_load_++;
    const uint64_t generation = generation_;
    const GlobalBatch global = plan_[step];
    const int64_t epoch = epoch_;
    const int64_t global_step = global_step_offset_ + static_cast<int64_t>(step);
    lock.unlock();

    std::optional<TrainBatch> batch;
    std::exception_ptr error;
    try {
      batch = load_rank_batch(datasets_, global, epoch, static_cast<int64_t>(step), global_step, options_);
    } catch (...) {
      error = std::current_exception();
    }
    lock.lock();
    if (generation == generation_) ready_[step] = {std::move(batch), error};
    lock.unlock();
    changed_.notify_all();
  }
}

}  // namespace sdt
