// `sdt sample`: text to image with a checkpoint, written as PNG; how a user checks that a checkpoint works. The options
// carry kohya's names; the image is the one kohya's sample images give for the same settings. The model flags
// (--pretrained_model_name_or_path, --family, --vae, and the family's own, such as SD 2.x's switch) are kohya's, read by its
// argument table as `sdt train` reads them, and so are --device and --blocks_to_swap (FLUX: forward-only block swap).
#include <CLI/CLI.hpp>

#include <spdlog/spdlog.h>

#include "cluster/communicator.h"
#include "launcher/commands.h"
#include "src/core/device.h"
#include "src/core/error.h"
#include "src/core/log.h"
#include "src/core/train_args.h"
#include "src/families/family.h"
#include "src/parallel/block_engine.h"

namespace sdt {

CLI::App* add_sample_command(CLI::App& app, SampleCommand& c) {
  auto* cmd = app.add_subcommand("sample", "text to image with a checkpoint (DDIM, Euler, Euler a), written as PNG; the "
                                            "model flags are kohya's (--pretrained_model_name_or_path, --family, --vae, "
                                            "the family's own)");
  cmd->allow_extras();  // the model flags, read in run_sample
  SampleOptions& s = c.sample;
  cmd->add_option("--tokenizer_vocab", c.tokenizer_vocab,
                  "CLIP vocabulary: bpe_simple_vocab_16e6.txt.gz, or a folder with vocab.json and merges.txt "
                  "(default: the diffusers folder's tokenizer/, or the shipped one)");
  cmd->add_option("--prompt", s.prompt, "the prompt; (word:1.2), (word), [word] weight words")->required();
  cmd->add_option("--negative_prompt", s.negative_prompt, "what the image should not show");
  cmd->add_option("--sampler", s.sampler, "ddim, euler or euler_a")
      ->check(CLI::IsMember({"ddim", "euler", "euler_a", "k_euler", "k_euler_a"}))
      ->capture_default_str();
  cmd->add_option_function<int>("--steps", [&s](const int& steps) { s.steps = steps; },
                                "denoising steps (default: kohya's, SD and SDXL 30, FLUX 20)")
      ->check(CLI::Range(1, 1000));
  cmd->add_option_function<double>("--scale", [&s](const double& scale) { s.scale = scale; },
                                   "classifier-free guidance scale, 1: none (default: SD and SDXL 7.5, FLUX 1)");
  cmd->add_option_function<double>("--guidance_scale", [&s](const double& g) { s.guidance_scale = g; },
                                   "FLUX.1 dev's embedded guidance (default 3.5)");
  cmd->add_option_function<uint64_t>("--seed", [&s](const uint64_t& seed) { s.seed = seed; },
                                     "random seed (default: a random one, logged)");
  cmd->add_option("--width", s.width, "image width, rounded down to a multiple of 8 (at least 64)")->capture_default_str();
  cmd->add_option("--height", s.height, "image height, rounded down to a multiple of 8 (at least 64)")
      ->capture_default_str();
  cmd->add_option("--output", c.output, "the PNG file to write")->required();
  return cmd;
}

// --blocks_to_swap k: the family's swappable blocks (its parallel plan, kohya's split) run through a forward-only
// block engine, their weights on the host and copied in as kohya's schedule needs them (read there straight from the
// checkpoint when the family deferred them). Made before the models move to the device, so swapped blocks never reach
// it. Null without swap.
std::unique_ptr<BlockEngine> swap_engine(Family& family, int64_t blocks_to_swap, Communicator& communicator) {
  if (blocks_to_swap <= 0) return nullptr;
  const ParallelPlan plan = family.parallel_plan();
  BlockEngineOptions options{.swap = plan.swapped(blocks_to_swap), .read_deferred = plan.deferred_weights};
  auto engine = std::make_unique<BlockEngine>(plan.blocks, std::vector<at::Tensor>{}, communicator, options);
  family.set_block_runner(engine.get());
  return engine;
}

int run_sample(const SampleCommand& command, const std::vector<std::string>& model_flags) {
  init_logging({}, 0, 1);
  const TrainArgs args = parse_train_args(model_flags).args;
  FamilyOptions model = family_options_from_args(args);
  if (!command.tokenizer_vocab.empty()) model.tokenizer = command.tokenizer_vocab;
  model.defer_block_weights = args.blocks_to_swap.value_or(0) > 0;
  const std::unique_ptr<Family> family = load_family(family_of_checkpoint(args.family, model.pretrained_model_name_or_path), model);
  const c10::Device device = select_device(args.device, 0);
  const std::unique_ptr<Communicator> communicator = make_communicator(World{}, device);
  const std::unique_ptr<BlockEngine> engine = swap_engine(*family, args.blocks_to_swap.value_or(0), *communicator);
  const ModelBundle& models = family->models();
  for (const auto& m : {models.denoiser, models.vae}) m->to(device);
  for (const auto& encoder : models.text_encoders) encoder->to(device);
  torch::NoGradGuard no_grad;
  write_png(command.output, family->sample(command.sample));
  spdlog::info("wrote {}", command.output);
  family->set_block_runner(nullptr);
  return 0;
}

}  // namespace sdt
