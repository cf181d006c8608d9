#include "src/core/tensor_io.h"

#include <algorithm>

#include "src/core/error.h"

namespace sdt {

using safetensors::DType;

at::ScalarType to_scalar_type(DType dtype) {
  switch (dtype) {
    case DType::F64: return at::kDouble;
    case DType::F32: return at::kFloat;
    case DType::F16: return at::kHalf;
    case DType::BF16: return at::kBFloat16;
    case DType::F8_E4M3: return at::kFloat8_e4m3fn;
    case DType::F8_E5M2: return at::kFloat8_e5m2;
    case DType::I64: return at::kLong;
    case DType::I32: return at::kInt;
    case DType::I16: return at::kShort;
    case DType::I8: return at::kChar;
    case DType::U64: return at::kUInt64;
    case DType::U32: return at::kUInt32;
    case DType::U16: return at::kUInt16;
    case DType::U8: return at::kByte;
    case DType::BOOL: return at::kBool;
  }
  fail("", "unhandled safetensors dtype");
}

DType to_safetensors_dtype(at::ScalarType type) {
  for (DType d : safetensors::all_dtypes()) {
    if (to_scalar_type(d) == type) return d;
  }
  fail("", "tensor dtype {} cannot be stored in safetensors", c10::toString(type));
}

at::Tensor load_tensor(const safetensors::File& file, const std::string& name, std::optional<at::ScalarType> dtype,
                       at::Device device) {
  const auto& info = file.info(name);
  auto bytes = file.bytes(info);
  const at::ScalarType stored = to_scalar_type(info.dtype);
  const auto options = at::TensorOptions().dtype(stored);
  at::Tensor view;
  if (reinterpret_cast<uintptr_t>(bytes.data()) % safetensors::dtype_size(info.dtype) == 0) {
    auto keep_alive = file.mapping();
    view = at::from_blob(const_cast<std::byte*>(bytes.data()), info.shape, [keep_alive](void*) {}, options);
  } else {
    // A file from a writer that did not align tensors: copy into aligned storage.
    view = at::empty(info.shape, options);
    std::memcpy(view.data_ptr(), bytes.data(), bytes.size());
  }
  return view.to(device, dtype.value_or(stored));
}

void save_safetensors(const std::string& path, const NamedTensors& tensors, const safetensors::Metadata& metadata) {
  std::vector<const std::pair<std::string, at::Tensor>*> order;
  for (const auto& entry : tensors) order.push_back(&entry);
  std::stable_sort(order.begin(), order.end(), [](auto* a, auto* b) {
    size_t sa = a->second.element_size(), sb = b->second.element_size();
    return sa != sb ? sa > sb : a->first < b->first;
  });

  std::vector<safetensors::TensorSpec> specs;
  for (const auto* entry : order) {
    const at::Tensor& t = entry->second;
    specs.push_back({entry->first, to_safetensors_dtype(t.scalar_type()), t.sizes().vec()});
  }
  safetensors::Writer writer(path, specs, metadata);
  for (const auto* entry : order) {
    // One tensor at a time: at most one temporary CPU contiguous copy is alive.
    at::Tensor cpu = entry->second.to(at::kCPU).contiguous();
    writer.append(cpu.data_ptr(), cpu.nbytes());
  }
  writer.commit();
}

}  // namespace sdt
