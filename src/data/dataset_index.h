// The dataset index: every image of a dataset with its raw caption, size (from the file header),
// repeats and regularization flag, built from the typed dataset config as kohya's DreamBooth,
// fine-tuning and ControlNet datasets do. DreamBooth folders are indexed once and the result is
// cached beside the images (sdt_index.json), so a large folder is not rescanned at every start.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "src/core/dataset_config.h"
#include "src/data/buckets.h"

namespace sdt {

struct ImageEntry {
  std::string path;          // the image file
  std::string caption;       // as stored (kohya processes it per sample later)
  int64_t width = 0;         // after EXIF orientation
  int64_t height = 0;
  int64_t num_repeats = 1;   // reg images: after kohya's balancing
  bool is_reg = false;
  size_t subset = 0;         // index into DatasetConfig::subsets
  std::string conditioning_path;  // ControlNet: the paired conditioning image
  BucketChoice bucket;       // filled by assign_buckets
};

// kohya's train/validation split (split_train_val): with a dataset's validation_split > 0, each DreamBooth subset's
// images (not regularization) are shuffled as Python's random.Random(validation_seed).shuffle does; training takes
// the first ceil(n (1 - split)), validation the last round(n split), with 1 repeat and no regularization images.
// Fine-tuning datasets are not split (kohya copies them whole into its validation set; sdt gives them none).
enum class DatasetPart { all, training, validation };

struct IndexOptions {
  bool use_index_cache = true;  // read/write sdt_index.json beside DreamBooth images
  bool skip_bad_images = false; // warn and skip an unreadable image instead of failing
  DatasetPart part = DatasetPart::all;
  uint64_t validation_seed = 0;  // when the dataset has no validation_seed: --validation_seed, else --seed
};

struct DatasetIndex {
  std::vector<ImageEntry> images;
  std::vector<std::string> warnings;  // also logged
  int64_t num_train_images = 0;       // with repeats, regularization excluded
  int64_t num_reg_images = 0;
};

DatasetIndex build_dataset_index(const DatasetConfig& dataset, const IndexOptions& options = {});

// Gives each image its bucket (kohya's BucketManager.select_bucket), or the fixed resolution
// without enable_bucket.
void assign_buckets(const DatasetConfig& dataset, DatasetIndex& index);

// Every dataset of a blueprint, indexed and bucketed, in the blueprint's order.
std::vector<DatasetIndex> index_datasets(const DatasetBlueprint& blueprint, const IndexOptions& options = {});

// The caption file of an image: "<stem><ext>", else for face-crop names "<name>_cx_cy_w_h" the
// file of "<name><ext>"; the first line stripped (all non-blank lines with wildcards). nullopt
// when there is none. Throws when the file is empty or not UTF-8.
std::optional<std::string> read_caption_file(const std::string& image_path, const std::string& extension, bool all_lines);

}  // namespace sdt
