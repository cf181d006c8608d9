// safetensors throughput: streaming write (with fsync and rename) and mmap read of a file of
// many tensors, the shape of a checkpoint. Prints figures; asserts nothing.
//   bench_safetensors [MiB=512] [tensors=256] [dir=/tmp]
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <sys/mman.h>

#include "src/core/safetensors.h"

using Clock = std::chrono::steady_clock;

int main(int argc, char** argv) {
  const size_t mib = argc > 1 ? std::stoul(argv[1]) : 512;
  const size_t count = argc > 2 ? std::stoul(argv[2]) : 256;
  const std::string dir = argc > 3 ? argv[3] : "/tmp";
  const std::string path = dir + "/bench_safetensors.safetensors";
  const int64_t elements = static_cast<int64_t>(mib * 1048576 / 4 / count);

  std::vector<float> buffer(elements, 0.5f);
  std::vector<sdt::safetensors::TensorSpec> specs;
  for (size_t i = 0; i < count; ++i) specs.push_back({fmt::format("block.{}.weight", i), sdt::safetensors::DType::F32, {elements}});
  const double bytes = 4.0 * elements * count;

  auto t0 = Clock::now();
  {
    sdt::safetensors::Writer w(path, specs, {{"bench", "1"}});
    for (size_t i = 0; i < count; ++i) w.append(buffer.data(), buffer.size() * 4);
    w.commit();
  }
  double write_s = std::chrono::duration<double>(Clock::now() - t0).count();

  auto t1 = Clock::now();
  sdt::safetensors::File f(path);
  double open_s = std::chrono::duration<double>(Clock::now() - t1).count();
  auto t2 = Clock::now();
  double sum = 0;
  for (const auto& t : f.tensors()) {
    auto b = f.bytes(t);
    const float* p = reinterpret_cast<const float*>(b.data());
    for (size_t k = 0; k < b.size() / 4; k += 1024) sum += p[k];  // touch every page
  }
  double read_s = std::chrono::duration<double>(Clock::now() - t2).count();

  fmt::print("file: {} tensors, {:.0f} MiB at {}\n", count, bytes / 1048576, path);
  fmt::print("write (stream + fsync + rename): {:.3f} s, {:.2f} GB/s\n", write_s, bytes / write_s / 1e9);
  fmt::print("open (mmap + header parse + validation): {:.3f} ms\n", open_s * 1e3);
  fmt::print("read (page-cache, touch every page): {:.3f} s, {:.2f} GB/s (checksum {})\n", read_s, bytes / read_s / 1e9, sum);
  std::remove(path.c_str());
  return 0;
}
