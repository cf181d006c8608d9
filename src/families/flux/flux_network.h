// kohya's networks/lora_flux.py on FLUX.1 and Chroma: which layers its LoRA adapts, what they are called, and the
// network arguments that choose among them and set their dims and learning rates.
#pragma once

#include <vector>

#include "src/core/train_args.h"
#include "src/models/clip_text.h"
#include "src/models/flux.h"
#include "src/models/t5.h"
#include "src/networks/lora.h"

namespace sdt {

// Every layer lora_flux can adapt, in its creation order: CLIP-L's attention and MLP layers (`lora_te1_...`), T5's
// attention and gated feed-forward layers (`lora_te3_...`, text encoder 1), every Linear of the double and the single
// blocks (`lora_unet_double_blocks_0_img_attn_qkv`, `lora_unet_single_blocks_0_linear1`; the fused q, k, v [, MLP]
// projections carry their parts for split_qkv), then the input layers in_dims adapts (img_in, time_in, vector_in,
// guidance_in, txt_in). Which of them a network takes is its configuration's (flux_network_config). Any model may be
// null.
std::vector<NetworkTarget> flux_network_targets(ClipTextModel clip_l, T5EncoderModel t5, FluxTransformer transformer);

// networks.lora_flux's create_network arguments, read as it reads them, for `transformer`'s block counts:
//   train_blocks=all|single|double     the block types adapted (default all)
//   train_t5xxl=True                   T5's layers too (not with cached text-encoder outputs)
//   img_attn_dim, txt_attn_dim, img_mlp_dim, txt_mlp_dim, img_mod_dim, txt_mod_dim, single_dim, single_mod_dim
//                                      the dim of those layers of the blocks instead of --network_dim (0: none)
//   train_double_block_indices=0,2-5, train_single_block_indices=...   only those blocks (all, none, indices, ranges)
//   in_dims=[img,time,vector,guidance,txt]   LoRA on the input layers at those dims (0: none)
//   network_reg_dims=pattern=dim,...   network_reg_lrs=pattern=lr,...   by the first pattern found in a module's name
//   split_qkv=True                     a LoRA per part of the fused q, k, v [, MLP] projections, saved combined
//   rank_dropout, module_dropout, loraplus_lr_ratio, loraplus_unet_lr_ratio, loraplus_text_encoder_lr_ratio, verbose
//   conv_dim, conv_alpha               accepted as kohya accepts them (FLUX has no convolution to adapt)
// and --text_encoder_lr with a value per text encoder (CLIP-L, T5). kohya's spelling of booleans is "True" / "False";
// other spellings, unknown keys and bad values are sdt::Errors (kohya skips them silently or crashes).
LoRANetworkConfig flux_network_config(const TrainArgs& args, const FluxConfig& transformer);

}  // namespace sdt
