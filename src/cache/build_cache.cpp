#include "src/cache/build_cache.h"

#include <openssl/evp.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <filesystem>
#include <future>
#include <map>
#include <set>
#include <thread>

#include <spdlog/spdlog.h>
#include <torch/torch.h>

#include "src/cache/latent_cache.h"
#include "src/cache/text_encoder_cache.h"
#include "src/core/device.h"
#include "src/core/error.h"
#include "src/data/captions.h"
#include "src/data/sample.h"
#include "src/families/family.h"

namespace sdt {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

// The parts of `dir` made with another identity: deleted when rebuilding (every rank deletes every
// one it sees: deleting is idempotent, so ranks need not agree on who deletes what); otherwise left
// for the reader to refuse with its message.
void delete_mismatched_parts(const std::string& dir, const CacheIdentity& identity) {
  for (const std::string& path : committed_parts(dir, identity.kind)) {
    std::optional<std::string> mismatch;
    try {
      mismatch = identity_mismatch(h5::open_file_read_only(path).get(), identity);
    } catch (const Error&) {
      if (!fs::exists(path)) continue;  // another rank deleted it first
      throw;
    }
    if (!mismatch) continue;
    spdlog::warn("{}: made differently ({}); deleting it to rebuild", path, *mismatch);
    std::error_code ec;
    fs::remove(path, ec);
  }
}

PartWriterOptions writer_options(const CacheOptions& options, const World& world, std::map<std::string, std::string> info) {
  return {options.cache_dir, world.rank, world.size, options.gzip_level, options.commit_every_entries, options.commit_every_seconds,
          std::move(info)};
}

void require_cache_dir(const CacheOptions& options) {
  if (options.cache_dir.empty()) {
    fail("--cache_dir", "required without --dataset_config and --train_data_dir: the folder of the cache files");
  }
}

// ---------------------------------------------------------------- latents: the items

// One image at one bucket: the unit of encoding. Its entries are the unflipped variant and, for
// flip_aug, the flipped one.
struct LatentItem {
  size_t dataset = 0;
  const ImageEntry* entry = nullptr;
  LatentKey key;  // unflipped
  bool flip_aug = false;
  bool alpha_mask = false;
};

std::vector<LatentItem> latent_items(const DatasetBlueprint& blueprint, const std::vector<DatasetIndex>& indexes) {
  std::vector<LatentItem> items;
  std::map<std::string, size_t> by_key;
  for (size_t d = 0; d < indexes.size(); ++d) {
    for (const auto& entry : indexes[d].images) {
      const SubsetConfig& subset = blueprint.datasets.at(d).subsets.at(entry.subset);
      const std::string where = subset.image_dir.value_or(entry.path);
      if (subset.color_aug) fail(where, "color_aug changes the pixels every epoch: latents cannot be cached (kohya refuses it too)");
      if (subset.random_crop) fail(where, "random_crop changes the pixels every epoch: latents cannot be cached (kohya refuses it too)");
      LatentItem item{d, &entry, latent_key(subset, entry, false), subset.flip_aug, subset.alpha_mask};
      const auto [it, inserted] = by_key.emplace(item.key.describe(), items.size());
      if (inserted) {
        items.push_back(std::move(item));
        continue;
      }
      // The same image in another subset or dataset, prepared the same way: one entry serves both.
      LatentItem& first = items[it->second];
      if (fs::absolute(first.entry->path).lexically_normal() != fs::absolute(entry.path).lexically_normal()) {
        fail(entry.path, "has the cache key {} of another image, {}: two subset folders of the same name hold the same file name; "
                         "rename one folder", item.key.image, first.entry->path);
      }
      if (first.alpha_mask != item.alpha_mask) {
        fail(entry.path, "is in a subset with alpha_mask and in one without: its cached entry cannot serve both");
      }
      first.flip_aug = first.flip_aug || item.flip_aug;
    }
  }
  // By bucket (area first, as kohya batches), then by name: the same order on every rank.
  std::sort(items.begin(), items.end(), [](const LatentItem& a, const LatentItem& b) {
    const auto order = [](const LatentItem& i) {
      return std::make_tuple(i.key.bucket.width * i.key.bucket.height, i.key.bucket.width, i.key.image, i.key.resized_size.width,
                             i.key.resized_size.height);
    };
    return order(a) < order(b);
  });
  return items;
}

// Which variants of an item still need an entry: [unflipped, flipped].
std::array<bool, 2> missing_variants(const LatentItem& item, const LatentCacheReader& cache, const LatentsCachingStrategy& strategy,
                                     bool skip_cache_check) {
  std::array<bool, 2> missing{false, false};
  const LatentsCacheLayout layout = strategy.cache_layout(item.key.bucket.width, item.key.bucket.height, false);
  for (int flipped = 0; flipped < (item.flip_aug ? 2 : 1); ++flipped) {
    LatentKey key = item.key;
    key.flipped = flipped == 1;
    const std::optional<LatentEntryInfo> info = cache.info(key);
    if (!info) {
      missing[flipped] = true;
    } else if (!skip_cache_check) {
      const Resolution original{item.entry->width, item.entry->height};
      missing[flipped] = info->shape != layout.shape || info->original_size != original || info->has_alpha_mask != item.alpha_mask;
    }
  }
  return missing;
}

std::string bucket_settings(const DatasetBlueprint& blueprint) {
  std::string settings;
  for (const auto& d : blueprint.datasets) {
    if (!settings.empty()) settings += "; ";
    settings += fmt::format("resolution={}x{} enable_bucket={} min_bucket_reso={} max_bucket_reso={} bucket_reso_steps={} "
                            "bucket_no_upscale={}",
                            d.width, d.height, d.enable_bucket, d.min_bucket_reso, d.max_bucket_reso, d.bucket_reso_steps,
                            d.bucket_no_upscale);
  }
  return settings;
}

// The pixels of a batch of items, as load_sample prepares them without flip or colour augmentation.
struct PreparedBatch {
  at::Tensor images;                    // (B, 3, H, W) in [-1, 1]
  std::vector<ProcessedSample> samples;  // original size, crop, alpha mask (image data dropped)
};

PreparedBatch prepare_batch(const std::vector<const LatentItem*>& batch, const std::vector<DatasetConfig>& unaugmented) {
  PreparedBatch out;
  const Resolution bucket = batch.front()->key.bucket;
  out.images = at::empty({static_cast<int64_t>(batch.size()), 3, bucket.height, bucket.width}, at::kFloat);
  for (size_t b = 0; b < batch.size(); ++b) {
    ProcessedSample s = load_sample(unaugmented.at(batch[b]->dataset), *batch[b]->entry, SampleKey{}, CaptionContext{});
    if (s.image.width != bucket.width || s.image.height != bucket.height) {
      fail(batch[b]->entry->path, "prepared at {}x{} for bucket {}x{}", s.image.width, s.image.height, bucket.width, bucket.height);
    }
    float* dst = out.images[static_cast<int64_t>(b)].data_ptr<float>();
    const size_t plane = static_cast<size_t>(s.image.width) * s.image.height;
    for (size_t i = 0; i < plane; ++i) {
      for (int c = 0; c < 3; ++c) dst[c * plane + i] = s.image.data[i * s.image.channels + c] / 127.5f - 1.0f;
    }
    s.image = {};
    out.samples.push_back(std::move(s));
  }
  return out;
}

struct LatentPlan {
  CacheIdentity identity;
  std::vector<LatentItem> items;
  std::vector<std::array<bool, 2>> missing;  // per item
  int64_t entries = 0;                        // entries the datasets need
  int64_t valid = 0;                          // of those, valid in the cache
};

// What the cache holds of the items the datasets need. `identity` hashes the weights, which takes
// a while for a real model: computed once by the caller.
LatentPlan plan_latents(const Family& family, const CacheIdentity& identity, const TrainArgs& args, const CacheOptions& options,
                        const DatasetBlueprint& blueprint, const std::vector<DatasetIndex>& indexes) {
  require_cache_dir(options);
  LatentPlan plan{identity, latent_items(blueprint, indexes), {}, 0, 0};
  if (options.rebuild) delete_mismatched_parts(options.cache_dir, plan.identity);
  const LatentCacheReader cache(options.cache_dir, plan.identity);
  const LatentsCachingStrategy& strategy = family.latents_caching_strategy();
  for (const auto& item : plan.items) {
    plan.missing.push_back(missing_variants(item, cache, strategy, args.skip_cache_check));
    const int64_t variants = item.flip_aug ? 2 : 1;
    plan.entries += variants;
    plan.valid += variants - plan.missing.back()[0] - plan.missing.back()[1];
  }
  return plan;
}

// ---------------------------------------------------------------- text-encoder outputs: the captions

std::vector<std::string> caption_variants(const DatasetBlueprint& blueprint, const std::vector<DatasetIndex>& indexes) {
  std::set<std::string> captions;
  for (size_t d = 0; d < indexes.size(); ++d) {
    for (const auto& entry : indexes[d].images) {
      const SubsetConfig& subset = blueprint.datasets.at(d).subsets.at(entry.subset);
      const std::string where = subset.image_dir.value_or(entry.path);
      if (subset.shuffle_caption || subset.caption_dropout_rate > 0 || subset.caption_dropout_every_n_epochs > 0 ||
          subset.caption_tag_dropout_rate > 0 || subset.enable_wildcard || subset.token_warmup_step > 0) {
        fail(where, "its captions change between epochs (shuffle_caption, caption dropout, wildcards or token warm-up): "
                    "text-encoder outputs cannot be cached (kohya refuses it too)");
      }
      Rng unused(0, 0, 0, RngPurpose::Caption);  // nothing random is left once those are refused
      captions.insert(process_caption(subset, entry.caption, CaptionContext{}, unused));
    }
  }
  return {captions.begin(), captions.end()};
}

struct CaptionPlan {
  CacheIdentity identity;
  std::vector<std::string> captions;
  std::vector<bool> missing;
  int64_t valid = 0;
};

CaptionPlan plan_captions(const CacheIdentity& identity, const CacheOptions& options, const DatasetBlueprint& blueprint,
                          const std::vector<DatasetIndex>& indexes) {
  require_cache_dir(options);
  CaptionPlan plan{identity, caption_variants(blueprint, indexes), {}, 0};
  if (options.rebuild) delete_mismatched_parts(options.cache_dir, plan.identity);
  const TextEncoderCacheReader cache(options.cache_dir, plan.identity);
  // Every entry of a part has the same output shapes, fixed by the identity's settings, so a present
  // entry is a valid one: --skip_cache_check changes nothing here.
  for (const auto& caption : plan.captions) {
    plan.missing.push_back(!cache.contains(caption));
    plan.valid += !plan.missing.back();
  }
  return plan;
}

template <typename CountMissing>
void wait_until_complete(const std::string& what, double timeout_seconds, double poll_seconds, CountMissing count_missing) {
  const Clock::time_point start = Clock::now();
  for (;;) {
    const auto [missing, example] = count_missing();
    if (missing == 0) return;
    if (seconds_since(start) >= timeout_seconds) {
      fail(what, "{} entries still missing after {:.0f} s, e.g. {}: did a rank stop before finishing its share?", missing,
           timeout_seconds, example);
    }
    std::this_thread::sleep_for(std::chrono::duration<double>(poll_seconds));
  }
}

std::string format_duration(double seconds) {
  const auto s = static_cast<int64_t>(seconds);
  return s >= 3600 ? fmt::format("{}:{:02d}:{:02d}", s / 3600, s / 60 % 60, s % 60) : fmt::format("{:02d}:{:02d}", s / 60, s % 60);
}

}  // namespace

// ---------------------------------------------------------------- identities

std::string weights_sha256(const std::vector<const torch::nn::Module*>& modules) {
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  for (size_t m = 0; m < modules.size(); ++m) {
    // A network's tensors on a layer (its child `lora`) are not the model's: a partial cache stays valid across runs.
    const auto own = [](const std::string& key) { return key.find(".lora.") == std::string::npos; };
    for (const auto& p : modules[m]->named_parameters(true)) {
      if (own(p.key())) tensors.emplace_back(fmt::format("{}.{}", m, p.key()), p.value());
    }
    for (const auto& b : modules[m]->named_buffers(true)) {
      if (own(b.key())) tensors.emplace_back(fmt::format("{}.{}", m, b.key()), b.value());
    }
  }
  std::sort(tensors.begin(), tensors.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  EVP_MD_CTX* context = EVP_MD_CTX_new();
  EVP_DigestInit_ex(context, EVP_sha256(), nullptr);
  for (const auto& [name, tensor] : tensors) {
    const at::Tensor bytes = tensor.detach().to(at::kCPU).contiguous();
    const std::string header = fmt::format("{}|{}|{}|", name, c10::toString(bytes.scalar_type()), fmt::join(bytes.sizes(), "x"));
    EVP_DigestUpdate(context, header.data(), header.size());
    EVP_DigestUpdate(context, bytes.data_ptr(), static_cast<size_t>(bytes.numel()) * bytes.element_size());
  }
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int size = 0;
  EVP_DigestFinal_ex(context, digest, &size);
  EVP_MD_CTX_free(context);
  std::string hex;
  for (unsigned int i = 0; i < size; ++i) hex += fmt::format("{:02x}", digest[i]);
  return hex;
}

CacheIdentity latent_cache_identity(const Family& family, const CacheOptions& options) {
  return {CacheKind::latents, family.name(), weights_sha256({family.models().vae.get()}), options.dtype, "latent_sampling=mean"};
}

CacheIdentity text_encoder_cache_identity(const Family& family, const TrainArgs& args,
                                          const CacheOptions& options) {
  std::vector<const torch::nn::Module*> encoders;
  for (const auto& e : family.models().text_encoders) encoders.push_back(e.get());
  const std::string settings = fmt::format("{} weighted_captions={}", family.text_encoder_settings(), args.weighted_captions);
  return {CacheKind::text_encoder_outputs, family.name(), weights_sha256(encoders), options.dtype, settings};
}

std::string default_cache_dir(const TrainArgs& args) {
  if (args.dataset_config) return (fs::absolute(*args.dataset_config).parent_path() / "sdt_cache").string();
  if (args.train_data_dir) return (fs::path(*args.train_data_dir) / "sdt_cache").string();
  return "";
}

// ---------------------------------------------------------------- latents

CacheBuildSummary build_latent_cache(const Family& family, const TrainArgs& args,
                                     const CacheOptions& options, const DatasetBlueprint& blueprint,
                                     const std::vector<DatasetIndex>& indexes, const World& world) {
  const Clock::time_point start = Clock::now();
  torch::NoGradGuard no_grad;
  const LatentPlan plan =
      plan_latents(family, latent_cache_identity(family, options), args, options, blueprint, indexes);

  // This rank's items that need work, in batches of one bucket of up to vae_batch_size.
  std::vector<std::vector<const LatentItem*>> batches;
  CacheProgress progress;
  for (size_t i = 0; i < plan.items.size(); ++i) {
    if (!plan.missing[i][0] && !plan.missing[i][1]) continue;
    ++progress.to_do_all_ranks;
    if (static_cast<int>(i % static_cast<size_t>(world.size)) != world.rank) continue;
    ++progress.to_do;
    const LatentItem& item = plan.items[i];
    if (batches.empty() || batches.back().front()->key.bucket != item.key.bucket ||
        static_cast<int64_t>(batches.back().size()) >= std::max<int64_t>(1, args.vae_batch_size)) {
      batches.emplace_back();
    }
    batches.back().push_back(&item);
  }
  spdlog::info("latent cache {}: {} entries for {} images, {} valid; {} images to encode, {} of them on this rank", options.cache_dir,
               plan.entries, plan.items.size(), plan.valid, progress.to_do_all_ranks, progress.to_do);

  // load_sample without the random flip (both variants are encoded when needed) and colour (refused).
  std::vector<DatasetConfig> unaugmented = blueprint.datasets;
  for (auto& d : unaugmented) {
    for (auto& s : d.subsets) s.flip_aug = false;
  }
  std::map<const LatentItem*, std::array<bool, 2>> missing;
  for (size_t i = 0; i < plan.items.size(); ++i) missing[&plan.items[i]] = plan.missing[i];

  LatentCacheWriter writer(plan.identity, writer_options(options, world, {{"bucket_settings", bucket_settings(blueprint)}}));
  const LatentsCachingStrategy& strategy = family.latents_caching_strategy();
  const at::Device device = family.models().vae->parameters().at(0).device();
  // Decode and resize the next batch on a second thread while this one is encoded.
  std::future<PreparedBatch> next;
  if (!batches.empty()) next = std::async(std::launch::async, prepare_batch, batches[0], std::cref(unaugmented));
  for (size_t b = 0; b < batches.size(); ++b) {
    PreparedBatch prepared = next.get();
    if (b + 1 < batches.size()) next = std::async(std::launch::async, prepare_batch, batches[b + 1], std::cref(unaugmented));
    const std::vector<const LatentItem*>& batch = batches[b];
    bool any_flipped = false;
    for (const LatentItem* item : batch) any_flipped = any_flipped || missing[item][1];
    const EncodedLatents encoded = strategy.encode(prepared.images.to(device), any_flipped, LatentSampling::mean);
    if (!at::isfinite(encoded.latents).all().item<bool>() || (any_flipped && !at::isfinite(encoded.flipped).all().item<bool>())) {
      fail(batch.front()->entry->path, "the VAE gave NaN or infinite latents for a batch of {} images starting here", batch.size());
    }
    std::vector<LatentKey> keys;
    std::vector<LatentEntry> entries;
    for (size_t i = 0; i < batch.size(); ++i) {
      const LatentItem& item = *batch[i];
      const ProcessedSample& s = prepared.samples[i];
      at::Tensor mask;
      if (!s.alpha_mask.empty()) {
        mask = at::from_blob(const_cast<float*>(s.alpha_mask.data()), {item.key.bucket.height, item.key.bucket.width}, at::kFloat).clone();
      }
      const auto row = static_cast<int64_t>(i);
      if (missing[&item][0]) {
        keys.push_back(item.key);
        entries.push_back({encoded.latents[row].cpu(), s.original_size, s.crop_ltrb, mask});
      }
      if (missing[&item][1]) {
        // What load_sample makes of a flipped sample: the mask mirrored, the crop measured from the other side.
        CropLtrb crop = s.crop_ltrb;
        crop.left = static_cast<double>(item.key.bucket.width) - s.crop_ltrb.right;
        crop.right = crop.left + (s.crop_ltrb.right - s.crop_ltrb.left);
        keys.push_back(item.key);
        keys.back().flipped = true;
        entries.push_back({encoded.flipped[row].cpu(), s.original_size, crop, mask.defined() ? mask.flip({1}) : mask});
      }
    }
    writer.add(keys, entries);
    progress.done += static_cast<int64_t>(batch.size());
    if (options.on_progress) options.on_progress(progress);
  }
  writer.commit();
  return {static_cast<int64_t>(plan.entries), plan.valid, progress.done, seconds_since(start)};
}

void wait_for_latent_cache(const Family& family, const TrainArgs& args, const CacheOptions& options,
                           const DatasetBlueprint& blueprint, const std::vector<DatasetIndex>& indexes, double timeout_seconds,
                           double poll_seconds) {
  CacheOptions reading = options;
  reading.rebuild = false;  // deleting is for the builders
  const CacheIdentity identity = latent_cache_identity(family, options);
  wait_until_complete(options.cache_dir, timeout_seconds, poll_seconds, [&] {
    const LatentPlan plan = plan_latents(family, identity, args, reading, blueprint, indexes);
    std::string example;
    for (size_t i = 0; i < plan.items.size() && example.empty(); ++i) {
      if (plan.missing[i][0] || plan.missing[i][1]) example = plan.items[i].key.describe();
    }
    return std::pair{plan.entries - plan.valid, example};
  });
}

// ---------------------------------------------------------------- text-encoder outputs

CacheBuildSummary build_text_encoder_cache(const Family& family, const TrainArgs& args,
                                           const CacheOptions& options, const DatasetBlueprint& blueprint,
                                           const std::vector<DatasetIndex>& indexes, const World& world) {
  const Clock::time_point start = Clock::now();
  torch::NoGradGuard no_grad;
  const CaptionPlan plan = plan_captions(text_encoder_cache_identity(family, args, options), options, blueprint, indexes);
  const int64_t batch_size = std::max<int64_t>(
      1, options.text_encoder_batch_size.value_or(blueprint.datasets.empty() ? 1 : blueprint.datasets.front().batch_size));

  std::vector<std::vector<std::string>> batches;
  CacheProgress progress;
  for (size_t i = 0; i < plan.captions.size(); ++i) {
    if (!plan.missing[i]) continue;
    ++progress.to_do_all_ranks;
    if (static_cast<int>(i % static_cast<size_t>(world.size)) != world.rank) continue;
    ++progress.to_do;
    if (batches.empty() || static_cast<int64_t>(batches.back().size()) >= batch_size) batches.emplace_back();
    batches.back().push_back(plan.captions[i]);
  }
  spdlog::info("text-encoder output cache {}: {} caption variants, {} cached; {} to encode, {} of them on this rank", options.cache_dir,
               plan.captions.size(), plan.valid, progress.to_do_all_ranks, progress.to_do);

  TextEncoderCacheWriter writer(plan.identity, writer_options(options, world, {}));
  const TextEncoderOutputsCachingStrategy& strategy = family.text_encoder_outputs_caching_strategy();
  for (const auto& batch : batches) {
    NamedTensors outputs = strategy.outputs_to_cache(batch, args.weighted_captions);
    for (const auto& [name, tensor] : outputs) {
      if (at::isFloatingType(tensor.scalar_type()) && !at::isfinite(tensor).all().item<bool>()) {
        fail("caption \"" + batch.front() + "\"", "the text encoder gave NaN or infinite '{}' for a batch of {} captions starting here",
             name, batch.size());
      }
    }
    writer.add(batch, outputs);
    progress.done += static_cast<int64_t>(batch.size());
    if (options.on_progress) options.on_progress(progress);
  }
  writer.commit();
  return {static_cast<int64_t>(plan.captions.size()), plan.valid, progress.done, seconds_since(start)};
}

void wait_for_text_encoder_cache(const Family& family, const TrainArgs& args,
                                 const CacheOptions& options, const DatasetBlueprint& blueprint,
                                 const std::vector<DatasetIndex>& indexes, double timeout_seconds, double poll_seconds) {
  CacheOptions reading = options;
  reading.rebuild = false;
  const CacheIdentity identity = text_encoder_cache_identity(family, args, options);
  wait_until_complete(options.cache_dir, timeout_seconds, poll_seconds, [&] {
    const CaptionPlan plan = plan_captions(identity, reading, blueprint, indexes);
    std::string example;
    for (size_t i = 0; i < plan.captions.size() && example.empty(); ++i) {
      if (plan.missing[i]) example = "the caption \"" + plan.captions[i] + "\"";
    }
    return std::pair{static_cast<int64_t>(plan.captions.size()) - plan.valid, example};
  });
}

// ---------------------------------------------------------------- the commands

namespace {

template <typename Build>
CacheBuildSummary run_cache_command(const TrainArgs& args, CacheOptions options, const World& world, const std::string& label,
                                    Build build) {
  if (options.cache_dir.empty()) options.cache_dir = default_cache_dir(args);
  require_cache_dir(options);
  if (!options.on_progress) options.on_progress = cache_progress_line(label, world);
  // The dataset first: its mistakes are found in a second, the model takes longer to load.
  const DatasetBlueprint blueprint = resolve_dataset_config(args);
  const std::vector<DatasetIndex> indexes = index_datasets(blueprint, {.skip_bad_images = args.skip_bad_images});
  FamilyOptions model = family_options_from_args(args);
  model.defer_block_weights = true;  // the caches never run the denoiser: a family that can leaves its blocks unread
  const std::unique_ptr<Family> family = load_family(family_of_checkpoint(args.family, model.pretrained_model_name_or_path), model);
  // The encoders run on this rank's device (--device); the entries come back to the host as they are written.
  const c10::Device device = select_device(args.device, world.local_rank);
  family->models().vae->to(device);
  for (const auto& encoder : family->models().text_encoders) encoder->to(device);
  const CacheBuildSummary summary = build(*family, args, options, blueprint, indexes, world);
  if (summary.encoded > 0 && world.rank == 0) fmt::print(stderr, "\n");
  spdlog::info("{}: {} entries needed, {} were valid; this rank encoded {} items in {:.1f} s", label, summary.items,
               summary.valid_before, summary.encoded, summary.seconds);
  return summary;
}

}  // namespace

CacheBuildSummary run_cache_latents(const TrainArgs& args, CacheOptions options, const World& world) {
  return run_cache_command(args, std::move(options), world, "caching latents", build_latent_cache);
}

CacheBuildSummary run_cache_text_encoder_outputs(const TrainArgs& args, CacheOptions options, const World& world) {
  return run_cache_command(args, std::move(options), world, "caching text-encoder outputs", build_text_encoder_cache);
}

std::function<void(const CacheProgress&)> cache_progress_line(const std::string& label, const World& world) {
  if (world.rank != 0) return {};
  struct State {
    Clock::time_point began = Clock::now();
    Clock::time_point drawn{};
  };
  auto state = std::make_shared<State>();
  return [label, world, state](const CacheProgress& p) {
    const Clock::time_point now = Clock::now();
    if (p.done < p.to_do && now - state->drawn < std::chrono::milliseconds(200)) return;
    state->drawn = now;
    const int64_t total = p.to_do_all_ranks;
    // Rank 0's share scaled to all ranks' items (exact with one rank).
    const int64_t done = p.to_do > 0 ? p.done * total / p.to_do : total;
    const double elapsed = std::chrono::duration<double>(now - state->began).count();
    const double rate = elapsed > 0 ? static_cast<double>(done) / elapsed : 0.0;
    const double left = rate > 0 ? static_cast<double>(total - done) / rate : 0.0;
    const int width = 20;
    const int filled = total > 0 ? static_cast<int>(width * done / total) : width;
    fmt::print(stderr, "\r{}: {:3d}%|{}{}| {}{}/{} [{}<{}, {:.2f}it/s]", label, total > 0 ? 100 * done / total : 100,
               std::string(static_cast<size_t>(filled), '#'), std::string(static_cast<size_t>(width - filled), ' '),
               world.size > 1 ? "~" : "", done, total, format_duration(elapsed), format_duration(left), rate);
  };
}

}  // namespace sdt
