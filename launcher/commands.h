// The subcommands of `sdt`. Each parses its configuration, builds the objects it needs and runs
// them; no logic of its own lives here.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "src/families/options.h"
#include "src/train/trainer.h"

namespace CLI {
class App;
}

namespace sdt {

int run_inspect(const std::string& path);
int run_inspect_dataset(const std::vector<std::string>& argv);
int run_train(const std::vector<std::string>& argv, const World& world, TrainMode mode);

// `sdt sample`: its options are added to `app` as a subcommand bound to `command`; run_sample runs it once parsed.
struct SampleCommand {
  std::optional<std::string> family;  // --family
  FamilyOptions model;
  SampleOptions sample;
  std::string output;
};
CLI::App* add_sample_command(CLI::App& app, SampleCommand& command);
int run_sample(const SampleCommand& command);

// `sdt merge-lora`: kohya's networks/merge_lora.py arguments.
struct MergeLoraCommand {
  bool v2 = false, concat = false, shuffle = false, no_metadata = false;
  std::string sd_model, save_to, precision = "float", save_precision;
  std::vector<std::string> models;
  std::vector<double> ratios;
};
CLI::App* add_merge_lora_command(CLI::App& app, MergeLoraCommand& command);
int run_merge_lora(const MergeLoraCommand& command);

// `sdt cache-latents` and `sdt cache-te` (cmd_cache.cpp): `sdt train`'s arguments plus the cache's own.
struct CacheCommands {
  CLI::App* latents = nullptr;
  CLI::App* text_encoder = nullptr;
  bool chosen() const;
};
CacheCommands add_cache_commands(CLI::App& app);
int run_cache_command(const CacheCommands& commands, const World& world);

}  // namespace sdt
