// Building caches with the tiny SD 1.x model (tests/fixtures/sd/sd1) on a small dataset: entries
// equal what training would encode on the fly; a build killed mid-part and run again ends identical
// to an uninterrupted one; a cache made with other VAE weights is refused (or rebuilt when asked);
// two ranks make the same entries as one process, through the library and through `sdt`.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>

#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include "src/cache/build_cache.h"
#include "src/cache/latent_cache.h"
#include "src/cache/text_encoder_cache.h"
#include "src/core/error.h"
#include "src/core/safetensors.h"
#include "src/core/tensor_io.h"
#include "src/data/sample.h"
#include "src/families/family.h"

namespace sdt {
namespace {

namespace fs = std::filesystem;

const std::string kModel = SDT_FIXTURES "/sd/sd1";
const std::string kTokenizer = SDT_FIXTURES "/sd/sampling/tokenizer";

// Four RGB images of three aspect ratios in a flip_aug subset, two RGBA images in an alpha_mask
// subset; buckets of 16 pixels' steps around 32x32.
struct Toy {
  fs::path root;
  TrainArgs args;
  CacheOptions options;
};

void write_image(const fs::path& path, int width, int height, const cv::Scalar& colour, bool alpha, const std::string& caption) {
  cv::Mat m(height, width, alpha ? CV_8UC4 : CV_8UC3, colour);
  cv::rectangle(m, cv::Rect(width / 4, height / 3, width / 3, height / 4), cv::Scalar(250, 250, 250, 255), cv::FILLED);
  if (alpha) {
    for (int y = 0; y < height; ++y) {
      for (int x = 0; x < width; ++x) m.at<cv::Vec4b>(y, x)[3] = static_cast<uint8_t>((x * 255) / (width - 1));
    }
  }
  cv::imwrite(path.string(), m);
  std::ofstream(fs::path(path).replace_extension(".txt")) << caption;
}

Toy make_toy(const std::string& name, const std::string& extra_subset_keys = "") {
  Toy toy;
  toy.root = fs::path(testing::TempDir()) / ("sdt_cache_build_" + name);
  fs::remove_all(toy.root);
  fs::create_directories(toy.root / "toy");
  fs::create_directories(toy.root / "masked");
  write_image(toy.root / "toy" / "red.png", 32, 32, {40, 40, 220}, false, "a red square");
  write_image(toy.root / "toy" / "blue.png", 48, 32, {220, 60, 40}, false, "a blue square");
  write_image(toy.root / "toy" / "green.png", 32, 48, {40, 200, 40}, false, "a green square");
  write_image(toy.root / "toy" / "grey.png", 40, 36, {128, 128, 128}, false, "a red square");  // a shared caption
  write_image(toy.root / "masked" / "a.png", 32, 32, {10, 90, 200, 255}, true, "a masked square");
  write_image(toy.root / "masked" / "b.png", 36, 30, {200, 90, 10, 255}, true, "another masked square");
  const fs::path config = toy.root / "dataset.toml";
  std::ofstream(config) << fmt::format(R"([general]
enable_bucket = true
min_bucket_reso = 16
max_bucket_reso = 64
bucket_reso_steps = 16
resolution = 32
batch_size = 2
caption_extension = ".txt"

[[datasets]]
  [[datasets.subsets]]
  image_dir = "{}"
  num_repeats = 2
  flip_aug = true
  {}

  [[datasets.subsets]]
  image_dir = "{}"
  alpha_mask = true
)",
                                       (toy.root / "toy").string(), extra_subset_keys, (toy.root / "masked").string());
  toy.args.pretrained_model_name_or_path = kModel;
  toy.args.tokenizer = kTokenizer;
  toy.args.dataset_config = config.string();
  toy.args.vae_batch_size = 1;  // each image alone: entries bitwise equal however the work is split
  toy.options.cache_dir = (toy.root / "cache").string();
  return toy;
}

const Family& tiny_family() {
  static std::unique_ptr<Family> family = [] {
    FamilyOptions o;
    o.pretrained_model_name_or_path = kModel;
    o.tokenizer = kTokenizer;
    return load_family("sd", o);
  }();
  return *family;
}

struct Data {
  DatasetBlueprint blueprint;
  std::vector<DatasetIndex> indexes;
};

Data load_data(const TrainArgs& args) {
  Data d{resolve_dataset_config(args), {}};
  d.indexes = index_datasets(d.blueprint, {.use_index_cache = false});
  return d;
}

CacheBuildSummary build_latents(const Toy& toy, const World& world = World{}, const CacheOptions* options = nullptr) {
  const Data d = load_data(toy.args);
  return build_latent_cache(tiny_family(), toy.args, options ? *options : toy.options, d.blueprint, d.indexes, world);
}

// Every entry the toy dataset needs: each image unflipped, and flipped in the flip_aug subset.
std::vector<LatentKey> expected_keys(const Data& d) {
  std::vector<LatentKey> keys;
  for (size_t i = 0; i < d.indexes.size(); ++i) {
    for (const auto& entry : d.indexes[i].images) {
      const SubsetConfig& subset = d.blueprint.datasets[i].subsets[entry.subset];
      keys.push_back(latent_key(subset, entry, false));
      if (subset.flip_aug) keys.push_back(latent_key(subset, entry, true));
    }
  }
  return keys;
}

void expect_same_caches(const std::string& dir, const std::string& reference_dir, const Toy& toy) {
  const Data d = load_data(toy.args);
  const CacheIdentity identity = latent_cache_identity(tiny_family(), toy.options);
  const LatentCacheReader cache(dir, identity), reference(reference_dir, identity);
  const std::vector<LatentKey> keys = expected_keys(d);
  ASSERT_EQ(keys.size(), 10u);
  EXPECT_EQ(cache.size(), keys.size());
  EXPECT_EQ(reference.size(), keys.size());
  for (const auto& key : keys) {
    SCOPED_TRACE(key.describe());
    const LatentEntry a = cache.read(key), b = reference.read(key);
    EXPECT_TRUE(at::equal(a.latents, b.latents));
    EXPECT_EQ(a.original_size, b.original_size);
    EXPECT_EQ(a.crop_ltrb.left, b.crop_ltrb.left);
    EXPECT_EQ(a.crop_ltrb.right, b.crop_ltrb.right);
    ASSERT_EQ(a.alpha_mask.defined(), b.alpha_mask.defined());
    if (a.alpha_mask.defined()) {
      EXPECT_TRUE(at::equal(a.alpha_mask, b.alpha_mask));
    }
  }
}

// Waits for a forked child; true when it exited with 0.
bool child_succeeded(pid_t child) {
  int status = 0;
  waitpid(child, &status, 0);
  return WIFEXITED(status) && WEXITSTATUS(status) == 0;
}

// Runs `body` in a child process, on one thread.
template <typename Body>
pid_t fork_child(Body body) {
  const pid_t child = fork();
  if (child == 0) {
    // fork keeps one thread: a thread pool the parent's earlier tests started is unusable here (libgomp would wait
    // for workers that do not exist), so the child computes on this thread alone.
    at::set_num_threads(1);
    int code = 0;
    try {
      body();
    } catch (const std::exception& e) {
      fmt::print(stderr, "child: {}\n", e.what());
      code = 1;
    }
    _exit(code);
  }
  return child;
}

TEST(BuildCache, EntriesEqualWhatTrainingEncodesOnTheFly) {
  const Toy toy = make_toy("on_the_fly");
  const CacheBuildSummary summary = build_latents(toy);
  EXPECT_EQ(summary.items, 10);
  EXPECT_EQ(summary.valid_before, 0);
  EXPECT_EQ(summary.encoded, 6);

  const Data d = load_data(toy.args);
  const LatentCacheReader cache(toy.options.cache_dir, latent_cache_identity(tiny_family(), toy.options));
  const LatentsCachingStrategy& strategy = tiny_family().latents_caching_strategy();
  DatasetConfig unflipped = d.blueprint.datasets[0];
  for (auto& s : unflipped.subsets) s.flip_aug = false;
  for (const auto& entry : d.indexes[0].images) {
    SCOPED_TRACE(entry.path);
    const SubsetConfig& subset = unflipped.subsets[entry.subset];
    const ProcessedSample s = load_sample(unflipped, entry, SampleKey{}, CaptionContext{});
    at::Tensor image = at::empty({1, 3, s.image.height, s.image.width});
    for (int c = 0; c < 3; ++c) {
      for (int y = 0; y < s.image.height; ++y) {
        for (int x = 0; x < s.image.width; ++x) {
          image[0][c][y][x] = s.image.data[(static_cast<size_t>(y) * s.image.width + x) * 3 + c] / 127.5f - 1.0f;
        }
      }
    }
    const EncodedLatents encoded = strategy.encode(image, true, LatentSampling::mean);
    const LatentEntry plain = cache.read(latent_key(d.blueprint.datasets[0].subsets[entry.subset], entry, false));
    EXPECT_TRUE(at::equal(plain.latents, encoded.latents[0]));
    EXPECT_EQ(plain.original_size, (Resolution{entry.width, entry.height}));
    EXPECT_EQ(plain.crop_ltrb.left, s.crop_ltrb.left);
    EXPECT_EQ(plain.crop_ltrb.bottom, s.crop_ltrb.bottom);
    if (subset.alpha_mask) {
      ASSERT_TRUE(plain.alpha_mask.defined());
      EXPECT_TRUE(at::equal(plain.alpha_mask, at::from_blob(const_cast<float*>(s.alpha_mask.data()), plain.alpha_mask.sizes(), at::kFloat)));
    } else {
      EXPECT_FALSE(plain.alpha_mask.defined());
      const LatentEntry flipped = cache.read(latent_key(d.blueprint.datasets[0].subsets[entry.subset], entry, true));
      EXPECT_TRUE(at::equal(flipped.latents, encoded.flipped[0]));
      EXPECT_DOUBLE_EQ(flipped.crop_ltrb.left, entry.bucket.bucket.width - s.crop_ltrb.right);
    }
  }
}

TEST(BuildCache, RerunSkipsValidEntriesAndReencodesChangedImages) {
  const Toy toy = make_toy("rerun");
  EXPECT_EQ(build_latents(toy).encoded, 6);
  const CacheBuildSummary again = build_latents(toy);
  EXPECT_EQ(again.valid_before, 10);
  EXPECT_EQ(again.encoded, 0);
  // An image replaced by one of another size: its old entry no longer matches (original size or
  // bucket), so it alone is encoded again.
  write_image(toy.root / "toy" / "blue.png", 46, 32, {220, 60, 40}, false, "a blue square");
  const CacheBuildSummary changed = build_latents(toy);
  EXPECT_EQ(changed.valid_before, 8);
  EXPECT_EQ(changed.encoded, 1);
}

TEST(BuildCache, KilledBuildThenRerunEqualsUninterruptedBuild) {
  const Toy toy = make_toy("killed");
  int ready[2];
  ASSERT_EQ(pipe(ready), 0);
  const pid_t child = fork_child([&] {
    // Parts of 3 entries: stop once one is committed and the next is open with entries in it.
    CacheOptions options = toy.options;
    options.commit_every_entries = 3;
    options.on_progress = [&](const CacheProgress&) {
      bool committed = false, open = false;
      for (const auto& f : fs::directory_iterator(toy.options.cache_dir)) {
        committed = committed || f.path().extension() == ".h5";
        open = open || (f.path().extension() == ".tmp" && fs::file_size(f.path()) > 0);
      }
      if (!committed || !open) return;
      const char byte = 1;
      if (write(ready[1], &byte, 1) != 1) _exit(2);
      pause();
    };
    build_latents(toy, World{}, &options);
  });
  close(ready[1]);
  char byte = 0;
  ASSERT_EQ(read(ready[0], &byte, 1), 1) << "the build ended before it had a committed and an open part";
  kill(child, SIGKILL);
  int status = 0;
  waitpid(child, &status, 0);
  ASSERT_TRUE(WIFSIGNALED(status));
  close(ready[0]);

  const CacheIdentity identity = latent_cache_identity(tiny_family(), toy.options);
  const size_t committed = LatentCacheReader(toy.options.cache_dir, identity).size();
  EXPECT_GT(committed, 0u);
  EXPECT_LT(committed, 10u);
  const CacheBuildSummary resumed = build_latents(toy);
  EXPECT_EQ(resumed.valid_before, static_cast<int64_t>(committed));
  EXPECT_GT(resumed.encoded, 0);

  Toy uninterrupted = toy;
  uninterrupted.options.cache_dir = (toy.root / "uninterrupted").string();
  build_latents(uninterrupted);
  expect_same_caches(toy.options.cache_dir, uninterrupted.options.cache_dir, toy);
}

TEST(BuildCache, TwoRanksMakeTheSameEntriesAsOneProcess) {
  const Toy toy = make_toy("two_ranks");
  Toy shared = toy;
  shared.options.cache_dir = (toy.root / "two_ranks").string();
  const pid_t rank0 = fork_child([&] { build_latents(shared, World{0, 2}); });
  const pid_t rank1 = fork_child([&] { build_latents(shared, World{1, 2}); });
  ASSERT_TRUE(child_succeeded(rank0));
  ASSERT_TRUE(child_succeeded(rank1));
  EXPECT_EQ(committed_parts(shared.options.cache_dir, CacheKind::latents).size(), 2u);
  build_latents(toy);
  expect_same_caches(shared.options.cache_dir, toy.options.cache_dir, toy);
}

// `mpirun -np 2 sdt cache-latents` against `sdt cache-latents` (skipped without Open MPI's mpirun).
TEST(BuildCache, MpirunTwoRanksOfTheCommandMakeTheSameEntriesAsOne) {
  if (std::system("command -v mpirun > /dev/null 2>&1") != 0) GTEST_SKIP() << "mpirun (openmpi-bin) is not installed";
  const Toy toy = make_toy("command");
  const std::string args = fmt::format("--pretrained_model_name_or_path {} --tokenizer {} --dataset_config {} --console_log_level ERROR",
                                       kModel, kTokenizer, *toy.args.dataset_config);
  const std::string one = fmt::format("{} cache-latents {} --cache_dir {}", SDT_BINARY, args, toy.options.cache_dir);
  ASSERT_EQ(std::system(one.c_str()), 0) << one;
  const std::string two_dir = (toy.root / "two").string();
  const std::string two = fmt::format(
      "OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 mpirun -np 2 --oversubscribe -x OMP_NUM_THREADS "
      "{} cache-latents {} --cache_dir {}",
      SDT_BINARY, args, two_dir);
  ASSERT_EQ(std::system(two.c_str()), 0) << two;
  const auto parts = committed_parts(two_dir, CacheKind::latents);
  ASSERT_EQ(parts.size(), 2u);
  EXPECT_EQ(fs::path(parts[0]).filename(), "latents.r0000-of-0002.p00000.h5");
  EXPECT_EQ(fs::path(parts[1]).filename(), "latents.r0001-of-0002.p00000.h5");
  expect_same_caches(two_dir, toy.options.cache_dir, toy);
}

TEST(BuildCache, CacheOfOtherVaeWeightsIsRefusedOrRebuilt) {
  const Toy toy = make_toy("other_vae");
  build_latents(toy);
  const std::string part = committed_parts(toy.options.cache_dir, CacheKind::latents).at(0);

  // The same VAE with one weight nudged.
  const fs::path vae = toy.root / "other_vae";
  fs::create_directories(vae);
  fs::copy_file(kModel + "/vae/config.json", vae / "config.json");
  const safetensors::File weights(kModel + "/vae/diffusion_pytorch_model.safetensors");
  NamedTensors tensors;
  for (const auto& t : weights.tensors()) tensors.emplace_back(t.name, load_tensor(weights, t.name).clone());
  tensors[0].second.add_(1e-3);
  save_safetensors((vae / "diffusion_pytorch_model.safetensors").string(), tensors);

  Toy other = toy;
  other.args.vae = vae.string();
  FamilyOptions o;
  o.pretrained_model_name_or_path = kModel;
  o.tokenizer = kTokenizer;
  o.vae = vae.string();
  const std::unique_ptr<Family> other_family = load_family("sd", o);
  const Data d = load_data(other.args);
  try {
    build_latent_cache(*other_family, other.args, other.options, d.blueprint, d.indexes, World{});
    FAIL() << "expected a refusal";
  } catch (const Error& e) {
    EXPECT_EQ(e.where(), part);
    EXPECT_NE(std::string(e.what()).find("weights_sha256"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("--rebuild_cache"), std::string::npos) << e.what();
  }
  other.options.rebuild = true;
  const CacheBuildSummary rebuilt = build_latent_cache(*other_family, other.args, other.options, d.blueprint, d.indexes, World{});
  EXPECT_EQ(rebuilt.valid_before, 0);
  EXPECT_EQ(rebuilt.encoded, 6);
  const CacheIdentity new_identity = latent_cache_identity(*other_family, other.options);
  for (const std::string& p : committed_parts(toy.options.cache_dir, CacheKind::latents)) {
    EXPECT_EQ(h5::read_string_attribute(h5::open_file_read_only(p).get(), "weights_sha256"), new_identity.weights_sha256) << p;
  }
  EXPECT_EQ(LatentCacheReader(toy.options.cache_dir, new_identity).size(), 10u);
}

TEST(BuildCache, WaitReturnsOnlyOnceEveryRankHasWrittenItsShare) {
  const Toy toy = make_toy("wait");
  const Data d = load_data(toy.args);
  build_latent_cache(tiny_family(), toy.args, toy.options, d.blueprint, d.indexes, World{1, 2});
  try {
    wait_for_latent_cache(tiny_family(), toy.args, toy.options, d.blueprint, d.indexes, 0.2, 0.05);
    FAIL() << "rank 0's share is missing";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("entries still missing"), std::string::npos) << e.what();
  }
  build_latent_cache(tiny_family(), toy.args, toy.options, d.blueprint, d.indexes, World{0, 2});
  wait_for_latent_cache(tiny_family(), toy.args, toy.options, d.blueprint, d.indexes, 5, 0.05);
}

TEST(BuildCache, SubsetsWithColourAugmentationAreRefused) {
  const Toy toy = make_toy("color_aug", "color_aug = true");
  try {
    build_latents(toy);
    FAIL() << "expected a refusal";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("color_aug"), std::string::npos) << e.what();
  }
}

TEST(BuildCache, TextEncoderOutputsEqualTheStrategysAndSplitAcrossRanks) {
  const Toy toy = make_toy("te");
  const Data d = load_data(toy.args);
  const Family& family = tiny_family();
  Toy split = toy;
  split.options.cache_dir = (toy.root / "split").string();
  const CacheBuildSummary one = build_text_encoder_cache(family, toy.args, toy.options, d.blueprint, d.indexes, World{});
  EXPECT_EQ(one.items, 5);  // six images, one caption shared
  EXPECT_EQ(one.encoded, 5);
  for (int rank = 0; rank < 2; ++rank) {
    build_text_encoder_cache(family, split.args, split.options, d.blueprint, d.indexes, World{rank, 2});
  }
  EXPECT_EQ(build_text_encoder_cache(family, toy.args, toy.options, d.blueprint, d.indexes, World{}).encoded, 0);

  const CacheIdentity identity = text_encoder_cache_identity(family, toy.args, toy.options);
  const TextEncoderCacheReader cache(toy.options.cache_dir, identity), split_cache(split.options.cache_dir, identity);
  const std::vector<std::string> captions{"a masked square", "a red square", "another masked square"};
  const Conditioning cached = family.text_encoder_outputs_caching_strategy().outputs_from_cache(cache.read_batch(captions));
  const Conditioning direct = family.text_encoding_strategy().encode(family.tokenize_strategy().tokenize(captions, false));
  ASSERT_EQ(cached.size(), 1u);
  EXPECT_TRUE(at::allclose(conditioning_tensor(cached, "hidden_state"), conditioning_tensor(direct, "hidden_state"), 1e-5, 1e-6));
  EXPECT_TRUE(at::equal(split_cache.read_batch(captions)[0].second, cache.read_batch(captions)[0].second));
}

}  // namespace
}  // namespace sdt
