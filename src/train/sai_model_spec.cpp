#include "src/train/sai_model_spec.h"

#include <cctype>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <iterator>

#include <fmt/format.h>
#include <openssl/evp.h>

#include "src/core/error.h"
#include "src/core/text.h"
#include "src/networks/lora_metadata.h"

namespace sdt {
namespace {

std::string base64(const std::string& bytes) {
  std::string out(4 * ((bytes.size() + 2) / 3) + 1, '\0');  // EVP_EncodeBlock also writes a terminating NUL
  const int n = EVP_EncodeBlock(reinterpret_cast<unsigned char*>(out.data()), reinterpret_cast<const unsigned char*>(bytes.data()),
                                static_cast<int>(bytes.size()));
  out.resize(static_cast<size_t>(n));
  return out;
}

// kohya's file_to_data_url, with Python's mimetypes for the image types a thumbnail is.
std::string data_url(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("--metadata_thumbnail", "cannot read {}", path);
  const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::string ext = std::filesystem::path(path).extension().string();
  for (char& c : ext) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  const std::string mime = ext == ".png" ? "image/png" : ext == ".jpg" || ext == ".jpeg" ? "image/jpeg"
                           : ext == ".webp" ? "image/webp" : ext == ".gif" ? "image/gif" : "application/octet-stream";
  return fmt::format("data:{};base64,{}", mime, base64(bytes));
}

// kohya's determine_resolution: "512" -> 512x512, "512,768" -> 512x768; none: the family's.
std::string resolution(const std::optional<std::string>& given, int native) {
  if (!given) return fmt::format("{}x{}", native, native);
  const std::vector<std::string> parts = split(*given, ',');
  if (parts.size() == 1) return fmt::format("{}x{}", trim(parts[0]), trim(parts[0]));
  return fmt::format("{}x{}", trim(parts[0]), trim(parts[1]));
}

}  // namespace

safetensors::Metadata sai_model_spec(const ModelSpec& family, const TrainArgs& args, bool lora, double timestamp) {
  safetensors::Metadata m;
  m["modelspec.sai_model_spec"] = "1.0.1";
  m["modelspec.architecture"] = family.architecture + (lora ? "/lora" : "");
  m["modelspec.implementation"] = lora ? family.lora_implementation : family.checkpoint_implementation;
  // kohya: --metadata_title, else --output_name, else "LoRA@<timestamp>" ("Checkpoint@..." for a whole model).
  m["modelspec.title"] = args.metadata_title ? *args.metadata_title
                         : args.output_name  ? *args.output_name
                                             : std::string(lora ? "LoRA" : "Checkpoint") + "@" + python_str(timestamp);
  m["modelspec.resolution"] = resolution(args.resolution, family.native_resolution);
  const std::time_t seconds = static_cast<std::time_t>(timestamp);
  std::tm local{};
  localtime_r(&seconds, &local);
  char date[32];
  std::strftime(date, sizeof date, "%Y-%m-%dT%H:%M:%S", &local);
  m["modelspec.date"] = date;
  m["modelspec.implementation_version"] = "sdt/" SDT_VERSION;
  if (family.prediction_type) m["modelspec.prediction_type"] = *family.prediction_type;
  if (args.min_timestep || args.max_timestep) {
    m["modelspec.timestep_range"] = fmt::format("{},{}", args.min_timestep.value_or(0), args.max_timestep.value_or(1000));
  }
  if (args.clip_skip) m["modelspec.encoder_layer"] = std::to_string(*args.clip_skip);
  const std::pair<const char*, const std::optional<std::string>*> optional[] = {
      {"author", &args.metadata_author},           {"description", &args.metadata_description},
      {"license", &args.metadata_license},         {"tags", &args.metadata_tags},
      {"usage_hint", &args.metadata_usage_hint},   {"merged_from", &args.metadata_merged_from},
      {"trigger_phrase", &args.metadata_trigger_phrase}, {"preprocessor", &args.metadata_preprocessor},
      {"is_negative_embedding", &args.metadata_is_negative_embedding},
  };
  for (const auto& [key, value] : optional) {
    if (*value) m[fmt::format("modelspec.{}", key)] = **value;
  }
  if (args.metadata_thumbnail) {
    const std::string& t = *args.metadata_thumbnail;
    m["modelspec.thumbnail"] = t.starts_with("data:") ? t : data_url(t);
  }
  return m;
}

}  // namespace sdt
