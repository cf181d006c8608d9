#include "src/data/buckets.h"

#include <cmath>

#include "src/core/error.h"

namespace sdt {

std::vector<Resolution> make_bucket_resolutions(Resolution max_reso, int64_t min_size, int64_t max_size, int64_t divisible) {
  const int64_t max_area = max_reso.width * max_reso.height;
  std::set<Resolution> resos;
  const int64_t square = static_cast<int64_t>(std::floor(std::sqrt(static_cast<double>(max_area)) / divisible)) * divisible;
  resos.insert({square, square});
  for (int64_t width = min_size; width <= max_size; width += divisible) {
    const int64_t height = std::min(max_size, (max_area / width) / divisible * divisible);
    if (height >= min_size) {
      resos.insert({width, height});
      resos.insert({height, width});
    }
  }
  return {resos.begin(), resos.end()};
}

BucketSelector::BucketSelector(Resolution max_reso, int64_t min_size, int64_t max_size, int64_t steps, bool no_upscale)
    : max_reso_(max_reso), steps_(steps), no_upscale_(no_upscale) {
  if (steps < 1) fail("bucket_reso_steps", "must be at least 1, got {}", steps);
  // kohya's adjust_min_max_bucket_reso_by_steps
  if (min_size < steps) {
    fail("min_bucket_reso", "{} is smaller than bucket_reso_steps {}, so it rounds down to 0 and no bucket fits (kohya "
                            "divides by zero here); lower bucket_reso_steps or raise min_bucket_reso", min_size, steps);
  }
  min_size = min_size / steps * steps;
  max_size = (max_size + steps - 1) / steps * steps;
  if (!no_upscale) {
    if (std::min(max_reso.width, max_reso.height) < min_size) {
      fail("min_bucket_reso", "{} is larger than the resolution {}x{}", min_size, max_reso.width, max_reso.height);
    }
    if (std::max(max_reso.width, max_reso.height) > max_size) {
      fail("max_bucket_reso", "{} is smaller than the resolution {}x{}", max_size, max_reso.width, max_reso.height);
    }
    predefined_ = make_bucket_resolutions(max_reso, min_size, max_size, steps);
    predefined_set_ = {predefined_.begin(), predefined_.end()};
    for (const auto& r : predefined_) aspect_ratios_.push_back(static_cast<double>(r.width) / static_cast<double>(r.height));
  }
}

int64_t BucketSelector::round_to_steps(double x) const {
  const auto v = static_cast<int64_t>(x + 0.5);
  return v - v % steps_;
}

BucketChoice BucketSelector::select(int64_t w, int64_t h) const {
  const double aspect = static_cast<double>(w) / static_cast<double>(h);
  BucketChoice choice;
  if (!no_upscale_) {
    Resolution reso{w, h};
    if (!predefined_set_.count(reso)) {
      size_t best = 0;  // the first of equals, as numpy's argmin
      for (size_t i = 1; i < aspect_ratios_.size(); ++i) {
        if (std::abs(aspect_ratios_[i] - aspect) < std::abs(aspect_ratios_[best] - aspect)) best = i;
      }
      reso = predefined_[best];
    }
    const double bucket_aspect = static_cast<double>(reso.width) / static_cast<double>(reso.height);
    // Scale so the image covers the bucket; the excess is cropped.
    const double scale = aspect > bucket_aspect ? static_cast<double>(reso.height) / static_cast<double>(h)
                                                : static_cast<double>(reso.width) / static_cast<double>(w);
    choice.bucket = reso;
    choice.resized_size = {static_cast<int64_t>(static_cast<double>(w) * scale + 0.5),
                           static_cast<int64_t>(static_cast<double>(h) * scale + 0.5)};
    return choice;
  }
  const double max_area = static_cast<double>(max_reso_.width * max_reso_.height);
  if (static_cast<double>(w * h) > max_area) {
    const double resized_width = std::sqrt(max_area * aspect);
    const double resized_height = max_area / resized_width;
    const int64_t bw = round_to_steps(resized_width);
    const int64_t bh_in_wr = round_to_steps(static_cast<double>(bw) / aspect);
    const double ar_width_rounded = static_cast<double>(bw) / static_cast<double>(bh_in_wr);
    const int64_t bh = round_to_steps(resized_height);
    const int64_t bw_in_hr = round_to_steps(static_cast<double>(bh) * aspect);
    const double ar_height_rounded = static_cast<double>(bw_in_hr) / static_cast<double>(bh);
    if (std::abs(ar_width_rounded - aspect) < std::abs(ar_height_rounded - aspect)) {
      choice.resized_size = {bw, static_cast<int64_t>(static_cast<double>(bw) / aspect + 0.5)};
    } else {
      choice.resized_size = {static_cast<int64_t>(static_cast<double>(bh) * aspect + 0.5), bh};
    }
  } else {
    choice.resized_size = {w, h};
  }
  // Crop, never pad: the bucket is the resized size floored to the steps.
  choice.bucket = {choice.resized_size.width - choice.resized_size.width % steps_,
                   choice.resized_size.height - choice.resized_size.height % steps_};
  return choice;
}

CropLtrb BucketSelector::crop_ltrb(Resolution bucket, Resolution original_size) {
  const double bucket_ar = static_cast<double>(bucket.width) / static_cast<double>(bucket.height);
  const double image_ar = static_cast<double>(original_size.width) / static_cast<double>(original_size.height);
  double rw, rh;
  if (bucket_ar > image_ar) {
    rw = static_cast<double>(bucket.height) * image_ar;
    rh = static_cast<double>(bucket.height);
  } else {
    rw = static_cast<double>(bucket.width);
    rh = static_cast<double>(bucket.width) / image_ar;
  }
  // Python's // on floats is floor division.
  const double left = std::floor((static_cast<double>(bucket.width) - rw) / 2);
  const double top = std::floor((static_cast<double>(bucket.height) - rh) / 2);
  return {left, top, left + rw, top + rh};
}

}  // namespace sdt
