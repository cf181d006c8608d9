// safetensors <-> at::Tensor. Loading converts straight into the requested dtype and device, so a
// bf16 model loaded from an fp32 file never holds a full fp32 copy; saving streams one tensor at a
// time through safetensors::Writer, so no second copy of a state dict is built.
#pragma once

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <ATen/ATen.h>

#include "src/core/safetensors.h"

namespace sdt {

at::ScalarType to_scalar_type(safetensors::DType dtype);
safetensors::DType to_safetensors_dtype(at::ScalarType type);  // throws for types safetensors lacks

// The tensor `name` of `file`. Without a dtype or device change this is a zero-copy view of the
// (copy-on-write) mapping that keeps the mapping alive; otherwise only the converted tensor is
// allocated.
at::Tensor load_tensor(const safetensors::File& file, const std::string& name,
                       std::optional<at::ScalarType> dtype = std::nullopt, at::Device device = at::kCPU);

using NamedTensors = std::vector<std::pair<std::string, at::Tensor>>;

// Writes `tensors` (any device, any layout) to `path` atomically. Tensors are laid out by element
// size, largest first, then by name, as the reference writer does, so every tensor's data is
// aligned to its element size in the file and can be viewed without a copy.
void save_safetensors(const std::string& path, const NamedTensors& tensors, const safetensors::Metadata& metadata = {});

}  // namespace sdt
