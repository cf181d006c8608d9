#include "src/core/device.h"

#include <cstdlib>
#include <string>

#include <ATen/DeviceAccelerator.h>
#include <torch/cuda.h>

#include "src/core/error.h"

namespace sdt {

namespace {

std::string visible_devices() {
  const char* value = std::getenv("CUDA_VISIBLE_DEVICES");
  return value ? fmt::format("CUDA_VISIBLE_DEVICES={}", value) : "CUDA_VISIBLE_DEVICES unset";
}

}  // namespace

c10::Device select_device(std::string_view flag, int local_rank) {
  if (flag != "auto" && flag != "cuda" && flag != "cpu") fail("--device", "'{}' is not one of auto, cuda, cpu", flag);
  // torch::cuda::device_count() is 0 in a CPU build of LibTorch and on a machine without a visible GPU.
  const int count = torch::cuda::is_available() ? static_cast<int>(torch::cuda::device_count()) : 0;
  if (flag == "cpu" || (flag == "auto" && count == 0)) return c10::Device(c10::kCPU);
  if (count == 0) {
    fail("--device", "cuda asked for, but no CUDA device is visible ({}; this LibTorch {} CUDA)", visible_devices(),
         at::hasCUDA() ? "has" : "was built without");
  }
  if (count > 1 && local_rank >= count) {
    fail("--device", "rank {} on its node has no GPU of its own: {} visible ({}); start at most {} processes per node",
         local_rank, count, visible_devices(), count);
  }
  const auto index = static_cast<c10::DeviceIndex>(count == 1 ? 0 : local_rank);
  at::accelerator::setDeviceIndex(index);
  return c10::Device(c10::kCUDA, index);
}

}  // namespace sdt
