// Building the caches: the pre-pass of `sdt cache-latents` and `sdt cache-te`, and the same work at
// the start of training. No LibTorch in this header, so the launcher compiles without it.
//
// The work split needs no communication: every rank lists the same items in the same order (from
// the dataset config and the images' headers), and rank r encodes the items i with
// i % world == r that have no valid entry yet. Ranks write their own part files; nobody waits for
// anybody while encoding. A rank that must see the whole cache before going on (training)
// polls the folder with wait_for_latent_cache / wait_for_text_encoder_cache, which have no
// collective operation to time out however long another rank still encodes.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "cluster/world.h"
#include "src/cache/cache_format.h"
#include "src/core/dataset_config.h"
#include "src/core/train_args.h"
#include "src/data/dataset_index.h"

namespace torch::nn {
class Module;
}

namespace sdt {

class Family;

// How far this rank is: items it has encoded, items it has to encode, and items all ranks have to
// encode (each rank knows every rank's share from the common item list).
struct CacheProgress {
  int64_t done = 0;
  int64_t to_do = 0;
  int64_t to_do_all_ranks = 0;
};

// The cache settings `sdt train` has no kohya argument for.
struct CacheOptions {
  std::string cache_dir;               // default_cache_dir() when the command line gives none
  std::string dtype = "float";         // stored floats: float, fp16, bf16
  int gzip_level = 0;                  // 0: raw chunks (fastest to read)
  bool rebuild = false;                // delete parts made with other weights / settings instead of refusing them
  int64_t commit_every_entries = 0;    // see PartWriterOptions
  double commit_every_seconds = 300;
  std::optional<int64_t> text_encoder_batch_size;  // kohya's --text_encoder_batch_size; default: the dataset's batch size
  std::function<void(const CacheProgress&)> on_progress;  // called on every rank after each written batch
};

// sdt_cache beside the --dataset_config file, else <train_data_dir>/sdt_cache (the folder kohya would read with
// --dataset_config given, as it then ignores --train_data_dir); empty when neither is given.
std::string default_cache_dir(const TrainArgs& args);

struct CacheBuildSummary {
  int64_t items = 0;          // entries the datasets need (all ranks)
  int64_t valid_before = 0;   // of those, found valid in the cache at the start
  int64_t encoded = 0;        // by this rank
  double seconds = 0;
};

// The latents of every image of the datasets at its bucket (and flipped, for flip_aug subsets),
// through the family's latent caching strategy with the VAE's posterior mean. An entry counts as
// valid when its key is present and, unless args.skip_cache_check (kohya: existence only), its
// latents have the shape the bucket needs, its original size matches the image's and it has an
// alpha mask exactly when the subset asks for one. Subsets with color_aug or random_crop are
// refused: their pixels change every epoch, so there is nothing to cache (kohya refuses them too).
CacheBuildSummary build_latent_cache(const Family& family, const TrainArgs& args,
                                     const CacheOptions& options, const DatasetBlueprint& blueprint,
                                     const std::vector<DatasetIndex>& indexes, const World& world);

// The text-encoder outputs of every caption variant, with the captions processed as training will
// (prefix, suffix, first line...). Subsets whose captions change between epochs (shuffle, dropout,
// wildcards, token warm-up) are refused, as kohya refuses them.
CacheBuildSummary build_text_encoder_cache(const Family& family, const TrainArgs& args,
                                           const CacheOptions& options, const DatasetBlueprint& blueprint,
                                           const std::vector<DatasetIndex>& indexes, const World& world);

// Returns once every entry the datasets need is in the cache (other ranks' shares included),
// checking every `poll_seconds`; an sdt::Error after `timeout_seconds` says how many are missing and
// names one.
void wait_for_latent_cache(const Family& family, const TrainArgs& args, const CacheOptions& options,
                           const DatasetBlueprint& blueprint, const std::vector<DatasetIndex>& indexes, double timeout_seconds,
                           double poll_seconds = 2);
void wait_for_text_encoder_cache(const Family& family, const TrainArgs& args,
                                 const CacheOptions& options, const DatasetBlueprint& blueprint,
                                 const std::vector<DatasetIndex>& indexes, double timeout_seconds, double poll_seconds = 2);

// What the readers of a cache built with these settings expect (LatentCacheReader, TextEncoderCacheReader).
CacheIdentity latent_cache_identity(const Family& family, const CacheOptions& options);
CacheIdentity text_encoder_cache_identity(const Family& family, const TrainArgs& args,
                                          const CacheOptions& options);

// SHA-256 (hex) over a module's parameters and buffers: each one's name, dtype, shape and bytes, in
// name order. The same weights give the same hash whatever file format they were loaded from.
std::string weights_sha256(const std::vector<const torch::nn::Module*>& modules);

// `sdt cache-latents` / `sdt cache-te`: the family and the datasets loaded as `sdt train` loads
// them, then the cache built; the progress line on rank 0.
CacheBuildSummary run_cache_latents(const TrainArgs& args, CacheOptions options, const World& world);
CacheBuildSummary run_cache_text_encoder_outputs(const TrainArgs& args, CacheOptions options, const World& world);

// A progress line on stderr, drawn by rank 0 only: `label`, a bar over all ranks' items, rate and
// time left. Rank 0 cannot see the others' progress without communication, so with several ranks
// the count is rank 0's share scaled to the whole (ranks encode at similar speeds), marked "~".
std::function<void(const CacheProgress&)> cache_progress_line(const std::string& label, const World& world);

}  // namespace sdt
