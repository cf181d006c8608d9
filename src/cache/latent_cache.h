// The latent cache: writing entries into part files, and the reader that training uses to find an
// item's entry and read only that item, with a prefetch thread (docs/cache_format.md).
//
// An item is one image of a subset prepared for one bucket, flipped or not. Its key names the image
// by its subset folder and its path inside it (so the cache stays valid when the dataset moves) and
// the pixels it was made from: the bucket, the size the image was resized to before the centre
// crop, and the flip. Changing bucket settings therefore changes the keys of the images it affects,
// which are then encoded afresh; nothing stale is ever read under a current key.
#pragma once

#include <condition_variable>
#include <deque>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include <ATen/ATen.h>

#include "src/cache/cache_format.h"
#include "src/core/dataset_config.h"
#include "src/data/buckets.h"
#include "src/data/dataset_index.h"

namespace sdt {

struct LatentKey {
  std::string image;         // "<subset folder name>/<path inside it>", '/'-separated
  Resolution bucket;         // pixels
  Resolution resized_size;   // the image is resized to this, then centre-cropped to the bucket
  bool flipped = false;
  bool operator==(const LatentKey&) const = default;
  std::string describe() const;  // "10_cat/a.png in bucket 512x768 (resized to 512x800), flipped"
};

// "<subset folder name>/<path inside it>" for an image of `subset`; the absolute path for an image
// outside its subset folder (fine-tuning metadata may point anywhere).
std::string cache_item_name(const SubsetConfig& subset, const std::string& image_path);
LatentKey latent_key(const SubsetConfig& subset, const ImageEntry& entry, bool flipped);

// The latent key of a training sample, from its dataset and image path (what a TrainBatch carries).
class LatentKeyIndex {
 public:
  LatentKeyIndex(const DatasetBlueprint& blueprint, const std::vector<DatasetIndex>& indexes);
  LatentKey key(uint32_t dataset, const std::string& image_path, bool flipped) const;

 private:
  std::vector<std::unordered_map<std::string, LatentKey>> unflipped_;  // per dataset, by image path
};

struct LatentEntry {
  at::Tensor latents;          // (C, h, w) as the family's caching strategy returns them (scaled for the denoiser)
  Resolution original_size;    // of the image file
  CropLtrb crop_ltrb;          // kohya's crop conditioning, mirrored for a flipped entry
  at::Tensor alpha_mask;       // (H, W) float32 in [0, 1] at the bucket size, flipped with the image; undefined when none
};

// A batch of entries of one bucket, in the order asked.
struct LatentBatch {
  at::Tensor latents;  // (B, C, h, w) in the stored dtype
  std::vector<Resolution> original_sizes;
  std::vector<CropLtrb> crop_ltrbs;
  at::Tensor alpha_masks;  // (B, H, W) float32, ones for entries without a mask; undefined when no entry has one
};

// Writes entries into this rank's parts; an entry is visible to readers once its part is committed.
class LatentCacheWriter {
 public:
  // identity.dtype ("float", "fp16", "bf16") is how the latents are stored.
  LatentCacheWriter(CacheIdentity identity, PartWriterOptions options);
  ~LatentCacheWriter();  // an uncommitted part is deleted: call commit() when done
  // Writes entries (any buckets) and commits the part when it is due.
  void add(const std::vector<LatentKey>& keys, const std::vector<LatentEntry>& entries);
  void commit();

 private:
  struct BucketTables;
  PartSeries parts_;
  h5::Handle latents_group_;
  std::map<std::string, std::unique_ptr<BucketTables>> buckets_;  // of the open part, by group name
};

// What the reader knows about an entry without reading its latents.
struct LatentEntryInfo {
  std::vector<int64_t> shape;  // of the latents (C, h, w)
  Resolution original_size;
  bool has_alpha_mask = false;
};

// Opens every committed latents part of a cache folder read-only and indexes their keys; reads
// one entry at a time. Safe to use from several threads (the HDF5 library serialises its calls).
class LatentCacheReader {
 public:
  // A part made with another identity than `expected` is an sdt::Error naming the file and the
  // attribute. A folder without parts is an empty cache.
  LatentCacheReader(const std::string& dir, const CacheIdentity& expected);
  ~LatentCacheReader();

  size_t size() const { return rows_.size(); }
  const std::vector<std::string>& files() const { return files_; }
  bool contains(const LatentKey& key) const;
  std::optional<LatentEntryInfo> info(const LatentKey& key) const;
  // A key without an entry, or an entry that cannot be read, is an sdt::Error naming the item and
  // the cache folder or part file.
  LatentEntry read(const LatentKey& key) const;
  LatentBatch read_batch(const std::vector<LatentKey>& keys) const;

 private:
  struct Part;
  struct Row;
  const Row& row_of(const LatentKey& key) const;
  std::string dir_;
  std::vector<std::string> files_;
  std::vector<std::unique_ptr<Part>> parts_;
  std::unordered_map<std::string, Row> rows_;
};

// Reads batches on one background thread, in the order they were asked for: ask for the next
// step's batch, train on this one, then take it.
class LatentPrefetcher {
 public:
  explicit LatentPrefetcher(const LatentCacheReader& reader);
  ~LatentPrefetcher();
  LatentPrefetcher(const LatentPrefetcher&) = delete;
  LatentPrefetcher& operator=(const LatentPrefetcher&) = delete;
  // The future holds the batch, or the reader's error.
  std::future<LatentBatch> prefetch(std::vector<LatentKey> keys);

 private:
  void work();
  const LatentCacheReader& reader_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::deque<std::pair<std::vector<LatentKey>, std::promise<LatentBatch>>> queue_;
  bool stopping_ = false;
  std::thread worker_;
};

}  // namespace sdt
