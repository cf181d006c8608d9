// `sdt train` (kohya's train_network.py: a LoRA) and `sdt train_db` (train_db.py: the whole model, DreamBooth or
// fine-tuning): resolve the configuration (command line over --config_file over defaults), then train.
#include <filesystem>
#include <fstream>

#include "cluster/world.h"
#include "launcher/commands.h"
#include "src/core/error.h"
#include "src/core/log.h"
#include "src/core/train_args.h"
#include "src/train/trainer.h"

namespace sdt {
namespace {

void print_help(const TrainCommand& command) {
  fmt::print(
      "usage: sdt {} [--config_file FILE.toml] [--output_config] [--name value | --name=value | --flag] ...\n\n"
      "Arguments have kohya-ss/sd-scripts' names ({}). The command line wins over --config_file,\n"
      "which wins over the defaults. docs/configuration.md has this list with the dataset config keys.\n",
      command.name, command.script);
  std::string group;
  for (const auto& spec : train_arg_specs()) {
    if (spec.group != group) {
      group = spec.group;
      fmt::print("\n{}:\n", group);
    }
    std::string def = format_arg_value(spec.get(TrainArgs{}));
    fmt::print("  --{:<36} {}{}\n", spec.name, spec.help, def.empty() || spec.kind == ArgKind::Flag ? "" : " [default " + def + "]");
  }
}

std::string effective_config_toml(const ParsedTrainArgs& parsed) {
  std::string header = "# sdt train: effective configuration (arguments that differ from their defaults)\n";
  if (!parsed.config_path.empty()) header += "# read from " + parsed.config_path + " and the command line\n";
  return header + train_args_to_toml(parsed.args);
}

}  // namespace

int run_train(const std::vector<std::string>& argv, const World& world, const TrainCommand& command) {
  for (const auto& a : argv) {
    if (a == "--help" || a == "-h") {
      print_help(command);
      return 0;
    }
  }
  ParsedTrainArgs parsed = parse_train_args(argv);
  if (!parsed.args.family) parsed.args.family = command.family;
  const TrainMode mode = command.mode;
  const TrainArgs& args = parsed.args;
  init_logging({args.console_log_level, args.console_log_file, args.console_log_simple, args.log_all_ranks}, world.rank,
               world.size);

  if (args.output_config) {
    // kohya writes the configuration to --config_file when that file does not exist yet; when it
    // does, it was read as input, and the resolved configuration goes to stdout rather than over it.
    const std::string text = effective_config_toml(parsed);
    if (args.config_file && parsed.config_path.empty()) {
      std::string path = args.config_file->ends_with(".toml") ? *args.config_file : *args.config_file + ".toml";
      std::ofstream out(path);
      out << text;
      out.close();
      if (!out) fail(path, "cannot write the configuration file");
      spdlog::info("wrote the configuration to {}", path);
    } else {
      fmt::print("{}", text);
    }
    return 0;
  }

  const TrainSummary summary = train(args, world, mode);
  if (summary.interrupted) {
    // EX_TEMPFAIL: the job may be requeued and continue with --resume latest (slurm/train.sbatch does).
    spdlog::warn("stopped at step {} on request; state: {}", summary.steps, summary.state_path);
    return 75;
  }
  spdlog::info("trained {} steps; {}: {}", summary.steps, mode == TrainMode::network ? "LoRA" : "model", summary.weights_path);
  return 0;
}

}  // namespace sdt
