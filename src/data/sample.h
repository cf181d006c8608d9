// One training sample as kohya's BaseDataset.__getitem__ makes it from an image file: decode,
// resize and crop to its bucket (or face crop / random crop without buckets), colour augmentation,
// flip, alpha mask, caption processing. Every random choice comes from generators keyed by
// (seed, epoch, sample position), so any rank that loads the sample makes the same choices.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "src/core/dataset_config.h"
#include "src/data/buckets.h"
#include "src/data/captions.h"
#include "src/data/dataset_index.h"
#include "src/data/image.h"

namespace sdt {

// A sample's occurrence in an epoch: (step, index in the global batch) does not depend on the rank
// count, and tells apart the repeats of one image.
struct SampleKey {
  uint64_t seed = 0;
  int64_t epoch = 1;
  int64_t step = 0;
  uint32_t index = 0;
  uint64_t occurrence() const { return (static_cast<uint64_t>(step) << 32) | index; }
};

struct ProcessedSample {
  Image image;                      // (H, W, 3) at the bucket size
  std::vector<float> alpha_mask;    // (H, W) in [0, 1]; empty unless the subset uses alpha_mask
  std::optional<Image> conditioning;  // ControlNet: (H, W, 3), same resize/crop/flip as the image
  std::string caption;              // processed
  Resolution original_size;         // before resize
  CropLtrb crop_ltrb;               // kohya's SDXL crop conditioning (mirrored when flipped)
  bool flipped = false;
  float loss_weight = 1.0f;         // prior_loss_weight for regularization images
};

ProcessedSample load_sample(const DatasetConfig& dataset, const ImageEntry& entry, const SampleKey& key,
                            const CaptionContext& caption_context);

// What load_sample decides about a sample without its pixels (image empty, no alpha mask), for training from
// cached latents: caption, flip, original size, crop conditioning, loss weight. The same decisions as load_sample
// for subsets a cache accepts (no color_aug, no random_crop, buckets or images already at the resolution).
ProcessedSample describe_sample(const DatasetConfig& dataset, const ImageEntry& entry, const SampleKey& key,
                                const CaptionContext& caption_context);

// kohya's AugHelper.color_aug on RGB data: with probability 0.33, either a hue shift in [-8, 8]
// (OpenCV's 0-180 hue scale) or a gamma in [0.95, 1.05].
void color_augment(Image& image, Rng& rng);

}  // namespace sdt
