// `sdt train` end to end on the tiny SD 1.x fixture model: a U-Net LoRA trained for a few hundred
// steps on a tiny dataset ends clearly below its starting loss, and writes a LoRA file in kohya's
// format with the training metadata.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <numeric>

#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include "src/core/safetensors.h"
#include "src/train/trainer.h"

namespace sdt {
namespace {

namespace fs = std::filesystem;

// Two flat-colour images with a bright square at different places, 32x32, captioned by colour.
fs::path make_dataset(const fs::path& root) {
  const fs::path dir = root / "train" / "4_toy";
  fs::create_directories(dir);
  const std::pair<const char*, cv::Scalar> images[] = {{"red", cv::Scalar(40, 40, 220)}, {"blue", cv::Scalar(220, 60, 40)}};
  int i = 0;
  for (const auto& [name, colour] : images) {
    cv::Mat m(32, 32, CV_8UC3, colour);
    cv::rectangle(m, cv::Rect(4 + 14 * i, 8, 10, 10), cv::Scalar(250, 250, 250), cv::FILLED);
    cv::imwrite((dir / (std::string(name) + ".png")).string(), m);
    std::ofstream(dir / (std::string(name) + ".txt")) << "a " << name << " square";
    ++i;
  }
  return root / "train";
}

TEST(Trainer, UnetLoraLossFallsAndTheFileIsKohyas) {
  const fs::path root = fs::path(testing::TempDir()) / "sdt_trainer";
  fs::remove_all(root);
  TrainArgs args;
  args.pretrained_model_name_or_path = SDT_FIXTURES "/sd/sd1";  // a diffusers folder: its configs give the tiny sizes
  args.tokenizer = SDT_FIXTURES "/sd/sampling/tokenizer";  // byte-level: its ids fit the tiny text encoder
  args.train_data_dir = make_dataset(root).string();
  args.resolution = "32";
  args.output_dir = (root / "out").string();
  args.output_name = "toy";
  args.network_module = "networks.lora";
  args.network_dim = 4;
  args.network_alpha = 4;
  args.network_train_unet_only = true;
  args.learning_rate = 1e-2;
  args.max_train_steps = 300;
  args.train_batch_size = 2;
  args.seed = 1;
  args.max_data_loader_n_workers = 1;
  args.min_timestep = 400;
  args.max_timestep = 600;
  TrainSummary summary = train_network(args, World{});
  ASSERT_EQ(summary.steps, 300);
  auto mean = [](auto begin, auto end) { return std::accumulate(begin, end, 0.0) / static_cast<double>(end - begin); };
  const double first = mean(summary.losses.begin(), summary.losses.begin() + 30);
  const double last = mean(summary.losses.end() - 30, summary.losses.end());
  std::cout << "mean loss of the first 30 steps " << first << ", of the last 30 " << last << "\n";
  EXPECT_LT(last, 0.7 * first);

  safetensors::File lora(summary.weights_path);
  EXPECT_EQ(lora.metadata().at("ss_network_module"), "networks.lora");
  EXPECT_EQ(lora.metadata().at("ss_network_dim"), "4");
  EXPECT_TRUE(lora.metadata().count("sshs_model_hash"));
  size_t unet_keys = 0;
  for (const auto& t : lora.tensors()) {
    EXPECT_TRUE(t.name.starts_with("lora_unet_")) << t.name;
    unet_keys += t.name.ends_with(".lora_down.weight");
  }
  EXPECT_GT(unet_keys, 0u);
  EXPECT_TRUE(fs::exists(root / "out" / "toy_loss.png"));
  EXPECT_TRUE(fs::exists(root / "out" / "logs" / "metrics.jsonl"));
  fs::remove_all(root);
}

}  // namespace
}  // namespace sdt
