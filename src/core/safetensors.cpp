#include "src/core/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <set>

#include <nlohmann/json.hpp>

#include "src/core/error.h"
#include "src/core/text.h"

static_assert(std::endian::native == std::endian::little, "safetensors is little-endian; so is every host we target");

namespace sdt::safetensors {
namespace {

struct DTypeRow {
  DType dtype;
  std::string_view name;
  size_t size;
};

constexpr std::array<DTypeRow, 15> kDTypes{{
    {DType::F64, "F64", 8},       {DType::F32, "F32", 4},         {DType::F16, "F16", 2},
    {DType::BF16, "BF16", 2},     {DType::F8_E4M3, "F8_E4M3", 1}, {DType::F8_E5M2, "F8_E5M2", 1},
    {DType::I64, "I64", 8},       {DType::I32, "I32", 4},         {DType::I16, "I16", 2},
    {DType::I8, "I8", 1},         {DType::U64, "U64", 8},         {DType::U32, "U32", 4},
    {DType::U16, "U16", 2},       {DType::U8, "U8", 1},           {DType::BOOL, "BOOL", 1},
}};

const DTypeRow& row(DType dtype) { return kDTypes[static_cast<size_t>(dtype)]; }

std::string where(const std::string& file, std::string_view tensor) {
  return tensor.empty() ? file : file + ": tensor '" + std::string(tensor) + "'";
}

std::string system_error(int err) { return std::strerror(err); }

// Parses the header JSON, rejecting a key that appears twice in any object (nlohmann would keep
// the last one silently; the reference implementation refuses such a file).
nlohmann::json parse_json_rejecting_duplicates(std::string_view text, const std::string& file) {
  std::vector<std::set<std::string>> keys_per_object;
  auto callback = [&](int depth, nlohmann::json::parse_event_t event, nlohmann::json& parsed) {
    using E = nlohmann::json::parse_event_t;
    if (event == E::object_start) keys_per_object.emplace_back();
    if (event == E::object_end) keys_per_object.pop_back();
    if (event == E::key) {
      const std::string& key = parsed.get_ref<const std::string&>();
      if (!keys_per_object.back().insert(key).second) {
        fail(where(file, depth == 1 ? key : ""), "header JSON has the key '{}' twice (duplicate {})", key,
             depth == 1 ? "tensor name" : "field");
      }
    }
    return true;
  };
  try {
    return nlohmann::json::parse(text.begin(), text.end(), callback);
  } catch (const nlohmann::json::parse_error& e) {
    fail(file, "header is not valid JSON (byte {} of the header): {}", e.byte, e.what());
  } catch (const nlohmann::json::exception& e) {
    // e.g. a number too large for a double ("1e999"): valid JSON grammar, unusable header.
    fail(file, "header JSON cannot be read: {}", e.what());
  }
}

uint64_t checked_numel_bytes(const std::vector<int64_t>& shape, size_t item_size, const std::string& at) {
  uint64_t n = item_size;
  for (int64_t d : shape) {
    if (__builtin_mul_overflow(n, static_cast<uint64_t>(d), &n)) fail(at, "shape overflows 64-bit byte count");
  }
  return n;
}

TensorInfo parse_tensor_entry(const std::string& name, const nlohmann::json& entry, uint64_t data_size,
                              const std::string& file) {
  const std::string at = where(file, name);
  if (!entry.is_object()) fail(at, "header entry must be an object with dtype, shape, data_offsets; got {}", entry.type_name());
  for (const auto& [key, _] : entry.items()) {
    if (key != "dtype" && key != "shape" && key != "data_offsets") {
      fail(at, "unknown field '{}' (expected dtype, shape, data_offsets)", key);
    }
  }
  TensorInfo t;
  t.name = name;

  auto dtype_it = entry.find("dtype");
  if (dtype_it == entry.end() || !dtype_it->is_string()) fail(at, "missing or non-string 'dtype'");
  auto dtype = dtype_from_name(dtype_it->get<std::string>());
  if (!dtype) {
    fail(at, "unknown dtype '{}' (expected one of F64 F32 F16 BF16 F8_E4M3 F8_E5M2 I64 I32 I16 I8 U64 U32 U16 U8 BOOL)",
         dtype_it->get<std::string>());
  }
  t.dtype = *dtype;

  auto shape_it = entry.find("shape");
  if (shape_it == entry.end() || !shape_it->is_array()) fail(at, "missing or non-array 'shape'");
  for (const auto& d : *shape_it) {
    if (!d.is_number_unsigned() || d.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX)) {
      fail(at, "shape {} has an entry that is not a non-negative integer", shape_it->dump());
    }
    t.shape.push_back(static_cast<int64_t>(d.get<uint64_t>()));
  }

  auto offsets_it = entry.find("data_offsets");
  if (offsets_it == entry.end() || !offsets_it->is_array() || offsets_it->size() != 2 ||
      !(*offsets_it)[0].is_number_unsigned() || !(*offsets_it)[1].is_number_unsigned()) {
    fail(at, "'data_offsets' must be [begin, end] with non-negative integers");
  }
  t.begin = (*offsets_it)[0].get<uint64_t>();
  t.end = (*offsets_it)[1].get<uint64_t>();
  if (t.begin > t.end) fail(at, "data_offsets [{}, {}] end before they begin", t.begin, t.end);
  if (t.end > data_size) {
    fail(at, "data_offsets [{}, {}] run past the data section of {} bytes (file truncated?)", t.begin, t.end, data_size);
  }
  uint64_t expected = checked_numel_bytes(t.shape, dtype_size(t.dtype), at);
  if (expected != t.nbytes()) {
    fail(at, "{} x shape {} needs {} bytes but data_offsets [{}, {}] span {}", dtype_name(t.dtype), shape_it->dump(),
         expected, t.begin, t.end, t.nbytes());
  }
  return t;
}

Metadata parse_metadata(const nlohmann::json& entry, const std::string& file) {
  const std::string at = file + ": __metadata__";
  if (!entry.is_object()) fail(at, "must be an object of string values; got {}", entry.type_name());
  Metadata m;
  for (const auto& [key, value] : entry.items()) {
    if (!value.is_string()) fail(at, "value of '{}' must be a string; got {}", key, value.type_name());
    m[key] = value.get<std::string>();
  }
  return m;
}

}  // namespace

std::string_view dtype_name(DType dtype) { return row(dtype).name; }
size_t dtype_size(DType dtype) { return row(dtype).size; }

std::optional<DType> dtype_from_name(std::string_view name) {
  for (const auto& r : kDTypes) {
    if (r.name == name) return r.dtype;
  }
  return std::nullopt;
}

const std::vector<DType>& all_dtypes() {
  static const std::vector<DType> dtypes = [] {
    std::vector<DType> v;
    for (const auto& r : kDTypes) v.push_back(r.dtype);
    return v;
  }();
  return dtypes;
}

int64_t TensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

Header parse_header(std::span<const uint8_t> head, uint64_t file_size, const std::string& file) {
  if (file_size < 8) fail(file, "file is {} bytes, too short for the 8-byte header length (not a safetensors file?)", file_size);
  if (head.size() < 8) fail(file, "internal: header bytes not provided");
  uint64_t header_len = 0;
  std::memcpy(&header_len, head.data(), 8);
  if (header_len > kMaxHeaderBytes) {
    fail(file, "header length {} exceeds the {} byte limit (not a safetensors file?)", header_len, kMaxHeaderBytes);
  }
  if (header_len > file_size - 8) {
    fail(file, "header length {} runs past the end of the {} byte file (truncated?)", header_len, file_size);
  }
  if (head.size() < 8 + header_len) fail(file, "internal: header bytes not provided");
  std::string_view text(reinterpret_cast<const char*>(head.data() + 8), header_len);
  if (text.empty() || text.front() != '{') fail(file, "header does not start with '{{' (not a safetensors file?)");

  nlohmann::json json = parse_json_rejecting_duplicates(text, file);
  if (!json.is_object()) fail(file, "header JSON must be an object; got {}", json.type_name());

  Header h;
  h.data_offset = 8 + header_len;
  const uint64_t data_size = file_size - h.data_offset;
  for (const auto& [name, entry] : json.items()) {
    if (name == "__metadata__") {
      h.metadata = parse_metadata(entry, file);
    } else {
      h.tensors.push_back(parse_tensor_entry(name, entry, data_size, file));
    }
  }

  // Tensors must tile the data section exactly: sorted by offset, each begins where the previous
  // ends, the last ends at the end of the file.
  std::sort(h.tensors.begin(), h.tensors.end(),
            [](const TensorInfo& a, const TensorInfo& b) { return std::tie(a.begin, a.end) < std::tie(b.begin, b.end); });
  uint64_t cursor = 0;
  const TensorInfo* previous = nullptr;
  for (const auto& t : h.tensors) {
    if (t.begin < cursor) {
      fail(where(file, t.name), "data_offsets [{}, {}] overlap tensor '{}' [{}, {}]", t.begin, t.end, previous->name,
           previous->begin, previous->end);
    }
    if (t.begin > cursor) fail(where(file, t.name), "{} unused bytes before this tensor's data (offset {})", t.begin - cursor, t.begin);
    cursor = t.end;
    previous = &t;
  }
  if (cursor != data_size) {
    fail(file, "data section is {} bytes but the tensors cover {} (trailing garbage or a broken header)", data_size, cursor);
  }
  return h;
}

// ------------------------------------------------------------------------------------ reading

File::File(const std::string& path) : path_(path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail(path, "cannot open: {}", system_error(errno));
  struct stat st{};
  if (::fstat(fd, &st) != 0) {
    int err = errno;
    ::close(fd);
    fail(path, "cannot stat: {}", system_error(err));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    fail(path, "not a regular file");
  }
  size_ = static_cast<uint64_t>(st.st_size);
  if (size_ < 8) {
    ::close(fd);
    fail(path, "file is {} bytes, too short for the 8-byte header length (not a safetensors file?)", size_);
  }
  // Copy-on-write private mapping: tensors may view it directly and even be modified in place
  // without ever changing the file.
  void* addr = ::mmap(nullptr, size_, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
  int err = errno;
  ::close(fd);
  if (addr == MAP_FAILED) fail(path, "cannot mmap {} bytes: {}", size_, system_error(err));
  const uint64_t size = size_;
  mapping_ = std::shared_ptr<void>(addr, [size](void* p) { ::munmap(p, size); });

  header_ = parse_header({static_cast<const uint8_t*>(addr), size_}, size_, path_);
  for (size_t i = 0; i < header_.tensors.size(); ++i) index_.emplace(header_.tensors[i].name, i);
}

File::~File() = default;
File::File(File&&) noexcept = default;
File& File::operator=(File&&) noexcept = default;

bool File::contains(std::string_view name) const { return index_.count(std::string(name)) > 0; }

const TensorInfo& File::info(std::string_view name) const {
  auto it = index_.find(std::string(name));
  if (it == index_.end()) {
    std::vector<std::string> names;
    for (const auto& t : header_.tensors) names.push_back(t.name);
    fail(where(path_, name), "no such tensor in this file ({} tensors){}", names.size(), did_you_mean(name, names));
  }
  return header_.tensors[it->second];
}

std::span<const std::byte> File::bytes(std::string_view name) const { return bytes(info(name)); }

std::span<const std::byte> File::bytes(const TensorInfo& t) const {
  const auto* base = static_cast<const std::byte*>(mapping_.get()) + header_.data_offset;
  return {base + t.begin, t.nbytes()};
}

// ------------------------------------------------------------------------------------ writing

Writer::Writer(std::string path, const std::vector<TensorSpec>& tensors, const Metadata& metadata)
    : path_(std::move(path)) {
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t offset = 0;
  std::set<std::string> names;
  for (const auto& spec : tensors) {
    if (spec.name == "__metadata__") fail(path_, "'__metadata__' cannot be a tensor name");
    if (!names.insert(spec.name).second) fail(where(path_, spec.name), "tensor name given twice");
    for (int64_t d : spec.shape) {
      if (d < 0) fail(where(path_, spec.name), "negative dimension in shape");
    }
    TensorInfo t{spec.name, spec.dtype, spec.shape, offset, 0};
    t.end = offset + checked_numel_bytes(spec.shape, dtype_size(spec.dtype), where(path_, spec.name));
    offset = t.end;
    header[t.name] = {{"dtype", dtype_name(t.dtype)}, {"shape", t.shape}, {"data_offsets", {t.begin, t.end}}};
    layout_.push_back(std::move(t));
  }
  std::string text = header.dump();
  // Pad with spaces so the data section starts 8-byte aligned, as the reference writer does.
  text.append((8 - text.size() % 8) % 8, ' ');

  temp_path_ = path_ + ".tmp-" + std::to_string(::getpid());
  fd_ = ::open(temp_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd_ < 0) fail(path_, "cannot create temporary file {}: {}", temp_path_, system_error(errno));
  uint64_t header_len = text.size();
  try {
    write_raw(&header_len, 8);
    write_raw(text.data(), text.size());
  } catch (...) {  // the destructor does not run for a constructor that throws: remove the temporary here
    ::close(fd_);
    fd_ = -1;
    ::unlink(temp_path_.c_str());
    throw;
  }
  while (current_ < layout_.size() && layout_[current_].nbytes() == 0) ++current_;
}

Writer::~Writer() {
  if (fd_ >= 0) ::close(fd_);
  if (!committed_ && !temp_path_.empty()) ::unlink(temp_path_.c_str());
}

void Writer::write_raw(const void* data, size_t nbytes) {
  const char* p = static_cast<const char*>(data);
  while (nbytes > 0) {
    ssize_t n = ::write(fd_, p, nbytes);
    if (n < 0) {
      if (errno == EINTR) continue;
      fail(path_, "write to {} failed: {}", temp_path_, system_error(errno));
    }
    p += n;
    nbytes -= static_cast<size_t>(n);
  }
}

void Writer::append(const void* data, size_t nbytes) {
  const char* p = static_cast<const char*>(data);
  while (nbytes > 0) {
    if (current_ >= layout_.size()) fail(path_, "more data appended than the declared tensors hold");
    const TensorInfo& t = layout_[current_];
    size_t take = std::min<uint64_t>(nbytes, t.nbytes() - written_in_current_);
    write_raw(p, take);
    p += take;
    nbytes -= take;
    written_in_current_ += take;
    if (written_in_current_ == t.nbytes()) {
      written_in_current_ = 0;
      ++current_;
      while (current_ < layout_.size() && layout_[current_].nbytes() == 0) ++current_;
    }
  }
}

void Writer::commit() {
  if (current_ < layout_.size()) {
    fail(where(path_, layout_[current_].name), "commit before all tensor data was appended ({} of {} bytes)",
         written_in_current_, layout_[current_].nbytes());
  }
  if (::fsync(fd_) != 0) fail(path_, "fsync of {} failed: {}", temp_path_, system_error(errno));
  if (::close(fd_) != 0) {
    fd_ = -1;
    fail(path_, "close of {} failed: {}", temp_path_, system_error(errno));
  }
  fd_ = -1;
  if (::rename(temp_path_.c_str(), path_.c_str()) != 0) {
    fail(path_, "cannot rename {} into place: {}", temp_path_, system_error(errno));
  }
  committed_ = true;
  // Make the rename itself durable.
  std::string dir = std::filesystem::path(path_).parent_path().string();
  int dir_fd = ::open(dir.empty() ? "." : dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir_fd >= 0) {
    ::fsync(dir_fd);
    ::close(dir_fd);
  }
}

}  // namespace sdt::safetensors
