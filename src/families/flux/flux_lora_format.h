// FLUX LoRA files between kohya's layout and ai-toolkit's (diffusers' module names, `lora_A` / `lora_B`, no alpha), as
// kohya's networks/convert_flux_lora.py converts them:
//
//   kohya (sd-scripts)                          ai-toolkit
//   lora_unet_double_blocks_N_img_attn_qkv      transformer.transformer_blocks.N.attn.to_q / to_k / to_v
//   lora_unet_double_blocks_N_txt_attn_qkv      ... attn.add_q_proj / add_k_proj / add_v_proj
//   lora_unet_single_blocks_N_linear1           transformer.single_transformer_blocks.N.attn.to_q / k / v, proj_mlp
//   (and one to one: proj, mlp_0 / mlp_2, mod_lin, linear2, modulation_lin)
//
// To ai-toolkit, alpha / rank is folded into the weights (split between down and up by powers of two); a fused module
// (qkv, linear1) becomes one module per part, each with the fused down weight and its rows of the up weight, or, when
// the up weight is block-diagonal (a file that came from ai-toolkit), each with its own block. To kohya, the parts'
// down weights are stacked and their up weights placed block-diagonally, alpha set to the rank (scale 1). Either way
// every module's up · down · alpha / rank is kept. Keys of neither layout (text encoders) are left out with a warning,
// as kohya's script leaves them.
#pragma once

#include "src/core/tensor_io.h"

namespace sdt {

NamedTensors flux_lora_to_ai_toolkit(const NamedTensors& kohya);
NamedTensors flux_lora_to_kohya(const NamedTensors& ai_toolkit);

}  // namespace sdt
