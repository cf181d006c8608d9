// Reading what the fixture generators (tests/fixtures/*/gen_*.py) write: all tensors of a safetensors file by name,
// a JSON file.
#pragma once

#include <fstream>
#include <map>
#include <string>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "src/core/safetensors.h"
#include "src/core/tensor_io.h"

namespace sdt::testing_support {

inline std::map<std::string, at::Tensor> read_tensors(const std::string& path) {
  safetensors::File file(path);
  std::map<std::string, at::Tensor> out;
  for (const auto& info : file.tensors()) out[info.name] = load_tensor(file, info.name).clone();
  return out;
}

inline nlohmann::json read_json(const std::string& path) {
  std::ifstream in(path);
  return nlohmann::json::parse(in);
}

}  // namespace sdt::testing_support
