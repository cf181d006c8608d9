// Aspect-ratio buckets exactly as kohya's BucketManager and model_util.make_bucket_resolutions.
#pragma once

#include <cstdint>
#include <set>
#include <utility>
#include <vector>

namespace sdt {

struct Resolution {
  int64_t width = 0;
  int64_t height = 0;
  auto operator<=>(const Resolution&) const = default;
};

// All (w, h) with w, h multiples of `divisible` in [min_size, max_size] and w*h <= max area, plus the
// square of the max area; sorted.
std::vector<Resolution> make_bucket_resolutions(Resolution max_reso, int64_t min_size, int64_t max_size, int64_t divisible);

struct BucketChoice {
  Resolution bucket;        // the training size
  Resolution resized_size;  // the image is resized to this, then cropped to `bucket`
};

struct CropLtrb {
  double left = 0, top = 0, right = 0, bottom = 0;
};

class BucketSelector {
 public:
  // With bucket_no_upscale the buckets follow the images (min/max ignored); otherwise they are
  // predefined by make_bucket_resolutions. min/max are first rounded to multiples of `steps`.
  BucketSelector(Resolution max_reso, int64_t min_size, int64_t max_size, int64_t steps, bool no_upscale);

  BucketChoice select(int64_t image_width, int64_t image_height) const;
  const std::vector<Resolution>& predefined() const { return predefined_; }

  // SDXL's crop conditioning: where the whole image would sit if fitted inside the bucket (kohya's
  // get_crop_ltrb; not the crop actually taken).
  static CropLtrb crop_ltrb(Resolution bucket, Resolution original_size);

 private:
  int64_t round_to_steps(double x) const;

  Resolution max_reso_;
  int64_t steps_;
  bool no_upscale_;
  std::vector<Resolution> predefined_;
  std::set<Resolution> predefined_set_;
  std::vector<double> aspect_ratios_;
};

}  // namespace sdt
