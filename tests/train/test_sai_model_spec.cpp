// The SAI model-spec keys (modelspec.*) sdt writes, against what kohya's library/sai_model_spec.py writes for the same
// runs (tests/fixtures/metadata/gen_model_spec.py): SD 1.x and 2.x (v-prediction), LoRA and checkpoint, defaults and
// every --metadata_* flag, at a fixed timestamp in UTC. modelspec.implementation_version names the tool ("sdt/...").
#include <gtest/gtest.h>

#include <cstdlib>
#include <ctime>
#include <fstream>

#include <nlohmann/json.hpp>

#include "src/core/error.h"
#include "src/core/train_args.h"
#include "src/families/family.h"
#include "src/train/sai_model_spec.h"

namespace sdt {
namespace {

TEST(SaiModelSpec, EqualsKohyasKeysForTheSameRun) {
  ::setenv("TZ", "UTC", 1);
  ::tzset();
  std::ifstream in(SDT_FIXTURES "/metadata/model_spec.json");
  ASSERT_TRUE(in) << "missing fixture";
  const nlohmann::json fixture = nlohmann::json::parse(in);
  const double timestamp = fixture.at("timestamp");
  for (const auto& [name, c] : fixture.at("cases").items()) {
    SCOPED_TRACE(name);
    std::vector<std::string> argv;
    bool v2 = false;
    for (const auto& [flag, value] : c.at("flags").items()) {
      argv.push_back("--" + flag);
      if (value.is_boolean()) {
        v2 = v2 || flag == "v2";
        continue;
      }
      argv.push_back(value.is_string() ? value.get<std::string>() : value.dump());
    }
    TrainArgs args = parse_train_args(argv).args;
    args.pretrained_model_name_or_path = SDT_FIXTURES + std::string(v2 ? "/sd/sd2" : "/sd/sd1");
    args.tokenizer = SDT_FIXTURES "/sd/sampling/tokenizer";
    const bool lora = c.at("metadata").at("modelspec.architecture").get<std::string>().ends_with("/lora");
    const std::unique_ptr<Family> family = load_family_for_training(args);
    safetensors::Metadata ours = sai_model_spec(family->model_spec(), args, lora, timestamp);
    EXPECT_EQ(ours.at("modelspec.implementation_version"), "sdt/" SDT_VERSION);
    ours.erase("modelspec.implementation_version");
    const safetensors::Metadata kohya = c.at("metadata").get<safetensors::Metadata>();
    EXPECT_EQ(ours, kohya);
  }
}

TEST(SaiModelSpec, AThumbnailFileBecomesADataUrl) {
  const std::string path = testing::TempDir() + "/thumb.png";
  std::ofstream(path, std::ios::binary) << "abcd";  // base64 "YWJjZA=="
  TrainArgs args;
  args.metadata_thumbnail = path;
  const safetensors::Metadata m = sai_model_spec({.architecture = "x"}, args, true, 0);
  EXPECT_EQ(m.at("modelspec.thumbnail"), "data:image/png;base64,YWJjZA==");
  args.metadata_thumbnail = testing::TempDir() + "/missing.png";
  EXPECT_THROW(sai_model_spec({.architecture = "x"}, args, true, 0), Error);
}

}  // namespace
}  // namespace sdt
