#include "src/networks/lora_metadata.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <openssl/evp.h>

#include "src/core/error.h"

namespace sdt {

std::string python_str(double value) {
  if (std::isnan(value)) return "nan";
  if (std::isinf(value)) return value > 0 ? "inf" : "-inf";
  // fmt's shortest round-trip form is Python's repr except that Python marks integral floats with ".0".
  std::string s = fmt::format("{}", value);
  if (s.find_first_of(".e") == std::string::npos) s += ".0";
  return s;
}

std::string python_str(bool value) { return value ? "True" : "False"; }
std::string python_str(int64_t value) { return std::to_string(value); }
std::string python_str(const std::optional<double>& value) { return value ? python_str(*value) : "None"; }
std::string python_str(const std::optional<int64_t>& value) { return value ? python_str(*value) : "None"; }
std::string python_str(const std::optional<std::string>& value) { return value ? *value : "None"; }

namespace {

// A JSON string as json.dumps(ensure_ascii=True) writes it: UTF-8 decoded, every code point outside " " .. "~"
// escaped as \uXXXX (surrogate pairs above 0xffff).
std::string python_json_string(const std::string& text) {
  std::string out = "\"";
  auto escape = [&](uint32_t unit) { out += fmt::format("\\u{:04x}", unit); };
  for (size_t i = 0; i < text.size();) {
    const auto byte = static_cast<unsigned char>(text[i]);
    uint32_t code = byte;
    size_t length = 1;
    if (byte >= 0xf0) code = byte & 0x07, length = 4;
    else if (byte >= 0xe0) code = byte & 0x0f, length = 3;
    else if (byte >= 0xc0) code = byte & 0x1f, length = 2;
    for (size_t k = 1; k < length && i + k < text.size(); ++k) code = (code << 6) | (static_cast<unsigned char>(text[i + k]) & 0x3f);
    i += length;
    switch (code) {
      case '"': out += "\\\""; continue;
      case '\\': out += "\\\\"; continue;
      case '\n': out += "\\n"; continue;
      case '\r': out += "\\r"; continue;
      case '\t': out += "\\t"; continue;
      case '\b': out += "\\b"; continue;
      case '\f': out += "\\f"; continue;
      default: break;
    }
    if (code < 0x20 || (code > 0x7e && code <= 0xffff)) {
      escape(code);
    } else if (code > 0xffff) {
      escape(0xd800 + ((code - 0x10000) >> 10));
      escape(0xdc00 + ((code - 0x10000) & 0x3ff));
    } else {
      out += static_cast<char>(code);
    }
  }
  return out + "\"";
}

}  // namespace

std::string python_json(const nlohmann::ordered_json& value) {
  std::string out;
  switch (value.type()) {
    case nlohmann::ordered_json::value_t::object: {
      for (const auto& [key, item] : value.items()) out += (out.empty() ? "" : ", ") + python_json_string(key) + ": " + python_json(item);
      return "{" + out + "}";
    }
    case nlohmann::ordered_json::value_t::array: {
      for (const auto& item : value) out += (out.empty() ? "" : ", ") + python_json(item);
      return "[" + out + "]";
    }
    case nlohmann::ordered_json::value_t::string: return python_json_string(value.get<std::string>());
    case nlohmann::ordered_json::value_t::boolean: return value.get<bool>() ? "true" : "false";
    case nlohmann::ordered_json::value_t::number_float: return python_str(value.get<double>());
    case nlohmann::ordered_json::value_t::null: return "null";
    default: return value.dump();  // integers
  }
}

Sha256::Sha256() : context_(EVP_MD_CTX_new()) {
  if (!context_ || EVP_DigestInit_ex(static_cast<EVP_MD_CTX*>(context_), EVP_sha256(), nullptr) != 1) {
    fail("sha256", "OpenSSL could not start a SHA-256 digest");
  }
}

Sha256::~Sha256() { EVP_MD_CTX_free(static_cast<EVP_MD_CTX*>(context_)); }

void Sha256::update(const void* data, size_t nbytes) {
  if (nbytes > 0) EVP_DigestUpdate(static_cast<EVP_MD_CTX*>(context_), data, nbytes);
}

std::string Sha256::hex_digest() {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int length = 0;
  EVP_DigestFinal_ex(static_cast<EVP_MD_CTX*>(context_), digest, &length);
  std::string hex;
  for (unsigned int i = 0; i < length; ++i) hex += fmt::format("{:02x}", digest[i]);
  return hex;
}

namespace {

constexpr uint64_t kLegacyOffset = 0x100000, kLegacyLength = 0x10000;

// Feeds the part of a byte stream that falls into [begin, end) of the whole stream.
struct WindowHasher {
  WindowHasher(uint64_t begin, uint64_t end) : begin(begin), end(end) {}
  uint64_t begin, end, position = 0;
  Sha256 sha;
  void feed(const void* data, uint64_t nbytes) {
    const uint64_t lo = std::max(begin, position), hi = std::min(end, position + nbytes);
    if (lo < hi) sha.update(static_cast<const char*>(data) + (lo - position), hi - lo);
    position += nbytes;
  }
};

}  // namespace

SafetensorsHashes precalculate_safetensors_hashes(const NamedTensors& tensors, const safetensors::Metadata& metadata) {
  // The layout save_safetensors (and the Rust writer, for tensors of one dtype) uses: element size, largest first,
  // then name.
  std::vector<const std::pair<std::string, at::Tensor>*> order;
  for (const auto& entry : tensors) order.push_back(&entry);
  std::stable_sort(order.begin(), order.end(), [](auto* a, auto* b) {
    size_t sa = a->second.element_size(), sb = b->second.element_size();
    return sa != sb ? sa > sb : a->first < b->first;
  });

  // The header JSON's length is all the hashes need from it (the legacy window starts past a header this size).
  safetensors::Metadata ss_metadata;
  for (const auto& [key, value] : metadata) {
    if (key.rfind("ss_", 0) == 0) ss_metadata[key] = value;
  }
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  header["__metadata__"] = ss_metadata;
  uint64_t offset = 0;
  for (const auto* entry : order) {
    const at::Tensor& t = entry->second;
    const uint64_t nbytes = t.numel() * t.element_size();
    header[entry->first] = {{"dtype", safetensors::dtype_name(to_safetensors_dtype(t.scalar_type()))},
                            {"shape", t.sizes().vec()},
                            {"data_offsets", {offset, offset + nbytes}}};
    offset += nbytes;
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  const uint64_t header_length = text.size();

  Sha256 data_sha;
  WindowHasher legacy(kLegacyOffset, kLegacyOffset + kLegacyLength);
  legacy.feed(&header_length, 8);
  legacy.feed(text.data(), text.size());
  for (const auto* entry : order) {
    at::Tensor cpu = entry->second.to(at::kCPU).contiguous();
    data_sha.update(cpu.data_ptr(), cpu.nbytes());
    legacy.feed(cpu.data_ptr(), cpu.nbytes());
  }
  return {data_sha.hex_digest(), legacy.sha.hex_digest().substr(0, 8)};
}

namespace {

void hash_file_range(const std::string& path, uint64_t begin, uint64_t length, Sha256& sha) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(path, "cannot open the file to hash it");
  in.seekg(static_cast<std::streamoff>(begin));
  std::vector<char> buffer(1 << 20);
  while (length > 0 && in) {
    in.read(buffer.data(), static_cast<std::streamsize>(std::min<uint64_t>(buffer.size(), length)));
    const auto got = static_cast<uint64_t>(in.gcount());
    if (got == 0) break;
    sha.update(buffer.data(), got);
    length -= got;
  }
}

}  // namespace

std::string legacy_model_hash(const std::string& path) {
  Sha256 sha;
  hash_file_range(path, kLegacyOffset, kLegacyLength, sha);
  return sha.hex_digest().substr(0, 8);
}

std::string file_sha256(const std::string& path) {
  Sha256 sha;
  hash_file_range(path, 0, UINT64_MAX, sha);
  return sha.hex_digest();
}

safetensors::Metadata LoRATrainingMetadata::to_metadata() const {
  safetensors::Metadata m{
      {"ss_session_id", session_id},
      {"ss_training_started_at", training_started_at},
      {"ss_output_name", output_name},
      {"ss_learning_rate", learning_rate},
      {"ss_text_encoder_lr", text_encoder_lr},
      {"ss_unet_lr", unet_lr},
      {"ss_num_train_images", num_train_images},
      {"ss_num_validation_images", num_validation_images},
      {"ss_num_reg_images", num_reg_images},
      {"ss_num_batches_per_epoch", num_batches_per_epoch},
      {"ss_num_epochs", num_epochs},
      {"ss_gradient_checkpointing", gradient_checkpointing},
      {"ss_gradient_accumulation_steps", gradient_accumulation_steps},
      {"ss_max_train_steps", max_train_steps},
      {"ss_lr_warmup_steps", lr_warmup_steps},
      {"ss_lr_scheduler", lr_scheduler},
      {"ss_network_module", network_module},
      {"ss_network_dim", network_dim},
      {"ss_network_alpha", network_alpha},
      {"ss_network_dropout", network_dropout},
      {"ss_mixed_precision", mixed_precision},
      {"ss_full_fp16", full_fp16},
      {"ss_clip_skip", clip_skip},
      {"ss_max_token_length", max_token_length},
      {"ss_cache_latents", cache_latents},
      {"ss_seed", seed},
      {"ss_lowram", lowram},
      {"ss_noise_offset", noise_offset},
      {"ss_multires_noise_iterations", multires_noise_iterations},
      {"ss_multires_noise_discount", multires_noise_discount},
      {"ss_adaptive_noise_scale", adaptive_noise_scale},
      {"ss_zero_terminal_snr", zero_terminal_snr},
      {"ss_training_comment", training_comment},
      {"ss_sd_scripts_commit_hash", sd_scripts_commit_hash},
      {"ss_optimizer", optimizer},
      {"ss_max_grad_norm", max_grad_norm},
      {"ss_caption_dropout_rate", caption_dropout_rate},
      {"ss_caption_dropout_every_n_epochs", caption_dropout_every_n_epochs},
      {"ss_caption_tag_dropout_rate", caption_tag_dropout_rate},
      {"ss_face_crop_aug_range", face_crop_aug_range},
      {"ss_prior_loss_weight", prior_loss_weight},
      {"ss_min_snr_gamma", min_snr_gamma},
      {"ss_scale_weight_norms", scale_weight_norms},
      {"ss_ip_noise_gamma", ip_noise_gamma},
      {"ss_debiased_estimation", debiased_estimation},
      {"ss_noise_offset_random_strength", noise_offset_random_strength},
      {"ss_ip_noise_gamma_random_strength", ip_noise_gamma_random_strength},
      {"ss_loss_type", loss_type},
      {"ss_huber_schedule", huber_schedule},
      {"ss_huber_scale", huber_scale},
      {"ss_huber_c", huber_c},
      {"ss_fp8_base", fp8_base},
      {"ss_fp8_base_unet", fp8_base_unet},
      {"ss_validation_seed", validation_seed},
      {"ss_validation_split", validation_split},
      {"ss_max_validation_steps", max_validation_steps},
      {"ss_validate_every_n_epochs", validate_every_n_epochs},
      {"ss_validate_every_n_steps", validate_every_n_steps},
      {"ss_resize_interpolation", resize_interpolation},
  };
  for (const auto& [key, value] : dataset) {
    if (!value.empty()) m[key] = value;
  }
  for (const auto& [key, value] : base_model) m[key] = value;
  auto put = [&](const char* key, const std::optional<std::string>& value) {
    if (value) m[key] = *value;
  };
  put("ss_network_args", network_args_json);
  put("ss_sd_model_name", sd_model_name);
  put("ss_sd_model_hash", sd_model_hash);
  put("ss_new_sd_model_hash", new_sd_model_hash);
  put("ss_vae_name", vae_name);
  put("ss_vae_hash", vae_hash);
  put("ss_new_vae_hash", new_vae_hash);
  if (!training_finished_at.empty()) m["ss_training_finished_at"] = training_finished_at;
  if (!steps.empty()) m["ss_steps"] = steps;
  if (!epoch.empty()) m["ss_epoch"] = epoch;
  return m;
}

safetensors::Metadata minimum_network_metadata(const safetensors::Metadata& metadata) {
  safetensors::Metadata m;
  for (const char* key : {"ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha",
                          "ss_network_args"}) {
    auto it = metadata.find(key);
    if (it != metadata.end()) m[key] = it->second;
  }
  return m;
}

safetensors::Metadata build_minimum_network_metadata(const std::optional<std::string>& v2,
                                                     const std::optional<std::string>& base_model,
                                                     const std::string& network_module, const std::string& network_dim,
                                                     const std::string& network_alpha) {
  safetensors::Metadata m{{"ss_network_module", network_module}, {"ss_network_dim", network_dim},
                          {"ss_network_alpha", network_alpha}};
  if (v2) m["ss_v2"] = *v2;
  if (base_model) m["ss_base_model_version"] = *base_model;
  return m;
}

}  // namespace sdt
