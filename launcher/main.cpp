// sdt: one executable, one subcommand per job. `sdt --help` lists them.
#include <string>
#include <utility>
#include <vector>

#include <CLI/CLI.hpp>

#include "cluster/world.h"
#include "launcher/commands.h"
#include "src/core/error.h"

int main(int argc, char** argv) {
  // First, before any thread starts: MPI only when mpirun / srun started more than one process.
  sdt::DistributedSession session;
  CLI::App app{"sdt: train diffusion image models (LoRA and full fine-tuning) with kohya-ss/sd-scripts' configuration",
               "sdt"};
  app.set_version_flag("--version", sdt::version_report());
  app.require_subcommand(1);

  std::string inspect_path;
  auto* inspect = app.add_subcommand("inspect", "show a .safetensors file (tensors, sizes, metadata), or a dataset (`sdt inspect dataset --help`)");
  inspect->add_option("file", inspect_path, "the .safetensors file");
  auto* inspect_dataset = inspect->add_subcommand(
      "dataset",
      "show buckets, steps per epoch and processed captions of a --dataset_config; options: --world_size N, --dump K "
      "(write the first K processed images as PNG), --dump_dir DIR, --show_captions K, and any `sdt train` argument");
  inspect_dataset->prefix_command();

  // The training commands take kohya's ~200 arguments; their own parser (src/core/train_args) reads them, so CLI11
  // hands over everything after the command's name, --help included.
  std::vector<std::pair<CLI::App*, const sdt::TrainCommand*>> train_commands;
  for (const sdt::TrainCommand& command : sdt::kTrainCommands) {
    auto* sub = app.add_subcommand(command.name, command.description);
    if (std::string(command.name) == "train") sub->alias("train_network");
    sub->prefix_command();
    sub->set_help_flag();
    train_commands.emplace_back(sub, &command);
  }

  sdt::SampleCommand sample_command;
  auto* sample = sdt::add_sample_command(app, sample_command);
  sdt::MergeLoraCommand merge_lora_command;
  auto* merge_lora = sdt::add_merge_lora_command(app, merge_lora_command);
  sdt::ConvertFluxLoraCommand convert_flux_lora_command;
  auto* convert_flux_lora = sdt::add_convert_flux_lora_command(app, convert_flux_lora_command);
  const sdt::CacheCommands cache_commands = sdt::add_cache_commands(app);

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }

  try {
    if (*inspect_dataset) return sdt::run_inspect_dataset(inspect_dataset->remaining());
    if (*inspect) {
      if (inspect_path.empty()) throw CLI::RequiredError("file");
      return sdt::run_inspect(inspect_path);
    }
    for (const auto& [sub, command] : train_commands) {
      if (*sub) return sdt::run_train(sub->remaining(), session.world(), *command);
    }
    if (*sample) return sdt::run_sample(sample_command, sample->remaining());
    if (*merge_lora) return sdt::run_merge_lora(merge_lora_command, merge_lora->remaining());
    if (*convert_flux_lora) return sdt::run_convert_flux_lora(convert_flux_lora_command);
    if (cache_commands.chosen()) return sdt::run_cache_command(cache_commands, session.world());
  } catch (const std::exception& e) {
    // One rank's error ends the whole job, with the rank named: the others would wait for it forever.
    sdt::abort_job(session.world(), e.what());
  }
  return 0;
}
