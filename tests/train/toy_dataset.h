// The trainer tests' dataset: two flat-colour images with a bright square at different places, `size` x `size`,
// captioned by colour, in a DreamBooth folder `<repeats>_toy` under `root`/train. Returns `root`/train. And the
// trainer tests' run on it.
#pragma once

#include <filesystem>
#include <fstream>
#include <string>
#include <utility>

#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include "src/core/train_args.h"

namespace sdt::testing_support {

inline std::filesystem::path make_toy_dataset(const std::filesystem::path& root, int repeats, int size = 32) {
  const std::filesystem::path dir = root / "train" / (std::to_string(repeats) + "_toy");
  std::filesystem::create_directories(dir);
  const std::pair<const char*, cv::Scalar> images[] = {{"red", cv::Scalar(40, 40, 220)}, {"blue", cv::Scalar(220, 60, 40)}};
  int i = 0;
  for (const auto& [name, colour] : images) {
    cv::Mat m(size, size, CV_8UC3, colour);
    cv::rectangle(m, cv::Rect((4 + 14 * i) * size / 32, 8 * size / 32, 10 * size / 32, 10 * size / 32), cv::Scalar(250, 250, 250), cv::FILLED);
    cv::imwrite((dir / (std::string(name) + ".png")).string(), m);
    std::ofstream(dir / (std::string(name) + ".txt")) << "a " << name << " square";
    ++i;
  }
  return root / "train";
}

// A rank-4 LoRA (alpha 4) of `model`, a tiny fixture model's diffusers folder (its configs give the tiny sizes), on
// the toy dataset (4 repeats) made under `root`, at 32 pixels, batch 2, seed 1, one loader worker, written to
// `root`/out/toy*. The byte-level fixture vocabulary's ids fit the tiny text encoders.
inline TrainArgs tiny_lora_run(const std::filesystem::path& root, const std::string& model) {
  TrainArgs args;
  args.pretrained_model_name_or_path = model;
  args.tokenizer = SDT_FIXTURES "/sd/sampling/tokenizer";
  args.train_data_dir = make_toy_dataset(root, 4).string();
  args.resolution = "32";
  args.output_dir = (root / "out").string();
  args.output_name = "toy";
  args.network_module = "networks.lora";
  args.network_dim = 4;
  args.network_alpha = 4;
  args.train_batch_size = 2;
  args.seed = 1;
  args.max_data_loader_n_workers = 1;
  return args;
}

// The tiny FLUX.1 dev fixture as the model of `args` (tests/fixtures/flux/tiny: the transformer, T5, the autoencoder;
// the tiny SD text encoder as CLIP-L), flow matching with sigmoid timesteps and raw predictions, T5 cut to 16 tokens.
inline void use_tiny_flux(TrainArgs& args) {
  args.pretrained_model_name_or_path = SDT_FIXTURES "/flux/tiny/transformer.safetensors";
  args.family = "flux";
  args.network_module = "networks.lora_flux";
  args.clip_l = SDT_FIXTURES "/sd/sd1/text_encoder";
  args.t5xxl = SDT_FIXTURES "/flux/tiny/t5";
  args.ae = SDT_FIXTURES "/flux/tiny/ae";
  args.t5xxl_max_token_length = 16;
  args.timestep_sampling = "sigmoid";
  args.model_prediction_type = "raw";
}

// tiny_lora_run on the tiny FLUX.1 dev fixture.
inline TrainArgs tiny_flux_run(const std::filesystem::path& root) {
  TrainArgs args = tiny_lora_run(root, SDT_FIXTURES "/flux/tiny/transformer.safetensors");
  use_tiny_flux(args);
  return args;
}

}  // namespace sdt::testing_support
