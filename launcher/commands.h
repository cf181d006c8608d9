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

// `sdt --version`: the version and commit, and the versions of LibTorch (and CUDA / NCCL), MPI, HDF5 and OpenCV this
// build uses: what a bug report needs.
std::string version_report();

int run_inspect(const std::string& path);
int run_inspect_dataset(const std::vector<std::string>& argv);
// A training command: its name, what it trains, the kohya script it answers to, and the family that script trains
// (used when --family is not given; none: the checkpoint's).
struct TrainCommand {
  const char* name;
  TrainMode mode;
  const char* script;
  std::optional<std::string> family;
  const char* description;
};
inline const TrainCommand kTrainCommands[] = {
    {"train", TrainMode::network, "train_network.py", std::nullopt,
     "train a network (LoRA), as kohya's train_network.py; `sdt train --help` lists the arguments"},
    {"train_db", TrainMode::whole_model, "train_db.py", std::nullopt,
     "train the whole model (DreamBooth / fine-tuning), as kohya's train_db.py (for SDXL as sdxl_train.py)"},
    {"sdxl_train_network", TrainMode::network, "sdxl_train_network.py", "sdxl",
     "`sdt train` on SDXL, as kohya's sdxl_train_network.py, so its configs run unchanged"},
    {"sdxl_train", TrainMode::whole_model, "sdxl_train.py", "sdxl", "`sdt train_db` on SDXL, as kohya's sdxl_train.py"},
    {"flux_train_network", TrainMode::network, "flux_train_network.py", "flux",
     "`sdt train` on FLUX.1 / Chroma, as kohya's flux_train_network.py, so its configs run unchanged"},
    {"flux_train", TrainMode::whole_model, "flux_train.py", "flux", "`sdt train_db` on FLUX.1 / Chroma, as kohya's flux_train.py"},
};
int run_train(const std::vector<std::string>& argv, const World& world, const TrainCommand& command);

// `sdt sample`: its options are added to `app` as a subcommand bound to `command`; run_sample runs it once parsed.
struct SampleCommand {
  SampleOptions sample;
  std::string tokenizer_vocab;  // --tokenizer_vocab
  std::string output;
};
CLI::App* add_sample_command(CLI::App& app, SampleCommand& command);
// `model_flags`: the arguments sample does not know itself (kohya's model flags), read by kohya's argument table.
int run_sample(const SampleCommand& command, const std::vector<std::string>& model_flags);

// `sdt merge-lora`: kohya's networks/merge_lora.py arguments.
struct MergeLoraCommand {
  bool concat = false, shuffle = false, no_metadata = false;
  std::string sd_model, save_to, precision = "float", save_precision;
  std::string clip_l_save_to, t5xxl_save_to;  // flux_merge_lora.py: the text encoders a FLUX checkpoint does not hold
  std::vector<std::string> models;
  std::vector<double> ratios;
};
CLI::App* add_merge_lora_command(CLI::App& app, MergeLoraCommand& command);
// `model_flags`: the arguments merge-lora does not know itself (kohya's model flags, for the checkpoint's family).
int run_merge_lora(const MergeLoraCommand& command, const std::vector<std::string>& model_flags);

// `sdt convert-flux-lora`: kohya's networks/convert_flux_lora.py arguments.
struct ConvertFluxLoraCommand {
  std::string src, dst, src_path, dst_path;
};
CLI::App* add_convert_flux_lora_command(CLI::App& app, ConvertFluxLoraCommand& command);
int run_convert_flux_lora(const ConvertFluxLoraCommand& command);

// `sdt cache-latents` and `sdt cache-te` (cmd_cache.cpp): `sdt train`'s arguments plus the cache's own.
struct CacheCommands {
  CLI::App* latents = nullptr;
  CLI::App* text_encoder = nullptr;
  bool chosen() const;
};
CacheCommands add_cache_commands(CLI::App& app);
int run_cache_command(const CacheCommands& commands, const World& world);

}  // namespace sdt
