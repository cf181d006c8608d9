// sdt: one executable, one subcommand per job. `sdt --help` lists them.
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

  // `sdt train` takes kohya's ~190 arguments; its own parser (src/core/train_args) reads them, so
  // CLI11 hands over everything after the word "train", --help included.
  auto* train = app.add_subcommand("train", "train a network (LoRA), as kohya's train_network.py; `sdt train --help` lists the arguments");
  train->alias("train_network");
  train->prefix_command();
  train->set_help_flag();
  auto* train_db = app.add_subcommand("train_db", "train the whole model (DreamBooth / fine-tuning), as kohya's train_db.py");
  train_db->prefix_command();
  train_db->set_help_flag();

  sdt::SampleCommand sample_command;
  auto* sample = sdt::add_sample_command(app, sample_command);
  sdt::MergeLoraCommand merge_lora_command;
  auto* merge_lora = sdt::add_merge_lora_command(app, merge_lora_command);
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
    if (*train) return sdt::run_train(train->remaining(), session.world(), sdt::TrainMode::network);
    if (*train_db) return sdt::run_train(train_db->remaining(), session.world(), sdt::TrainMode::whole_model);
    if (*sample) return sdt::run_sample(sample_command, sample->remaining());
    if (*merge_lora) return sdt::run_merge_lora(merge_lora_command, merge_lora->remaining());
    if (cache_commands.chosen()) return sdt::run_cache_command(cache_commands, session.world());
  } catch (const std::exception& e) {
    // One rank's error ends the whole job, with the rank named: the others would wait for it forever.
    sdt::abort_job(session.world(), e.what());
  }
  return 0;
}
