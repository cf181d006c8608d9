// `sdt merge-lora`: kohya's networks/merge_lora.py. With --sd_model, merges LoRAs into a checkpoint, which is loaded
// and written by the family that recognises it (or --family) with kohya's model flags (SD 2.x's switch, ...); without, merges
// LoRAs into one LoRA file.
#include <map>
#include <set>

#include <CLI/CLI.hpp>
#include <fmt/ranges.h>
#include <spdlog/spdlog.h>

#include "launcher/commands.h"
#include "src/core/error.h"
#include "src/core/safetensors.h"
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

// The text encoders the family keeps beside its checkpoint (FLUX's CLIP-L and T5), written where --<name>_save_to
// says (kohya's flux_merge_lora.py). One the LoRAs changed but no flag asks for is named in a warning: its merge is
// not written.
void save_separate_text_encoders(const Family& family, const std::vector<NetworkTarget>& targets, const MergeLoraCommand& command,
                                 at::ScalarType save_dtype) {
  const std::map<std::string, std::string> save_to{{"clip_l", command.clip_l_save_to}, {"t5xxl", command.t5xxl_save_to}};
  const std::vector<std::string> separate = family.separate_text_encoders();
  for (const auto& [name, path] : save_to) {
    if (!path.empty() && std::find(separate.begin(), separate.end(), name) == separate.end()) {
      fail("--" + name + "_save_to", "{} keeps no {} beside its checkpoint", family.name(), name);
    }
  }
  std::set<int> changed;  // the text encoders some LoRA file has modules for
  for (const std::string& file_path : command.models) {
    const safetensors::File file(file_path);
    for (const NetworkTarget& t : targets) {
      if (!t.in_denoiser && file.contains(t.lora_name + ".lora_down.weight")) changed.insert(t.text_encoder);
    }
  }
  for (size_t i = 0; i < separate.size(); ++i) {
    const std::string& path = save_to.count(separate[i]) ? save_to.at(separate[i]) : "";
    if (!path.empty()) {
      spdlog::info("saving {} to: {}", separate[i], path);
      family.save_text_encoder(separate[i], path, save_dtype);
    } else if (changed.contains(static_cast<int>(i))) {
      spdlog::warn("the LoRAs' {} modules were merged into {}, which --save_to does not hold; give --{}_save_to to write it",
                   separate[i], separate[i], separate[i]);
    }
  }
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
  cmd->add_option("--clip_l_save_to", command.clip_l_save_to, "FLUX: where to write CLIP-L with the LoRAs' CLIP-L modules merged");
  cmd->add_option("--t5xxl_save_to", command.t5xxl_save_to, "FLUX: where to write T5-XXL with the LoRAs' T5 modules merged");
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
    const std::vector<NetworkTarget> targets = family->network_targets(true);
    merge_loras_into_targets(targets, command.models, command.ratios, merge_dtype);
    spdlog::info("saving {} model to: {}", family->name(), command.save_to);
    family->save_checkpoint(command.save_to, save_dtype, {});
    save_separate_text_encoders(*family, targets, command, save_dtype);
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
