#include "src/core/dataset_config.h"

#include <algorithm>
#include <filesystem>
#include <sstream>

#include <spdlog/spdlog.h>

#include <toml.hpp>

#include "src/core/error.h"
#include "src/core/text.h"

namespace sdt {
namespace {

enum KindBits : unsigned { kDB = 1u << 0, kFT = 1u << 1, kCN = 1u << 2, kAll = kDB | kFT | kCN };

unsigned kind_bit(DatasetKind kind) {
  switch (kind) {
    case DatasetKind::DreamBooth: return kDB;
    case DatasetKind::FineTuning: return kFT;
    case DatasetKind::ControlNet: return kCN;
  }
  return 0;
}

enum class ValueType { Bool, Int, Float, Str, Resolution, FloatPair, Table };

using Value = std::variant<bool, int64_t, double, std::string, std::pair<int64_t, int64_t>, std::pair<double, double>,
                           std::map<std::string, CustomAttribute>>;

template <typename T>
void assign(T& field, const Value& v) {
  field = std::get<T>(v);
}
template <typename T>
void assign(std::optional<T>& field, const Value& v) {
  field = std::get<T>(v);
}

// Where a key may appear (kohya's ConfigSanitizer schemas), where its value goes, and the range
// check that kohya leaves to crash later.
struct DatasetKey {
  const char* name;
  ValueType type;
  bool in_general;
  unsigned in_dataset;        // dataset kinds whose [[datasets]] table may hold the key
  unsigned in_subset;         // dataset kinds whose subsets may hold it
  unsigned required_in_subset;
  void (*to_subset)(SubsetConfig&, const Value&);
  void (*to_dataset)(DatasetConfig&, const Value&);
  std::string (*check)(const Value&);  // "" when fine, else what was expected
  const char* help;
};

#define SUBSET_FIELD(field) [](SubsetConfig& s, const Value& v) { assign(s.field, v); }
#define DATASET_FIELD(field) [](DatasetConfig& d, const Value& v) { assign(d.field, v); }

std::string at_least_0(const Value& v) { return std::get<int64_t>(v) >= 0 ? "" : "an integer >= 0"; }
std::string at_least_1(const Value& v) { return std::get<int64_t>(v) >= 1 ? "" : "an integer >= 1"; }
std::string rate(const Value& v) {
  double x = std::get<double>(v);
  return x >= 0.0 && x <= 1.0 ? "" : "a number between 0 and 1";
}
std::string non_negative(const Value& v) { return std::get<double>(v) >= 0.0 ? "" : "a number >= 0"; }
std::string positive_resolution(const Value& v) {
  auto [w, h] = std::get<std::pair<int64_t, int64_t>>(v);
  return w > 0 && h > 0 ? "" : "positive sizes";
}
std::string face_crop_range(const Value& v) {
  auto [lo, hi] = std::get<std::pair<double, double>>(v);
  return lo > 0 && lo <= hi ? "" : "[low, high] with 0 < low <= high";
}
std::string interpolation(const Value& v) {
  static const std::vector<std::string> names = {"lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area"};
  const auto& s = std::get<std::string>(v);
  for (const auto& n : names) {
    if (n == s) return "";
  }
  return "one of lanczos, nearest, bilinear, linear, bicubic, cubic, area" + did_you_mean(s, names);
}

const std::vector<DatasetKey>& dataset_keys() {
  using VT = ValueType;
  static const std::vector<DatasetKey> keys = {
      // kohya DATASET_ASCENDABLE_SCHEMA: [general] and [[datasets]]
      {"batch_size", VT::Int, true, kAll, 0, 0, nullptr, DATASET_FIELD(batch_size), at_least_1,
       "batch size (command line: --train_batch_size)"},
      {"bucket_no_upscale", VT::Bool, true, kAll, 0, 0, nullptr, DATASET_FIELD(bucket_no_upscale), nullptr,
       "never upscale an image to fit a bucket"},
      {"bucket_reso_steps", VT::Int, true, kAll, 0, 0, nullptr, DATASET_FIELD(bucket_reso_steps), at_least_1,
       "bucket size step in pixels"},
      {"enable_bucket", VT::Bool, true, kAll, 0, 0, nullptr, DATASET_FIELD(enable_bucket), nullptr,
       "aspect-ratio buckets"},
      {"max_bucket_reso", VT::Int, true, kAll, 0, 0, nullptr, DATASET_FIELD(max_bucket_reso), at_least_1,
       "largest bucket side"},
      {"min_bucket_reso", VT::Int, true, kAll, 0, 0, nullptr, DATASET_FIELD(min_bucket_reso), at_least_1,
       "smallest bucket side"},
      {"validation_seed", VT::Int, true, kAll, 0, 0, nullptr, DATASET_FIELD(validation_seed), nullptr,
       "seed of the train/validation split"},
      {"validation_split", VT::Float, true, kAll, 0, 0, nullptr, DATASET_FIELD(validation_split), rate,
       "fraction of images held out for validation"},
      {"resolution", VT::Resolution, true, kAll, 0, 0, nullptr,
       [](DatasetConfig& d, const Value& v) { std::tie(d.width, d.height) = std::get<std::pair<int64_t, int64_t>>(v); },
       positive_resolution, "training size: `512` or `[width, height]` (required)"},
      {"network_multiplier", VT::Float, true, kAll, 0, 0, nullptr, DATASET_FIELD(network_multiplier), nullptr,
       "network multiplier for this dataset's batches"},
      // kohya SUBSET_ASCENDABLE_SCHEMA: every level
      {"color_aug", VT::Bool, true, kAll, kAll, 0, SUBSET_FIELD(color_aug), nullptr, nullptr, "weak colour augmentation"},
      {"face_crop_aug_range", VT::FloatPair, true, kAll, kAll, 0, SUBSET_FIELD(face_crop_aug_range), nullptr,
       face_crop_range, "face-centred crop, face size range `[low, high]`"},
      {"flip_aug", VT::Bool, true, kAll, kAll, 0, SUBSET_FIELD(flip_aug), nullptr, nullptr, "horizontal flip augmentation"},
      {"num_repeats", VT::Int, true, kAll, kAll, 0, SUBSET_FIELD(num_repeats), nullptr, at_least_1,
       "times each image is repeated per epoch (command line: --dataset_repeats)"},
      {"random_crop", VT::Bool, true, kAll, kAll, 0, SUBSET_FIELD(random_crop), nullptr, nullptr,
       "random instead of centre crop"},
      {"shuffle_caption", VT::Bool, true, kAll, kAll, 0, SUBSET_FIELD(shuffle_caption), nullptr, nullptr,
       "shuffle caption tags"},
      {"keep_tokens", VT::Int, true, kAll, kAll, 0, SUBSET_FIELD(keep_tokens), nullptr, at_least_0,
       "leading tags never shuffled"},
      {"keep_tokens_separator", VT::Str, true, kAll, kAll, 0, SUBSET_FIELD(keep_tokens_separator), nullptr, nullptr,
       "separator ending the fixed part of a caption"},
      {"secondary_separator", VT::Str, true, kAll, kAll, 0, SUBSET_FIELD(secondary_separator), nullptr, nullptr,
       "separator of tags that move together"},
      {"caption_separator", VT::Str, true, kAll, kAll, 0, SUBSET_FIELD(caption_separator), nullptr, nullptr,
       "tag separator"},
      {"enable_wildcard", VT::Bool, true, kAll, kAll, 0, SUBSET_FIELD(enable_wildcard), nullptr, nullptr,
       "`{a|b}` wildcards and multi-line captions"},
      {"token_warmup_min", VT::Int, true, kAll, kAll, 0, SUBSET_FIELD(token_warmup_min), nullptr, at_least_0,
       "tags used at the start of token warm-up"},
      {"token_warmup_step", VT::Float, true, kAll, kAll, 0, SUBSET_FIELD(token_warmup_step), nullptr, non_negative,
       "steps (or ratio of steps, below 1) until all tags are used"},
      {"caption_prefix", VT::Str, true, kAll, kAll, 0, SUBSET_FIELD(caption_prefix), nullptr, nullptr,
       "text put before every caption"},
      {"caption_suffix", VT::Str, true, kAll, kAll, 0, SUBSET_FIELD(caption_suffix), nullptr, nullptr,
       "text put after every caption"},
      {"custom_attributes", VT::Table, true, kAll, kAll, 0, SUBSET_FIELD(custom_attributes), nullptr, nullptr,
       "free-form scalars handed to training (`diff_output_preservation`)"},
      {"resize_interpolation", VT::Str, true, kAll, kAll, 0, SUBSET_FIELD(resize_interpolation),
       DATASET_FIELD(resize_interpolation), interpolation, "resize filter (default: area when shrinking, lanczos when enlarging)"},
      // kohya DO_SUBSET_ASCENDABLE_SCHEMA: caption dropout, every level
      {"caption_dropout_every_n_epochs", VT::Int, true, kAll, kAll, 0, SUBSET_FIELD(caption_dropout_every_n_epochs),
       nullptr, at_least_0, "drop all captions every N epochs"},
      {"caption_dropout_rate", VT::Float, true, kAll, kAll, 0, SUBSET_FIELD(caption_dropout_rate), nullptr, rate,
       "probability of an empty caption"},
      {"caption_tag_dropout_rate", VT::Float, true, kAll, kAll, 0, SUBSET_FIELD(caption_tag_dropout_rate), nullptr, rate,
       "probability of dropping each tag"},
      // kohya DB_/CN_SUBSET_ASCENDABLE_SCHEMA
      {"caption_extension", VT::Str, true, kDB | kCN, kDB | kCN, 0, SUBSET_FIELD(caption_extension), nullptr, nullptr,
       "caption file extension"},
      {"class_tokens", VT::Str, true, kDB, kDB, 0, SUBSET_FIELD(class_tokens), nullptr, nullptr,
       "caption used when an image has no caption file"},
      {"cache_info", VT::Bool, true, kDB | kCN, kDB | kCN, 0, SUBSET_FIELD(cache_info), nullptr, nullptr,
       "cache image sizes and captions in the folder"},
      // kohya *_SUBSET_DISTINCT_SCHEMA: subsets only
      {"image_dir", VT::Str, false, 0, kAll, kDB | kCN, SUBSET_FIELD(image_dir), nullptr, nullptr, "folder of images"},
      {"is_reg", VT::Bool, false, 0, kDB, 0, SUBSET_FIELD(is_reg), nullptr, nullptr, "regularization images"},
      {"alpha_mask", VT::Bool, false, 0, kDB | kFT, 0, SUBSET_FIELD(alpha_mask), nullptr, nullptr,
       "use the alpha channel as loss mask"},
      {"metadata_file", VT::Str, false, 0, kFT, kFT, SUBSET_FIELD(metadata_file), nullptr, nullptr,
       "fine-tuning metadata JSON"},
      {"conditioning_data_dir", VT::Str, false, 0, kCN, kCN, SUBSET_FIELD(conditioning_data_dir), nullptr, nullptr,
       "folder of conditioning images, paired by file stem"},
  };
  return keys;
}

#undef SUBSET_FIELD
#undef DATASET_FIELD

// Keys that exist only on the command line (kohya's ARGPARSE_SPECIFIC_SCHEMA).
const std::vector<std::string> kCommandLineOnly = {"debug_dataset", "max_token_length", "prior_loss_weight"};

// The command-line argument a dataset key falls back to (kohya's ARGPARSE_OPTNAME_TO_CONFIG_OPTNAME).
std::string argparse_name(const std::string& key) {
  if (key == "batch_size") return "train_batch_size";
  if (key == "num_repeats") return "dataset_repeats";
  return key;
}

const DatasetKey* find_key(std::string_view name) {
  for (const auto& k : dataset_keys()) {
    if (name == k.name) return &k;
  }
  return nullptr;
}

std::vector<std::string> key_names() {
  std::vector<std::string> names;
  for (const auto& k : dataset_keys()) names.push_back(k.name);
  return names;
}

std::string_view type_text(ValueType t) {
  switch (t) {
    case ValueType::Bool: return "true/false";
    case ValueType::Int: return "an integer";
    case ValueType::Float: return "a number";
    case ValueType::Str: return "a string";
    case ValueType::Resolution: return "an integer or [width, height]";
    case ValueType::FloatPair: return "[number, number]";
    case ValueType::Table: return "a table of scalars";
  }
  return "?";
}

std::optional<double> toml_number(const toml::value& v) {
  if (v.is_floating()) return v.as_floating();
  if (v.is_integer()) return static_cast<double>(v.as_integer());
  return std::nullopt;
}

std::optional<Value> from_toml(ValueType type, const toml::value& v) {
  switch (type) {
    case ValueType::Bool:
      if (v.is_boolean()) return v.as_boolean();
      break;
    case ValueType::Int:
      if (v.is_integer()) return static_cast<int64_t>(v.as_integer());
      break;
    case ValueType::Float:
      if (auto x = toml_number(v)) return *x;
      break;
    case ValueType::Str:
      if (v.is_string()) return v.as_string().str;
      break;
    case ValueType::Resolution:
      if (v.is_integer()) return std::pair<int64_t, int64_t>{v.as_integer(), v.as_integer()};
      if (v.is_array() && v.as_array().size() == 2 && v.as_array()[0].is_integer() && v.as_array()[1].is_integer()) {
        return std::pair<int64_t, int64_t>{v.as_array()[0].as_integer(), v.as_array()[1].as_integer()};
      }
      break;
    case ValueType::FloatPair:
      if (v.is_array() && v.as_array().size() == 2) {
        auto a = toml_number(v.as_array()[0]), b = toml_number(v.as_array()[1]);
        if (a && b) return std::pair<double, double>{*a, *b};
      }
      break;
    case ValueType::Table:
      if (v.is_table()) {
        std::map<std::string, CustomAttribute> out;
        for (const auto& [k, e] : v.as_table()) {
          if (e.is_boolean()) out[k] = e.as_boolean();
          else if (e.is_integer()) out[k] = static_cast<int64_t>(e.as_integer());
          else if (e.is_floating()) out[k] = e.as_floating();
          else if (e.is_string()) out[k] = e.as_string().str;
          else return std::nullopt;
        }
        return out;
      }
      break;
  }
  return std::nullopt;
}

// A command-line value (kohya's argparse namespace) as a dataset value; nullopt when unset.
std::optional<Value> from_arg(ValueType type, const ArgValue& a, const std::string& name) {
  if (std::holds_alternative<std::monostate>(a)) return std::nullopt;
  auto pair_of = [&](auto parse) {
    const auto& s = std::get<std::string>(a);
    auto parts = split(s, ',');
    if (parts.size() == 1) parts.push_back(parts[0]);
    if (parts.size() != 2) fail("command line", "argument --{}: expected 'A' or 'A,B', got '{}'", name, s);
    return std::make_pair(parse(parts[0]), parse(parts[1]));
  };
  switch (type) {
    case ValueType::Bool: return std::get<bool>(a);
    case ValueType::Int: return std::get<int64_t>(a);
    case ValueType::Float: return std::get<double>(a);
    case ValueType::Str: return std::get<std::string>(a);
    case ValueType::Resolution:
      return pair_of([&](const std::string& p) -> int64_t {
        try {
          return std::stoll(p);
        } catch (const std::exception&) {
          fail("command line", "argument --{}: expected 'SIZE' or 'WIDTH,HEIGHT', got '{}'", name, std::get<std::string>(a));
        }
      });
    case ValueType::FloatPair:
      return pair_of([&](const std::string& p) -> double {
        try {
          return std::stod(p);
        } catch (const std::exception&) {
          fail("command line", "argument --{}: expected 'LOW,HIGH', got '{}'", name, std::get<std::string>(a));
        }
      });
    case ValueType::Table: return std::nullopt;
  }
  return std::nullopt;
}

// One table of the file ([general], a [[datasets]] entry or a subset), checked key by key.
struct Level {
  std::string where;  // "file: [[datasets]] #1 > [[datasets.subsets]] #2"
  std::map<std::string, std::pair<Value, std::string>> values;  // key -> (value, where with line)
};

std::string line_of(const std::string& file, const toml::value& v) {
  return fmt::format("{}:{}", file, v.location().line());
}

std::string describe_levels(const DatasetKey& k) {
  std::vector<std::string> levels;
  if (k.in_general) levels.push_back("[general]");
  if (k.in_dataset) levels.push_back("[[datasets]]");
  if (k.in_subset) levels.push_back("[[datasets.subsets]]");
  std::string s;
  for (size_t i = 0; i < levels.size(); ++i) s += (i ? ", " : "") + levels[i];
  return s;
}

std::string describe_kinds(unsigned bits) {
  std::vector<std::string> names;
  if (bits & kDB) names.push_back("DreamBooth");
  if (bits & kFT) names.push_back("fine-tuning");
  if (bits & kCN) names.push_back("ControlNet");
  std::string s;
  for (size_t i = 0; i < names.size(); ++i) s += (i ? " and " : "") + names[i];
  return s;
}

// kind == nullopt: [general]. subset: whether the table is a subset.
Level read_level(const toml::table& table, const std::string& file, const std::string& label, bool is_subset,
                 std::optional<DatasetKind> kind, const std::vector<std::string>& skip = {}) {
  Level level{file + ": " + label, {}};
  for (const auto& [key, v] : table) {
    if (std::find(skip.begin(), skip.end(), key) != skip.end()) continue;
    const std::string where = line_of(file, v) + ": " + label + ": key '" + key + "'";
    const DatasetKey* k = find_key(key);
    if (!k) {
      if (std::find(kCommandLineOnly.begin(), kCommandLineOnly.end(), key) != kCommandLineOnly.end()) {
        fail(where, "'{}' is a command-line argument (--{}), not a dataset config key", key, key);
      }
      fail(where, "unknown dataset config key{}", did_you_mean(key, key_names()));
    }
    bool allowed = !kind ? k->in_general : (is_subset ? (k->in_subset & kind_bit(*kind)) : (k->in_dataset & kind_bit(*kind)));
    if (!allowed) {
      const unsigned kinds = is_subset ? k->in_subset : k->in_dataset;
      if (kind && kinds != 0) {
        fail(where, "not allowed in a {} dataset here (allowed for {} datasets; at {})", dataset_kind_name(*kind),
             describe_kinds(kinds), describe_levels(*k));
      }
      fail(where, "not allowed at this level (allowed at {})", describe_levels(*k));
    }
    auto value = from_toml(k->type, v);
    if (!value) fail(where, "expected {}, got a TOML {}", type_text(k->type), toml::stringize(v.type()));
    if (k->check) {
      std::string expected = k->check(*value);
      if (!expected.empty()) fail(where, "out of range: expected {}", expected);
    }
    level.values.emplace(key, std::make_pair(std::move(*value), where));
  }
  return level;
}

std::optional<Value> resolve(const DatasetKey& k, const std::vector<const Level*>& chain, const TrainArgs& args) {
  for (const Level* level : chain) {
    auto it = level->values.find(k.name);
    if (it != level->values.end()) return it->second.first;
  }
  const std::string arg_name = argparse_name(k.name);
  const ArgSpec* spec = find_train_arg(arg_name);
  if (!spec) return std::nullopt;
  std::optional<Value> value = from_arg(k.type, spec->get(args), arg_name);
  // A value from the command line is held to what the TOML key would be.
  if (value && k.check) {
    if (const std::string expected = k.check(*value); !expected.empty()) {
      fail("--" + arg_name, "expected {}, got {}", expected, format_arg_value(spec->get(args)));
    }
  }
  return value;
}

DatasetKind detect_kind(const toml::array& subsets, const std::string& where) {
  auto all_have = [&](const char* key) {
    return std::all_of(subsets.begin(), subsets.end(), [&](const toml::value& s) { return s.is_table() && s.as_table().count(key); });
  };
  auto none_have = [&](const char* key) {
    return std::none_of(subsets.begin(), subsets.end(), [&](const toml::value& s) { return s.is_table() && s.as_table().count(key); });
  };
  if (all_have("conditioning_data_dir")) return DatasetKind::ControlNet;
  if (all_have("metadata_file")) return DatasetKind::FineTuning;
  if (none_have("metadata_file")) return DatasetKind::DreamBooth;
  fail(where, "DreamBooth subsets (without metadata_file) and fine-tuning subsets (with metadata_file) cannot be mixed "
              "in one dataset; split them into separate [[datasets]]");
}

bool same_subset(DatasetKind kind, const SubsetConfig& a, const SubsetConfig& b) {
  switch (kind) {
    case DatasetKind::DreamBooth: return a.image_dir == b.image_dir;
    case DatasetKind::FineTuning: return a.metadata_file == b.metadata_file;
    case DatasetKind::ControlNet: return a.image_dir == b.image_dir && a.conditioning_data_dir == b.conditioning_data_dir;
  }
  return false;
}

DatasetBlueprint build(const toml::value& root, const std::string& file, const TrainArgs& args) {
  if (!root.is_table()) fail(file, "a dataset config must be a TOML table");
  for (const auto& [key, v] : root.as_table()) {
    if (key != "general" && key != "datasets") {
      fail(line_of(file, v) + ": key '" + key + "'", "unknown top-level key (expected [general] and [[datasets]]){}",
           did_you_mean(key, {"general", "datasets"}));
    }
  }
  Level general{file + ": [general]", {}};
  if (root.contains("general")) {
    const auto& g = root.at("general");
    if (!g.is_table()) fail(line_of(file, g) + ": general", "expected a table [general]");
    general = read_level(g.as_table(), file, "[general]", false, std::nullopt);
  }

  DatasetBlueprint blueprint;
  if (!root.contains("datasets")) return blueprint;
  const auto& datasets = root.at("datasets");
  if (!datasets.is_array()) fail(line_of(file, datasets) + ": datasets", "expected an array of tables [[datasets]]");

  for (size_t di = 0; di < datasets.as_array().size(); ++di) {
    const auto& dv = datasets.as_array()[di];
    const std::string dlabel = fmt::format("[[datasets]] #{}", di + 1);
    if (!dv.is_table()) fail(file + ": " + dlabel, "expected a table");
    static const toml::array kNoSubsets;
    const toml::array* subsets = &kNoSubsets;
    if (dv.as_table().count("subsets")) {
      const auto& sv = dv.as_table().at("subsets");
      if (!sv.is_array()) fail(line_of(file, sv) + ": " + dlabel + ": subsets", "expected an array of tables [[datasets.subsets]]");
      subsets = &sv.as_array();
    }
    DatasetConfig dataset;
    dataset.kind = detect_kind(*subsets, file + ": " + dlabel);
    Level dlevel = read_level(dv.as_table(), file, dlabel, false, dataset.kind, {"subsets"});

    for (size_t si = 0; si < subsets->size(); ++si) {
      const auto& sv = (*subsets)[si];
      const std::string slabel = fmt::format("{} > [[datasets.subsets]] #{}", dlabel, si + 1);
      if (!sv.is_table()) fail(file + ": " + slabel, "expected a table");
      Level slevel = read_level(sv.as_table(), file, slabel, true, dataset.kind);
      SubsetConfig subset;
      for (const auto& k : dataset_keys()) {
        if (!(k.in_subset & kind_bit(dataset.kind)) || !k.to_subset) continue;
        if ((k.required_in_subset & kind_bit(dataset.kind)) && !slevel.values.count(k.name)) {
          fail(slevel.where, "'{}' is required in a {} subset", k.name, dataset_kind_name(dataset.kind));
        }
        if (auto v = resolve(k, {&slevel, &dlevel, &general}, args)) k.to_subset(subset, *v);
      }
      bool duplicate = std::any_of(dataset.subsets.begin(), dataset.subsets.end(),
                                   [&](const SubsetConfig& s) { return same_subset(dataset.kind, s, subset); });
      // kohya skips a subset that repeats one of the same dataset (same folder / metadata file).
      if (!duplicate) dataset.subsets.push_back(std::move(subset));
    }

    for (const auto& k : dataset_keys()) {
      if (!k.to_dataset) continue;
      if (auto v = resolve(k, {&dlevel, &general}, args)) k.to_dataset(dataset, *v);
    }
    dataset.debug_dataset = args.debug_dataset;
    dataset.prior_loss_weight = args.prior_loss_weight;
    if (dataset.width == 0) {
      fail(file + ": " + dlabel, "'resolution' is required: set it in [general], in this [[datasets]] or with --resolution");
    }
    if (dataset.min_bucket_reso > dataset.max_bucket_reso) {
      fail(file + ": " + dlabel, "min_bucket_reso {} is larger than max_bucket_reso {}", dataset.min_bucket_reso,
           dataset.max_bucket_reso);
    }
    blueprint.datasets.push_back(std::move(dataset));
  }
  return blueprint;
}

}  // namespace

std::string_view dataset_kind_name(DatasetKind kind) {
  switch (kind) {
    case DatasetKind::DreamBooth: return "DreamBooth";
    case DatasetKind::FineTuning: return "fine-tuning";
    case DatasetKind::ControlNet: return "ControlNet";
  }
  return "?";
}

DatasetBlueprint load_dataset_config(const std::string& path, const TrainArgs& args) {
  if (!path.ends_with(".toml")) fail(path, "dataset config must be a .toml file");
  toml::value root;
  try {
    root = toml::parse(path);
  } catch (const toml::syntax_error& e) {
    fail(path, "not valid TOML: {}", e.what());
  } catch (const std::runtime_error& e) {
    fail(path, "cannot read dataset config: {}", e.what());
  }
  return build(root, path, args);
}

DatasetBlueprint parse_dataset_config(const std::string& toml_text, const std::string& name, const TrainArgs& args) {
  std::istringstream in(toml_text);
  toml::value root;
  try {
    root = toml::parse(in, name);
  } catch (const toml::syntax_error& e) {
    fail(name, "not valid TOML: {}", e.what());
  }
  return build(root, name, args);
}

DatasetBlueprint dataset_config_from_args(const TrainArgs& args) {
  if (!args.train_data_dir) fail("command line", "no dataset: give --dataset_config, or --train_data_dir (with --in_json for fine-tuning)");
  toml::array subsets;
  if (args.in_json) {
    subsets.push_back(toml::table{{"image_dir", *args.train_data_dir}, {"metadata_file", *args.in_json}});
  } else {
    auto add_folders = [&](const std::string& base, bool is_reg) {
      namespace fs = std::filesystem;
      if (!fs::is_directory(base)) fail(base, "{} is not a folder", is_reg ? "--reg_data_dir" : "--train_data_dir");
      std::vector<fs::path> dirs;
      for (const auto& e : fs::directory_iterator(base)) {
        if (e.is_directory()) dirs.push_back(e.path());
      }
      std::sort(dirs.begin(), dirs.end());
      for (const auto& dir : dirs) {
        const std::string name = dir.filename().string();
        if (name == "sdt_cache") continue;  // the cache folder sdt puts here by default, not a dataset folder
        const auto tokens = split(name, '_');
        int64_t repeats = 0;
        try {
          size_t used = 0;
          repeats = std::stoll(tokens[0], &used);
          if (used != tokens[0].size()) repeats = 0;
        } catch (const std::exception&) {
          repeats = 0;
        }
        if (repeats < 1) {
          spdlog::warn("{}: ignored, its name does not start with a repeat count (\"<repeats>_<class tokens>\")", dir.string());
          continue;
        }
        std::string class_tokens;
        for (size_t i = 1; i < tokens.size(); ++i) class_tokens += (i > 1 ? "_" : "") + tokens[i];
        subsets.push_back(toml::table{{"image_dir", dir.string()}, {"num_repeats", repeats}, {"is_reg", is_reg},
                                      {"class_tokens", class_tokens}});
      }
    };
    add_folders(*args.train_data_dir, false);
    if (args.reg_data_dir) add_folders(*args.reg_data_dir, true);
  }
  toml::value root(toml::table{{"datasets", toml::array{toml::table{{"subsets", subsets}}}}});
  return build(root, "command line (--train_data_dir)", args);
}

DatasetBlueprint resolve_dataset_config(const TrainArgs& args) {
  if (!args.dataset_config) return dataset_config_from_args(args);
  if (args.train_data_dir || args.reg_data_dir || args.in_json) {
    spdlog::warn("--dataset_config is given: --train_data_dir, --reg_data_dir and --in_json are ignored");
  }
  return load_dataset_config(*args.dataset_config, args);
}

std::string dataset_keys_reference_markdown() {
  std::string out = "| key | type | [general] | [[datasets]] | [[datasets.subsets]] | description |\n|---|---|---|---|---|---|\n";
  auto kinds = [](unsigned bits, unsigned required) -> std::string {
    if (bits == 0) return "—";
    std::string s = bits == kAll ? "all" : describe_kinds(bits);
    if (required) s += " (required for " + describe_kinds(required) + ")";
    return s;
  };
  for (const auto& k : dataset_keys()) {
    std::string type(type_text(k.type));
    std::string help;
    for (char c : std::string(k.help)) help += c == '|' ? std::string("\\|") : std::string(1, c);
    out += fmt::format("| `{}` | {} | {} | {} | {} | {} |\n", k.name, type, k.in_general ? "yes" : "—",
                       kinds(k.in_dataset, 0), kinds(k.in_subset, k.required_in_subset), help);
  }
  out += "\nCommand line only (an error in the file): ";
  for (size_t i = 0; i < kCommandLineOnly.size(); ++i) out += (i ? ", " : "") + std::string("`--") + kCommandLineOnly[i] + "`";
  return out + ".\n";
}

}  // namespace sdt
