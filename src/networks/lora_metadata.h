// What kohya writes into a LoRA file's header besides the tensors: the `ss_*` training metadata train_network.py
// builds (every value as Python's str() prints it: "None", "True", "0.0001", "1e-05"), and the `sshs_*` hashes
// sd-webui-additional-networks reads, computed as kohya's train_util does.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include <nlohmann/json.hpp>

#include "src/core/safetensors.h"
#include "src/core/tensor_io.h"

namespace sdt {

// Python's str() of a value, for metadata kohya writes with str(v).
std::string python_str(double value);              // repr: shortest round-trip, "1.0", "0.0001", "1e-05"
std::string python_str(bool value);                // "True" / "False"
std::string python_str(int64_t value);
std::string python_str(const std::optional<double>& value);   // "None" when absent
std::string python_str(const std::optional<int64_t>& value);
std::string python_str(const std::optional<std::string>& value);

// Python's json.dumps with its defaults (", " and ": " separators, non-ASCII as \uXXXX escapes, keys in insertion
// order): how kohya writes ss_tag_frequency, ss_dataset_dirs and ss_network_args.
std::string python_json(const nlohmann::ordered_json& value);

// SHA-256 (OpenSSL) of what is fed in, as lowercase hex.
class Sha256 {
 public:
  Sha256();
  ~Sha256();
  Sha256(const Sha256&) = delete;
  Sha256& operator=(const Sha256&) = delete;
  void update(const void* data, size_t nbytes);
  std::string hex_digest();

 private:
  void* context_;
};

struct SafetensorsHashes {
  std::string model_hash;   // sshs_model_hash: SHA-256 of everything after the header
  std::string legacy_hash;  // sshs_legacy_hash: first 8 hex of SHA-256 of the 64 KiB at byte 0x100000
};

// kohya's precalculate_safetensors_hashes: the hashes of the file safetensors.torch.save(tensors, ss_metadata) would
// produce, where ss_metadata keeps only the `ss_*` keys of `metadata` (so user metadata added later does not change
// them). Computed over the header length and tensor bytes in the writer's layout, without building the file.
SafetensorsHashes precalculate_safetensors_hashes(const NamedTensors& tensors, const safetensors::Metadata& metadata);

// The base-model hashes train_network.py records (ss_sd_model_hash / ss_new_sd_model_hash, and for --vae):
// kohya's model_hash (first 8 hex of SHA-256 of the 64 KiB at 0x100000 of the file) and calculate_sha256 (whole file).
std::string legacy_model_hash(const std::string& path);
std::string file_sha256(const std::string& path);

// The `ss_*` metadata of train_network.py, filled by the trainer. Values are kept as Python's str() of what kohya
// holds (python_str above), so "None" where kohya has None; the defaults are kohya's defaults.
struct LoRATrainingMetadata {
  std::string session_id, training_started_at, output_name = "None";
  std::string learning_rate = "2e-06", text_encoder_lr = "None", unet_lr = "None";
  std::string num_train_images = "0", num_validation_images = "0", num_reg_images = "0";
  std::string num_batches_per_epoch = "0", num_epochs = "1";
  std::string gradient_checkpointing = "False", gradient_accumulation_steps = "1";
  std::string max_train_steps = "1600", lr_warmup_steps = "0", lr_scheduler = "constant";
  std::string network_module = "networks.lora", network_dim = "None", network_alpha = "1.0", network_dropout = "None";
  std::string mixed_precision = "no", full_fp16 = "False";
  std::string clip_skip = "None", max_token_length = "None", cache_latents = "False", seed = "None", lowram = "False";
  std::string noise_offset = "None", multires_noise_iterations = "None", multires_noise_discount = "0.3";
  std::string adaptive_noise_scale = "None", zero_terminal_snr = "False", training_comment = "None";
  std::string sd_scripts_commit_hash = "(unknown)", optimizer = "torch.optim.adamw.AdamW";
  std::string max_grad_norm = "1.0", caption_dropout_rate = "0.0", caption_dropout_every_n_epochs = "0";
  std::string caption_tag_dropout_rate = "0.0", face_crop_aug_range = "None", prior_loss_weight = "1.0";
  std::string min_snr_gamma = "None", scale_weight_norms = "None", ip_noise_gamma = "None";
  std::string debiased_estimation = "False", noise_offset_random_strength = "False";
  std::string ip_noise_gamma_random_strength = "False", loss_type = "l2", huber_schedule = "snr", huber_scale = "1.0";
  std::string huber_c = "0.1", fp8_base = "False", fp8_base_unet = "False", validation_seed = "None";
  std::string validation_split = "0.0", max_validation_steps = "None", validate_every_n_epochs = "None";
  std::string validate_every_n_steps = "None", resize_interpolation = "None";

  // Dataset description: with a dataset config ss_datasets / ss_tag_frequency / ss_dataset_dirs (JSON); without one
  // the flat ss_batch_size_per_device ... ss_bucket_info keys. Empty values are left out.
  safetensors::Metadata dataset;
  // What the model's family writes about the base model (Family::training_metadata: ss_v2, ss_base_model_version).
  safetensors::Metadata base_model;
  std::optional<std::string> network_args_json;      // ss_network_args, when --network_args was given
  std::optional<std::string> sd_model_name, sd_model_hash, new_sd_model_hash;  // ss_sd_model_*: basename, hashes
  std::optional<std::string> vae_name, vae_hash, new_vae_hash;
  // Set at each save.
  std::string training_finished_at, steps, epoch;
  // SAI model-spec keys (modelspec.*), written with the others, and kept by --no_metadata as kohya keeps them.
  safetensors::Metadata model_spec;

  safetensors::Metadata to_metadata() const;
};

// kohya's SS_METADATA_MINIMUM_KEYS subset (what --no_metadata keeps).
safetensors::Metadata minimum_network_metadata(const safetensors::Metadata& metadata);

// kohya's build_minimum_network_metadata (what merge_lora.py writes for merged LoRAs).
safetensors::Metadata build_minimum_network_metadata(const std::optional<std::string>& v2,
                                                     const std::optional<std::string>& base_model,
                                                     const std::string& network_module, const std::string& network_dim,
                                                     const std::string& network_alpha);

}  // namespace sdt
