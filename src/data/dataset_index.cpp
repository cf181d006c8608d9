#include "src/data/dataset_index.h"

#include <sys/stat.h>

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <map>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include "src/data/rng.h"

#include "src/core/error.h"
#include "src/data/captions.h"
#include "src/data/image.h"

namespace sdt {
namespace {

namespace fs = std::filesystem;
constexpr int kIndexVersion = 1;
constexpr const char* kIndexFile = "sdt_index.json";

void warn(DatasetIndex& index, std::string message) {
  spdlog::warn("{}", message);
  index.warnings.push_back(std::move(message));
}

bool valid_utf8(const std::string& s) {
  size_t i = 0;
  while (i < s.size()) {
    unsigned char c = static_cast<unsigned char>(s[i]);
    size_t n = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 0;
    if (n == 0 || i + n > s.size()) return false;
    for (size_t k = 1; k < n; ++k) {
      if ((static_cast<unsigned char>(s[i + k]) >> 6) != 0x2) return false;
    }
    i += n;
  }
  return true;
}

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(path, "cannot read: {}", std::strerror(errno));
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

// Image files directly in `dir` (not recursive), sorted, as kohya's glob_images. A symbolic link to nothing is left out
// with a warning.
std::vector<std::string> list_images(const std::string& dir) {
  std::vector<std::string> files;
  for (const auto& e : fs::directory_iterator(dir)) {
    if (!has_image_extension(e.path().filename().string())) continue;
    if (e.is_regular_file()) {
      files.push_back(e.path().string());
    } else if (e.is_symlink() && !fs::exists(e.path())) {
      spdlog::warn("{}: a symbolic link to {}, which does not exist; left out", e.path().string(), fs::read_symlink(e.path()).string());
    }
  }
  std::sort(files.begin(), files.end());
  return files;
}

// An image's size from its header; with `verify` (--skip_bad_images) the whole image is decoded too, so a truncated or
// corrupt file is found here, before training, and not at the step that loads it.
ImageSize checked_image_size(const std::string& path, bool verify) {
  const ImageSize size = read_image_size(path);
  if (verify) {
    const Image image = decode_image(path, false);
    if (image.width != size.width || image.height != size.height) {
      fail(path, "decodes to {}x{} but its header says {}x{}", image.width, image.height, size.width, size.height);
    }
  }
  return size;
}

struct FolderEntry {
  std::string path;
  std::optional<std::string> caption;
  int64_t width = 0, height = 0;
};

struct FileStamp {
  int64_t mtime_ns = -1;  // -1: no such file
  int64_t size = -1;
  bool operator==(const FileStamp&) const = default;
};

FileStamp stamp(const std::string& path) {
  struct stat st{};
  if (::stat(path.c_str(), &st) != 0) return {};
  return {static_cast<int64_t>(st.st_mtim.tv_sec) * 1'000'000'000 + st.st_mtim.tv_nsec, static_cast<int64_t>(st.st_size)};
}

std::vector<std::string> caption_candidates(const std::string& image_path, const std::string& extension) {
  const fs::path p(image_path);
  std::vector<std::string> out = {(p.parent_path() / p.stem()).string() + extension};
  auto tokens = python_split(p.stem().string(), "_");
  if (tokens.size() >= 5) {  // face-crop names "<name>_cx_cy_w_h"
    std::string base;
    for (size_t i = 0; i + 4 < tokens.size(); ++i) base += (i ? "_" : "") + tokens[i];
    out.push_back((p.parent_path() / base).string() + extension);
  }
  return out;
}

// One DreamBooth/ControlNet folder: file list, captions and sizes. sdt_index.json beside the images
// remembers each image's size and caption with the stamps (mtime, size) of the files they came
// from; a later start lists the folder and stats files, and opens only images and captions whose
// stamps changed.
std::vector<FolderEntry> index_folder(const SubsetConfig& subset, const IndexOptions& options, DatasetIndex& index) {
  const std::string dir = *subset.image_dir;
  const std::string cache_path = (fs::path(dir) / kIndexFile).string();
  const bool all_lines = subset.enable_wildcard;

  std::map<std::string, nlohmann::json> cached;  // file name -> record
  if (options.use_index_cache && fs::exists(cache_path)) {
    try {
      auto j = nlohmann::json::parse(read_text(cache_path));
      if (j.at("version") == kIndexVersion && j.at("caption_extension") == subset.caption_extension &&
          j.at("all_caption_lines") == all_lines) {
        for (auto& e : j.at("images")) cached[e.at("file").get<std::string>()] = e;
      }
    } catch (const nlohmann::json::exception& e) {
      warn(index, fmt::format("{}: unreadable index, rebuilding it ({})", cache_path, e.what()));
    }
  }

  std::vector<FolderEntry> entries;
  nlohmann::json records = nlohmann::json::array();
  bool changed = false;
  for (const auto& path : list_images(dir)) {
    const std::string name = fs::path(path).filename().string();
    const FileStamp image_stamp = stamp(path);
    std::vector<FileStamp> caption_stamps;
    for (const auto& c : caption_candidates(path, subset.caption_extension)) caption_stamps.push_back(stamp(c));
    auto it = cached.find(name);
    auto stamps_json = [](const std::vector<FileStamp>& v) {
      nlohmann::json a = nlohmann::json::array();
      for (const auto& s : v) a.push_back({s.mtime_ns, s.size});
      return a;
    };
    FolderEntry f{path, std::nullopt, 0, 0};
    // A cached record is used as it is, except that --skip_bad_images needs it verified by a full decode once.
    const bool needs_verifying = options.skip_bad_images && (it == cached.end() || !it->second.value("verified", false));
    if (it != cached.end() && !needs_verifying && it->second.at("image_stamp") == nlohmann::json({image_stamp.mtime_ns, image_stamp.size}) &&
        it->second.at("caption_stamps") == stamps_json(caption_stamps)) {
      f.width = it->second.at("width");
      f.height = it->second.at("height");
      if (!it->second.at("caption").is_null()) f.caption = it->second.at("caption").get<std::string>();
    } else {
      changed = true;
      f.caption = read_caption_file(path, subset.caption_extension, all_lines);
      try {
        ImageSize size = checked_image_size(path, options.skip_bad_images);
        f.width = size.width;
        f.height = size.height;
      } catch (const Error& e) {
        if (!options.skip_bad_images) throw;
        warn(index, fmt::format("skipping unreadable image: {}", e.what()));
        continue;
      }
    }
    const bool verified = options.skip_bad_images || (it != cached.end() && it->second.value("verified", false));
    records.push_back({{"file", name},
                       {"width", f.width},
                       {"height", f.height},
                       {"verified", verified},
                       {"caption", f.caption ? nlohmann::json(*f.caption) : nlohmann::json(nullptr)},
                       {"image_stamp", {image_stamp.mtime_ns, image_stamp.size}},
                       {"caption_stamps", stamps_json(caption_stamps)}});
    entries.push_back(std::move(f));
  }
  changed = changed || records.size() != cached.size();
  if (options.use_index_cache && changed) {
    const nlohmann::json j = {{"version", kIndexVersion},
                              {"caption_extension", subset.caption_extension},
                              {"all_caption_lines", all_lines},
                              {"images", records}};
    const std::string tmp = cache_path + ".tmp-" + std::to_string(::getpid());
    std::ofstream out(tmp);
    out << j.dump();
    out.close();
    std::error_code ec;
    if (out) fs::rename(tmp, cache_path, ec);
    if (!out || ec) {
      fs::remove(tmp, ec);
      warn(index, fmt::format("{}: cannot write the index (read-only folder?); the folder is scanned again next time", cache_path));
    }
  }
  return entries;
}

std::string find_conditioning_image(const std::string& cond_dir, const std::string& image_path) {
  const std::string stem = fs::path(image_path).stem().string();
  for (const auto& candidate : list_images(cond_dir)) {
    if (fs::path(candidate).stem().string() == stem) return candidate;
  }
  return "";
}

void index_dreambooth(const DatasetConfig& dataset, const IndexOptions& options, DatasetIndex& index) {
  std::vector<size_t> reg_positions;  // into index.images, in registration order
  std::vector<ImageEntry> reg_entries;
  for (size_t s = 0; s < dataset.subsets.size(); ++s) {
    const SubsetConfig& subset = dataset.subsets[s];
    const std::string& dir = *subset.image_dir;
    if (!fs::is_directory(dir)) {
      fail(dir, "image folder not found (image_dir of [[datasets.subsets]] #{})", s + 1);
    }
    if (subset.is_reg && options.part == DatasetPart::validation) continue;
    std::vector<FolderEntry> entries = index_folder(subset, options, index);
    if (entries.empty()) {
      warn(index, fmt::format("{}: no images (.png .jpg .jpeg .webp .bmp) found; subset ignored", dir));
      continue;
    }
    const int64_t num_repeats = options.part == DatasetPart::validation ? 1 : subset.num_repeats;
    if (!subset.is_reg && options.part != DatasetPart::all && dataset.validation_split > 0) {
      const size_t n = entries.size();
      std::vector<FolderEntry> shuffled;
      for (size_t i : python_shuffle_order(n, static_cast<uint64_t>(dataset.validation_seed.value_or(
                                                  static_cast<int64_t>(options.validation_seed))))) {
        shuffled.push_back(entries[i]);
      }
      const auto keep = options.part == DatasetPart::training
                            ? static_cast<size_t>(std::ceil(static_cast<double>(n) * (1.0 - dataset.validation_split)))
                            : static_cast<size_t>(std::nearbyint(static_cast<double>(n) * dataset.validation_split));
      if (options.part == DatasetPart::training) {
        shuffled.resize(std::min(keep, n));
      } else {
        shuffled.erase(shuffled.begin(), shuffled.end() - static_cast<std::ptrdiff_t>(std::min(keep, n)));
      }
      entries = std::move(shuffled);
      if (entries.empty()) continue;
    }
    std::vector<std::string> missing;
    std::vector<std::string> cond_files;
    if (dataset.kind == DatasetKind::ControlNet) {
      for (const auto& f : list_images(*subset.conditioning_data_dir)) cond_files.push_back(fs::path(f).stem().string());
    }
    for (auto& f : entries) {
      ImageEntry e;
      e.path = f.path;
      e.width = f.width;
      e.height = f.height;
      e.num_repeats = num_repeats;
      e.is_reg = subset.is_reg;
      e.subset = s;
      if (f.caption) {
        e.caption = *f.caption;
      } else {
        e.caption = subset.class_tokens.value_or("");
        missing.push_back(f.path);
      }
      if (dataset.kind == DatasetKind::ControlNet) {
        e.conditioning_path = find_conditioning_image(*subset.conditioning_data_dir, f.path);
        if (e.conditioning_path.empty()) {
          fail(f.path, "no conditioning image with the same name in {}", *subset.conditioning_data_dir);
        }
      }
      if (e.is_reg) {
        reg_entries.push_back(std::move(e));
      } else {
        index.num_train_images += num_repeats;
        index.images.push_back(std::move(e));
      }
    }
    if (subset.is_reg) index.num_reg_images += subset.num_repeats * static_cast<int64_t>(entries.size());
    if (!missing.empty()) {
      std::string first;
      for (size_t i = 0; i < std::min<size_t>(5, missing.size()); ++i) first += (i ? ", " : "") + missing[i];
      warn(index, fmt::format("{} images in {} have no caption file ({}); using class_tokens '{}' for: {}{}", missing.size(), dir,
                              subset.caption_extension, subset.class_tokens.value_or(""), first, missing.size() > 5 ? ", ..." : ""));
    }
    if (dataset.kind == DatasetKind::ControlNet && cond_files.size() != entries.size()) {
      fail(*subset.conditioning_data_dir, "{} conditioning images for {} images in {} (each image needs exactly one, same name)",
           cond_files.size(), entries.size(), dir);
    }
  }

  // kohya's balancing: register regularization images one by one, then add a repeat at a time,
  // cycling, until they match the training images (with repeats). Extra reg images stay unused.
  if (index.num_reg_images == 0) {
    if (options.part != DatasetPart::validation && (!reg_entries.empty() || dataset.kind == DatasetKind::DreamBooth)) {
      warn(index, "no regularization images");
    }
    return;
  }
  if (index.num_train_images < index.num_reg_images) warn(index, "more regularization images than training images: some are not used");
  int64_t n = 0;
  bool first_loop = true;
  size_t registered = 0;
  while (n < index.num_train_images) {
    for (size_t i = 0; i < reg_entries.size(); ++i) {
      if (first_loop) {
        n += reg_entries[i].num_repeats;
        registered = i + 1;
      } else {
        reg_entries[i].num_repeats += 1;
        n += 1;
      }
      if (n >= index.num_train_images) break;
    }
    first_loop = false;
  }
  for (size_t i = 0; i < registered; ++i) index.images.push_back(std::move(reg_entries[i]));
}

std::string resolve_ft_image(const SubsetConfig& subset, const std::string& key) {
  if (fs::exists(key)) return key;
  if (subset.image_dir) {
    fs::path joined = fs::path(*subset.image_dir) / key;
    if (fs::exists(joined)) return joined.string();
    for (const char* ext : {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".PNG", ".JPG", ".JPEG", ".WEBP", ".BMP"}) {
      if (fs::exists(joined.string() + ext)) return joined.string() + ext;
    }
  }
  return "";
}

void index_fine_tuning(const DatasetConfig& dataset, const IndexOptions& options, DatasetIndex& index) {
  for (size_t s = 0; s < dataset.subsets.size(); ++s) {
    const SubsetConfig& subset = dataset.subsets[s];
    const std::string& meta_path = *subset.metadata_file;
    if (!fs::exists(meta_path)) fail(meta_path, "metadata file not found (metadata_file of [[datasets.subsets]] #{})", s + 1);
    // {key: {caption, tags, image_size, ...}} or JSON lines {image_path, caption, tags, image_size}
    std::vector<std::pair<std::string, nlohmann::json>> records;
    try {
      if (meta_path.ends_with(".jsonl")) {
        std::istringstream lines(read_text(meta_path));
        std::string line;
        while (std::getline(lines, line)) {
          if (python_strip(line).empty()) continue;
          auto j = nlohmann::json::parse(line);
          records.emplace_back(j.at("image_path").get<std::string>(), j);
        }
      } else {
        auto j = nlohmann::json::parse(read_text(meta_path));
        for (auto& [key, value] : j.items()) records.emplace_back(key, value);
      }
    } catch (const nlohmann::json::exception& e) {
      fail(meta_path, "not a valid metadata file: {}", e.what());
    }
    for (const auto& [key, meta] : records) {
      ImageEntry e;
      e.path = resolve_ft_image(subset, key);
      if (e.path.empty()) fail(meta_path, "image '{}' not found (image_dir: {})", key, subset.image_dir.value_or("none"));
      std::string caption = meta.contains("caption") && meta["caption"].is_string() ? meta["caption"].get<std::string>() : "";
      std::string tags = meta.contains("tags") && meta["tags"].is_string() ? meta["tags"].get<std::string>() : "";
      if (!tags.empty()) caption = caption.empty() ? tags : caption + subset.caption_separator + tags;
      e.caption = caption;
      if (meta.contains("image_size") && meta["image_size"].is_array() && meta["image_size"].size() == 2) {
        e.width = meta["image_size"][0].get<int64_t>();
        e.height = meta["image_size"][1].get<int64_t>();
      } else {
        try {
          ImageSize size = checked_image_size(e.path, options.skip_bad_images);
          e.width = size.width;
          e.height = size.height;
        } catch (const Error& err) {
          if (!options.skip_bad_images) throw;
          warn(index, fmt::format("skipping unreadable image: {}", err.what()));
          continue;
        }
      }
      e.num_repeats = subset.num_repeats;
      e.subset = s;
      index.num_train_images += subset.num_repeats;
      index.images.push_back(std::move(e));
    }
  }
}

}  // namespace

std::optional<std::string> read_caption_file(const std::string& image_path, const std::string& extension, bool all_lines) {
  const std::vector<std::string> candidates = caption_candidates(image_path, extension);
  for (const auto& path : candidates) {
    if (!fs::is_regular_file(path)) continue;
    std::string text = read_text(path);
    if (!valid_utf8(text)) fail(path, "caption file is not UTF-8");
    std::vector<std::string> lines;
    std::istringstream in(text);
    std::string line;
    while (std::getline(in, line)) lines.push_back(line);
    if (lines.empty()) fail(path, "caption file is empty");
    if (!all_lines) return python_strip(lines[0]);
    std::string caption;
    for (const auto& l : lines) {
      std::string s = python_strip(l);
      if (!s.empty()) caption += (caption.empty() ? "" : "\n") + s;
    }
    return caption;
  }
  return std::nullopt;
}

DatasetIndex build_dataset_index(const DatasetConfig& dataset, const IndexOptions& options) {
  DatasetIndex index;
  if (options.part == DatasetPart::validation) {
    // Only DreamBooth-style datasets hold images out; an empty validation part is not an error.
    if (dataset.kind != DatasetKind::FineTuning && dataset.validation_split > 0) index_dreambooth(dataset, options, index);
    return index;
  }
  if (dataset.kind == DatasetKind::FineTuning) {
    index_fine_tuning(dataset, options, index);
  } else {
    index_dreambooth(dataset, options, index);
  }
  if (index.images.empty()) fail("dataset", "no images found in any subset (check image_dir / metadata_file)");
  return index;
}

void assign_buckets(const DatasetConfig& dataset, DatasetIndex& index) {
  const Resolution reso{dataset.width, dataset.height};
  if (!dataset.enable_bucket) {
    for (auto& e : index.images) e.bucket = {reso, {e.width, e.height}};
    return;
  }
  BucketSelector selector(reso, dataset.min_bucket_reso, dataset.max_bucket_reso, dataset.bucket_reso_steps,
                          dataset.bucket_no_upscale);
  for (auto& e : index.images) e.bucket = selector.select(e.width, e.height);
}

std::vector<DatasetIndex> index_datasets(const DatasetBlueprint& blueprint, const IndexOptions& options) {
  std::vector<DatasetIndex> indexes;
  for (const auto& d : blueprint.datasets) {
    indexes.push_back(build_dataset_index(d, options));
    assign_buckets(d, indexes.back());
  }
  return indexes;
}

}  // namespace sdt
