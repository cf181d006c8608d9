// `sdt sample`: text to image with an SD 1.x / 2.x checkpoint, written as PNG; how a user checks that a checkpoint
// works. The options carry kohya's names; the image is the one kohya's sample images give for the same settings.
#include <CLI/CLI.hpp>

#include "launcher/commands.h"
#include "src/core/log.h"

namespace sdt {

CLI::App* add_sample_command(CLI::App& app, SampleCommand& c) {
  auto* cmd = app.add_subcommand("sample", "text to image with an SD 1.x / 2.x checkpoint (DDIM, Euler, Euler a), written as PNG");
  FamilyOptions& m = c.model;
  SampleOptions& s = c.sample;
  cmd->add_option("--pretrained_model_name_or_path", m.pretrained_model_name_or_path,
                  "single-file checkpoint (.safetensors) or diffusers folder")
      ->required();
  cmd->add_option_function<std::string>("--family", [&c](const std::string& name) { c.family = name; },
                                        "the model family (default: the one that recognises the checkpoint)");
  cmd->add_flag("--v2", m.v2, "SD 2.x checkpoint (OpenCLIP text encoder, padding token \"!\")");
  cmd->add_flag("--v_parameterization", m.v_parameterization, "the model predicts v (SD 2.x 768-v)");
  cmd->add_option_function<std::string>("--vae", [&m](const std::string& path) { m.vae = path; },
                                        "VAE to use instead of the checkpoint's: a file or a diffusers folder");
  cmd->add_option("--tokenizer_vocab", m.tokenizer,
                  "CLIP vocabulary: bpe_simple_vocab_16e6.txt.gz, or a folder with vocab.json and merges.txt "
                  "(default: the diffusers folder's tokenizer/)");
  cmd->add_option_function<int>("--clip_skip", [&m](const int& n) { m.clip_skip = n; },
                                "condition on the n-th layer from the end of the text encoder")
      ->check(CLI::PositiveNumber);
  cmd->add_option("--prompt", s.prompt, "the prompt; (word:1.2), (word), [word] weight words")->required();
  cmd->add_option("--negative_prompt", s.negative_prompt, "what the image should not show");
  cmd->add_option("--sampler", s.sampler, "ddim, euler or euler_a")
      ->check(CLI::IsMember({"ddim", "euler", "euler_a", "k_euler", "k_euler_a"}))
      ->capture_default_str();
  cmd->add_option("--steps", s.steps, "denoising steps")->check(CLI::Range(1, 1000))->capture_default_str();
  cmd->add_option("--scale", s.scale, "classifier-free guidance scale (1: none)")->capture_default_str();
  cmd->add_option_function<uint64_t>("--seed", [&s](const uint64_t& seed) { s.seed = seed; },
                                     "random seed (default: a random one, logged)");
  cmd->add_option("--width", s.width, "image width, rounded down to a multiple of 8 (at least 64)")->capture_default_str();
  cmd->add_option("--height", s.height, "image height, rounded down to a multiple of 8 (at least 64)")
      ->capture_default_str();
  cmd->add_option("--output", c.output, "the PNG file to write")->required();
  return cmd;
}

int run_sample(const SampleCommand& command) {
  init_logging({}, 0, 1);
  sample_to_png(family_of_checkpoint(command.family, command.model.pretrained_model_name_or_path), command.model,
                command.sample, command.output);
  return 0;
}

}  // namespace sdt
