#include "src/cache/latent_cache.h"

#include <cmath>
#include <filesystem>

#include <fmt/format.h>

#include "src/cache/tensor_rows.h"
#include "src/core/error.h"

namespace sdt {
namespace {

namespace fs = std::filesystem;

// The tables of one bucket group, and their chunking: per-item tables one row per chunk (an item
// is read alone), the small per-entry facts many rows per chunk (read whole when a reader opens).
constexpr int64_t kFactsPerChunk = 1024;
constexpr int kAlphaMaskGzipLevel = 4;  // masks are mostly 0 or 255 and shrink well

std::string bucket_group_name(Resolution bucket) { return fmt::format("{}x{}", bucket.width, bucket.height); }

// The reader's map key: the four parts of a LatentKey, NUL-separated (no file name holds a NUL).
std::string map_key(const std::string& image, Resolution bucket, Resolution resized, bool flipped) {
  std::string key = image;
  key += '\0';
  key += bucket_group_name(bucket);
  key += '\0';
  key += bucket_group_name(resized);
  key += '\0';
  key += flipped ? 'f' : '-';
  return key;
}

std::string map_key(const LatentKey& key) { return map_key(key.image, key.bucket, key.resized_size, key.flipped); }

std::vector<int64_t> shape_of(const at::Tensor& t) { return {t.sizes().begin(), t.sizes().end()}; }

}  // namespace

std::string LatentKey::describe() const {
  return fmt::format("{} in bucket {}x{} (resized to {}x{}){}", image, bucket.width, bucket.height, resized_size.width,
                     resized_size.height, flipped ? ", flipped" : "");
}

std::string cache_item_name(const SubsetConfig& subset, const std::string& image_path) {
  const fs::path image = fs::absolute(image_path).lexically_normal();
  if (!subset.image_dir) return image.generic_string();
  fs::path dir = fs::absolute(*subset.image_dir).lexically_normal();
  if (dir.filename().empty()) dir = dir.parent_path();  // "a/b/" -> "a/b"
  const fs::path inside = image.lexically_relative(dir);
  if (inside.empty() || *inside.begin() == "..") return image.generic_string();
  return (dir.filename() / inside).generic_string();
}

LatentKey latent_key(const SubsetConfig& subset, const ImageEntry& entry, bool flipped) {
  return {cache_item_name(subset, entry.path), entry.bucket.bucket, entry.bucket.resized_size, flipped};
}

LatentKeyIndex::LatentKeyIndex(const DatasetBlueprint& blueprint, const std::vector<DatasetIndex>& indexes) {
  for (size_t d = 0; d < indexes.size(); ++d) {
    auto& keys = unflipped_.emplace_back();
    for (const auto& entry : indexes[d].images) {
      keys.emplace(entry.path, latent_key(blueprint.datasets.at(d).subsets.at(entry.subset), entry, false));
    }
  }
}

LatentKey LatentKeyIndex::key(uint32_t dataset, const std::string& image_path, bool flipped) const {
  if (dataset >= unflipped_.size()) fail("latent cache", "dataset {} asked of {} datasets", dataset, unflipped_.size());
  const auto it = unflipped_[dataset].find(image_path);
  if (it == unflipped_[dataset].end()) fail(image_path, "not an image of dataset {}", dataset);
  LatentKey key = it->second;
  key.flipped = flipped;
  return key;
}

// ---------------------------------------------------------------- writer

struct LatentCacheWriter::BucketTables {
  h5::Handle group;
  h5::RowTable image, resized_size, flipped, original_size, crop_ltrb, alpha_mask_row, latents, checksum;
  std::optional<h5::RowTable> alpha_mask;
};

LatentCacheWriter::LatentCacheWriter(CacheIdentity identity, PartWriterOptions options)
    : parts_(std::move(identity), std::move(options)) {
  stored_float_element(parts_.identity().dtype);  // refuse an unknown dtype before any work
}

LatentCacheWriter::~LatentCacheWriter() {
  buckets_.clear();
  latents_group_.reset();
}

void LatentCacheWriter::add(const std::vector<LatentKey>& keys, const std::vector<LatentEntry>& entries) {
  if (keys.size() != entries.size()) fail("latent cache writer", "{} keys for {} entries", keys.size(), entries.size());
  if (keys.empty()) return;
  const h5::Element element = stored_float_element(parts_.identity().dtype);
  const int gzip_level = parts_.options().gzip_level;
  PartFile& part = parts_.open();
  if (!latents_group_) latents_group_ = h5::create_group(part.id(), "latents");

  std::map<std::string, std::vector<size_t>> by_bucket;
  for (size_t i = 0; i < keys.size(); ++i) by_bucket[bucket_group_name(keys[i].bucket)].push_back(i);
  for (const auto& [name, members] : by_bucket) {
    const Resolution bucket = keys[members[0]].bucket;
    const std::vector<int64_t> shape = shape_of(entries[members[0]].latents);
    auto& tables = buckets_[name];
    if (!tables) {
      h5::Handle group = h5::create_group(latents_group_.get(), name);
      const hid_t g = group.get();
      tables.reset(new BucketTables{
          .group = std::move(group),
          .image = h5::RowTable::create(g, "image", h5::Element::string, {}, kFactsPerChunk),
          .resized_size = h5::RowTable::create(g, "resized_size", h5::Element::i64, {2}, kFactsPerChunk),
          .flipped = h5::RowTable::create(g, "flipped", h5::Element::u8, {}, kFactsPerChunk),
          .original_size = h5::RowTable::create(g, "original_size", h5::Element::i64, {2}, kFactsPerChunk),
          .crop_ltrb = h5::RowTable::create(g, "crop_ltrb", h5::Element::f64, {4}, kFactsPerChunk),
          .alpha_mask_row = h5::RowTable::create(g, "alpha_mask_row", h5::Element::i64, {}, kFactsPerChunk),
          .latents = h5::RowTable::create(g, "latents", element, shape, 1, gzip_level),
          .checksum = h5::RowTable::create(g, "checksum", h5::Element::i64, {}, kFactsPerChunk),
          .alpha_mask = std::nullopt,
      });
    }
    std::vector<std::string> images;
    std::vector<int64_t> resized, original, alpha_rows;
    std::vector<uint8_t> flipped, masks;
    std::vector<double> crops;
    std::vector<at::Tensor> latents;
    const int64_t mask_values = bucket.width * bucket.height;
    for (size_t i : members) {
      const LatentKey& key = keys[i];
      const LatentEntry& entry = entries[i];
      if (shape_of(entry.latents) != tables->latents.row_shape()) {
        fail(key.describe(), "latents of shape {} where bucket {} holds {}", fmt::join(shape_of(entry.latents), "x"), name,
             fmt::join(tables->latents.row_shape(), "x"));
      }
      images.push_back(key.image);
      resized.insert(resized.end(), {key.resized_size.width, key.resized_size.height});
      flipped.push_back(key.flipped ? 1 : 0);
      original.insert(original.end(), {entry.original_size.width, entry.original_size.height});
      crops.insert(crops.end(), {entry.crop_ltrb.left, entry.crop_ltrb.top, entry.crop_ltrb.right, entry.crop_ltrb.bottom});
      latents.push_back(entry.latents);
      if (!entry.alpha_mask.defined()) {
        alpha_rows.push_back(-1);
        continue;
      }
      if (shape_of(entry.alpha_mask) != std::vector<int64_t>{bucket.height, bucket.width}) {
        fail(key.describe(), "alpha mask of shape {}, expected the bucket's {}x{}", fmt::join(shape_of(entry.alpha_mask), "x"),
             bucket.height, bucket.width);
      }
      // The mask is the image's 8-bit alpha / 255: stored as the 8-bit values, read back exactly.
      const at::Tensor mask = entry.alpha_mask.to(at::kFloat).contiguous();
      const float* values = mask.data_ptr<float>();
      for (int64_t v = 0; v < mask_values; ++v) masks.push_back(static_cast<uint8_t>(std::lround(values[v] * 255.0f)));
      if (!tables->alpha_mask) {
        tables->alpha_mask = h5::RowTable::create(tables->group.get(), "alpha_mask", h5::Element::u8, {bucket.height, bucket.width}, 1,
                                                  kAlphaMaskGzipLevel);
      }
      alpha_rows.push_back(tables->alpha_mask->rows() + static_cast<int64_t>(masks.size() / mask_values) - 1);
    }
    const auto n = static_cast<int64_t>(members.size());
    const at::Tensor all = at::stack(latents);
    for (size_t j = 0; j < members.size(); ++j) {
      if (!all_finite(latents[j])) fail(keys[members[j]].describe(), "the VAE made non-finite latents: a corrupt image?");
    }
    const at::Tensor stacked = rows_for(all, element);
    std::vector<int64_t> checksums;
    const size_t row_bytes = static_cast<size_t>(tables->latents.row_bytes());
    for (int64_t r = 0; r < n; ++r) {
      const uint64_t sum = entry_checksum(static_cast<const char*>(stacked.data_ptr()) + r * row_bytes, row_bytes);
      checksums.push_back(static_cast<int64_t>(sum));
    }
    tables->latents.append(stacked.data_ptr(), n);
    tables->checksum.append(checksums.data(), n);
    if (!masks.empty()) tables->alpha_mask->append(masks.data(), static_cast<int64_t>(masks.size()) / mask_values);
    tables->original_size.append(original.data(), n);
    tables->crop_ltrb.append(crops.data(), n);
    tables->alpha_mask_row.append(alpha_rows.data(), n);
    tables->resized_size.append(resized.data(), n);
    tables->flipped.append(flipped.data(), n);
    tables->image.append_strings(images);
  }
  parts_.count(static_cast<int64_t>(keys.size()));
  if (parts_.commit_due()) commit();
}

void LatentCacheWriter::commit() {
  buckets_.clear();
  latents_group_.reset();
  parts_.commit();
}

// ---------------------------------------------------------------- reader

struct LatentCacheReader::Part {
  std::string path;
  h5::Handle file;
  struct Group {
    h5::RowTable latents;
    std::optional<h5::RowTable> alpha_mask;
  };
  std::vector<std::unique_ptr<Group>> groups;
};

struct LatentCacheReader::Row {
  const Part* part;
  const Part::Group* group;
  int64_t row;
  int64_t alpha_mask_row;  // -1: none
  std::optional<uint64_t> checksum;  // of the stored latents (parts written before checksums have none)
  Resolution original_size;
  CropLtrb crop_ltrb;
};

LatentCacheReader::~LatentCacheReader() = default;

LatentCacheReader::LatentCacheReader(const std::string& dir, const CacheIdentity& expected) : dir_(dir) {
  for (const std::string& path : committed_parts(dir, CacheKind::latents)) {
    auto part = std::make_unique<Part>();
    part->path = path;
    CommittedPart committed = open_committed_part(path, expected);
    part->file = std::move(committed.file);
    const hid_t file = part->file.get();
    const int64_t committed_entries = committed.entries;
    int64_t entries = 0;
    if (h5::has_member(file, "latents")) {
      h5::Handle latents_group = h5::open_group(file, "latents");
      for (const std::string& name : h5::member_names(latents_group.get())) {
        h5::Handle g = h5::open_group(latents_group.get(), name);
        const auto images = h5::RowTable::open(g.get(), "image").read_strings();
        const auto n = static_cast<int64_t>(images.size());
        auto read_all = [&](const char* table, auto element_zero, int64_t per_row) {
          const h5::RowTable t = h5::RowTable::open(g.get(), table);
          if (t.rows() != n || t.row_values() != per_row) fail(h5::describe(t.id()), "expected {} rows of {} values", n, per_row);
          std::vector<decltype(element_zero)> values(static_cast<size_t>(n * per_row));
          t.read(0, n, values.data());
          return values;
        };
        const auto resized = read_all("resized_size", int64_t{}, 2);
        const auto flipped = read_all("flipped", uint8_t{}, 1);
        const auto original = read_all("original_size", int64_t{}, 2);
        const auto crops = read_all("crop_ltrb", double{}, 4);
        const auto alpha_rows = read_all("alpha_mask_row", int64_t{}, 1);
        const auto checksums = h5::has_member(g.get(), "checksum") ? read_all("checksum", int64_t{}, 1) : std::vector<int64_t>{};
        auto group = std::make_unique<Part::Group>(Part::Group{h5::RowTable::open(g.get(), "latents"), std::nullopt});
        if (h5::has_member(g.get(), "alpha_mask")) group->alpha_mask = h5::RowTable::open(g.get(), "alpha_mask");
        if (group->latents.rows() != n) fail(h5::describe(group->latents.id()), "{} rows for {} images", group->latents.rows(), n);
        int bucket_width = 0, bucket_height = 0;
        if (std::sscanf(name.c_str(), "%dx%d", &bucket_width, &bucket_height) != 2) {
          fail(path, "latents/{}: expected a bucket group named <width>x<height>", name);
        }
        for (int64_t r = 0; r < n; ++r) {
          const size_t i = static_cast<size_t>(r);
          const int64_t alpha_row = alpha_rows[i];
          if (alpha_row >= 0 && (!group->alpha_mask || alpha_row >= group->alpha_mask->rows())) {
            fail(path, "latents/{}: entry {} names alpha mask row {} that does not exist", name, r, alpha_row);
          }
          rows_.try_emplace(map_key(images[i], {bucket_width, bucket_height}, {resized[2 * i], resized[2 * i + 1]}, flipped[i] != 0),
                            Row{part.get(), group.get(), r, alpha_row,
                                checksums.empty() ? std::nullopt : std::optional<uint64_t>(static_cast<uint64_t>(checksums[i])),
                                {original[2 * i], original[2 * i + 1]},
                                {crops[4 * i], crops[4 * i + 1], crops[4 * i + 2], crops[4 * i + 3]}});
        }
        entries += n;
        part->groups.push_back(std::move(group));
      }
    }
    if (entries != committed_entries) {
      fail(path, "holds {} entries but its commit recorded {}: the file is damaged; delete it and cache again", entries,
           committed_entries);
    }
    files_.push_back(path);
    parts_.push_back(std::move(part));
  }
}

bool LatentCacheReader::contains(const LatentKey& key) const { return rows_.count(map_key(key)) > 0; }

std::optional<LatentEntryInfo> LatentCacheReader::info(const LatentKey& key) const {
  const auto it = rows_.find(map_key(key));
  if (it == rows_.end()) return std::nullopt;
  const Row& row = it->second;
  return LatentEntryInfo{row.group->latents.row_shape(), row.original_size, row.alpha_mask_row >= 0};
}

const LatentCacheReader::Row& LatentCacheReader::row_of(const LatentKey& key) const {
  const auto it = rows_.find(map_key(key));
  if (it == rows_.end()) {
    fail(dir_, "no cached latents for {} in the {} part files here; cache them with `sdt cache-latents` and this dataset", key.describe(),
         files_.size());
  }
  return it->second;
}

LatentEntry LatentCacheReader::read(const LatentKey& key) const {
  LatentBatch batch = read_batch({key});
  LatentEntry entry{batch.latents[0], batch.original_sizes[0], batch.crop_ltrbs[0], {}};
  if (batch.alpha_masks.defined() && row_of(key).alpha_mask_row >= 0) entry.alpha_mask = batch.alpha_masks[0];
  return entry;
}

LatentBatch LatentCacheReader::read_batch(const std::vector<LatentKey>& keys) const {
  LatentBatch batch;
  if (keys.empty()) return batch;
  std::vector<const Row*> rows;
  bool any_mask = false;
  for (const auto& key : keys) {
    rows.push_back(&row_of(key));
    any_mask = any_mask || rows.back()->alpha_mask_row >= 0;
    if (rows.back()->group->latents.row_shape() != rows.front()->group->latents.row_shape()) {
      fail(key.describe(), "latents of shape {} cannot share a batch with {} ({})", fmt::join(rows.back()->group->latents.row_shape(), "x"),
           keys.front().describe(), fmt::join(rows.front()->group->latents.row_shape(), "x"));
    }
  }
  const h5::RowTable& first = rows.front()->group->latents;
  std::vector<int64_t> shape{static_cast<int64_t>(keys.size())};
  shape.insert(shape.end(), first.row_shape().begin(), first.row_shape().end());
  batch.latents = at::empty(shape, at::TensorOptions().dtype(scalar_type_of(first.element())));
  const Resolution bucket = keys.front().bucket;
  if (any_mask) batch.alpha_masks = at::ones({static_cast<int64_t>(keys.size()), bucket.height, bucket.width}, at::kFloat);
  std::vector<uint8_t> mask(static_cast<size_t>(bucket.width * bucket.height));
  for (size_t i = 0; i < keys.size(); ++i) {
    const Row& row = *rows[i];
    try {
      char* stored = static_cast<char*>(batch.latents.data_ptr()) + i * first.row_bytes();
      row.group->latents.read(row.row, 1, stored);
      if (row.checksum && entry_checksum(stored, static_cast<size_t>(first.row_bytes())) != *row.checksum) {
        fail("checksum", "the stored latents differ from what was written (a flipped bit or a changed file); delete this "
                         "part and run `sdt cache-latents` again, which encodes the entries it held");
      }
      if (row.alpha_mask_row >= 0) {
        row.group->alpha_mask->read(row.alpha_mask_row, 1, mask.data());
        float* out = batch.alpha_masks[static_cast<int64_t>(i)].data_ptr<float>();
        for (size_t v = 0; v < mask.size(); ++v) out[v] = mask[v] / 255.0f;
      }
    } catch (const Error& e) {
      fail(row.part->path, "reading the entry of {}: {}", keys[i].describe(), e.what());
    }
    batch.original_sizes.push_back(row.original_size);
    batch.crop_ltrbs.push_back(row.crop_ltrb);
  }
  return batch;
}

// ---------------------------------------------------------------- prefetch

LatentPrefetcher::LatentPrefetcher(const LatentCacheReader& reader) : reader_(reader), worker_([this] { work(); }) {}

LatentPrefetcher::~LatentPrefetcher() {
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
  }
  wake_.notify_all();
  worker_.join();
}

std::future<LatentBatch> LatentPrefetcher::prefetch(std::vector<LatentKey> keys) {
  std::promise<LatentBatch> promise;
  std::future<LatentBatch> future = promise.get_future();
  {
    std::lock_guard lock(mutex_);
    queue_.emplace_back(std::move(keys), std::move(promise));
  }
  wake_.notify_one();
  return future;
}

void LatentPrefetcher::work() {
  for (;;) {
    std::pair<std::vector<LatentKey>, std::promise<LatentBatch>> request;
    {
      std::unique_lock lock(mutex_);
      wake_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stopping, nothing left to read
      request = std::move(queue_.front());
      queue_.pop_front();
    }
    try {
      request.second.set_value(reader_.read_batch(request.first));
    } catch (...) {
      request.second.set_exception(std::current_exception());
    }
  }
}

}  // namespace sdt
