// Cache read throughput and build rate (issue #6).
//
//   bench_cache [--items 10000] [--dir /tmp/sdt_bench_cache] [--build_images 1024]   (0 skips that part)
//
// Read: `items` latents of 4x64x64 fp16 (a 512x512 SD image, 32 KiB each) in one cache part, read
// one item at a time in a shuffled order through LatentCacheReader, then the same rows straight
// through the HDF5 C API (the floor our reader's bookkeeping adds to), then the same latents from
// one .npz file per item as kohya keeps them. The page cache is dropped before each pass when the
// machine allows it (root, writable /proc/sys/vm/drop_caches); the output says which.
// Build: `sdt cache-latents` with the tiny SD 1.x model on `build_images` 64x64 images, as one
// process and as two ranks under mpirun.
#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <random>
#include <string>

#include <fmt/format.h>
#include <opencv2/imgcodecs.hpp>

#include "src/cache/latent_cache.h"
#include "src/cache/npz.h"

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
using namespace sdt;

namespace {

double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

// True when the page cache could be emptied, so the next pass reads from disk.
bool drop_page_cache() {
  std::system("sync");
  std::ofstream drop("/proc/sys/vm/drop_caches");
  if (!drop) return false;
  drop << "3\n";
  drop.flush();
  return static_cast<bool>(drop);
}

// The first value of an fp16 tensor: something to sum so that no read can be skipped, costing
// nothing next to a read (indexing a LibTorch tensor costs microseconds).
float first_value(const at::Tensor& t) { return static_cast<float>(*static_cast<const at::Half*>(t.data_ptr())); }

LatentKey item_key(int64_t i) { return {fmt::format("bench/img{:05d}.png", i), {512, 512}, {512, 512}, false}; }

void report(const char* what, int64_t items, size_t bytes_per_item, double seconds, bool cold) {
  fmt::print("  {:<44} {:>9.0f} items/s  {:>6.2f} GB/s  ({:.2f} s, {} page cache)\n", what, items / seconds,
             static_cast<double>(items) * static_cast<double>(bytes_per_item) / seconds / 1e9, seconds, cold ? "cold" : "warm");
}

void bench_reads(const fs::path& dir, int64_t items) {
  const CacheIdentity identity{CacheKind::latents, "sd", "bench", "fp16", "latent_sampling=mean"};
  const fs::path cache_dir = dir / "h5", npz_dir = dir / "npz";
  fs::remove_all(cache_dir);
  fs::remove_all(npz_dir);
  fs::create_directories(npz_dir);
  const size_t item_bytes = 4 * 64 * 64 * 2;

  fmt::print("writing {} latents 4x64x64 fp16 ({:.0f} MB) ...\n", items, items * item_bytes / 1e6);
  at::manual_seed(0);
  std::vector<at::Tensor> latents;
  for (int64_t i = 0; i < items; ++i) latents.push_back(at::randn({4, 64, 64}).to(at::kHalf));
  Clock::time_point written = Clock::now();
  {
    PartWriterOptions options;
    options.dir = cache_dir.string();
    options.commit_every_seconds = 1e9;
    LatentCacheWriter writer(identity, options);
    for (int64_t first = 0; first < items; first += 100) {
      std::vector<LatentKey> keys;
      std::vector<LatentEntry> entries;
      for (int64_t i = first; i < std::min(items, first + 100); ++i) {
        keys.push_back(item_key(i));
        entries.push_back({latents[static_cast<size_t>(i)], {512, 512}, {0, 0, 512, 512}, {}});
      }
      writer.add(keys, entries);
    }
    writer.commit();
  }
  report("write: HDF5 cache (one part)", items, item_bytes, seconds_since(written), false);
  written = Clock::now();
  for (int64_t i = 0; i < items; ++i) {
    write_npz((npz_dir / fmt::format("img{:05d}_0512x0512_sd.npz", i)).string(), {{"latents", latents[static_cast<size_t>(i)]}});
  }
  report("write: one .npz per item", items, item_bytes, seconds_since(written), false);

  std::vector<int64_t> order(static_cast<size_t>(items));
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), std::mt19937_64(1));
  fmt::print("reading every item once, one at a time, shuffled; each way twice: from disk, then from the page cache:\n");
  double checksum = 0;
  for (bool from_disk : {true, false}) {
    const bool cold = from_disk && drop_page_cache();
    const Clock::time_point t = Clock::now();
    const LatentCacheReader reader(cache_dir.string(), identity);
    const double open_seconds = seconds_since(t);
    for (int64_t i : order) checksum += first_value(reader.read(item_key(i)).latents);
    report("sdt LatentCacheReader::read", items, item_bytes, seconds_since(t), cold);
    fmt::print("    (of which opening the cache and indexing {} keys: {:.3f} s)\n", items, open_seconds);
  }
  for (bool from_disk : {true, false}) {
    const bool cold = from_disk && drop_page_cache();
    const Clock::time_point t = Clock::now();
    const LatentCacheReader reader(cache_dir.string(), identity);
    for (int64_t first = 0; first < items; first += 64) {
      std::vector<LatentKey> keys;
      for (int64_t i = first; i < std::min(items, first + 64); ++i) keys.push_back(item_key(order[static_cast<size_t>(i)]));
      checksum += first_value(reader.read_batch(keys).latents);
    }
    report("sdt read_batch, 64 shuffled items a batch", items, item_bytes, seconds_since(t), cold);
  }
  for (bool from_disk : {true, false}) {
    const bool cold = from_disk && drop_page_cache();
    const Clock::time_point t = Clock::now();
    const std::string part = committed_parts(cache_dir.string(), CacheKind::latents).at(0);
    // File locking off, as the reader opens it: HDF5 refuses a second open of a file with other flags.
    const hid_t access = H5Pcreate(H5P_FILE_ACCESS);
    H5Pset_file_locking(access, false, true);
    const hid_t file = H5Fopen(part.c_str(), H5F_ACC_RDONLY, access);
    H5Pclose(access);
    const hid_t dataset = H5Dopen2(file, "/latents/512x512/latents", H5P_DEFAULT);
    if (file < 0 || dataset < 0) {
      fmt::print("cannot open {} with the HDF5 C API\n", part);
      std::exit(1);
    }
    const hid_t file_type = H5Dget_type(dataset);
    const hid_t file_space = H5Dget_space(dataset);
    const hsize_t count[4] = {1, 4, 64, 64};
    const hid_t memory_space = H5Screate_simple(4, count, nullptr);
    std::vector<uint16_t> buffer(4 * 64 * 64);
    for (int64_t i : order) {
      const hsize_t start[4] = {static_cast<hsize_t>(i), 0, 0, 0};
      H5Sselect_hyperslab(file_space, H5S_SELECT_SET, start, nullptr, count, nullptr);
      if (H5Dread(dataset, file_type, memory_space, file_space, H5P_DEFAULT, buffer.data()) < 0) {
        fmt::print("H5Dread failed\n");
        std::exit(1);
      }
    }
    H5Sclose(memory_space);
    H5Sclose(file_space);
    H5Tclose(file_type);
    H5Dclose(dataset);
    H5Fclose(file);
    report("raw HDF5 H5Dread of the same rows", items, item_bytes, seconds_since(t), cold);
  }
  for (bool from_disk : {true, false}) {
    const bool cold = from_disk && drop_page_cache();
    const Clock::time_point t = Clock::now();
    for (int64_t i : order) {
      const NamedTensors arrays = read_npz((npz_dir / fmt::format("img{:05d}_0512x0512_sd.npz", i)).string());
      checksum += first_value(arrays.at(0).second);
    }
    report("one .npz per item (libzip + .npy)", items, item_bytes, seconds_since(t), cold);
  }
  fmt::print("  (checksum {:.3f}; cache part {:.0f} MB, .npz files {:.0f} MB)\n", checksum,
             fs::file_size(committed_parts(cache_dir.string(), CacheKind::latents).at(0)) / 1e6, items * (item_bytes + 256.0) / 1e6);
}

void bench_build(const fs::path& dir, int images) {
  const fs::path data = dir / "build_images" / "img";
  fs::remove_all(dir / "build_images");
  fs::create_directories(data);
  for (int i = 0; i < images; ++i) {
    cv::Mat m(64, 64, CV_8UC3);
    cv::randu(m, cv::Scalar(0, 0, 0), cv::Scalar(255, 255, 255));
    cv::imwrite((data / fmt::format("{:04d}.png", i)).string(), m);
    std::ofstream(data / fmt::format("{:04d}.txt", i)) << "caption " << i;
  }
  const fs::path config = dir / "build_images" / "dataset.toml";
  std::ofstream(config) << fmt::format("[general]\nresolution = 64\ncaption_extension = \".txt\"\n[[datasets]]\n  [[datasets.subsets]]\n"
                                       "  image_dir = \"{}\"\n",
                                       data.string());
  const std::string args = fmt::format(
      "--pretrained_model_name_or_path {0}/sd/sd1 --tokenizer {0}/sd/sampling/tokenizer --dataset_config {1} --vae_batch_size 8 "
      "--console_log_level WARNING",
      SDT_FIXTURES, config.string());
  fmt::print("building a latent cache of {} 64x64 images with the tiny SD 1.x model (OMP_NUM_THREADS=1 per process):\n", images);
  for (int ranks : {1, 2}) {
    const fs::path cache = dir / fmt::format("build_cache_{}", ranks);
    fs::remove_all(cache);
    const std::string launch = ranks == 1 ? "" : fmt::format("mpirun -np {} --oversubscribe -x OMP_NUM_THREADS ", ranks);
    const std::string command = fmt::format("OMP_NUM_THREADS=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 {}{} cache-latents "
                                            "{} --cache_dir {} 2>/dev/null",
                                            launch, SDT_BINARY, args, cache.string());
    const auto timed = [&] {
      const Clock::time_point t = Clock::now();
      if (std::system(command.c_str()) != 0) fmt::print("  (the command failed: {})\n", command);
      return seconds_since(t);
    };
    const double seconds = timed();
    const double fixed = timed();  // the same command again: everything is cached, only start-up and checks remain
    fmt::print("  {} rank{}: {:.2f} s wall, {:.1f} items/s; a rerun that finds everything cached takes {:.2f} s, so encoding "
               "alone runs at {:.1f} items/s\n",
               ranks, ranks > 1 ? "s" : " ", seconds, images / seconds, fixed, images / std::max(1e-3, seconds - fixed));
  }
}

}  // namespace

int main(int argc, char** argv) {
  int64_t items = 10000;
  int build_images = 1024;
  fs::path dir = "/tmp/sdt_bench_cache";
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    if (flag == "--items") items = std::stoll(argv[i + 1]);
    if (flag == "--dir") dir = argv[i + 1];
    if (flag == "--build_images") build_images = std::stoi(argv[i + 1]);
  }
  fs::create_directories(dir);
  if (items > 0) bench_reads(dir, items);
  if (build_images > 0) bench_build(dir, build_images);
  return 0;
}
