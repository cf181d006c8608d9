// The dataset config TOML (kohya's --dataset_config): [general], [[datasets]], [[datasets.subsets]].
//
// Each key is allowed at the levels kohya's ConfigSanitizer allows (see dataset_keys() and
// docs/configuration.md); each value resolves through kohya's fallback chain
// subset -> dataset -> general -> command line -> default. What comes out is typed: nothing
// downstream reads TOML.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <variant>
#include <vector>

#include "src/core/train_args.h"

namespace sdt {

// DreamBooth: folders of images with caption files; fine-tuning: a metadata JSON; ControlNet:
// images paired with conditioning images by file stem.
enum class DatasetKind { DreamBooth, FineTuning, ControlNet };
std::string_view dataset_kind_name(DatasetKind kind);

// custom_attributes: free-form scalars passed to the training loop (kohya reads one:
// diff_output_preservation).
using CustomAttribute = std::variant<bool, int64_t, double, std::string>;

struct SubsetConfig {
  std::optional<std::string> image_dir;
  int64_t num_repeats = 1;
  bool shuffle_caption = false;
  std::string caption_separator = ",";
  int64_t keep_tokens = 0;
  std::optional<std::string> keep_tokens_separator;
  std::optional<std::string> secondary_separator;
  bool enable_wildcard = false;
  bool color_aug = false;
  bool flip_aug = false;
  std::optional<std::pair<double, double>> face_crop_aug_range;
  bool random_crop = false;
  std::optional<std::string> caption_prefix;
  std::optional<std::string> caption_suffix;
  double caption_dropout_rate = 0.0;
  int64_t caption_dropout_every_n_epochs = 0;
  double caption_tag_dropout_rate = 0.0;
  int64_t token_warmup_min = 1;
  double token_warmup_step = 0;
  std::map<std::string, CustomAttribute> custom_attributes;
  std::optional<std::string> resize_interpolation;
  // DreamBooth and ControlNet
  std::string caption_extension = ".caption";
  bool cache_info = false;
  // DreamBooth
  bool is_reg = false;
  std::optional<std::string> class_tokens;
  // DreamBooth and fine-tuning
  bool alpha_mask = false;
  // fine-tuning
  std::optional<std::string> metadata_file;
  // ControlNet
  std::optional<std::string> conditioning_data_dir;
};

struct DatasetConfig {
  DatasetKind kind = DatasetKind::DreamBooth;
  int64_t width = 0;  // resolution, as kohya stores it: (width, height)
  int64_t height = 0;
  double network_multiplier = 1.0;
  bool debug_dataset = false;
  std::optional<int64_t> validation_seed;
  double validation_split = 0.0;
  std::optional<std::string> resize_interpolation;
  int64_t batch_size = 1;
  bool enable_bucket = false;
  int64_t min_bucket_reso = 256;
  int64_t max_bucket_reso = 1024;
  int64_t bucket_reso_steps = 64;
  bool bucket_no_upscale = false;
  double prior_loss_weight = 1.0;  // DreamBooth; from the command line only
  std::vector<SubsetConfig> subsets;
};

struct DatasetBlueprint {
  std::vector<DatasetConfig> datasets;
};

// Reads and validates a dataset config file against the training arguments it falls back to.
DatasetBlueprint load_dataset_config(const std::string& path, const TrainArgs& args);
// The same from TOML text; `name` is used in messages as the file name.
DatasetBlueprint parse_dataset_config(const std::string& toml_text, const std::string& name, const TrainArgs& args);

// Without --dataset_config, kohya builds the config from the command line: with --in_json one
// fine-tuning subset (train_data_dir + the metadata file); otherwise one DreamBooth dataset whose
// subsets are the sub-folders "<repeats>_<class tokens>" of --train_data_dir (and of --reg_data_dir,
// as regularization). Folders without a leading repeat count are skipped with a warning. Sub-folders
// are taken in name order (kohya takes the file system's order).
DatasetBlueprint dataset_config_from_args(const TrainArgs& args);

// The dataset config of a training run: --dataset_config when given (train_data_dir, reg_data_dir and
// in_json are then ignored, with a warning, as kohya does), else dataset_config_from_args.
DatasetBlueprint resolve_dataset_config(const TrainArgs& args);

// docs/configuration.md's dataset section, generated from the key table.
std::string dataset_keys_reference_markdown();

}  // namespace sdt
