// Data pipeline throughput: index build time of a DreamBooth folder (cold, and warm from
// sdt_index.json), and images/s through decode + resize + crop + augment + tensor with 1..N
// workers. Prints figures; asserts nothing.
//   bench_data IMAGE_DIR [resolution=512] [max_workers=2] [batches=all]
#include <chrono>
#include <filesystem>

#include <fmt/format.h>

#include "src/data/loader.h"

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

int main(int argc, char** argv) {
  if (argc < 2) {
    fmt::print(stderr, "usage: {} IMAGE_DIR [resolution=512] [max_workers=2] [batches=all]\n", argv[0]);
    return 2;
  }
  const std::string dir = argv[1];
  const int64_t resolution = argc > 2 ? std::stoll(argv[2]) : 512;
  const int max_workers = argc > 3 ? std::stoi(argv[3]) : 2;
  const int64_t max_batches = argc > 4 ? std::stoll(argv[4]) : INT64_MAX;

  sdt::SubsetConfig subset;
  subset.image_dir = dir;
  subset.caption_extension = ".txt";
  subset.flip_aug = true;
  subset.shuffle_caption = true;
  sdt::DatasetConfig config;
  config.width = config.height = resolution;
  config.enable_bucket = true;
  config.min_bucket_reso = 256;
  config.max_bucket_reso = 1024;
  config.batch_size = 4;
  config.subsets = {subset};

  std::filesystem::remove(std::filesystem::path(dir) / "sdt_index.json");
  auto t0 = Clock::now();
  sdt::DatasetIndex index = sdt::build_dataset_index(config);
  const double cold = seconds_since(t0);
  auto t1 = Clock::now();
  index = sdt::build_dataset_index(config);
  const double warm = seconds_since(t1);
  sdt::assign_buckets(config, index);
  fmt::print("index of {} images: {:.3f} s cold (headers + captions), {:.3f} s warm (from sdt_index.json)\n", index.images.size(),
             cold, warm);

  sdt::BatchPlanner planner({&index}, {config.batch_size}, 1);
  for (int workers = 1; workers <= max_workers; ++workers) {
    sdt::DataLoader loader({{&config, &index}}, planner, {.seed = 1, .workers = workers, .queue_depth = 2 * workers});
    loader.start_epoch(1);
    auto t = Clock::now();
    int64_t images = 0, batches = 0;
    while (batches < max_batches) {
      auto batch = loader.next();
      if (!batch) break;
      images += batch->images.size(0);
      ++batches;
    }
    const double s = seconds_since(t);
    fmt::print("loader, {} worker(s), resolution {}: {} images in {:.2f} s = {:.1f} images/s\n", workers, resolution, images, s,
               images / s);
  }
  return 0;
}
