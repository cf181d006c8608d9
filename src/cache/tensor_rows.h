// Between at::Tensor and the element types of the cache's row tables (the LibTorch side of h5.h).
#pragma once

#include <cmath>
#include <string>

#include <ATen/ATen.h>

#include "src/cache/h5.h"
#include "src/core/error.h"

namespace sdt {

// How floating-point values are stored, by kohya's precision names: "float", "fp16", "bf16".
inline h5::Element stored_float_element(const std::string& dtype) {
  if (dtype == "float") return h5::Element::f32;
  if (dtype == "fp16") return h5::Element::f16;
  if (dtype == "bf16") return h5::Element::bf16;
  fail("cache dtype", "'{}' is not one of float, fp16, bf16", dtype);
}

inline at::ScalarType scalar_type_of(h5::Element element) {
  switch (element) {
    case h5::Element::u8: return at::kByte;
    case h5::Element::i64: return at::kLong;
    case h5::Element::f64: return at::kDouble;
    case h5::Element::f32: return at::kFloat;
    case h5::Element::f16: return at::kHalf;
    case h5::Element::bf16: return at::kBFloat16;
    case h5::Element::string: break;
  }
  fail("cache", "a table of strings holds no tensor");
}

// The element a tensor is stored as: floating point as `dtype` says, booleans as uint8, other
// integers as int64.
inline h5::Element element_for(const at::Tensor& t, const std::string& dtype) {
  if (at::isFloatingType(t.scalar_type())) return stored_float_element(dtype);
  if (t.scalar_type() == at::kBool || t.scalar_type() == at::kByte) return h5::Element::u8;
  return h5::Element::i64;
}

// `t` in `element`'s type, contiguous on the CPU: its bytes are the rows to append.
inline at::Tensor rows_for(const at::Tensor& t, h5::Element element) {
  return t.to(at::kCPU, scalar_type_of(element)).contiguous();
}

// Whether every value is finite, in a plain loop: cache writers run in forked children in the tests, where an ATen
// reduction could start a thread pool that fork left unusable.
inline bool all_finite(const at::Tensor& tensor) {
  const at::Tensor values = tensor.to(at::kFloat).contiguous();
  const float* p = values.data_ptr<float>();
  for (int64_t i = 0; i < values.numel(); ++i) {
    if (!std::isfinite(p[i])) return false;
  }
  return true;
}

}  // namespace sdt
