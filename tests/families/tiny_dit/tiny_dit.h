// A tiny test-only DiT family, the second family through the training core: FLUX-style double blocks (image and text
// streams with their own weights, joint attention, modulation by a vector) that take and return several tensors,
// single blocks over the joined sequence, two conditioning tensors (the text encoder's hidden states and a pooled
// vector), and flow matching (src/objectives/flow_matching.h) as its objective. It follows docs/adding_a_family.md:
// a model, a family with the four strategies and the training hooks, a registry row, a checkpoint it recognises.
//
// Its VAE, text encoder and tokenizer are the tiny SD 1.x fixture's (tests/fixtures/sd), so only the denoiser is new.
// A checkpoint is a folder: `transformer/model.safetensors` (the DiT's weights, its config as JSON in the metadata
// key "tiny_dit_config") and `sd/`, the SD diffusers folder whose VAE and text encoder it uses.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include <torch/torch.h>

#include "src/families/family.h"
#include "src/train/trainer.h"
#include "src/models/layers.h"

namespace sdt::tiny_dit {

struct TinyDitConfig {
  int64_t latent_channels = 4;
  int64_t patch = 2;            // 2x2 latent patches per token, as FLUX packs them
  int64_t dim = 32;
  int64_t heads = 2;
  int64_t mlp_ratio = 2;
  int64_t double_blocks = 2;
  int64_t single_blocks = 2;
  int64_t context_dim = 32;     // the text encoder's hidden size
  int64_t pooled_dim = 32;
};

// FLUX's double-stream block, simplified: each stream modulated by the vector (shift, scale, gate for attention and
// MLP), joint attention over [text, image], separate MLPs. (img, txt, vec) -> (img, txt).
struct DoubleBlockImpl : torch::nn::Module {
  explicit DoubleBlockImpl(const TinyDitConfig& c);
  std::pair<at::Tensor, at::Tensor> forward(const at::Tensor& img, const at::Tensor& txt, const at::Tensor& vec);

  Linear img_mod{nullptr}, img_qkv{nullptr}, img_proj{nullptr}, img_mlp_in{nullptr}, img_mlp_out{nullptr};
  Linear txt_mod{nullptr}, txt_qkv{nullptr}, txt_proj{nullptr}, txt_mlp_in{nullptr}, txt_mlp_out{nullptr};
  int64_t dim, heads;
};
TORCH_MODULE(DoubleBlock);

// FLUX's single-stream block: one modulation, linear1 to qkv and the MLP's hidden, linear2 back. (x, vec) -> x.
struct SingleBlockImpl : torch::nn::Module {
  explicit SingleBlockImpl(const TinyDitConfig& c);
  at::Tensor forward(const at::Tensor& x, const at::Tensor& vec);

  Linear modulation{nullptr}, linear1{nullptr}, linear2{nullptr};
  int64_t dim, heads, mlp;
};
TORCH_MODULE(SingleBlock);

struct TinyDitImpl : torch::nn::Module {
  explicit TinyDitImpl(TinyDitConfig config);
  // latents (B, C, h, w) (h, w even), timesteps (B) in [0, 1000], text (B, S, context_dim), pooled (B, pooled_dim)
  // -> (B, C, h, w).
  at::Tensor forward(const at::Tensor& latents, const at::Tensor& timesteps, const at::Tensor& text, const at::Tensor& pooled);
  // The double and single blocks, in the order forward runs them.
  std::vector<std::shared_ptr<torch::nn::Module>> blocks() const;

  TinyDitConfig config;
  bool gradient_checkpointing = false;
  BlockRunner* block_runner = nullptr;  // not owned
  Linear img_in{nullptr}, txt_in{nullptr}, time_in{nullptr}, vector_in{nullptr}, final_mod{nullptr}, final_out{nullptr};
  torch::nn::ModuleList double_blocks, single_blocks;
};
TORCH_MODULE(TinyDit);

// Registers "tiny_dit" (once per process).
void register_family();

// What the tests train the tiny DiT with: the model folder, the toy dataset at 64x64, batch 1, seed 1, flow matching
// with sigmoid timesteps; a LoRA of dim 4 on the DiT (lr 1e-2), or the whole model (lr 2e-3).
TrainArgs training_args(const std::string& model, const std::string& train_data_dir, TrainMode mode);

// Writes a checkpoint folder at `folder` with a DiT of `config` initialised after torch.manual_seed(seed), beside the
// SD diffusers folder `sd_folder` (linked as `sd/`).
void write_checkpoint(const std::string& folder, const TinyDitConfig& config, uint64_t seed, const std::string& sd_folder);

// A whole toy run in `folder` (emptied first): a DiT of `config` (seed 3) beside the tiny SD 1.x fixture, the toy
// dataset at 64x64 (4 repeats), training_args with batch 2 and raw predictions, outputs in `folder`/out as "toy".
TrainArgs toy_run(const std::string& folder, TrainMode mode, const TinyDitConfig& config = {});

}  // namespace sdt::tiny_dit
