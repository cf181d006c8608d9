#include "src/cache/h5.h"

#include "src/core/error.h"

namespace sdt::h5 {
namespace {

// HDF5 prints its error stack to stderr by default; we turn each failure into one sdt::Error
// instead, carrying the innermost HDF5 message. The thread-safe library keeps that setting per
// thread, so each thread that calls HDF5 (a prefetch thread) turns it off for itself.
void silence_hdf5() {
  thread_local const bool silenced = [] {
    H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
    return true;
  }();
  (void)silenced;
}

std::string hdf5_message() {
  std::string message;
  H5Ewalk2(
      H5E_DEFAULT, H5E_WALK_DOWNWARD,
      [](unsigned, const H5E_error2_t* error, void* out) -> herr_t {
        if (error->desc && *error->desc) *static_cast<std::string*>(out) = error->desc;
        return 0;
      },
      &message);
  H5Eclear2(H5E_DEFAULT);
  return message.empty() ? "HDF5 call failed" : message;
}

// Where a failure happened, put into words only when one does: naming an object walks the file's
// groups (H5Iget_name), which would cost more than reading a row.
struct Where {
  Where(std::string path) : text(std::move(path)) {}  // implicit: a file's path says where
  Where(hid_t object, std::string suffix) : object(object), text(std::move(suffix)) {}
  std::string render() const { return object >= 0 ? describe(object) + text : text; }
  hid_t object = H5I_INVALID_HID;  // named by describe(), followed by `text`; or just `text`
  std::string text;
};

[[noreturn]] void fail_hdf5(const Where& where, const std::string& doing) {
  fail(where.render(), "{}: {}", doing, hdf5_message());
}

hid_t checked(hid_t id, const Where& where, const std::string& doing) {
  if (id < 0) fail_hdf5(where, doing);
  return id;
}

void checked_status(herr_t status, const Where& where, const std::string& doing) {
  if (status < 0) fail_hdf5(where, doing);
}

// A 2-byte float type: sign bit 15, `exponent_bits` above `mantissa_bits`.
hid_t make_half_type(size_t exponent_bits, size_t mantissa_bits, size_t exponent_bias) {
  hid_t type = H5Tcopy(H5T_IEEE_F32LE);
  H5Tset_fields(type, 15, mantissa_bits, exponent_bits, 0, mantissa_bits);
  H5Tset_size(type, 2);
  H5Tset_ebias(type, exponent_bias);
  return type;
}

// The type an element has both in the file and in memory (little-endian x86 / ARM hosts). These
// live for the whole process.
hid_t element_type(Element element) {
  static const hid_t f16 = make_half_type(5, 10, 15);
  static const hid_t bf16 = make_half_type(8, 7, 127);
  static const hid_t utf8_string = [] {
    hid_t type = H5Tcopy(H5T_C_S1);
    H5Tset_size(type, H5T_VARIABLE);
    H5Tset_cset(type, H5T_CSET_UTF8);
    return type;
  }();
  switch (element) {
    case Element::u8: return H5T_STD_U8LE;
    case Element::i64: return H5T_STD_I64LE;
    case Element::f64: return H5T_IEEE_F64LE;
    case Element::f32: return H5T_IEEE_F32LE;
    case Element::f16: return f16;
    case Element::bf16: return bf16;
    case Element::string: return utf8_string;
  }
  return H5I_INVALID_HID;
}

Element element_of(hid_t type, const Where& where) {
  const H5T_class_t type_class = H5Tget_class(type);
  const size_t size = H5Tget_size(type);
  if (type_class == H5T_STRING && H5Tis_variable_str(type) > 0) return Element::string;
  if (type_class == H5T_INTEGER && size == 1 && H5Tget_sign(type) == H5T_SGN_NONE) return Element::u8;
  if (type_class == H5T_INTEGER && size == 8 && H5Tget_sign(type) == H5T_SGN_2) return Element::i64;
  if (type_class == H5T_FLOAT && size == 8) return Element::f64;
  if (type_class == H5T_FLOAT && size == 4) return Element::f32;
  if (type_class == H5T_FLOAT && size == 2) return H5Tget_ebias(type) == 127 ? Element::bf16 : Element::f16;
  fail(where.render(), "stored in a type the caches do not use (class {}, {} bytes)", static_cast<int>(type_class), size);
}

Handle dataspace(const std::vector<hsize_t>& dims, const std::vector<hsize_t>& max_dims = {}) {
  return Handle(H5Screate_simple(static_cast<int>(dims.size()), dims.data(), max_dims.empty() ? nullptr : max_dims.data()),
                H5Sclose);
}

// The file space of `dataset` with rows [first, first + count) selected, and a memory space for them.
std::pair<Handle, Handle> row_spaces(hid_t dataset, const std::vector<int64_t>& row_shape, int64_t first, int64_t count,
                                     const Where& where) {
  Handle file_space(checked(H5Dget_space(dataset), where, "getting the dataspace"), H5Sclose);
  std::vector<hsize_t> start{static_cast<hsize_t>(first)}, counts{static_cast<hsize_t>(count)};
  for (int64_t d : row_shape) {
    start.push_back(0);
    counts.push_back(static_cast<hsize_t>(d));
  }
  checked_status(H5Sselect_hyperslab(file_space.get(), H5S_SELECT_SET, start.data(), nullptr, counts.data(), nullptr), where,
                 "selecting rows");
  return {std::move(file_space), dataspace(counts)};
}

}  // namespace

Handle& Handle::operator=(Handle&& other) noexcept {
  if (this != &other) {
    reset();
    id_ = other.id_;
    close_ = other.close_;
    other.id_ = H5I_INVALID_HID;
  }
  return *this;
}

hid_t Handle::release() {
  const hid_t id = id_;
  id_ = H5I_INVALID_HID;
  return id;
}

void Handle::reset() {
  if (id_ >= 0 && close_) close_(id_);
  id_ = H5I_INVALID_HID;
}

std::string element_name(Element element) {
  switch (element) {
    case Element::u8: return "uint8";
    case Element::i64: return "int64";
    case Element::f64: return "float64";
    case Element::f32: return "float32";
    case Element::f16: return "float16";
    case Element::bf16: return "bfloat16";
    case Element::string: return "string";
  }
  return "?";
}

size_t element_size(Element element) {
  switch (element) {
    case Element::u8: return 1;
    case Element::i64: case Element::f64: return 8;
    case Element::f32: return 4;
    case Element::f16: case Element::bf16: return 2;
    case Element::string: return sizeof(char*);
  }
  return 0;
}

std::string describe(hid_t object) {
  char file[4096] = "?", name[4096] = "";
  H5Fget_name(object, file, sizeof(file));
  H5Iget_name(object, name, sizeof(name));
  return std::string(file) + (name[0] && std::string(name) != "/" ? std::string(":") + name : "");
}

namespace {

Handle file_access(const std::string& path) {
  Handle fapl(checked(H5Pcreate(H5P_FILE_ACCESS), path, "creating file access properties"), H5Pclose);
  checked_status(H5Pset_libver_bounds(fapl.get(), H5F_LIBVER_V110, H5F_LIBVER_V110), path, "choosing the file format");
  // Cache files are written once and never changed; POSIX locks only get in the way on shared
  // file systems (Lustre, NFS) where they may be unavailable.
  checked_status(H5Pset_file_locking(fapl.get(), false, true), path, "disabling file locking");
  return fapl;
}

}  // namespace

Handle create_file(const std::string& path) {
  silence_hdf5();
  Handle fapl = file_access(path);
  // Closing fails while an object of the file is open, rather than silently leaving it open.
  checked_status(H5Pset_fclose_degree(fapl.get(), H5F_CLOSE_SEMI), path, "setting the close degree");
  return Handle(checked(H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, fapl.get()), path, "creating the file"), H5Fclose);
}

Handle open_file_read_only(const std::string& path) {
  silence_hdf5();
  Handle fapl = file_access(path);
  return Handle(checked(H5Fopen(path.c_str(), H5F_ACC_RDONLY, fapl.get()), path, "opening the file"), H5Fclose);
}

void close_file(Handle& file) {
  const Where where(describe(file.get()));  // named before: the file is gone once closed
  checked_status(H5Fclose(file.release()), where, "closing");
}

Handle create_group(hid_t parent, const std::string& name) {
  return Handle(checked(H5Gcreate2(parent, name.c_str(), H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), Where{parent, ""},
                        "creating group " + name),
                H5Gclose);
}

Handle open_group(hid_t parent, const std::string& name) {
  return Handle(checked(H5Gopen2(parent, name.c_str(), H5P_DEFAULT), Where{parent, ""}, "opening group " + name), H5Gclose);
}

bool has_member(hid_t group, const std::string& name) { return H5Lexists(group, name.c_str(), H5P_DEFAULT) > 0; }

std::vector<std::string> member_names(hid_t group) {
  std::vector<std::string> names;
  checked_status(H5Literate(
                     group, H5_INDEX_NAME, H5_ITER_INC, nullptr,
                     [](hid_t, const char* name, const H5L_info_t*, void* out) -> herr_t {
                       static_cast<std::vector<std::string>*>(out)->push_back(name);
                       return 0;
                     },
                     &names),
                 Where{group, ""}, "listing members");
  return names;
}

void write_attribute(hid_t object, const std::string& name, const std::string& value) {
  const Where where{object, ""};
  Handle space(H5Screate(H5S_SCALAR), H5Sclose);
  const hid_t type = element_type(Element::string);
  Handle attribute(checked(H5Acreate2(object, name.c_str(), type, space.get(), H5P_DEFAULT, H5P_DEFAULT), where,
                           "creating attribute " + name),
                   H5Aclose);
  const char* text = value.c_str();
  checked_status(H5Awrite(attribute.get(), type, &text), where, "writing attribute " + name);
}

void write_attribute(hid_t object, const std::string& name, int64_t value) {
  const Where where{object, ""};
  Handle space(H5Screate(H5S_SCALAR), H5Sclose);
  Handle attribute(checked(H5Acreate2(object, name.c_str(), H5T_STD_I64LE, space.get(), H5P_DEFAULT, H5P_DEFAULT), where,
                           "creating attribute " + name),
                   H5Aclose);
  checked_status(H5Awrite(attribute.get(), H5T_NATIVE_INT64, &value), where, "writing attribute " + name);
}

std::optional<std::string> read_string_attribute(hid_t object, const std::string& name) {
  if (H5Aexists(object, name.c_str()) <= 0) return std::nullopt;
  const Where where{object, ""};
  Handle attribute(checked(H5Aopen(object, name.c_str(), H5P_DEFAULT), where, "opening attribute " + name), H5Aclose);
  Handle stored(H5Aget_type(attribute.get()), H5Tclose);
  if (H5Tget_class(stored.get()) != H5T_STRING || H5Tis_variable_str(stored.get()) <= 0) {
    fail(where.render(), "attribute {}: expected a variable-length string", name);
  }
  char* text = nullptr;
  checked_status(H5Aread(attribute.get(), element_type(Element::string), &text), where, "reading attribute " + name);
  std::string value = text ? text : "";
  H5free_memory(text);
  return value;
}

std::optional<int64_t> read_int_attribute(hid_t object, const std::string& name) {
  if (H5Aexists(object, name.c_str()) <= 0) return std::nullopt;
  const Where where{object, ""};
  Handle attribute(checked(H5Aopen(object, name.c_str(), H5P_DEFAULT), where, "opening attribute " + name), H5Aclose);
  Handle stored(H5Aget_type(attribute.get()), H5Tclose);
  if (H5Tget_class(stored.get()) != H5T_INTEGER) fail(where.render(), "attribute {}: expected an integer", name);
  int64_t value = 0;
  checked_status(H5Aread(attribute.get(), H5T_NATIVE_INT64, &value), where, "reading attribute " + name);
  return value;
}

// ---------------------------------------------------------------- row tables

RowTable::RowTable(Handle dataset, Element element, std::vector<int64_t> row_shape, int64_t rows, bool raw_row_chunks)
    : dataset_(std::move(dataset)), element_(element), row_shape_(std::move(row_shape)), rows_(rows), raw_row_chunks_(raw_row_chunks) {}

int64_t RowTable::row_values() const {
  int64_t n = 1;
  for (int64_t d : row_shape_) n *= d;
  return n;
}

RowTable RowTable::create(hid_t group, const std::string& name, Element element, std::vector<int64_t> row_shape,
                          int64_t rows_per_chunk, int gzip_level) {
  const Where where{group, "/" + name};
  std::vector<hsize_t> dims{0}, max_dims{H5S_UNLIMITED}, chunk{static_cast<hsize_t>(rows_per_chunk)};
  for (int64_t d : row_shape) {
    dims.push_back(static_cast<hsize_t>(d));
    max_dims.push_back(static_cast<hsize_t>(d));
    chunk.push_back(static_cast<hsize_t>(d));
  }
  Handle space = dataspace(dims, max_dims);
  Handle dcpl(checked(H5Pcreate(H5P_DATASET_CREATE), where, "creating dataset properties"), H5Pclose);
  checked_status(H5Pset_chunk(dcpl.get(), static_cast<int>(chunk.size()), chunk.data()), where, "setting the chunk shape");
  // Every row is written before it is read: no fill values to write first (HDF5 needs them for strings).
  if (element != Element::string) checked_status(H5Pset_fill_time(dcpl.get(), H5D_FILL_TIME_NEVER), where, "turning off fill values");
  if (gzip_level > 0) {
    checked_status(H5Pset_shuffle(dcpl.get()), where, "adding the shuffle filter");
    checked_status(H5Pset_deflate(dcpl.get(), static_cast<unsigned>(gzip_level)), where, "adding the gzip filter");
  }
  Handle dataset(checked(H5Dcreate2(group, name.c_str(), element_type(element), space.get(), H5P_DEFAULT, dcpl.get(), H5P_DEFAULT),
                         where, "creating the dataset"),
                 H5Dclose);
  const bool raw_row_chunks = rows_per_chunk == 1 && gzip_level == 0 && element != Element::string;
  return RowTable(std::move(dataset), element, std::move(row_shape), 0, raw_row_chunks);
}

RowTable RowTable::open(hid_t group, const std::string& name) {
  const Where where{group, "/" + name};
  Handle dataset(checked(H5Dopen2(group, name.c_str(), H5P_DEFAULT), where, "opening the dataset"), H5Dclose);
  Handle type(checked(H5Dget_type(dataset.get()), where, "reading the type"), H5Tclose);
  const Element element = element_of(type.get(), where);
  Handle space(checked(H5Dget_space(dataset.get()), where, "reading the shape"), H5Sclose);
  const int rank = H5Sget_simple_extent_ndims(space.get());
  if (rank < 1) fail(where.render(), "expected a table of rows (at least one dimension)");
  std::vector<hsize_t> dims(static_cast<size_t>(rank));
  H5Sget_simple_extent_dims(space.get(), dims.data(), nullptr);
  std::vector<int64_t> row_shape(dims.begin() + 1, dims.end());
  Handle dcpl(checked(H5Dget_create_plist(dataset.get()), where, "reading the creation properties"), H5Pclose);
  std::vector<hsize_t> chunk(static_cast<size_t>(rank), 0);
  const bool raw_row_chunks = element != Element::string && H5Pget_layout(dcpl.get()) == H5D_CHUNKED &&
                              H5Pget_chunk(dcpl.get(), rank, chunk.data()) == rank && chunk[0] == 1 &&
                              H5Pget_nfilters(dcpl.get()) == 0;
  return RowTable(std::move(dataset), element, std::move(row_shape), static_cast<int64_t>(dims[0]), raw_row_chunks);
}

void RowTable::append(const void* rows, int64_t count) {
  if (count == 0) return;
  const Where where{dataset_.get(), ""};
  std::vector<hsize_t> dims{static_cast<hsize_t>(rows_ + count)};
  for (int64_t d : row_shape_) dims.push_back(static_cast<hsize_t>(d));
  checked_status(H5Dset_extent(dataset_.get(), dims.data()), where, "growing the table");
  auto [file_space, memory_space] = row_spaces(dataset_.get(), row_shape_, rows_, count, where);
  checked_status(H5Dwrite(dataset_.get(), element_type(element_), memory_space.get(), file_space.get(), H5P_DEFAULT, rows), where,
                 "writing rows");
  rows_ += count;
}

void RowTable::append_strings(const std::vector<std::string>& rows) {
  if (element_ != Element::string) fail(describe(dataset_.get()), "not a table of strings");
  std::vector<const char*> pointers;
  for (const auto& s : rows) pointers.push_back(s.c_str());
  append(pointers.data(), static_cast<int64_t>(rows.size()));
}

void RowTable::read(int64_t first, int64_t count, void* out) const {
  const Where where{dataset_.get(), ""};
  if (first < 0 || count < 0 || first + count > rows_) fail(where.render(), "rows {}..{} asked of a table of {}", first, first + count, rows_);
  if (count == 0) return;
  silence_hdf5();
  if (raw_row_chunks_) {
    std::vector<hsize_t> offset(row_shape_.size() + 1, 0);
    for (int64_t r = 0; r < count; ++r) {
      offset[0] = static_cast<hsize_t>(first + r);
      uint32_t filters = 0;
      checked_status(H5Dread_chunk(dataset_.get(), H5P_DEFAULT, offset.data(), &filters, static_cast<char*>(out) + r * row_bytes()),
                     where, "reading rows");
    }
    return;
  }
  auto [file_space, memory_space] = row_spaces(dataset_.get(), row_shape_, first, count, where);
  checked_status(H5Dread(dataset_.get(), element_type(element_), memory_space.get(), file_space.get(), H5P_DEFAULT, out), where,
                 "reading rows");
}

std::vector<std::string> RowTable::read_strings() const {
  const Where where{dataset_.get(), ""};
  if (element_ != Element::string) fail(where.render(), "not a table of strings");
  std::vector<char*> pointers(static_cast<size_t>(rows_), nullptr);
  read(0, rows_, pointers.data());
  std::vector<std::string> strings;
  strings.reserve(pointers.size());
  for (char* p : pointers) strings.emplace_back(p ? p : "");
  Handle space = dataspace({static_cast<hsize_t>(rows_)});
  H5Dvlen_reclaim(element_type(Element::string), space.get(), H5P_DEFAULT, pointers.data());
  return strings;
}

}  // namespace sdt::h5
