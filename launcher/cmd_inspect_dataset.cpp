// `sdt inspect dataset --dataset_config x.toml [--world_size N] [--dump K] [train arguments]`:
// what training would see: buckets and their sample counts, steps per epoch for a world size,
// processed captions, and optionally the first K processed images as PNG.
#include <filesystem>

#include <fmt/format.h>

#include "launcher/commands.h"
#include "src/core/dataset_config.h"
#include "src/core/error.h"
#include "src/core/train_args.h"
#include "src/data/sample.h"
#include "src/data/sampler.h"

namespace sdt {
namespace {

struct InspectOptions {
  int world_size = 1;
  int dump = 0;
  std::string dump_dir = "dataset_dump";
  int captions = 8;
};

// Takes inspect's own options out of argv; the rest are training arguments.
std::vector<std::string> take_inspect_options(const std::vector<std::string>& argv, InspectOptions& o) {
  std::vector<std::string> rest;
  for (size_t i = 0; i < argv.size(); ++i) {
    auto value = [&](const std::string& name) -> std::string {
      if (i + 1 >= argv.size()) fail("command line", "{} needs a value", name);
      return argv[++i];
    };
    auto integer = [&](const std::string& name) {
      std::string v = value(name);
      try {
        return std::stoi(v);
      } catch (const std::exception&) {
        fail("command line", "{}: expected an integer, got '{}'", name, v);
      }
    };
    if (argv[i] == "--world_size") {
      o.world_size = integer("--world_size");
      if (o.world_size < 1) fail("command line", "--world_size must be at least 1");
    } else if (argv[i] == "--dump") {
      o.dump = integer("--dump");
    } else if (argv[i] == "--dump_dir") {
      o.dump_dir = value("--dump_dir");
    } else if (argv[i] == "--show_captions") {
      o.captions = integer("--show_captions");
    } else {
      rest.push_back(argv[i]);
    }
  }
  return rest;
}

}  // namespace

int run_inspect_dataset(const std::vector<std::string>& argv) {
  for (const auto& a : argv) {
    if (a == "--help" || a == "-h") {
      fmt::print(
          "usage: sdt inspect dataset --dataset_config FILE.toml [--world_size N] [--dump K] [--dump_dir DIR]\n"
          "                           [--show_captions K] [any `sdt train` argument, e.g. --seed, --resolution]\n\n"
          "Prints each dataset's buckets with their samples per epoch, the steps per epoch for the world size, and\n"
          "processed captions of epoch 1; --dump writes the first K processed images as PNG for a visual check.\n");
      return 0;
    }
  }
  InspectOptions o;
  ParsedTrainArgs parsed = parse_train_args(take_inspect_options(argv, o));
  const TrainArgs& args = parsed.args;
  if (!args.dataset_config) fail("command line", "--dataset_config is required");
  DatasetBlueprint blueprint = load_dataset_config(*args.dataset_config, args);
  if (blueprint.datasets.empty()) fail(*args.dataset_config, "no [[datasets]]");

  const std::vector<DatasetIndex> indexes = index_datasets(blueprint, {.skip_bad_images = args.skip_bad_images});
  const uint64_t seed = static_cast<uint64_t>(args.seed.value_or(0));
  BatchPlanner planner(indexes, blueprint, o.world_size, seed);

  for (size_t d = 0; d < blueprint.datasets.size(); ++d) {
    const auto& cfg = blueprint.datasets[d];
    const auto& idx = indexes[d];
    int64_t reg = 0;
    for (const auto& e : idx.images) reg += e.is_reg;
    fmt::print("dataset {}: {}, {} images ({} regularization), {} training samples with repeats, batch size {} per rank\n",
               d + 1, dataset_kind_name(cfg.kind), idx.images.size(), reg, idx.num_train_images, cfg.batch_size);
    fmt::print("  buckets (width x height: samples per epoch):\n");
    for (const auto& [reso, count] : planner.bucket_counts(static_cast<uint32_t>(d))) {
      fmt::print("    {}x{}: {}\n", reso.width, reso.height, count);
    }
  }
  fmt::print("world size {}: global batch = batch size x {}; {} steps per epoch; each rank loads its share of every global batch\n",
             o.world_size, o.world_size, planner.steps_per_epoch());

  const std::vector<GlobalBatch> epoch = planner.epoch(1);
  int shown = 0, dumped = 0;
  if (o.dump > 0) std::filesystem::create_directories(o.dump_dir);
  fmt::print("processed captions (epoch 1, seed {}):\n", seed);
  for (size_t step = 0; step < epoch.size() && (shown < o.captions || dumped < o.dump); ++step) {
    for (uint32_t i = 0; i < epoch[step].samples.size() && (shown < o.captions || dumped < o.dump); ++i) {
      const SampleRef ref = epoch[step].samples[i];
      const DatasetConfig& cfg = blueprint.datasets[ref.dataset];
      const ImageEntry& entry = indexes[ref.dataset].images[ref.image];
      const SampleKey key{seed, 1, static_cast<int64_t>(step), i};
      ProcessedSample s = load_sample(cfg, entry, key, {1, static_cast<int64_t>(step), args.max_train_steps});
      if (shown < o.captions) {
        fmt::print("  {} [{}x{}{}]: {}\n", entry.path, s.image.width, s.image.height, s.flipped ? ", flipped" : "", s.caption);
        ++shown;
      }
      if (dumped < o.dump) {
        const std::string out = (std::filesystem::path(o.dump_dir) /
                                 fmt::format("{:05d}_{:03d}_{}.png", step, i, std::filesystem::path(entry.path).stem().string()))
                                    .string();
        write_png(out, s.image);
        ++dumped;
      }
    }
  }
  if (dumped > 0) fmt::print("wrote {} processed images to {}\n", dumped, o.dump_dir);
  return 0;
}

}  // namespace sdt
