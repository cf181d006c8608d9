// safetensors files: a strict, memory-mapped reader with lazy per-tensor access, and a streaming
// writer that never leaves a half-written file under its final name.
//
// Format (https://github.com/huggingface/safetensors): 8 bytes little-endian header length N,
// N bytes of JSON {"name": {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__":
// {str: str}}, then the data section; offsets are relative to the data section, tensors are
// packed without gaps and cover it exactly.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace sdt::safetensors {

enum class DType : uint8_t { F64, F32, F16, BF16, F8_E4M3, F8_E5M2, I64, I32, I16, I8, U64, U32, U16, U8, BOOL };

std::string_view dtype_name(DType dtype);
size_t dtype_size(DType dtype);
std::optional<DType> dtype_from_name(std::string_view name);
const std::vector<DType>& all_dtypes();

using Metadata = std::map<std::string, std::string>;

struct TensorInfo {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  uint64_t begin = 0;  // byte offsets into the data section
  uint64_t end = 0;
  uint64_t nbytes() const { return end - begin; }
  int64_t numel() const;
};

struct Header {
  std::vector<TensorInfo> tensors;  // sorted by offset (file order)
  Metadata metadata;
  uint64_t data_offset = 0;  // 8 + header length: where the data section starts in the file
};

// Largest header we accept, as the reference implementation does (100 MB).
inline constexpr uint64_t kMaxHeaderBytes = 100'000'000;

// Validates everything about a file's layout without touching tensor data: `file_head` holds at
// least the first 8 + N bytes, `file_size` is the size of the whole file. Throws sdt::Error naming
// `file_name`, the tensor and the problem.
Header parse_header(std::span<const uint8_t> file_head, uint64_t file_size, const std::string& file_name);

// A read-only view of a safetensors file. The file is memory-mapped: opening reads only the
// header; a tensor's pages are read from disk when its bytes are first touched.
class File {
 public:
  explicit File(const std::string& path);
  ~File();
  File(File&&) noexcept;
  File& operator=(File&&) noexcept;

  const std::string& path() const { return path_; }
  const std::vector<TensorInfo>& tensors() const { return header_.tensors; }
  const Metadata& metadata() const { return header_.metadata; }
  uint64_t file_size() const { return size_; }

  bool contains(std::string_view name) const;
  // Throws sdt::Error naming the file and the missing tensor (with the nearest existing name).
  const TensorInfo& info(std::string_view name) const;
  std::span<const std::byte> bytes(std::string_view name) const;
  std::span<const std::byte> bytes(const TensorInfo& info) const;

  // The mapping outlives the File for as long as someone holds this (zero-copy tensors do).
  // Pages are mapped copy-on-write: writing into them never changes the file.
  std::shared_ptr<void> mapping() const { return mapping_; }

 private:
  std::string path_;
  uint64_t size_ = 0;
  std::shared_ptr<void> mapping_;
  Header header_;
  std::unordered_map<std::string, size_t> index_;
};

// Streaming writer. Declare every tensor up front (the header precedes the data), then append
// each tensor's bytes in declaration order, in as many pieces as convenient, then commit().
// Data goes to "<path>.tmp-<pid>" in the same folder; commit() checks that every tensor got
// exactly its bytes, fsyncs, and renames onto `path`. Destroying an uncommitted writer removes the
// temporary file, so a crash or an error never leaves a partial file under the final name.
struct TensorSpec {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
};

class Writer {
 public:
  Writer(std::string path, const std::vector<TensorSpec>& tensors, const Metadata& metadata);
  ~Writer();
  Writer(const Writer&) = delete;
  Writer& operator=(const Writer&) = delete;

  void append(const void* data, size_t nbytes);
  void commit();

 private:
  void write_raw(const void* data, size_t nbytes);

  std::string path_;
  std::string temp_path_;
  int fd_ = -1;
  std::vector<TensorInfo> layout_;
  size_t current_ = 0;        // tensor being appended
  uint64_t written_in_current_ = 0;
  bool committed_ = false;
};

}  // namespace sdt::safetensors
