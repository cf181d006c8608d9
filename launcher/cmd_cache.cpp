// `sdt cache-latents` and `sdt cache-te`: kohya's tools/cache_latents.py and
// tools/cache_text_encoder_outputs.py as one job of any number of ranks. They take `sdt train`'s
// arguments (the same --config_file, --dataset_config, model and bucket settings training will
// use), plus the cache's own options below; each rank encodes its share (src/cache/build_cache.h).
#include <CLI/CLI.hpp>

#include "cluster/world.h"
#include "launcher/commands.h"
#include "src/cache/build_cache.h"
#include "src/core/error.h"
#include "src/core/log.h"
#include "src/core/train_args.h"

namespace sdt {
namespace {

struct CacheFlag {
  const char* name;
  const char* value;  // nullptr: a flag without a value
  const char* help;
};

constexpr CacheFlag kCacheFlags[] = {
    {"cache_dir", "DIR", "the cache folder (default: sdt_cache beside the --dataset_config file, else <train_data_dir>/sdt_cache)"},
    {"cache_dtype", "float|fp16|bf16", "how latents / outputs are stored (default: float, as kohya)"},
    {"cache_gzip_level", "0-9", "compress the stored latents / outputs (default: 0, none: fastest to read)"},
    {"rebuild_cache", nullptr, "delete cache parts made with other weights or settings and encode their items again "
                               "(default: refuse them)"},
    {"cache_commit_entries", "N", "commit a part file after N entries (default: 0, no limit)"},
    {"cache_commit_seconds", "S", "commit a part file after S seconds (default: 300): a killed job loses at most that much work"},
    {"text_encoder_batch_size", "N", "captions per text-encoder batch (cache-te; default: the dataset's batch size)"},
};

void print_help(const std::string& command) {
  fmt::print("usage: sdt {} [sdt train arguments] [cache options]\n\n"
             "Takes `sdt train`'s arguments (kohya's names: --pretrained_model_name_or_path, --vae, --dataset_config or\n"
             "--train_data_dir, --vae_batch_size, --skip_cache_check, ...; `sdt train --help` lists them), so the cache\n"
             "matches the training run that gives the same ones. Under mpirun or srun each rank encodes its share.\n\n"
             "cache options:\n",
             command);
  for (const auto& flag : kCacheFlags) {
    fmt::print("  --{:<36} {}\n", fmt::format("{} {}", flag.name, flag.value ? flag.value : ""), flag.help);
  }
}

// Takes the cache options out of `argv`; what is left is for parse_train_args.
CacheOptions take_cache_options(std::vector<std::string>& argv) {
  CacheOptions options;
  std::vector<std::string> rest;
  for (size_t i = 0; i < argv.size(); ++i) {
    const std::string& arg = argv[i];
    const CacheFlag* flag = nullptr;
    std::optional<std::string> value;
    for (const auto& f : kCacheFlags) {
      const std::string name = std::string("--") + f.name;
      if (arg == name) flag = &f;
      if (arg.starts_with(name + "=")) {
        flag = &f;
        value = arg.substr(name.size() + 1);
      }
    }
    if (!flag) {
      rest.push_back(arg);
      continue;
    }
    const std::string where = std::string("--") + flag->name;
    if (!flag->value && value) fail(where, "is a flag and takes no value");
    if (flag->value && !value) {
      if (i + 1 >= argv.size()) fail(where, "expects a value ({})", flag->value);
      value = argv[++i];
    }
    auto number = [&] {
      try {
        size_t used = 0;
        const double x = std::stod(*value, &used);
        if (used == value->size() && x >= 0) return x;
      } catch (const std::exception&) {
      }
      fail(where, "expected a non-negative number, got '{}'", *value);
    };
    const std::string name = flag->name;
    if (name == "cache_dir") options.cache_dir = *value;
    if (name == "cache_dtype") options.dtype = *value;
    if (name == "cache_gzip_level") options.gzip_level = static_cast<int>(number());
    if (name == "rebuild_cache") options.rebuild = true;
    if (name == "cache_commit_entries") options.commit_every_entries = static_cast<int64_t>(number());
    if (name == "cache_commit_seconds") options.commit_every_seconds = number();
    if (name == "text_encoder_batch_size") options.text_encoder_batch_size = static_cast<int64_t>(number());
  }
  if (options.dtype != "float" && options.dtype != "fp16" && options.dtype != "bf16") {
    fail("--cache_dtype", "'{}' is not one of float, fp16, bf16", options.dtype);
  }
  if (options.gzip_level > 9) fail("--cache_gzip_level", "{} is not in 0-9", options.gzip_level);
  argv = std::move(rest);
  return options;
}

int run_cache(const std::string& command, std::vector<std::string> argv, const World& world) {
  for (const auto& a : argv) {
    if (a == "--help" || a == "-h") {
      print_help(command);
      return 0;
    }
  }
  CacheOptions options = take_cache_options(argv);
  const TrainArgs args = parse_train_args(argv).args;
  init_logging({args.console_log_level, args.console_log_file, args.console_log_simple, args.log_all_ranks}, world.rank, world.size);
  if (command == "cache-latents") {
    run_cache_latents(args, std::move(options), world);
  } else {
    run_cache_text_encoder_outputs(args, std::move(options), world);
  }
  return 0;
}

}  // namespace

CacheCommands add_cache_commands(CLI::App& app) {
  // As `sdt train`: our own parser reads the arguments, so CLI11 hands over everything, --help included.
  CacheCommands commands;
  commands.latents = app.add_subcommand("cache-latents", "encode the dataset's latents into an HDF5 cache (kohya's tools/cache_latents.py); "
                                                         "`sdt cache-latents --help`");
  commands.text_encoder = app.add_subcommand(
      "cache-te", "encode the captions' text-encoder outputs into an HDF5 cache (kohya's tools/cache_text_encoder_outputs.py)");
  for (CLI::App* command : {commands.latents, commands.text_encoder}) {
    command->prefix_command();
    command->set_help_flag();
  }
  return commands;
}

bool CacheCommands::chosen() const { return latents->parsed() || text_encoder->parsed(); }

int run_cache_command(const CacheCommands& commands, const World& world) {
  CLI::App* command = commands.latents->parsed() ? commands.latents : commands.text_encoder;
  return run_cache(command->get_name(), command->remaining(), world);
}

}  // namespace sdt
