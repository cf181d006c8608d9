// A layer a network (LoRA) may adapt, as the model's family names it. The family decides which layers of its models
// are targets and what kohya calls them (src/families/<family>/); the network engine (lora.h) only wraps them.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include <torch/nn/module.h>

namespace sdt {

// kohya's block layout of a family's denoiser for block-wise dims, alphas and learning rates (networks/lora.py):
// `side` blocks on each of the down and up sides and `mid` between them; SDXL adds a block before them (the embeddings)
// and one after (the output). The values of block_dims and the like: SD 1.x/2.x 12 + 1 + 12 = 25 (index 0 unused),
// SDXL 1 + 9 + 3 + 9 + 1 = 23. A target's NetworkTarget::block indexes them.
struct NetworkBlockLayout {
  int side = 12;
  int mid = 1;
  bool outer_blocks = false;
  std::string family = "SD 1.x/2.x";  // for errors

  int total() const { return 2 * side + mid + (outer_blocks ? 2 : 0); }
  static NetworkBlockLayout sd() { return {}; }
  static NetworkBlockLayout sdxl() { return {9, 3, true, "SDXL"}; }
};

struct NetworkTarget {
  std::string lora_name;                       // kohya's module name: "lora_unet_..." / "lora_te_..." (file key prefix)
  std::shared_ptr<torch::nn::Module> module;   // an sdt::Linear or sdt::Conv2d (src/models/layers.h)
  bool in_denoiser = false;                    // the denoiser's (kohya's unet_loras), else a text encoder's
  int block = -1;                              // kohya's block index for block-wise dims and lrs; -1: none
  int text_encoder = 0;                        // which of the family's text encoders (--text_encoder_lr's index)
  // The name other tools' files give the same module, which kohya reads as lora_name (SDXL's U-Net by its diffusers
  // path, `lora_unet_down_blocks_1_attentions_0_...`: kohya's convert_diffusers_to_sai_if_needed); empty: none.
  std::string other_name;
  // The parts a fused projection's output is made of (FLUX's q, k, v [, MLP]), for kohya's lora_flux split_qkv: one
  // LoRA per part, saved as one block-diagonal LoRA. Empty: not fused.
  std::vector<int64_t> split_dims;
};

}  // namespace sdt
