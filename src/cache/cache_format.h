// What the cache folder holds and how a part file becomes visible (docs/cache_format.md).
//
// A cache is a folder of HDF5 part files, each written by one process with serial HDF5 and never
// changed afterwards: "latents.r0001-of-0004.p00002.h5" is the third part that rank 1 of 4 wrote.
// A part is written under "<name>.tmp" and only renamed to its name after HDF5 has closed it and
// the bytes are on disk, so a reader never sees a half-written entry, whenever the writer dies.
// Its root attributes say how its entries were made (CacheIdentity); a reader refuses a part made
// differently from what it expects, naming the file and the attribute. No LibTorch here.
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "src/cache/h5.h"

namespace sdt {

inline constexpr int64_t kCacheFormatVersion = 1;

enum class CacheKind { latents, text_encoder_outputs };
std::string cache_kind_name(CacheKind kind);  // "latents", "text_encoder_outputs": the file prefix and the kind attribute

// Everything besides an item's own key that decides what its entry holds. Parts with equal
// identities are interchangeable; a different identity means the entries would differ.
struct CacheIdentity {
  CacheKind kind = CacheKind::latents;
  std::string family;          // "sd"
  std::string weights_sha256;  // of the VAE (latents) or of the text encoders (outputs): weights_sha256() in build_cache.h
  std::string dtype;           // how floating-point values are stored: "float", "fp16" or "bf16" (kohya's precision names)
  std::string settings;        // the encoder's settings that change its outputs, e.g. "latent_sampling=mean"
};

// The first identity attribute of a part that differs from `expected`, as "<attribute>: the file has
// <x>, this run expects <y>"; nullopt when the part matches.
std::optional<std::string> identity_mismatch(hid_t file, const CacheIdentity& expected);

struct PartName {
  CacheKind kind = CacheKind::latents;
  int rank = 0;
  int world = 1;
  int64_t part = 0;
};
std::string part_file_name(const PartName& name);  // "latents.r0001-of-0004.p00002.h5"
// The committed parts of `kind` in `dir`, sorted by name; none when the folder does not exist.
std::vector<std::string> committed_parts(const std::string& dir, CacheKind kind);

// A committed part opened for reading, after checking it was made as `expected` says (sdt::Error naming
// the file and the differing attribute otherwise), with the number of entries its commit recorded.
struct CommittedPart {
  h5::Handle file;
  int64_t entries = 0;
};
CommittedPart open_committed_part(const std::string& path, const CacheIdentity& expected);

// One part file being written. The constructor creates "<name>.tmp" with the identity and `info`
// (attributes for people reading the file, not checked) at its root; commit() records the number
// of entries, closes the file, syncs it and renames it to its name. A part destroyed before its
// commit is deleted: a writer that fails leaves nothing behind, one that is killed leaves a
// temporary that the next writer of the same rank removes.
class PartFile {
 public:
  PartFile(const std::string& dir, const PartName& name, const CacheIdentity& identity,
           const std::map<std::string, std::string>& info);
  ~PartFile();
  PartFile(const PartFile&) = delete;
  PartFile& operator=(const PartFile&) = delete;

  hid_t id() const { return file_.get(); }
  const std::string& path() const { return path_; }  // the committed name
  void commit(int64_t entries);

 private:
  std::string path_;
  std::string temporary_path_;
  h5::Handle file_;
  bool committed_ = false;
};

// The part number a writer (kind, rank, world) uses next: one past the highest it left in `dir`.
int64_t next_part_number(const std::string& dir, CacheKind kind, int rank, int world);

struct PartWriterOptions {
  std::string dir;
  int rank = 0;
  int world = 1;
  int gzip_level = 0;                 // 1-9 compresses the large tables (shuffle + gzip); 0 stores them raw
  int64_t commit_every_entries = 0;   // commit a part after this many entries (0: no limit)
  double commit_every_seconds = 300;  // ... or when it has been open this long: a killed job loses at most this much work
  std::map<std::string, std::string> info;  // more root attributes, for people reading the files (bucket_settings, ...)
};

// The parts one writer (a rank) makes in turn: opens the next when asked for one, says when the open
// one is due for its commit. The writer closes its datasets, then calls commit().
class PartSeries {
 public:
  // Removes this writer's stale temporaries (remove_stale_temporaries) and finds its next part number.
  PartSeries(CacheIdentity identity, PartWriterOptions options);
  PartFile& open();  // the open part, or a new one
  void count(int64_t entries) { entries_ += entries; }
  bool commit_due() const;
  void commit();  // commits the open part, if any
  const PartWriterOptions& options() const { return options_; }
  const CacheIdentity& identity() const { return identity_; }

 private:
  CacheIdentity identity_;
  PartWriterOptions options_;
  int64_t next_part_ = 0;
  std::unique_ptr<PartFile> part_;
  int64_t entries_ = 0;
  std::chrono::steady_clock::time_point opened_at_;
};

// Removes temporaries that no running writer of this job owns: this rank's own, and (rank 0) those
// of writers from a job with another world size.
// The checksum stored beside each cached entry and checked when it is read, so a flipped bit or a value changed on
// disk is an error naming the entry instead of training on it: FNV-1a over the stored bytes, eight at a time (any
// change within one 8-byte word changes it; it runs at memory speed).
uint64_t entry_checksum(const void* data, size_t bytes);

void remove_stale_temporaries(const std::string& dir, CacheKind kind, int rank, int world);

}  // namespace sdt
