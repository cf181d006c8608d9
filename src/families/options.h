// What a model family is loaded from and what one sample image is, as plain values. The launcher fills them from its
// command line; there is no LibTorch in this header, so launcher/ compiles without it.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "src/core/train_args.h"

namespace sdt {

// The dtype a family's models are built and read in.
enum class WeightsDtype { float32, bfloat16, float16 };

// kohya's model arguments, under its names.
struct FamilyOptions {
  std::string pretrained_model_name_or_path;  // a single-file checkpoint (.safetensors) or a diffusers folder
  std::optional<std::string> vae;             // replaces the checkpoint's VAE: a file or a diffusers folder
  // The CLIP vocabulary: OpenAI's bpe_simple_vocab_16e6.txt.gz, or a folder holding vocab.json and merges.txt (a
  // diffusers folder's tokenizer/). Empty: the tokenizer/ folder of a diffusers model.
  std::string tokenizer;
  bool v2 = false;                       // SD 2.x: OpenCLIP text encoder, padding token "!"
  bool v_parameterization = false;       // the model predicts v instead of the noise (SD 2.x 768-v)
  std::optional<int> max_token_length;   // 75 (none), 150 or 225 tokens per caption
  std::optional<int> clip_skip;          // condition on the output of the n-th layer from the end (1 = the last)
  // SDXL single files: the second text encoder's text_projection as kohya loads it (untransposed, kohya's pooled
  // vector) rather than as OpenCLIP and diffusers use it.
  bool text_projection_as_kohya = false;
  // FLUX.1 / Chroma (flux_train_network.py): the transformer is --pretrained_model_name_or_path, its text encoders and
  // autoencoder come as separate files.
  std::optional<std::string> clip_l, t5xxl, ae;
  std::optional<int> t5xxl_max_token_length;  // none: 256 for schnell, 512 for dev and Chroma
  bool apply_t5_attn_mask = false;            // mask T5's padding in T5 and in the transformer's attention
  double guidance_scale = 3.5;                // dev's embedded guidance while training
  std::string model_type = "flux";            // flux | chroma
  // Every model is built and read in this dtype (a trainer whose models are all used in bf16 reads them so, and never
  // holds them in fp32: 24 GB for FLUX's transformer rather than 48).
  WeightsDtype weights_dtype = WeightsDtype::float32;
  // The caller does not need the denoiser's blocks to hold their weights: a block engine reads each rank's part of
  // them from the checkpoint (--sharding full, --blocks_to_swap: ParallelPlan::deferred_weights), or they never run
  // (the cache commands). A family that can then builds its blocks without weights.
  bool defer_block_weights = false;
};

// One text-to-image run; what is not given takes the family's kohya default.
struct SampleOptions {
  std::string prompt;
  std::string negative_prompt;
  std::string sampler = "ddim";  // ddim, euler, euler_a (kohya also accepts k_euler, k_euler_a); FLUX: its Euler
  std::optional<int> steps;      // none: SD and SDXL 30, FLUX 20
  std::optional<double> scale;   // classifier-free guidance, 1 or less: none. None: SD and SDXL 7.5, FLUX 1
  std::optional<double> guidance_scale;  // FLUX dev's embedded guidance; none: 3.5
  std::optional<uint64_t> seed;  // none: a random seed, which is logged
  int width = 512;               // pixels; rounded down to a multiple of 8, at least 64, as kohya does
  int height = 512;
};

// kohya's model arguments (--pretrained_model_name_or_path, --vae, --v2, --clip_skip, ...) as FamilyOptions;
// a missing --pretrained_model_name_or_path is an sdt::Error.
FamilyOptions family_options_from_args(const TrainArgs& args);

// The family to load: `family` (--family) when given, else the one family whose checkpoints `checkpoint` looks like
// (from its tensor names or its diffusers config). Neither, or a checkpoint several families recognise: an sdt::Error.
std::string family_of_checkpoint(const std::optional<std::string>& family, const std::string& checkpoint);

}  // namespace sdt
