// Writes a safetensors file with our writer for tests/check_safetensors_with_python.py: one tensor per
// dtype in the value pattern of tests/fixtures/safetensors/gen_fixtures.py, plus metadata.
#include <cstdio>

#include <torch/torch.h>

#include "src/core/tensor_io.h"

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s OUT.safetensors\n", argv[0]);
    return 2;
  }
  sdt::NamedTensors tensors;
  for (sdt::safetensors::DType d : sdt::safetensors::all_dtypes()) {
    const at::ScalarType type = sdt::to_scalar_type(d);
    at::Tensor i = at::arange(15, at::kLong);
    at::Tensor t;
    if (type == at::kBool) {
      t = (i % 3) == 0;
    } else if (at::isFloatingType(type)) {
      t = (((i % 17) - 8).to(at::kDouble) * 0.25).to(type);
    } else if (type == at::kByte || type == at::kUInt16 || type == at::kUInt32 || type == at::kUInt64) {
      t = (i % 17).to(type);
    } else {
      t = ((i % 17) - 8).to(type);
    }
    tensors.emplace_back("t_" + std::string(sdt::safetensors::dtype_name(d)), t.reshape({3, 5}));
  }
  tensors.emplace_back("scalar_f32", at::scalar_tensor(1.5, at::kFloat));
  tensors.emplace_back("empty_f16", at::zeros({0, 4}, at::kHalf));
  sdt::save_safetensors(argv[1], tensors,
                        {{"ss_network_module", "networks.lora"}, {"ss_network_dim", "4"}, {"note", "written by sdt"}});
  return 0;
}
