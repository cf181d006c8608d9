// Building blocks shared by the VAE and the U-Net (diffusers names and semantics): the ResNet block, down- and
// up-sampling, multi-head attention on top of at::scaled_dot_product_attention, and gradient checkpointing.
#pragma once

#include <functional>
#include <vector>

#include <torch/torch.h>

namespace sdt {

// diffusers ResnetBlock2D: GroupNorm -> SiLU -> conv3x3 (+ projected time embedding) -> GroupNorm -> SiLU -> conv3x3,
// plus a 1x1 `conv_shortcut` when the channel count changes. temb_channels == 0: no time embedding (the VAE).
struct ResnetBlock2DImpl : torch::nn::Module {
  ResnetBlock2DImpl(int64_t in_channels, int64_t out_channels, int64_t temb_channels, int64_t groups, double eps);
  at::Tensor forward(const at::Tensor& x, const at::Tensor& temb = {});  // (B, C_in, H, W), (B, T) -> (B, C_out, H, W)

  torch::nn::GroupNorm norm1{nullptr}, norm2{nullptr};
  torch::nn::Conv2d conv1{nullptr}, conv2{nullptr}, conv_shortcut{nullptr};
  torch::nn::Linear time_emb_proj{nullptr};
};
TORCH_MODULE(ResnetBlock2D);

// diffusers Downsample2D with use_conv: a stride-2 conv3x3 named `conv`. The U-Net pads by 1 on every side; the VAE
// pads 0 and adds one row and one column of zeros at the bottom and right first (asymmetric, as the LDM VAE did).
struct Downsample2DImpl : torch::nn::Module {
  Downsample2DImpl(int64_t channels, bool asymmetric_padding);
  at::Tensor forward(const at::Tensor& x);  // (B, C, H, W) -> (B, C, ceil(H/2), ceil(W/2))

  torch::nn::Conv2d conv{nullptr};
  bool asymmetric_padding;
};
TORCH_MODULE(Downsample2D);

// diffusers Upsample2D with use_conv: nearest-neighbour resize, then conv3x3 named `conv`. `size` is the output
// height and width; when empty it doubles them. The U-Net passes the size of the skip connection it is about to
// meet, so inputs whose sides are not multiples of 2^levels come back to the right size.
struct Upsample2DImpl : torch::nn::Module {
  explicit Upsample2DImpl(int64_t channels);
  at::Tensor forward(const at::Tensor& x, std::vector<int64_t> size = {});

  torch::nn::Conv2d conv{nullptr};
};
TORCH_MODULE(Upsample2D);

// Multi-head attention of already projected q, k, v: (B, Nq, H*D), (B, Nk, H*D), (B, Nk, H*D) -> (B, Nq, H*D).
at::Tensor multi_head_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t heads,
                                bool causal = false);

// Gradient checkpointing: runs `block(inputs)` without keeping its activations, and in backward runs it again with
// grad enabled to get the gradients of `inputs` and `params` (the tensors the block reads besides its inputs).
// The block must be deterministic (no dropout): it is evaluated twice. Inputs must be defined tensors.
using Block = std::function<at::Tensor(const std::vector<at::Tensor>& inputs)>;
at::Tensor checkpointed(Block block, const std::vector<at::Tensor>& inputs, const std::vector<at::Tensor>& params);

// The autocast state (on or off, and the dtype) of a device type: captured when a block first runs and restored
// while backward recomputes it, so the recomputation is the same computation (torch.utils.checkpoint does this too;
// backward itself runs outside the forward's autocast scope).
struct AutocastState {
  c10::DeviceType device = c10::DeviceType::CPU;
  bool enabled = false;
  at::ScalarType dtype = at::kBFloat16;
  static AutocastState current(c10::DeviceType device);
};
class AutocastRestore {
 public:
  explicit AutocastRestore(const AutocastState& state);
  ~AutocastRestore();
  AutocastRestore(const AutocastRestore&) = delete;
  AutocastRestore& operator=(const AutocastRestore&) = delete;

 private:
  AutocastState state_, previous_;
};

// Runs a model's repeated blocks (the U-Net's ResNets and Transformer2Ds) when the model's weights are not all
// resident: full sharding gathers a block's weights just before it runs and recomputes it in backward
// (src/dist/sharded_units.h). `module` is the block, `params` the tensors it reads besides its inputs.
class BlockRunner {
 public:
  virtual ~BlockRunner() = default;
  virtual at::Tensor run(const torch::nn::Module& module, Block block, const std::vector<at::Tensor>& inputs,
                         const std::vector<at::Tensor>& params) = 0;
};

}  // namespace sdt
