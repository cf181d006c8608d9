// Comparing a C++ output with a reference output, printing the measured error so it can be quoted.
#pragma once

#include <gtest/gtest.h>

#include <iostream>
#include <string>

#include <torch/torch.h>

namespace sdt::testing_support {

// Passes when max |actual - expected| <= rel_tol * max |expected| (relative to the output's scale: an
// element-wise ratio is meaningless where the reference crosses zero). Prints both errors and records them as
// test properties.
inline void expect_close(const std::string& what, const at::Tensor& actual, const at::Tensor& expected,
                         double rel_tol = 1e-4) {
  ASSERT_EQ(actual.sizes(), expected.sizes()) << what;
  const at::Tensor a = actual.detach().to(at::kDouble), e = expected.detach().to(at::kDouble);
  const double max_abs = (a - e).abs().max().item<double>();
  const double scale = e.abs().max().item<double>();
  const double rel = max_abs / scale;
  std::cout << "[conformance] " << what << ": max abs err " << max_abs << ", max rel err " << rel
            << " (max |ref| " << scale << ")\n";
  ::testing::Test::RecordProperty(what + ".max_abs_err", std::to_string(max_abs));
  ::testing::Test::RecordProperty(what + ".max_rel_err", std::to_string(rel));
  EXPECT_LE(rel, rel_tol) << what;
  EXPECT_GT(scale, 0.0) << what << ": an all-zero reference proves nothing";
}

// A sample image (H, W, 3) uint8 against the reference pipeline's: at most one level of 255 apart per pixel (a few
// sampling steps amplify the models' ~1e-6 fp32 differences a little), and a reference with contrast (a flat one proves
// little). Prints the largest difference.
inline void expect_image_within_one_level(const at::Tensor& image, const at::Tensor& expected, const std::string& what) {
  ASSERT_EQ(image.sizes(), expected.sizes()) << what;
  EXPECT_GT(expected.max().item<int64_t>(), expected.min().item<int64_t>() + 50) << what << ": a flat reference proves little";
  const int64_t worst = (image.to(at::kInt) - expected.to(at::kInt)).abs().max().item<int64_t>();
  std::cout << "[conformance] " << what << ": max pixel difference " << worst << "\n";
  EXPECT_LE(worst, 1) << what;
}

}  // namespace sdt::testing_support
