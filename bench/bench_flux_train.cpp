// `sdt flux_train_network` on a FLUX-width transformer (hidden 3072, 24 heads of 128, FLUX's MLP ratio; random weights;
// by default 1 double and 4 single blocks, 0.9 G weights) with the tiny fixture's CLIP-L, T5 and autoencoder: per
// --sharding mode with and without --blocks_to_swap, each rank's memory plan, its measured peak of live CPU tensor
// bytes, the step time with its split, and the bytes block swap moves per step (kohya's schedule for frozen blocks:
// each swapped block copied in once for forward and once for backward). Run it as one process and under
// mpiexec -np 2 / -np 3. Asserts nothing.
//   [mpiexec -np N] bench_flux_train <source dir> [steps=3] [double=1] [single=4] [swap=1] [resolution=32] [precision=no]
// precision: no (fp32), bf16 (--mixed_precision bf16 --gradient_checkpointing: the transformer made and stored in bf16),
// or bf16+fp8 (and --fp8_base), kohya's low-memory settings. On a GPU (--device auto takes it) each rank also prints
// the caching allocator's peak; bench/gpu/check.sh runs a full-size FLUX.1 (19 + 38 blocks) that way.
#include <mpi.h>

#include <filesystem>
#include <fstream>

#include <fmt/format.h>
#include <spdlog/spdlog.h>
#include <torch/torch.h>

#include "bench/train_bench.h"
#include "cluster/world.h"
#include "src/models/flux_checkpoint.h"
#include "src/models/ldm_layout.h"
#include "src/train/trainer.h"

namespace fs = std::filesystem;

namespace {

int64_t bytes_of(const std::shared_ptr<torch::nn::Module>& block) {
  int64_t bytes = 0;
  for (const auto& p : block->parameters()) bytes += p.numel() * static_cast<int64_t>(p.element_size());
  return bytes;
}

}  // namespace

int main(int argc, char** argv) {
  sdt::DistributedSession session;
  const sdt::World& world = session.world();
  if (argc < 2) {
    fmt::print(stderr, "usage: bench_flux_train <source dir> [steps=3] [double=1] [single=4] [swap=1] [resolution=32]\n");
    return 2;
  }
  const fs::path source = argv[1];
  const int64_t steps = argc > 2 ? std::stoll(argv[2]) : 3;
  sdt::FluxConfig config;
  config.in_channels = 64;      // the tiny autoencoder's 16 channels, packed
  config.vec_in_dim = 32;       // the tiny CLIP-L
  config.context_in_dim = 16;   // the tiny T5
  config.depth = argc > 3 ? std::stoll(argv[3]) : 1;
  config.depth_single_blocks = argc > 4 ? std::stoll(argv[4]) : 4;
  const int64_t swap = argc > 5 ? std::stoll(argv[5]) : 1;
  const int resolution = argc > 6 ? std::stoi(argv[6]) : 32;
  const std::string precision = argc > 7 ? argv[7] : "no";
  if (precision != "no" && precision != "bf16" && precision != "bf16+fp8") {
    fmt::print(stderr, "precision: no, bf16 or bf16+fp8, not '{}'\n", precision);
    return 2;
  }
  const at::ScalarType weights_dtype = precision == "no" ? at::kFloat : at::kBFloat16;

  const fs::path work = fs::temp_directory_path() / "sdt_bench_flux_train";
  int64_t double_bytes = 0, single_bytes = 0, weights = 0;
  {
    torch::manual_seed(0);
    sdt::FluxTransformer transformer = sdt::ldm::build_in(weights_dtype, [&] { return sdt::FluxTransformer(config); });
    double_bytes = bytes_of(transformer->double_blocks[0]);
    single_bytes = bytes_of(transformer->single_blocks[0]);
    for (const auto& p : transformer->parameters()) weights += p.numel();
    if (world.rank == 0) {
      fs::remove_all(work);
      fs::create_directories(work);
      sdt::save_flux_transformer((work / "transformer.safetensors").string(), transformer, std::nullopt, {});
      sdt::bench::make_images(work / "images", resolution);
    }
  }
  if (world.size > 1) MPI_Barrier(MPI_COMM_WORLD);
  spdlog::set_level(spdlog::level::warn);
  // kohya's split of --blocks_to_swap; each swapped frozen block comes in once in forward, once in backward.
  // fp8 storage moves one byte per weight where the blocks were made with two.
  const int64_t moved = 2 * ((swap / 2) * double_bytes + (swap - swap / 2) * 2 * single_bytes) / (precision == "bf16+fp8" ? 2 : 1);
  if (world.rank == 0) {
    fmt::print("FLUX-width transformer: hidden {}, {} double + {} single blocks, {:.2f} G weights ({:.0f} MiB per double "
               "block, {:.0f} MiB per single block, {}); {}x{} images, batch 1 per rank, {} timed steps, precision {}\n",
               config.hidden_size, config.depth, config.depth_single_blocks, weights / 1e9, double_bytes / 1048576.0,
               single_bytes / 1048576.0, c10::toString(weights_dtype), resolution, resolution, steps, precision);
  }
  for (const std::string setting : {"none", "none+swap", "optimizer", "gradients", "full", "full+swap"}) {
    const std::string sharding = setting.substr(0, setting.find('+'));
    if (world.size == 1 && sharding != "none") continue;  // one rank shards nothing
    sdt::TrainArgs args;
    args.pretrained_model_name_or_path = (work / "transformer.safetensors").string();
    args.family = "flux";
    args.clip_l = (source / "tests/fixtures/sd/sd1/text_encoder").string();
    args.t5xxl = (source / "tests/fixtures/flux/tiny/t5").string();
    args.ae = (source / "tests/fixtures/flux/tiny/ae").string();
    args.t5xxl_max_token_length = 16;
    args.tokenizer = (source / "tests/fixtures/sd/sampling/tokenizer").string();
    args.train_data_dir = (work / "images").string();
    args.caption_extension = ".txt";
    args.resolution = std::to_string(resolution);
    args.train_batch_size = 1;
    args.output_dir = (work / fmt::format("out{}", world.rank)).string();
    args.network_module = "networks.lora_flux";
    args.network_dim = 16;
    args.network_alpha = 16;
    args.network_train_unet_only = true;
    args.learning_rate = 1e-4;
    args.max_train_steps = steps;
    args.seed = 1;
    args.max_data_loader_n_workers = 1;
    args.log_time_every_n_steps = 0;
    args.sharding = sharding;
    args.blocks_to_swap = setting.ends_with("+swap") ? swap : 0;
    args.timestep_sampling = "sigmoid";
    if (precision != "no") {
      args.mixed_precision = "bf16";
      args.gradient_checkpointing = true;
      args.fp8_base = precision == "bf16+fp8";
    }
    const sdt::TrainSummary summary = sdt::train(args, world, sdt::TrainMode::network);
    const sdt::StepTimes& t = summary.times;
    const double n = static_cast<double>(t.steps);
    const double plan = sdt::bench::max_over_ranks(static_cast<double>(summary.planned_bytes), world) / 1048576.0;
    const double peak = sdt::bench::max_over_ranks(static_cast<double>(summary.peak_bytes), world) / 1048576.0;
    const double total = sdt::bench::max_over_ranks(1e3 * t.total() / n, world);
    const double device_peak = sdt::bench::max_over_ranks(static_cast<double>(summary.device_peak_bytes), world) / 1048576.0;
    if (world.rank == 0) {
      const double swapped = setting.ends_with("+swap") ? moved / 1048576.0 / (sharding == "full" ? world.size : 1) : 0.0;
      fmt::print("LoRA ranks {}  --sharding {:9s} plan {:7.0f} MiB  peak {:7.0f} MiB  ms/step {:7.0f} (forward {:.0f}, "
                 "backward {:.0f}, communication {:.0f}, optimizer {:.0f})  swap moves {:.0f} MiB/step{}\n",
                 world.size, setting, plan, peak, total, 1e3 * t.forward / n, 1e3 * t.backward / n,
                 1e3 * t.communication / n, 1e3 * t.optimizer / n, swapped,
                 device_peak > 0 ? fmt::format("  device peak {:.0f} MiB", device_peak) : "");
      std::fflush(stdout);
    }
  }
  return 0;
}
