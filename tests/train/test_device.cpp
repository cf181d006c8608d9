// --device: which device a rank computes on, and the named errors when the asked-for device is not there. The GPU
// half runs where LibTorch sees a CUDA device (tests/train/test_cuda_training.cpp trains there).
#include <gtest/gtest.h>

#include <torch/cuda.h>

#include "src/core/device.h"
#include "src/core/error.h"

namespace sdt {
namespace {

bool has_cuda() { return torch::cuda::is_available() && torch::cuda::device_count() > 0; }

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(Device, CpuIsTheCpu) { EXPECT_EQ(select_device("cpu", 3), c10::Device(c10::kCPU)); }

TEST(Device, AutoIsCudaWhereAGpuIsVisibleAndTheCpuElsewhere) {
  const c10::Device device = select_device("auto", 0);
  EXPECT_EQ(device.type(), has_cuda() ? c10::kCUDA : c10::kCPU);
}

TEST(Device, CudaWithoutAVisibleGpuIsANamedError) {
  if (has_cuda()) GTEST_SKIP() << "a CUDA device is visible";
  const std::string message = error_of([] { select_device("cuda", 0); });
  EXPECT_NE(message.find("--device"), std::string::npos) << message;
  EXPECT_NE(message.find("no CUDA device is visible"), std::string::npos) << message;
  EXPECT_NE(message.find("CUDA_VISIBLE_DEVICES"), std::string::npos) << message;
}

TEST(Device, AnUnknownDeviceIsANamedError) {
  const std::string message = error_of([] { select_device("tpu", 0); });
  EXPECT_NE(message.find("'tpu' is not one of auto, cuda, cpu"), std::string::npos) << message;
}

TEST(Device, EachRankOnANodeTakesTheGpuOfItsLocalRank) {
  if (!has_cuda()) GTEST_SKIP() << "no CUDA device";
  const int count = static_cast<int>(torch::cuda::device_count());
  const int local_rank = count - 1;
  EXPECT_EQ(select_device("cuda", local_rank), c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(local_rank)));
  if (count > 1) {
    const std::string message = error_of([&] { select_device("cuda", count); });
    EXPECT_NE(message.find("has no GPU of its own"), std::string::npos) << message;
  }
}

}  // namespace
}  // namespace sdt
