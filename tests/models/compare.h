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

}  // namespace sdt::testing_support
