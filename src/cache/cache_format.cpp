#include "src/cache/cache_format.h"

#include <cstring>

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <regex>

#include <fmt/format.h>

#include "src/core/error.h"

namespace sdt {
namespace {

namespace fs = std::filesystem;

constexpr const char* kTemporarySuffix = ".tmp";

std::optional<PartName> parse_name(const std::string& file_name, CacheKind kind) {
  static const std::regex pattern(R"(([a-z_]+)\.r(\d{4,})-of-(\d{4,})\.p(\d{5,})\.h5)");
  std::smatch m;
  if (!std::regex_match(file_name, m, pattern) || m[1] != cache_kind_name(kind)) return std::nullopt;
  return PartName{kind, std::stoi(m[2]), std::stoi(m[3]), std::stoll(m[4])};
}

std::optional<PartName> parse_temporary_name(const std::string& file_name, CacheKind kind) {
  if (!file_name.ends_with(kTemporarySuffix)) return std::nullopt;
  return parse_name(file_name.substr(0, file_name.size() - std::char_traits<char>::length(kTemporarySuffix)), kind);
}

// fsync of a file or folder by path: what rename-based commits need to survive a power cut.
void sync_path(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) fail(path, "cannot open to sync it to disk");
  const int status = ::fsync(fd);
  ::close(fd);
  if (status != 0) fail(path, "syncing to disk failed");
}

}  // namespace

std::string cache_kind_name(CacheKind kind) {
  return kind == CacheKind::latents ? "latents" : "text_encoder_outputs";
}

std::optional<std::string> identity_mismatch(hid_t file, const CacheIdentity& expected) {
  const std::optional<int64_t> version = h5::read_int_attribute(file, "sdt_cache_format");
  if (version != kCacheFormatVersion) {
    return version ? fmt::format("sdt_cache_format: the file is in format {}, this sdt reads format {}", *version, kCacheFormatVersion)
                   : std::string("sdt_cache_format: missing; not an sdt cache file");
  }
  const std::pair<const char*, std::string> expected_attributes[] = {
      {"kind", cache_kind_name(expected.kind)},
      {"family", expected.family},
      {"weights_sha256", expected.weights_sha256},
      {"dtype", expected.dtype},
      {"settings", expected.settings},
  };
  for (const auto& [name, value] : expected_attributes) {
    const std::optional<std::string> stored = h5::read_string_attribute(file, name);
    if (stored != value) {
      return fmt::format("{}: the file has {}, this run expects '{}'", name, stored ? "'" + *stored + "'" : "none", value);
    }
  }
  return std::nullopt;
}

std::string part_file_name(const PartName& name) {
  return fmt::format("{}.r{:04d}-of-{:04d}.p{:05d}.h5", cache_kind_name(name.kind), name.rank, name.world, name.part);
}

std::vector<std::string> committed_parts(const std::string& dir, CacheKind kind) {
  std::vector<std::string> paths;
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    if (parse_name(entry.path().filename().string(), kind)) paths.push_back(entry.path().string());
  }
  std::sort(paths.begin(), paths.end());
  return paths;
}

int64_t next_part_number(const std::string& dir, CacheKind kind, int rank, int world) {
  int64_t next = 0;
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    const std::string file_name = entry.path().filename().string();
    std::optional<PartName> name = parse_name(file_name, kind);
    if (!name) name = parse_temporary_name(file_name, kind);
    if (name && name->rank == rank && name->world == world) next = std::max(next, name->part + 1);
  }
  return next;
}

void remove_stale_temporaries(const std::string& dir, CacheKind kind, int rank, int world) {
  std::error_code ec;
  std::vector<fs::path> stale;
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    const std::optional<PartName> name = parse_temporary_name(entry.path().filename().string(), kind);
    if (!name) continue;
    const bool mine = name->rank == rank && name->world == world;
    const bool orphan = name->world != world && rank == 0;
    if (mine || orphan) stale.push_back(entry.path());
  }
  for (const auto& path : stale) fs::remove(path, ec);
}

// ---------------------------------------------------------------- one part being written

PartFile::PartFile(const std::string& dir, const PartName& name, const CacheIdentity& identity,
                   const std::map<std::string, std::string>& info)
    : path_((fs::path(dir) / part_file_name(name)).string()), temporary_path_(path_ + kTemporarySuffix) {
  fs::create_directories(dir);
  file_ = h5::create_file(temporary_path_);
  h5::write_attribute(file_.get(), "sdt_cache_format", kCacheFormatVersion);
  h5::write_attribute(file_.get(), "kind", cache_kind_name(identity.kind));
  h5::write_attribute(file_.get(), "family", identity.family);
  h5::write_attribute(file_.get(), "weights_sha256", identity.weights_sha256);
  h5::write_attribute(file_.get(), "dtype", identity.dtype);
  h5::write_attribute(file_.get(), "settings", identity.settings);
  for (const auto& [key, value] : info) h5::write_attribute(file_.get(), key, value);
}

PartFile::~PartFile() {
  if (committed_) return;
  file_.reset();
  std::error_code ec;
  fs::remove(temporary_path_, ec);
}

void PartFile::commit(int64_t entries) {
  h5::write_attribute(file_.get(), "entries", entries);
  h5::close_file(file_);
  sync_path(temporary_path_);
  std::error_code ec;
  fs::rename(temporary_path_, path_, ec);
  if (ec) fail(temporary_path_, "cannot rename to {}: {}", path_, ec.message());
  sync_path(fs::path(path_).parent_path().string());
  committed_ = true;
}

// ---------------------------------------------------------------- the parts of one writer

PartSeries::PartSeries(CacheIdentity identity, PartWriterOptions options)
    : identity_(std::move(identity)), options_(std::move(options)) {
  remove_stale_temporaries(options_.dir, identity_.kind, options_.rank, options_.world);
  next_part_ = next_part_number(options_.dir, identity_.kind, options_.rank, options_.world);
}

PartFile& PartSeries::open() {
  if (!part_) {
    std::map<std::string, std::string> info = options_.info;
    info["written_by"] = fmt::format("rank {} of {}", options_.rank, options_.world);
    part_ = std::make_unique<PartFile>(options_.dir, PartName{identity_.kind, options_.rank, options_.world, next_part_++},
                                       identity_, info);
    entries_ = 0;
    opened_at_ = std::chrono::steady_clock::now();
  }
  return *part_;
}

bool PartSeries::commit_due() const {
  if (!part_) return false;
  if (options_.commit_every_entries > 0 && entries_ >= options_.commit_every_entries) return true;
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - opened_at_).count() >= options_.commit_every_seconds;
}

void PartSeries::commit() {
  if (!part_) return;
  part_->commit(entries_);
  part_.reset();
}

uint64_t entry_checksum(const void* data, size_t bytes) {
  constexpr uint64_t kPrime = 0x100000001b3ULL;
  uint64_t hash = 0xcbf29ce484222325ULL;
  const auto* p = static_cast<const unsigned char*>(data);
  size_t i = 0;
  for (; i + 8 <= bytes; i += 8) {
    uint64_t word;
    std::memcpy(&word, p + i, 8);
    hash = (hash ^ word) * kPrime;
  }
  for (; i < bytes; ++i) hash = (hash ^ p[i]) * kPrime;
  return hash;
}

CommittedPart open_committed_part(const std::string& path, const CacheIdentity& expected) {
  CommittedPart part;
  part.file = h5::open_file_read_only(path);
  if (auto mismatch = identity_mismatch(part.file.get(), expected)) {
    fail(path, "this cache part was made differently from what this run needs ({}); rebuild the cache with this run's "
               "arguments and `sdt cache-latents --rebuild_cache` (text-encoder outputs: `sdt cache-te --rebuild_cache`), "
               "or move the cache folder away", *mismatch);
  }
  const std::optional<int64_t> entries = h5::read_int_attribute(part.file.get(), "entries");
  if (!entries) fail(path, "no 'entries' attribute: not a committed cache part");
  part.entries = *entries;
  return part;
}

}  // namespace sdt
