// `sdt convert-flux-lora`: kohya's networks/convert_flux_lora.py, a FLUX LoRA between kohya's layout (sd-scripts) and
// ai-toolkit's (diffusers' names, lora_A / lora_B); src/families/flux/flux_lora_format.h does the conversion.
#include <CLI/CLI.hpp>
#include <spdlog/spdlog.h>

#include "launcher/commands.h"
#include "src/core/error.h"
#include "src/core/safetensors.h"
#include "src/core/tensor_io.h"
#include "src/families/flux/flux_lora_format.h"

namespace sdt {

CLI::App* add_convert_flux_lora_command(CLI::App& app, ConvertFluxLoraCommand& command) {
  auto* cmd = app.add_subcommand("convert-flux-lora", "convert a FLUX LoRA between kohya's layout (sd-scripts) and "
                                                       "ai-toolkit's (diffusers' names), as kohya's convert_flux_lora.py");
  const auto formats = CLI::IsMember({"sd-scripts", "ai-toolkit"});
  cmd->add_option("--src", command.src, "the source layout")->required()->check(formats);
  cmd->add_option("--dst", command.dst, "the destination layout")->required()->check(formats);
  cmd->add_option("--src_path", command.src_path, "the LoRA to convert (.safetensors)")->required();
  cmd->add_option("--dst_path", command.dst_path, "the converted LoRA (.safetensors)")->required();
  return cmd;
}

int run_convert_flux_lora(const ConvertFluxLoraCommand& command) {
  if (command.src == command.dst) fail("--dst", "is the source layout, {}: nothing to convert", command.src);
  const safetensors::File file(command.src_path);
  NamedTensors tensors;
  for (const auto& info : file.tensors()) tensors.emplace_back(info.name, load_tensor(file, info.name));
  spdlog::info("converting {} from {} to {}", command.src_path, command.src, command.dst);
  const NamedTensors converted = command.dst == "ai-toolkit" ? flux_lora_to_ai_toolkit(tensors) : flux_lora_to_kohya(tensors);
  if (converted.empty()) fail(command.src_path, "holds no FLUX transformer LoRA in the {} layout", command.src);
  save_safetensors(command.dst_path, converted, file.metadata());
  spdlog::info("saved {} tensors to {}", converted.size(), command.dst_path);
  return 0;
}

}  // namespace sdt
