#include "src/train/dataset_metadata.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <filesystem>
#include <map>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "src/core/text.h"
#include "src/data/buckets.h"
#include "src/networks/lora_metadata.h"

namespace sdt {
namespace {

namespace fs = std::filesystem;
using Json = nlohmann::ordered_json;

std::string base_name(const std::string& path) { return fs::path(path).filename().string(); }

// kohya's BaseDataset.tag_frequency: per image folder (or metadata file), each lower-cased comma-separated tag's count.
Json tag_frequency(const DatasetConfig& dataset, const DatasetIndex& index) {
  Json frequency = Json::object();
  for (size_t s = 0; s < dataset.subsets.size(); ++s) {
    const SubsetConfig& subset = dataset.subsets[s];
    const std::optional<std::string>& source = subset.image_dir ? subset.image_dir : subset.metadata_file;
    if (!source) continue;
    Json& folder = frequency[base_name(*source)];
    if (folder.is_null()) folder = Json::object();
    for (const ImageEntry& image : index.images) {
      if (image.subset != s) continue;
      for (const std::string& part : split(image.caption, ',')) {
        std::string tag = trim(part);
        if (tag.empty()) continue;
        std::transform(tag.begin(), tag.end(), tag.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
        folder[tag] = folder.value(tag, 0) + 1;
      }
    }
  }
  return frequency;
}

int64_t image_count(const DatasetIndex& index, size_t subset) {
  return std::count_if(index.images.begin(), index.images.end(), [&](const ImageEntry& image) { return image.subset == subset; });
}

// kohya's bucket_info: the non-empty buckets by their index in the bucket manager's sorted resolutions (the predefined
// ones with buckets, those the images made without upscaling, or the one resolution), their image counts with repeats,
// and the mean |bucket aspect ratio - image aspect ratio| over the images.
Json bucket_info(const DatasetConfig& dataset, const DatasetIndex& index) {
  std::map<Resolution, int64_t> counts;
  double error_sum = 0;
  for (const ImageEntry& image : index.images) {
    counts[image.bucket.bucket] += image.num_repeats;
    if (dataset.enable_bucket) {
      const Resolution& b = image.bucket.bucket;
      error_sum += std::abs(static_cast<double>(b.width) / static_cast<double>(b.height) -
                            static_cast<double>(image.width) / static_cast<double>(image.height));
    }
  }
  std::vector<Resolution> resos;
  if (dataset.enable_bucket && !dataset.bucket_no_upscale) {
    resos = make_bucket_resolutions({dataset.width, dataset.height}, dataset.min_bucket_reso, dataset.max_bucket_reso,
                                    dataset.bucket_reso_steps);
  } else {
    for (const auto& [reso, count] : counts) resos.push_back(reso);
  }
  Json buckets = Json::object();
  for (size_t i = 0; i < resos.size(); ++i) {
    const auto found = counts.find(resos[i]);
    if (found == counts.end() || found->second == 0) continue;
    buckets[std::to_string(i)] = {{"resolution", {resos[i].width, resos[i].height}}, {"count", found->second}};
  }
  Json info = {{"buckets", buckets}};
  // kohya's 0 (an int) when no image was fitted to a bucket.
  const bool fitted = dataset.enable_bucket && !index.images.empty();
  info["mean_img_ar_error"] = fitted ? Json(error_sum / static_cast<double>(index.images.size())) : Json(0);
  return info;
}

Json optional_string(const std::optional<std::string>& value) { return value ? Json(*value) : Json(nullptr); }

}  // namespace

safetensors::Metadata kohya_dataset_metadata(const DatasetBlueprint& blueprint, const std::vector<DatasetIndex>& indexes,
                                             const TrainArgs& args, int world_size) {
  Json datasets = Json::array(), tag_frequencies = Json::object(), dirs = Json::object(), reg_dirs = Json::object();
  for (size_t d = 0; d < blueprint.datasets.size(); ++d) {
    const DatasetConfig& dataset = blueprint.datasets[d];
    const DatasetIndex& index = indexes[d];
    const bool dreambooth = dataset.kind == DatasetKind::DreamBooth;
    const Json frequency = tag_frequency(dataset, index);
    Json subsets = Json::array();
    for (size_t s = 0; s < dataset.subsets.size(); ++s) {
      const SubsetConfig& subset = dataset.subsets[s];
      const int64_t images = image_count(index, s);
      Json entry = {{"img_count", images},
                    {"num_repeats", subset.num_repeats},
                    {"color_aug", subset.color_aug},
                    {"flip_aug", subset.flip_aug},
                    {"random_crop", subset.random_crop},
                    {"shuffle_caption", subset.shuffle_caption},
                    {"keep_tokens", subset.keep_tokens},
                    {"keep_tokens_separator", subset.keep_tokens_separator.value_or("")},  // kohya: --keep_tokens_separator's ""
                    {"secondary_separator", optional_string(subset.secondary_separator)},
                    {"enable_wildcard", subset.enable_wildcard},
                    {"caption_prefix", optional_string(subset.caption_prefix)},
                    {"caption_suffix", optional_string(subset.caption_suffix)},
                    {"resize_interpolation", optional_string(subset.resize_interpolation)}};
      std::optional<std::string> folder;
      if (subset.image_dir) entry["image_dir"] = *(folder = base_name(*subset.image_dir));
      if (dreambooth) {
        entry["class_tokens"] = optional_string(subset.class_tokens);
        entry["is_reg"] = subset.is_reg;
        if (subset.is_reg) folder.reset();  // regularisation folders are not merged into ss_dataset_dirs
      } else if (subset.metadata_file) {
        entry["metadata_file"] = *(folder = base_name(*subset.metadata_file));
      }
      subsets.push_back(entry);
      const Json info = {{"n_repeats", subset.num_repeats}, {"img_count", images}};
      if (!args.dataset_config) {
        if (subset.is_reg && subset.image_dir) reg_dirs[base_name(*subset.image_dir)] = info;
        else if (folder) dirs[*folder] = info;
        continue;
      }
      if (!folder) continue;
      std::string key = *folder;
      for (int k = 2; dirs.contains(key); ++k) key = fmt::format("{} ({})", *folder, k);
      dirs[key] = info;
    }
    Json described = {{"is_dreambooth", dreambooth},
                      {"batch_size_per_device", dataset.batch_size},
                      {"num_train_images", index.num_train_images},
                      {"num_reg_images", index.num_reg_images},
                      {"resolution", {dataset.width, dataset.height}},
                      {"enable_bucket", dataset.enable_bucket},
                      {"min_bucket_reso", dataset.min_bucket_reso},
                      {"max_bucket_reso", dataset.max_bucket_reso},
                      {"tag_frequency", frequency},
                      {"bucket_info", bucket_info(dataset, index)},
                      {"resize_interpolation", optional_string(dataset.resize_interpolation)},
                      {"subsets", subsets}};
    datasets.push_back(described);
    for (const auto& [folder, counts] : frequency.items()) {
      if (!tag_frequencies.contains(folder)) tag_frequencies[folder] = counts;
    }
  }
  if (args.dataset_config) {
    return {{"ss_datasets", python_json(datasets)},
            {"ss_tag_frequency", python_json(tag_frequencies)},
            {"ss_dataset_dirs", python_json(dirs)}};
  }
  // Folders on the command line: one dataset, described by kohya's flat keys (values as Python's str() of them).
  const DatasetConfig& dataset = blueprint.datasets.at(0);
  return {{"ss_batch_size_per_device", std::to_string(args.train_batch_size)},
          {"ss_total_batch_size", std::to_string(args.train_batch_size * world_size * args.gradient_accumulation_steps)},
          {"ss_resolution", args.resolution.value_or("None")},
          {"ss_color_aug", python_str(args.color_aug)},
          {"ss_flip_aug", python_str(args.flip_aug)},
          {"ss_random_crop", python_str(args.random_crop)},
          {"ss_shuffle_caption", python_str(args.shuffle_caption)},
          {"ss_enable_bucket", python_str(dataset.enable_bucket)},
          {"ss_bucket_no_upscale", python_str(dataset.bucket_no_upscale)},
          {"ss_min_bucket_reso", std::to_string(dataset.min_bucket_reso)},
          {"ss_max_bucket_reso", std::to_string(dataset.max_bucket_reso)},
          {"ss_keep_tokens", std::to_string(args.keep_tokens)},
          {"ss_dataset_dirs", python_json(dirs)},
          {"ss_reg_dataset_dirs", python_json(reg_dirs)},
          {"ss_tag_frequency", python_json(tag_frequencies)},
          {"ss_bucket_info", python_json(bucket_info(dataset, indexes.at(0)))}};
}

}  // namespace sdt
