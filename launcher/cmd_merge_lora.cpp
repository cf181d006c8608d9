// `sdt merge-lora`: kohya's networks/merge_lora.py. With --sd_model, merges LoRAs into an SD 1.x / 2.x single-file
// checkpoint; without, merges LoRAs into one LoRA file.
#include <CLI/CLI.hpp>
#include <spdlog/spdlog.h>

#include "launcher/commands.h"
#include "src/core/error.h"
#include "src/families/sd/sd_family.h"
#include "src/models/sd_checkpoint.h"
#include "src/networks/lora_metadata.h"
#include "src/networks/merge.h"

namespace sdt {

namespace {

std::optional<at::ScalarType> precision_dtype(const std::string& name) {
  if (name == "float") return at::kFloat;
  if (name == "fp16") return at::kHalf;
  if (name == "bf16") return at::kBFloat16;
  return std::nullopt;
}

}  // namespace

CLI::App* add_merge_lora_command(CLI::App& app, MergeLoraCommand& command) {
  auto* cmd = app.add_subcommand("merge-lora", "merge LoRAs into an SD 1.x/2.x checkpoint (--sd_model), or into one LoRA");
  cmd->add_flag("--v2", command.v2, "the --sd_model is Stable Diffusion 2.x");
  cmd->add_option("--sd_model", command.sd_model, "checkpoint (.safetensors) to merge into; without it the LoRAs are merged into one LoRA");
  cmd->add_option("--save_to", command.save_to, "output file (.safetensors)")->required();
  cmd->add_option("--models", command.models, "LoRA files to merge")->required();
  cmd->add_option("--ratios", command.ratios, "one ratio per LoRA file")->required();
  cmd->add_option("--precision", command.precision, "precision of the merge (float recommended)")
      ->check(CLI::IsMember({"float", "fp16", "bf16"}));
  cmd->add_option("--save_precision", command.save_precision, "precision of the saved file; the merge's when omitted")
      ->check(CLI::IsMember({"float", "fp16", "bf16"}));
  cmd->add_flag("--concat", command.concat, "concatenate the LoRAs along the rank instead of summing (the result's dim is the sum)");
  cmd->add_flag("--shuffle", command.shuffle, "shuffle the ranks of the merged LoRA");
  cmd->add_flag("--no_metadata", command.no_metadata, "accepted for kohya compatibility: sdt writes only the minimum network metadata");
  return cmd;
}

int run_merge_lora(const MergeLoraCommand& command) {
  const at::ScalarType merge_dtype = *precision_dtype(command.precision);
  const at::ScalarType save_dtype = precision_dtype(command.save_precision).value_or(merge_dtype);

  if (!command.sd_model.empty()) {
    const SdConfig config = command.v2 ? SdConfig::sd2() : SdConfig::sd1();
    spdlog::info("loading SD model: {}", command.sd_model);
    SdModels models = load_ldm_checkpoint(command.sd_model, config, merge_dtype);
    merge_loras_into_targets(sd_network_targets(models.text_encoder, models.unet, true), command.models, command.ratios, merge_dtype);
    spdlog::info("saving SD model to: {}", command.save_to);
    save_ldm_checkpoint(command.save_to, models, config, save_dtype);
    return 0;
  }

  MergedLoRA merged = merge_lora_files(command.models, command.ratios, merge_dtype, command.concat, command.shuffle);
  // kohya hashes the merged tensors in the merge precision, before converting them to the save precision.
  SafetensorsHashes hashes = precalculate_safetensors_hashes(merged.tensors, merged.metadata);
  merged.metadata["sshs_model_hash"] = hashes.model_hash;
  merged.metadata["sshs_legacy_hash"] = hashes.legacy_hash;
  for (auto& [name, tensor] : merged.tensors) tensor = tensor.to(save_dtype);
  spdlog::info("saving model to: {}", command.save_to);
  save_safetensors(command.save_to, merged.tensors, merged.metadata);
  return 0;
}

}  // namespace sdt
