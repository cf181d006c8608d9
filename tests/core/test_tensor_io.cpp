// safetensors <-> at::Tensor: dtype mapping, zero-copy views, conversion on load, streaming save.
#include <gtest/gtest.h>

#include <filesystem>

#include <torch/torch.h>

#include "src/core/error.h"
#include "src/core/tensor_io.h"

namespace sdt {
namespace {

// The same value pattern as tests/fixtures/safetensors/gen_fixtures.py.
at::Tensor value_pattern(int64_t n, at::ScalarType dtype) {
  at::Tensor i = at::arange(n, at::kLong);
  if (dtype == at::kBool) return (i % 3) == 0;
  if (at::isFloatingType(dtype)) return (((i % 17) - 8).to(at::kDouble) * 0.25).to(dtype);
  if (dtype == at::kByte || dtype == at::kUInt16 || dtype == at::kUInt32 || dtype == at::kUInt64) return (i % 17).to(dtype);
  return ((i % 17) - 8).to(dtype);
}

TEST(TensorIo, PythonFixtureLoadsToTheExpectedValuesInEveryDtype) {
  safetensors::File f(SDT_FIXTURES "/safetensors/python_all_dtypes.safetensors");
  for (safetensors::DType d : safetensors::all_dtypes()) {
    const std::string name = "t_" + std::string(safetensors::dtype_name(d));
    at::Tensor t = load_tensor(f, name);
    EXPECT_EQ(t.scalar_type(), to_scalar_type(d)) << name;
    EXPECT_EQ(t.sizes(), at::IntArrayRef({3, 5})) << name;
    // Compare in a dtype every kind converts to exactly.
    at::Tensor expected = value_pattern(15, to_scalar_type(d)).reshape({3, 5});
    EXPECT_TRUE(at::equal(t.to(at::kDouble), expected.to(at::kDouble))) << name;
  }
  EXPECT_EQ(load_tensor(f, "scalar_f32").item<float>(), 1.5f);
  EXPECT_EQ(load_tensor(f, "empty_f16").sizes(), at::IntArrayRef({0, 4}));
}

TEST(TensorIo, LoadWithoutConversionIsAZeroCopyViewThatNeverWritesTheFile) {
  const std::string path = testing::TempDir() + "view.safetensors";
  save_safetensors(path, {{"w", at::arange(6, at::kFloat).reshape({2, 3})}});
  safetensors::File f(path);
  at::Tensor w = load_tensor(f, "w");
  EXPECT_EQ(w.data_ptr(), static_cast<const void*>(f.bytes("w").data()));
  w.add_(100);  // copy-on-write pages: the file keeps its values
  safetensors::File again(path);
  EXPECT_EQ(load_tensor(again, "w")[0][0].item<float>(), 0.0f);
}

TEST(TensorIo, LoadConvertsToTheRequestedDtype) {
  const std::string path = testing::TempDir() + "convert.safetensors";
  at::Tensor w = at::randn({4, 8});
  save_safetensors(path, {{"w", w}});
  safetensors::File f(path);
  at::Tensor b = load_tensor(f, "w", at::kBFloat16);
  EXPECT_EQ(b.scalar_type(), at::kBFloat16);
  EXPECT_TRUE(at::equal(b, w.to(at::kBFloat16)));
}

TEST(TensorIo, SaveRoundTripsEveryDtypeAndLaysOutLargestElementsFirst) {
  const std::string path = testing::TempDir() + "torch_all.safetensors";
  NamedTensors tensors;
  for (safetensors::DType d : safetensors::all_dtypes()) {
    tensors.emplace_back(std::string("t_") + std::string(safetensors::dtype_name(d)), value_pattern(10, to_scalar_type(d)));
  }
  tensors.emplace_back("non_contiguous", at::arange(12, at::kFloat).reshape({3, 4}).t());
  save_safetensors(path, tensors, {{"k", "v"}});
  safetensors::File f(path);
  EXPECT_EQ(f.metadata().at("k"), "v");
  for (const auto& [name, t] : tensors) {
    EXPECT_TRUE(at::equal(load_tensor(f, name).to(at::kDouble), t.to(at::kDouble))) << name;
  }
  size_t previous = SIZE_MAX;
  for (const auto& info : f.tensors()) {
    size_t size = safetensors::dtype_size(info.dtype);
    EXPECT_LE(size, previous) << info.name;
    EXPECT_EQ(info.begin % size, 0u) << info.name;
    previous = size;
  }
}

TEST(TensorIo, UnsupportedDtypeIsRefusedBeforeAnythingIsWritten) {
  const std::string path = testing::TempDir() + "complex.safetensors";
  EXPECT_THROW(save_safetensors(path, {{"c", at::zeros({2}, at::kComplexFloat)}}), Error);
  EXPECT_FALSE(std::filesystem::exists(path));
}

}  // namespace
}  // namespace sdt
