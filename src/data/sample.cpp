#include "src/data/sample.h"

#include <cmath>
#include <filesystem>

#include <opencv2/core.hpp>
#include <opencv2/imgproc.hpp>

#include "src/core/error.h"

namespace sdt {
namespace {

struct FaceInfo {
  int64_t cx = 0, cy = 0, w = 0, h = 0;
};

// kohya's face-crop file names: "<name>_cx_cy_w_h.<ext>".
std::optional<FaceInfo> face_from_name(const std::string& path) {
  auto tokens = python_split(std::filesystem::path(path).stem().string(), "_");
  if (tokens.size() < 5) return std::nullopt;
  try {
    size_t n = tokens.size();
    return FaceInfo{std::stoll(tokens[n - 4]), std::stoll(tokens[n - 3]), std::stoll(tokens[n - 2]), std::stoll(tokens[n - 1])};
  } catch (const std::exception&) {
    fail(path, "face_crop_aug_range needs file names ending in _cx_cy_w_h (integers)");
  }
}

int64_t floor_div(int64_t a, int64_t b) { return a / b - ((a % b != 0) && ((a < 0) != (b < 0))); }

const Interpolation* subset_interpolation(const DatasetConfig& dataset, const SubsetConfig& subset, Interpolation& storage) {
  const auto& name = subset.resize_interpolation ? subset.resize_interpolation : dataset.resize_interpolation;
  if (!name) return nullptr;
  storage = interpolation_from_name(*name);
  return &storage;
}

// kohya's crop_target: scale so the face lands in face_crop_aug_range of the target, crop around it.
Image face_crop(const Image& image, const FaceInfo& face, const SubsetConfig& subset, int64_t target_w, int64_t target_h,
                const Interpolation* interpolation, Rng& rng) {
  if (image.height == target_h && image.width == target_w) return image;
  const auto [lo, hi] = *subset.face_crop_aug_range;
  const double face_size = static_cast<double>(std::max(face.w, face.h));
  const double size = static_cast<double>(std::min(target_h, target_w));
  double min_scale = std::max(static_cast<double>(target_h) / image.height, static_cast<double>(target_w) / image.width);
  min_scale = std::min(1.0, std::max(min_scale, size / (face_size * hi)));
  const double max_scale = std::min(1.0, std::max(min_scale, size / (face_size * lo)));
  const double scale = min_scale >= max_scale ? min_scale : rng.uniform(min_scale, max_scale);
  const int nh = static_cast<int>(image.height * scale + 0.5);
  const int nw = static_cast<int>(image.width * scale + 0.5);
  if (nh < target_h || nw < target_w) fail("face crop", "image {}x{} is smaller than the resolution", image.width, image.height);
  Image out = resize_image(image, nw, nh, interpolation);
  const int64_t face_p[2] = {static_cast<int64_t>(face.cy * scale + 0.5), static_cast<int64_t>(face.cx * scale + 0.5)};
  const int64_t target[2] = {target_h, target_w};
  const int64_t length[2] = {nh, nw};
  int64_t p[2];
  const auto fs = static_cast<int64_t>(std::max(face.w, face.h));
  for (int axis = 0; axis < 2; ++axis) {
    int64_t p1 = face_p[axis] - target[axis] / 2;
    if (subset.random_crop) {
      const int64_t range = std::max(length[axis] - face_p[axis], face_p[axis]);
      p1 += rng.randint(0, range) + rng.randint(0, range) - range;
    } else if (lo != hi && fs > static_cast<int64_t>(size) / 10 && fs >= 40) {
      p1 += rng.randint(floor_div(-fs, 20), fs / 20);
    }
    p[axis] = std::max<int64_t>(0, std::min(p1, length[axis] - target[axis]));
  }
  return crop_image(out, static_cast<int>(p[1]), static_cast<int>(p[0]), static_cast<int>(target_w), static_cast<int>(target_h));
}

std::vector<float> alpha_of(const Image& rgba) {
  std::vector<float> mask(static_cast<size_t>(rgba.width) * rgba.height);
  for (size_t i = 0; i < mask.size(); ++i) mask[i] = rgba.data[i * 4 + 3] / 255.0f;
  return mask;
}

Image drop_alpha(const Image& rgba) {
  Image rgb{rgba.width, rgba.height, 3, std::vector<uint8_t>(static_cast<size_t>(rgba.width) * rgba.height * 3)};
  for (size_t i = 0, n = static_cast<size_t>(rgba.width) * rgba.height; i < n; ++i) {
    std::memcpy(&rgb.data[i * 3], &rgba.data[i * 4], 3);
  }
  return rgb;
}

}  // namespace

void color_augment(Image& image, Rng& rng) {
  if (rng.uniform() > 0.33) return;
  cv::Mat m(image.height, image.width, CV_8UC3, image.data.data());
  if (rng.uniform() > 0.5) {
    // kohya converts with COLOR_BGR2HSV although its pixels are RGB; the same call on our RGB
    // pixels shifts hue exactly as kohya does.
    cv::Mat hsv;
    cv::cvtColor(m, hsv, cv::COLOR_BGR2HSV);
    double shift = rng.uniform(-8.0, 8.0);
    if (shift < 0) shift += 180;
    for (int y = 0; y < hsv.rows; ++y) {
      auto* row = hsv.ptr<uint8_t>(y);
      for (int x = 0; x < hsv.cols; ++x) row[3 * x] = static_cast<uint8_t>(std::fmod(row[3 * x] + shift, 180.0));
    }
    cv::cvtColor(hsv, m, cv::COLOR_HSV2BGR);
  } else {
    const double gamma = rng.uniform(0.95, 1.05);
    uint8_t table[256];
    for (int v = 0; v < 256; ++v) table[v] = static_cast<uint8_t>(std::clamp(std::pow(static_cast<double>(v), gamma), 0.0, 255.0));
    for (auto& px : image.data) px = table[px];
  }
}

ProcessedSample load_sample(const DatasetConfig& dataset, const ImageEntry& entry, const SampleKey& key,
                            const CaptionContext& caption_context) {
  const SubsetConfig& subset = dataset.subsets.at(entry.subset);
  Rng crop_rng(key.seed, static_cast<uint64_t>(key.epoch), key.occurrence(), RngPurpose::Crop);
  Rng augment_rng(key.seed, static_cast<uint64_t>(key.epoch), key.occurrence(), RngPurpose::Augment);
  Rng caption_rng(key.seed, static_cast<uint64_t>(key.epoch), key.occurrence(), RngPurpose::Caption);
  Interpolation interpolation_storage;
  const Interpolation* interpolation = subset_interpolation(dataset, subset, interpolation_storage);

  ProcessedSample s;
  Image image = decode_image(entry.path, subset.alpha_mask);
  s.original_size = {image.width, image.height};
  const Resolution bucket = entry.bucket.bucket;
  int crop_left = 0, crop_top = 0;  // of the resized image; reused for the conditioning image
  if (dataset.enable_bucket) {
    // kohya's trim_and_resize_if_required: resize to cover the bucket, crop width then height.
    const auto [rw, rh] = entry.bucket.resized_size;
    if (image.width != rw || image.height != rh) image = resize_image(image, static_cast<int>(rw), static_cast<int>(rh), interpolation);
    if (image.width > bucket.width) {
      const int64_t excess = image.width - bucket.width;
      crop_left = static_cast<int>(subset.random_crop ? crop_rng.randint(0, excess) : excess / 2);
    }
    if (image.height > bucket.height) {
      const int64_t excess = image.height - bucket.height;
      crop_top = static_cast<int>(subset.random_crop ? crop_rng.randint(0, excess) : excess / 2);
    }
    image = crop_image(image, crop_left, crop_top, static_cast<int>(bucket.width), static_cast<int>(bucket.height));
    s.crop_ltrb = BucketSelector::crop_ltrb(bucket, s.original_size);
  } else {
    // Without buckets kohya does not resize: a face crop, or a random crop of a larger image.
    std::optional<FaceInfo> face = subset.face_crop_aug_range ? face_from_name(entry.path) : std::nullopt;
    if (face && face->cx > 0) {
      image = face_crop(image, *face, subset, dataset.width, dataset.height, interpolation, crop_rng);
    } else if (image.height > dataset.height || image.width > dataset.width) {
      if (!subset.random_crop) {
        fail(entry.path, "image {}x{} is larger than the resolution {}x{}: enable buckets, random_crop or face crop",
             image.width, image.height, dataset.width, dataset.height);
      }
      if (image.height > dataset.height) crop_top = static_cast<int>(crop_rng.randint(0, image.height - dataset.height));
      if (image.width > dataset.width) crop_left = static_cast<int>(crop_rng.randint(0, image.width - dataset.width));
      image = crop_image(image, crop_left, crop_top, static_cast<int>(std::min<int64_t>(image.width, dataset.width)),
                         static_cast<int>(std::min<int64_t>(image.height, dataset.height)));
    }
    if (image.width != dataset.width || image.height != dataset.height) {
      fail(entry.path, "image {}x{} is smaller than the resolution {}x{} (buckets are off)", image.width, image.height,
           dataset.width, dataset.height);
    }
    s.original_size = {image.width, image.height};
  }

  if (subset.alpha_mask) {
    s.alpha_mask = alpha_of(image);
    image = drop_alpha(image);
  }
  if (subset.color_aug) color_augment(image, augment_rng);
  s.flipped = subset.flip_aug && augment_rng.uniform() < 0.5;
  if (s.flipped) {
    image = flip_horizontal(image);
    if (!s.alpha_mask.empty()) {
      for (int y = 0; y < image.height; ++y) std::reverse(s.alpha_mask.begin() + y * image.width, s.alpha_mask.begin() + (y + 1) * image.width);
    }
    // The conditioning left of a flipped sample is measured from the other side.
    const double left = static_cast<double>(bucket.width) - s.crop_ltrb.right;
    s.crop_ltrb.right = left + (s.crop_ltrb.right - s.crop_ltrb.left);
    s.crop_ltrb.left = left;
  }
  if (!entry.conditioning_path.empty()) {
    // kohya: the conditioning image has the target's original size, is resized to the target's
    // resized size, centre-cropped and flipped with it.
    Image cond = decode_image(entry.conditioning_path, false);
    if (cond.width != s.original_size.width || cond.height != s.original_size.height) {
      fail(entry.conditioning_path, "conditioning image is {}x{} but its image is {}x{}", cond.width, cond.height,
           s.original_size.width, s.original_size.height);
    }
    const auto [rw, rh] = dataset.enable_bucket ? entry.bucket.resized_size : s.original_size;
    if (cond.width != rw || cond.height != rh) cond = resize_image(cond, static_cast<int>(rw), static_cast<int>(rh), interpolation);
    cond = crop_image(cond, static_cast<int>((cond.width - image.width) / 2), static_cast<int>((cond.height - image.height) / 2),
                      image.width, image.height);
    if (s.flipped) cond = flip_horizontal(cond);
    s.conditioning = std::move(cond);
  }
  s.image = std::move(image);
  s.caption = process_caption(subset, entry.caption, caption_context, caption_rng);
  s.loss_weight = entry.is_reg ? static_cast<float>(dataset.prior_loss_weight) : 1.0f;
  return s;
}

ProcessedSample describe_sample(const DatasetConfig& dataset, const ImageEntry& entry, const SampleKey& key,
                                const CaptionContext& caption_context) {
  const SubsetConfig& subset = dataset.subsets.at(entry.subset);
  if (subset.color_aug || subset.random_crop) {
    fail(entry.path, "a sample with color_aug or random_crop needs its pixels every epoch; it cannot come from a latent cache");
  }
  Rng augment_rng(key.seed, static_cast<uint64_t>(key.epoch), key.occurrence(), RngPurpose::Augment);
  Rng caption_rng(key.seed, static_cast<uint64_t>(key.epoch), key.occurrence(), RngPurpose::Caption);
  ProcessedSample s;
  s.original_size = {entry.width, entry.height};
  const Resolution bucket = entry.bucket.bucket;
  if (dataset.enable_bucket) s.crop_ltrb = BucketSelector::crop_ltrb(bucket, s.original_size);
  s.flipped = subset.flip_aug && augment_rng.uniform() < 0.5;
  if (s.flipped) {
    const double left = static_cast<double>(bucket.width) - s.crop_ltrb.right;
    s.crop_ltrb.right = left + (s.crop_ltrb.right - s.crop_ltrb.left);
    s.crop_ltrb.left = left;
  }
  s.caption = process_caption(subset, entry.caption, caption_context, caption_rng);
  s.loss_weight = entry.is_reg ? static_cast<float>(dataset.prior_loss_weight) : 1.0f;
  return s;
}

}  // namespace sdt
