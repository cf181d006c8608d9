// `sdt inspect FILE.safetensors`: what kohya's tools/show_metadata.py shows, plus the tensors.
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "launcher/commands.h"
#include "src/core/safetensors.h"

namespace sdt {
namespace {

std::string human_bytes(uint64_t bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double value = static_cast<double>(bytes);
  size_t unit = 0;
  while (value >= 1024 && unit + 1 < std::size(units)) {
    value /= 1024;
    ++unit;
  }
  return unit == 0 ? fmt::format("{} B", bytes) : fmt::format("{:.2f} {}", value, units[unit]);
}

}  // namespace

int run_inspect(const std::string& path) {
  safetensors::File file(path);
  std::map<safetensors::DType, uint64_t> bytes_per_dtype;
  uint64_t total_bytes = 0;
  int64_t total_elements = 0;
  for (const auto& t : file.tensors()) {
    std::string shape;
    for (size_t i = 0; i < t.shape.size(); ++i) shape += (i ? ", " : "") + std::to_string(t.shape[i]);
    fmt::print("{}\t{}\t[{}]\n", t.name, safetensors::dtype_name(t.dtype), shape);
    bytes_per_dtype[t.dtype] += t.nbytes();
    total_bytes += t.nbytes();
    total_elements += t.numel();
  }
  std::string by_dtype;
  for (const auto& [dtype, bytes] : bytes_per_dtype) {
    by_dtype += fmt::format("{}{} {}", by_dtype.empty() ? "" : ", ", safetensors::dtype_name(dtype), human_bytes(bytes));
  }
  fmt::print("\n{} tensors, {} elements, {} bytes ({}){}{}\n", file.tensors().size(), total_elements, total_bytes,
             human_bytes(total_bytes), by_dtype.empty() ? "" : ": ", by_dtype);
  if (file.metadata().empty()) {
    fmt::print("no metadata\n");
  } else {
    fmt::print("metadata:\n{}\n", nlohmann::ordered_json(file.metadata()).dump(4));
  }
  return 0;
}

}  // namespace sdt
