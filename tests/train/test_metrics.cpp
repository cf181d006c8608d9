// Progress, logs and sample prompts: TFRecord framing, kohya's prompt syntax and image names.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>

#include <opencv2/imgcodecs.hpp>

#include "src/core/error.h"
#include "src/data/chart.h"
#include "src/train/metrics.h"
#include "src/train/sample_prompts.h"

namespace sdt {
namespace {

namespace fs = std::filesystem;

std::string temp(const std::string& name) { return testing::TempDir() + name; }

TEST(Metrics, Crc32cOfTheStandardCheckString) {
  EXPECT_EQ(crc32c("123456789", 9), 0xE3069283u);
  EXPECT_EQ(crc32c("", 0), 0u);
}

TEST(Metrics, TensorBoardRecordsAreFramedWithValidChecksums) {
  const std::string dir = temp("tb_records");
  fs::remove_all(dir);
  std::string path;
  {
    TensorBoardWriter tb(dir);
    tb.add_scalar("loss/current", 0.5f, 1);
    tb.add_scalar("lr/unet", 1e-4f, 2);
    tb.flush();
    path = tb.path();
  }
  EXPECT_NE(fs::path(path).filename().string().find("events.out.tfevents."), std::string::npos);
  std::ifstream in(path, std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(in)), {});
  size_t pos = 0, records = 0;
  auto masked = [](const void* p, size_t n) {
    uint32_t c = crc32c(p, n);
    return ((c >> 15) | (c << 17)) + 0xa282ead8u;
  };
  while (pos < bytes.size()) {
    uint64_t len;
    uint32_t len_crc, data_crc;
    std::memcpy(&len, &bytes[pos], 8);
    std::memcpy(&len_crc, &bytes[pos + 8], 4);
    EXPECT_EQ(len_crc, masked(&bytes[pos], 8));
    std::memcpy(&data_crc, &bytes[pos + 12 + len], 4);
    EXPECT_EQ(data_crc, masked(&bytes[pos + 12], len));
    if (records == 0) EXPECT_NE(bytes.substr(pos + 12, len).find("brain.Event:2"), std::string::npos);
    if (records == 1) EXPECT_NE(bytes.substr(pos + 12, len).find("loss/current"), std::string::npos);
    pos += 16 + len;
    ++records;
  }
  EXPECT_EQ(records, 3u);
}

TEST(Metrics, JsonlAndLossCurve) {
  const std::string jsonl = temp("metrics.jsonl");
  fs::remove(jsonl);
  {
    JsonlWriter log(jsonl);
    log.write(1, 1, {{"loss", 0.25}, {"lr", 1e-4}});
    log.write(2, 1, {{"loss", 0.125}});
  }
  std::ifstream in(jsonl);
  std::string first, second;
  std::getline(in, first);
  std::getline(in, second);
  EXPECT_NE(first.find("\"step\":1"), std::string::npos) << first;
  EXPECT_NE(second.find("\"loss\":0.125"), std::string::npos) << second;

  std::vector<std::pair<int64_t, double>> losses;
  for (int i = 0; i < 300; ++i) losses.emplace_back(i, 1.0 / (1 + i * 0.05) + 0.05 * ((i * 37) % 11) / 11.0);
  write_line_chart_png(temp("loss.png"), losses, "loss");
  cv::Mat png = cv::imread(temp("loss.png"));
  EXPECT_EQ(png.cols, 800);
  EXPECT_EQ(png.rows, 450);
}

// The metrics log on a full disk (/dev/full fails every write with ENOSPC) is a named error, not a log that silently
// stops growing.
TEST(Metrics, AFullDiskUnderTheMetricsLogIsANamedError) {
  JsonlWriter log("/dev/full");
  try {
    log.write(1, 0, {{"loss", 0.5}});
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("/dev/full: cannot write the metrics log"), std::string::npos) << e.what();
  }
}

TEST(SamplePrompts, KohyasLineSyntax) {
  SamplePrompt p = parse_prompt_line("masterpiece, 1girl --n low quality, blurry --w 640 --h 384 --d 7 --s 2000 --l 5.5 --ss euler_a");
  EXPECT_EQ(p.prompt, "masterpiece, 1girl");
  EXPECT_EQ(p.negative_prompt, "low quality, blurry");
  EXPECT_EQ(p.width, 640);
  EXPECT_EQ(p.height, 384);
  EXPECT_EQ(p.seed, 7);
  EXPECT_EQ(p.steps, 1000);  // clamped to [1, 1000]
  EXPECT_DOUBLE_EQ(*p.scale, 5.5);
  EXPECT_EQ(p.sampler, "euler_a");
  SamplePrompt bad = parse_prompt_line("a cat --l 1.2.3 --W 512");
  EXPECT_FALSE(bad.scale.has_value());  // kohya ignores a piece that does not convert
  EXPECT_EQ(bad.width, 512);            // options are case-insensitive
}

TEST(SamplePrompts, TxtTomlAndJsonFiles) {
  std::ofstream(temp("p.txt")) << "# comment\n\na dog --d 1\n  a cat --w 256\n";
  auto txt = load_sample_prompts(temp("p.txt"));
  ASSERT_EQ(txt.size(), 2u);
  EXPECT_EQ(txt[1].prompt, "a cat");
  EXPECT_EQ(txt[1].index, 1);
  std::ofstream(temp("p.toml")) << "[prompt]\nwidth = 320\nsample_steps = 12\n[[prompt.subset]]\nprompt = \"x\"\n"
                                   "[[prompt.subset]]\nprompt = \"y\"\nwidth = 448\n";
  auto toml = load_sample_prompts(temp("p.toml"));
  ASSERT_EQ(toml.size(), 2u);
  EXPECT_EQ(toml[0].width, 320);
  EXPECT_EQ(toml[1].width, 448);
  EXPECT_EQ(toml[1].steps, 12);
  std::ofstream(temp("p.json")) << R"(["a --h 128", {"prompt": "b", "seed": 3, "negative_prompt": "c"}])";
  auto json = load_sample_prompts(temp("p.json"));
  ASSERT_EQ(json.size(), 2u);
  EXPECT_EQ(json[0].height, 128);
  EXPECT_EQ(json[1].seed, 3);
  EXPECT_THROW(load_sample_prompts(temp("p.yaml")), Error);
}

TEST(SamplePrompts, ImageNamesAreKohyas) {
  SamplePrompt p;
  p.index = 3;
  EXPECT_EQ(sample_image_name(std::string("lora"), std::nullopt, 120, p, "20261129030000"), "lora_000120_03_20261129030000.png");
  p.seed = 42;
  EXPECT_EQ(sample_image_name(std::nullopt, 2, 999, p, "20261129030000"), "e000002_03_20261129030000_42.png");
}

}  // namespace
}  // namespace sdt
