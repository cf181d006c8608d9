// `sdt train` in every --sharding mode on a mid-size random SD 1.x U-Net (the tiny fixture's text encoder and VAE):
// per mode, each rank's memory plan, its measured peak of live CPU tensor bytes, and the step time with its split.
// `none+ckpt` is plain data parallel with --gradient_checkpointing: the same recomputation as `full`, so the two
// differ by the sharding alone.
// Run it as one process and under mpiexec -np 2 / -np 3 to see the per-rank figures shrink. Asserts nothing.
//   [mpiexec -np N] bench_train_sharding <source dir> [steps=6] [channels=64,128,256]
#include <mpi.h>

#include <filesystem>
#include <fstream>
#include <sstream>

#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>
#include <torch/torch.h>

#include "bench/train_bench.h"
#include "cluster/world.h"
#include "src/core/safetensors.h"
#include "src/core/tensor_io.h"
#include "src/models/sd_checkpoint.h"
#include "src/train/trainer.h"

namespace fs = std::filesystem;

namespace {

// The fixture's diffusers folder with its U-Net widened to `channels` (2 layers per level, 8-channel heads,
// 32 groups) and random weights.
void make_model(const fs::path& source, const fs::path& model, const std::vector<int64_t>& channels) {
  const fs::path fixture = source / "tests/fixtures/sd/sd1";
  fs::create_directories(model / "unet");
  fs::copy(fixture / "text_encoder", model / "text_encoder", fs::copy_options::recursive);
  fs::copy(fixture / "vae", model / "vae", fs::copy_options::recursive);
  nlohmann::json config = nlohmann::json::parse(std::ifstream(fixture / "unet/config.json"));
  config["block_out_channels"] = channels;
  config["layers_per_block"] = 2;
  config["attention_head_dim"] = 8;
  config["norm_num_groups"] = 32;
  std::ofstream(model / "unet/config.json") << config.dump(1);
  torch::manual_seed(0);
  sdt::UNet2DConditionModel unet(sdt::read_unet_config((model / "unet/config.json").string()));
  sdt::NamedTensors tensors;
  for (const auto& item : unet->named_parameters()) tensors.emplace_back(item.key(), item.value().detach());
  sdt::save_safetensors((model / "unet/diffusion_pytorch_model.safetensors").string(), tensors, {});
}

}  // namespace

int main(int argc, char** argv) {
  sdt::DistributedSession session;
  const sdt::World& world = session.world();
  if (argc < 2) {
    fmt::print(stderr, "usage: bench_train_sharding <source dir> [steps=6] [channels=64,128,256]\n");
    return 2;
  }
  const fs::path source = argv[1];
  const int64_t steps = argc > 2 ? std::stoll(argv[2]) : 6;
  std::vector<int64_t> channels;
  {
    std::stringstream list(argc > 3 ? argv[3] : "64,128,256");
    for (std::string c; std::getline(list, c, ',');) channels.push_back(std::stoll(c));
  }
  const fs::path work = fs::temp_directory_path() / "sdt_bench_train_sharding";
  if (world.rank == 0) {
    fs::remove_all(work);
    make_model(source, work / "model", channels);
    sdt::bench::make_images(work / "images");
  }
  if (world.size > 1) MPI_Barrier(MPI_COMM_WORLD);
  spdlog::set_level(spdlog::level::warn);

  for (sdt::TrainMode mode : {sdt::TrainMode::network, sdt::TrainMode::whole_model}) {
    for (const std::string setting : {"none", "none+ckpt", "optimizer", "gradients", "full"}) {
      const std::string sharding = setting.substr(0, setting.find('+'));
      sdt::TrainArgs args;
      args.pretrained_model_name_or_path = (work / "model").string();
      args.tokenizer = (source / "tests/fixtures/sd/sampling/tokenizer").string();
      args.train_data_dir = (work / "images").string();
      args.resolution = "64";
      args.train_batch_size = 2;
      args.output_dir = (work / fmt::format("out{}", world.rank)).string();
      args.network_module = "networks.lora";
      args.network_dim = 16;
      args.network_alpha = 16;
      args.network_train_unet_only = true;
      args.stop_text_encoder_training = -1;  // train_db: the U-Net alone
      args.learning_rate = 1e-4;
      args.max_train_steps = steps;
      args.seed = 1;
      args.max_data_loader_n_workers = 1;
      args.log_time_every_n_steps = 0;
      args.sharding = sharding;
      args.gradient_checkpointing = setting.ends_with("+ckpt");
      const sdt::TrainSummary summary = sdt::train(args, world, mode);
      const sdt::StepTimes& t = summary.times;
      const double n = static_cast<double>(t.steps);
      const double plan = sdt::bench::max_over_ranks(static_cast<double>(summary.planned_bytes), world) / 1048576.0;
      const double peak = sdt::bench::max_over_ranks(static_cast<double>(summary.peak_bytes), world) / 1048576.0;
      const double total = sdt::bench::max_over_ranks(1e3 * t.total() / n, world);
      const double communication = sdt::bench::max_over_ranks(1e3 * t.communication / n, world);
      const double backward = sdt::bench::max_over_ranks(1e3 * t.backward / n, world);
      if (world.rank == 0) {
        fmt::print("{:7s} ranks {}  --sharding {:9s}  plan {:7.1f} MiB  peak {:7.1f} MiB  ms/step {:7.1f} "
                   "(forward {:.1f}, backward {:.1f}, communication {:.1f}, optimizer {:.1f})\n",
                   mode == sdt::TrainMode::network ? "LoRA" : "full FT", world.size, setting, plan, peak, total,
                   1e3 * t.forward / n, backward, communication, 1e3 * t.optimizer / n);
        std::fflush(stdout);
      }
    }
  }
  return 0;
}
