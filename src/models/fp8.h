// kohya's fp8 storage of frozen models (--fp8_base, --fp8_base_unet): weights in float8_e4m3fn, half of bf16's bytes,
// widened back by autocast as each op runs (linear and convolution take them; norms and embeddings do not).
#pragma once

#include <string>

#include <torch/nn/module.h>

namespace sdt {

// A denoiser, stored whole in fp8 (kohya's `unet.to(dtype=torch.float8_e4m3fn)`).
void store_denoiser_in_fp8(torch::nn::Module& denoiser);

// A text encoder in fp8 as kohya's prepare_text_encoder_fp8 leaves it: its embeddings (CLIP's token and position
// embeddings, T5's shared embedding and relative-position biases) and T5's norms stay in `kept`, the rest is fp8. T5's
// feed-forward then keeps its activations in the compute dtype (t5.h), as kohya's replaced forward does.
void store_text_encoder_in_fp8(torch::nn::Module& encoder, at::ScalarType kept);

// Why PyTorch's CPU kernels cannot run `model` with fp8 weights (a LayerNorm or GroupNorm with weights: its CPU kernel
// refuses mixed dtypes, where CUDA's autocast widens them); empty when they can.
std::string fp8_cpu_obstacle(const torch::nn::Module& model);

}  // namespace sdt
