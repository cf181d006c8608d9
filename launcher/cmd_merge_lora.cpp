// `sdt merge-lora`: kohya's networks/merge_lora.py. With --sd_model, merges LoRAs into a checkpoint, which is loaded
// and written by the family that recognises it (or --family) with kohya's model flags (SD 2.x's switch, ...); without, merges
// LoRAs into one LoRA file.
#include <CLI/CLI.hpp>
#include <fmt/ranges.h>
#include <spdlog/spdlog.h>

#include "launcher/commands.h"
#include "src/core/error.h"
#include "src/core/train_args.h"
#include "src/families/family.h"
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
  auto* cmd = app.add_subcommand("merge-lora", "merge LoRAs into a checkpoint (--sd_model), or into one LoRA; the "
                                                "checkpoint's family takes kohya's model flags (--family, the family's own)");
  cmd->allow_extras();  // the model flags, read by kohya's argument table for the checkpoint's family
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

int run_merge_lora(const MergeLoraCommand& command, const std::vector<std::string>& model_flags) {
  const at::ScalarType merge_dtype = *precision_dtype(command.precision);
  const at::ScalarType save_dtype = precision_dtype(command.save_precision).value_or(merge_dtype);

  if (!command.sd_model.empty()) {
    TrainArgs model = parse_train_args(model_flags).args;
    model.pretrained_model_name_or_path = command.sd_model;
    spdlog::info("loading model: {}", command.sd_model);
    const std::unique_ptr<Family> family = load_family_for_training(model);
    const ModelBundle& bundle = family->models();
    for (const auto& m : {bundle.denoiser, bundle.vae}) m->to(merge_dtype);
    for (const auto& m : bundle.text_encoders) m->to(merge_dtype);
    merge_loras_into_targets(family->network_targets(true), command.models, command.ratios, merge_dtype);
    spdlog::info("saving {} model to: {}", family->name(), command.save_to);
    family->save_checkpoint(command.save_to, save_dtype, {});
    return 0;
  }
  if (!model_flags.empty()) fail("merge-lora", "unknown arguments without --sd_model: {}", fmt::join(model_flags, " "));

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
