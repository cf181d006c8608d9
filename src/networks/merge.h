// kohya-ss/sd-scripts' networks/merge_lora.py for SD 1.x / 2.x: LoRAs merged into a model's weights, or several
// LoRAs merged into one LoRA file.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "src/core/safetensors.h"
#include "src/core/tensor_io.h"
#include "src/networks/network_target.h"

namespace sdt {

// kohya's merge_to_sd_model: for each file and its ratio, every `<name>.lora_down.weight` whose module is one of
// `targets` (the family's network targets with the convolution blocks, e.g. sd_network_targets(te, unet, true)) adds
// ratio * (alpha / dim) * dW to that module's weight, computed in `merge_dtype` (the models' dtype): up @ down for
// Linear and 1x1 Conv2d, the composed kernel for 3x3. Keys for modules the models lack are reported (returned) and
// skipped, as kohya does.
std::vector<std::string> merge_loras_into_targets(const std::vector<NetworkTarget>& targets, const std::vector<std::string>& lora_paths,
                                                 const std::vector<double>& ratios, at::ScalarType merge_dtype);

struct MergedLoRA {
  NamedTensors tensors;
  safetensors::Metadata metadata;  // kohya's minimum network metadata
  bool v2 = false;                 // the first file's ss_v2 == "True"
};

// kohya's merge_lora_models. Per module the first file's alpha is kept (base_alpha); each file's weights are scaled
// by s = sqrt(alpha / base_alpha) * ratio, lora_up by |s| (so a negative ratio flips the product once), and summed,
// or with `concat` stacked along the rank (the result's dim is the sum of the dims; alpha stays base_alpha). Summing
// requires equal shapes. `shuffle` permutes each module's ranks (down rows and up columns together) with `generator`.
MergedLoRA merge_lora_files(const std::vector<std::string>& lora_paths, const std::vector<double>& ratios,
                            at::ScalarType merge_dtype, bool concat, bool shuffle,
                            std::optional<at::Generator> generator = std::nullopt);

}  // namespace sdt
