#include "src/cache/npz.h"

#include <zip.h>

#include <cstring>
#include <filesystem>
#include <regex>

#include <fmt/format.h>

#include "src/core/error.h"

namespace sdt {
namespace {

namespace fs = std::filesystem;

constexpr char kMagic[] = "\x93NUMPY";
constexpr size_t kMagicSize = 6;

struct NpyType {
  const char* descr;
  at::ScalarType type;
};
// '|' marks one-byte types (no byte order), '<' little-endian; NumPy writes '=' for neither.
constexpr NpyType kNpyTypes[] = {
    {"b1", at::kBool}, {"u1", at::kByte}, {"i1", at::kChar}, {"i2", at::kShort}, {"i4", at::kInt},
    {"i8", at::kLong}, {"f2", at::kHalf}, {"f4", at::kFloat}, {"f8", at::kDouble},
};

// The header is a Python dict literal: {'descr': '<f4', 'fortran_order': False, 'shape': (4, 8, 8), }
// (static patterns: a benchmark reads ten thousand of these).
const std::regex kDescrField(R"('descr'\s*:\s*'([^']*)')");
const std::regex kFortranField(R"('fortran_order'\s*:\s*(True|False))");
const std::regex kShapeField(R"('shape'\s*:\s*\(([^)]*)\))");
const std::regex kNumber(R"(\d+)");

std::string header_field(const std::string& where, const std::string& header, const std::regex& field, const char* name) {
  std::smatch m;
  if (!std::regex_search(header, m, field)) fail(where, "the .npy header has no '{}': {}", name, header);
  return m[1];
}

std::string zip_message(zip_t* archive) { return zip_strerror(archive); }

}  // namespace

at::Tensor parse_npy(const std::string& where, const uint8_t* data, size_t size) {
  if (size < kMagicSize + 4 || std::memcmp(data, kMagic, kMagicSize) != 0) fail(where, "not a .npy array (no \\x93NUMPY magic)");
  const int major = data[6];
  size_t header_size = 0, offset = 0;
  if (major == 1) {
    header_size = data[8] | (data[9] << 8);
    offset = 10;
  } else if (major == 2 || major == 3) {
    header_size = data[8] | (data[9] << 8) | (data[10] << 16) | (static_cast<size_t>(data[11]) << 24);
    offset = 12;
  } else {
    fail(where, ".npy format version {} is not one of 1, 2, 3", major);
  }
  if (offset + header_size > size) fail(where, "the .npy header runs past the end of the array file");
  const std::string header(reinterpret_cast<const char*>(data + offset), header_size);
  const std::string descr = header_field(where, header, kDescrField, "descr");
  if (header_field(where, header, kFortranField, "fortran_order") == "True") fail(where, "a Fortran-order array; sdt reads C-order arrays");
  std::vector<int64_t> shape;
  const std::string dims = header_field(where, header, kShapeField, "shape");
  for (auto it = std::sregex_iterator(dims.begin(), dims.end(), kNumber); it != std::sregex_iterator(); ++it) {
    shape.push_back(std::stoll(it->str()));
  }
  if (descr.size() < 3 || descr[0] == '>') fail(where, "array type '{}': sdt reads little-endian numeric arrays", descr);
  const NpyType* type = nullptr;
  for (const auto& t : kNpyTypes) {
    if (descr.substr(1) == t.descr) type = &t;
  }
  if (!type) fail(where, "array type '{}' is not a bool, integer or float type", descr);
  at::Tensor tensor = at::empty(shape, at::TensorOptions().dtype(type->type));
  const size_t bytes = static_cast<size_t>(tensor.numel()) * tensor.element_size();
  const size_t begin = offset + header_size;
  if (begin + bytes != size) fail(where, "{} bytes of data for shape ({}) of '{}' ({} expected)", size - begin, fmt::join(shape, ", "), descr, bytes);
  std::memcpy(tensor.data_ptr(), data + begin, bytes);
  return tensor;
}

std::string npy_bytes(const at::Tensor& tensor) {
  const at::Tensor t = tensor.to(at::kCPU).contiguous();
  const NpyType* type = nullptr;
  for (const auto& candidate : kNpyTypes) {
    if (candidate.type == t.scalar_type()) type = &candidate;
  }
  if (!type) fail("npy", "tensors of type {} have no .npy type here", c10::toString(t.scalar_type()));
  const char order = t.element_size() == 1 ? '|' : '<';
  std::string shape;
  for (int64_t d : t.sizes()) shape += fmt::format("{}, ", d);
  if (t.dim() > 1) shape.resize(shape.size() - 2);  // (4, 8) but (3,) and ()
  if (t.dim() == 1) shape.resize(shape.size() - 1);
  std::string header = fmt::format("{{'descr': '{}{}', 'fortran_order': False, 'shape': ({}), }}", order, type->descr, shape);
  const size_t unpadded = kMagicSize + 4 + header.size() + 1;
  header.append((64 - unpadded % 64) % 64, ' ');
  header += '\n';
  std::string out(kMagic, kMagicSize);
  out += '\x01';
  out += '\x00';
  out += static_cast<char>(header.size() & 0xff);
  out += static_cast<char>(header.size() >> 8);
  out += header;
  out.append(static_cast<const char*>(t.data_ptr()), static_cast<size_t>(t.numel()) * t.element_size());
  return out;
}

NamedTensors read_npz(const std::string& path) {
  int error = 0;
  zip_t* archive = zip_open(path.c_str(), ZIP_RDONLY, &error);
  if (!archive) {
    zip_error_t e;
    zip_error_init_with_code(&e, error);
    const std::string message = zip_error_strerror(&e);
    zip_error_fini(&e);
    fail(path, "cannot open as an .npz (zip) archive: {}", message);
  }
  NamedTensors arrays;
  try {
    const zip_int64_t entries = zip_get_num_entries(archive, 0);
    for (zip_int64_t i = 0; i < entries; ++i) {
      zip_stat_t stat;
      if (zip_stat_index(archive, static_cast<zip_uint64_t>(i), 0, &stat) != 0) fail(path, "entry {}: {}", i, zip_message(archive));
      std::string name = stat.name;
      if (!name.ends_with(".npy")) fail(path, "entry '{}' is not a .npy array", name);
      std::vector<uint8_t> bytes(stat.size);
      zip_file_t* file = zip_fopen_index(archive, static_cast<zip_uint64_t>(i), 0);
      if (!file) fail(path, "entry '{}': {}", name, zip_message(archive));
      const zip_int64_t got = zip_fread(file, bytes.data(), bytes.size());
      zip_fclose(file);
      if (got != static_cast<zip_int64_t>(bytes.size())) fail(path, "entry '{}': read {} of {} bytes", name, got, bytes.size());
      name.resize(name.size() - 4);
      arrays.emplace_back(name, parse_npy(path + ":" + name, bytes.data(), bytes.size()));
    }
  } catch (...) {
    zip_discard(archive);
    throw;
  }
  zip_discard(archive);
  return arrays;
}

void write_npz(const std::string& path, const NamedTensors& arrays) {
  const std::string temporary = path + ".tmp";
  int error = 0;
  zip_t* archive = zip_open(temporary.c_str(), ZIP_CREATE | ZIP_TRUNCATE, &error);
  if (!archive) fail(temporary, "cannot create a zip archive (libzip error {})", error);
  std::vector<std::string> files;  // libzip reads them when the archive is closed
  files.reserve(arrays.size());
  for (const auto& [name, tensor] : arrays) {
    files.push_back(npy_bytes(tensor));
    zip_source_t* source = zip_source_buffer(archive, files.back().data(), files.back().size(), 0);
    const zip_int64_t index = source ? zip_file_add(archive, (name + ".npy").c_str(), source, ZIP_FL_ENC_UTF_8) : -1;
    if (index < 0) {
      if (source) zip_source_free(source);
      const std::string message = zip_message(archive);
      zip_discard(archive);
      fail(temporary, "adding '{}': {}", name, message);
    }
    zip_set_file_compression(archive, static_cast<zip_uint64_t>(index), ZIP_CM_STORE, 0);
  }
  if (zip_close(archive) != 0) {
    const std::string message = zip_message(archive);
    zip_discard(archive);
    fail(temporary, "writing the archive: {}", message);
  }
  fs::rename(temporary, path);
}

std::string kohya_latents_npz_path(const std::string& image_path, Resolution original_size, const std::string& suffix) {
  const fs::path stem = fs::path(image_path).replace_extension();
  const std::string legacy = stem.string() + ".npz";
  if (fs::exists(legacy)) return legacy;
  return fmt::format("{}_{:04d}x{:04d}{}.npz", stem.string(), original_size.width, original_size.height, suffix);
}

KohyaLatents read_kohya_latents_npz(const std::string& path) {
  const NamedTensors arrays = read_npz(path);
  auto find = [&](const std::string& key) -> at::Tensor {
    for (const auto& [name, tensor] : arrays) {
      if (name == key) return tensor;
    }
    return {};
  };
  KohyaLatents out;
  out.latents = find("latents");
  if (!out.latents.defined()) fail(path, "no 'latents' array: not a kohya latent cache (or a multi-resolution one)");
  out.latents = out.latents.to(at::kFloat);
  if (at::Tensor flipped = find("latents_flipped"); flipped.defined()) out.flipped = flipped.to(at::kFloat);
  if (at::Tensor mask = find("alpha_mask"); mask.defined()) out.alpha_mask = mask.to(at::kFloat);
  const at::Tensor size = find("original_size");
  const at::Tensor crop = find("crop_ltrb");
  if (!size.defined() || size.numel() != 2) fail(path, "expected 'original_size' of 2 values [W, H]");
  if (!crop.defined() || crop.numel() != 4) fail(path, "expected 'crop_ltrb' of 4 values [left, top, right, bottom]");
  const at::Tensor s = size.to(at::kLong), c = crop.to(at::kDouble);
  out.original_size = {s[0].item<int64_t>(), s[1].item<int64_t>()};
  out.crop_ltrb = {c[0].item<double>(), c[1].item<double>(), c[2].item<double>(), c[3].item<double>()};
  return out;
}

}  // namespace sdt
