// A layer a network (LoRA) may adapt, as the model's family names it. The family decides which layers of its models
// are targets and what kohya calls them (src/families/<family>/); the network engine (lora.h) only wraps them.
#pragma once

#include <memory>
#include <string>

#include <torch/nn/module.h>

namespace sdt {

struct NetworkTarget {
  std::string lora_name;                       // kohya's module name: "lora_unet_..." / "lora_te_..." (file key prefix)
  std::shared_ptr<torch::nn::Module> module;   // an sdt::Linear or sdt::Conv2d (src/models/layers.h)
  bool in_denoiser = false;                    // the denoiser's (kohya's unet_loras), else a text encoder's
  int block = -1;                              // kohya's block index for block-wise dims and lrs; -1: none
};

}  // namespace sdt
