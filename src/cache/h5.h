// A thin layer over the HDF5 C API (serial libhdf5) for the caches: owned handles, files, groups,
// attributes, and row tables, chunked datasets that grow along their first dimension one batch of
// rows at a time and are read back row by row. Every failure is an sdt::Error naming the file and
// the object, with HDF5's own message. No LibTorch here.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <hdf5.h>

namespace sdt::h5 {

// An hid_t with its closing function (H5Fclose, H5Gclose, ...); closed when it goes away.
class Handle {
 public:
  using Closer = herr_t (*)(hid_t);
  Handle() = default;
  Handle(hid_t id, Closer close) : id_(id), close_(close) {}
  Handle(Handle&& other) noexcept : id_(other.id_), close_(other.close_) { other.id_ = H5I_INVALID_HID; }
  Handle& operator=(Handle&& other) noexcept;
  Handle(const Handle&) = delete;
  Handle& operator=(const Handle&) = delete;
  ~Handle() { reset(); }
  hid_t get() const { return id_; }
  explicit operator bool() const { return id_ >= 0; }
  void reset();
  hid_t release();  // gives up ownership without closing

 private:
  hid_t id_ = H5I_INVALID_HID;
  Closer close_ = nullptr;
};

// The element types the caches store. f16 and bf16 are IEEE half and bfloat16, defined as HDF5
// float types (size 2, their sign/exponent/mantissa fields), so h5dump prints their values.
enum class Element { u8, i64, f64, f32, f16, bf16, string };
std::string element_name(Element element);
size_t element_size(Element element);  // bytes per value in memory (string: a char*)

// A new file, replacing any file of that name. Written in HDF5 1.10's format: a dataset growing
// along one dimension indexes its chunks in an extensible array, so finding row i costs the same
// for the millionth row as for the first.
Handle create_file(const std::string& path);
Handle open_file_read_only(const std::string& path);
// Closes a file created by create_file, checking the status: HDF5 writes what it still holds here.
// Fails while any dataset or group of the file is still open.
void close_file(Handle& file);

Handle create_group(hid_t parent, const std::string& name);
Handle open_group(hid_t parent, const std::string& name);
bool has_member(hid_t group, const std::string& name);
std::vector<std::string> member_names(hid_t group);  // in name order

void write_attribute(hid_t object, const std::string& name, const std::string& value);
void write_attribute(hid_t object, const std::string& name, int64_t value);
std::optional<std::string> read_string_attribute(hid_t object, const std::string& name);
std::optional<int64_t> read_int_attribute(hid_t object, const std::string& name);

// "<file>:<object path>", for messages.
std::string describe(hid_t object);

// A dataset of rows: shape (rows, row_shape...), chunked along the rows, growing as rows are
// appended. Numeric rows are read and written in their stored type, no conversion.
class RowTable {
 public:
  // rows_per_chunk: 1 for tables read one row at a time (latents), more for small rows read whole.
  // gzip_level > 0 compresses chunks (with the byte shuffle filter first).
  static RowTable create(hid_t group, const std::string& name, Element element, std::vector<int64_t> row_shape,
                         int64_t rows_per_chunk, int gzip_level = 0);
  static RowTable open(hid_t group, const std::string& name);

  void append(const void* rows, int64_t count);
  void append_strings(const std::vector<std::string>& rows);
  void read(int64_t first, int64_t count, void* out) const;
  std::vector<std::string> read_strings() const;  // the whole table

  int64_t rows() const { return rows_; }
  Element element() const { return element_; }
  const std::vector<int64_t>& row_shape() const { return row_shape_; }
  int64_t row_values() const;  // values per row
  size_t row_bytes() const { return static_cast<size_t>(row_values()) * element_size(element_); }
  hid_t id() const { return dataset_.get(); }

 private:
  RowTable(Handle dataset, Element element, std::vector<int64_t> row_shape, int64_t rows, bool raw_row_chunks);
  Handle dataset_;
  Element element_ = Element::u8;
  std::vector<int64_t> row_shape_;
  int64_t rows_ = 0;
  // Each chunk is one row stored as is (no filter): a row is read as its chunk's bytes
  // (H5Dread_chunk), about twice as fast as a selection through H5Dread.
  bool raw_row_chunks_ = false;
};

}  // namespace sdt::h5
