// libFuzzer target: the safetensors header parser must either accept a file or throw sdt::Error,
// never crash, hang or read out of bounds, whatever the bytes. Run: tests/fuzz/run_fuzz.sh SECONDS
#include <cstddef>
#include <cstdint>

#include "src/core/error.h"
#include "src/core/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    auto header = sdt::safetensors::parse_header({data, size}, size, "fuzz.safetensors");
    // Whatever was accepted must describe bytes inside the input.
    for (const auto& t : header.tensors) {
      if (header.data_offset + t.end > size) __builtin_trap();
    }
  } catch (const sdt::Error&) {
  }
  return 0;
}
