// The LoRA file: kohya's keys and dtypes, the ss_* metadata, and the sshs_* hashes against kohya's
// precalculate_safetensors_hashes run on the same tensors (hashes.json from gen_lora_fixtures.py).
#include <gtest/gtest.h>

#include <cstdio>
#include <filesystem>
#include <fstream>

#include "src/core/error.h"
#include "src/networks/lora_metadata.h"
#include "tests/networks/lora_fixtures.h"

namespace sdt {
namespace {

using namespace lora_test;

// gen_lora_fixtures.py's deterministic_tensors().
NamedTensors deterministic_tensors() {
  at::Tensor big = (at::arange(300000, at::kLong) % 251).to(at::kFloat) / 7;
  return {{"lora_unet_a.lora_down.weight", big.reshape({600, 500})},
          {"lora_unet_b.lora_up.weight", big.slice(0, 0, 1000).reshape({10, 100}) * 2},
          {"lora_unet_a.alpha", at::scalar_tensor(4.0, at::kFloat)}};
}

safetensors::Metadata fixture_metadata(const nlohmann::json& hashes) {
  safetensors::Metadata m;
  for (const auto& [k, v] : hashes.at("metadata").items()) m[k] = v.get<std::string>();
  return m;
}

TEST(LoRAHashes, EqualKohyasPrecalculatedHashes) {
  const nlohmann::json hashes = read_json(kNetworks + "hashes.json");
  const safetensors::Metadata metadata = fixture_metadata(hashes);
  // Over 1 MiB, so the legacy hash reads a real 64 KiB window past the header.
  SafetensorsHashes big = precalculate_safetensors_hashes(deterministic_tensors(), metadata);
  EXPECT_EQ(big.model_hash, hashes.at("deterministic").at("sshs_model_hash").get<std::string>());
  EXPECT_EQ(big.legacy_hash, hashes.at("deterministic").at("sshs_legacy_hash").get<std::string>());

  NamedTensors lora;
  for (auto& [name, t] : read_tensors(kNetworks + "lora_sd1.safetensors")) lora.emplace_back(name, t.to(at::kHalf));
  SafetensorsHashes small = precalculate_safetensors_hashes(lora, metadata);
  EXPECT_EQ(small.model_hash, hashes.at("lora_sd1_fp16").at("sshs_model_hash").get<std::string>());
  EXPECT_EQ(small.legacy_hash, hashes.at("lora_sd1_fp16").at("sshs_legacy_hash").get<std::string>());
}

// The model hash is the SHA-256 of the data section, so it can be checked on the written file too.
// kohya's model_hash (SHA-256 of the 64 KiB at 0x100000, first 8 hex digits; of nothing for a shorter file) and
// calculate_sha256 (the whole file), as Python's hashlib computes them for the same bytes.
TEST(ModelHashes, EqualKohyasModelHashAndSha256) {
  const std::string big = ::testing::TempDir() + "model_hash_big.bin", small = ::testing::TempDir() + "model_hash_small.bin";
  {
    std::ofstream out(big, std::ios::binary);
    for (int64_t i = 0; i < 0x110000; ++i) out.put(static_cast<char>((i * 7 + 3) % 251));
    std::ofstream tiny(small, std::ios::binary);
    for (int i = 0; i < 100; ++i) tiny.put(static_cast<char>(i));
  }
  EXPECT_EQ(legacy_model_hash(big), "145d6c8b");
  EXPECT_EQ(file_sha256(big), "6dc2cb154824993e5f1ad486ee5524ec87bda256d13db64f1bc828e0331badfd");
  EXPECT_EQ(legacy_model_hash(small), "e3b0c442");
  EXPECT_EQ(file_sha256(small), "bce0aff19cf5aa6a7469a30d61d04e4376e4bbf6381052ee9e7f33925c954d52");
  std::remove(big.c_str());
  std::remove(small.c_str());
}

// The JSON kohya's metadata holds, as Python's json.dumps writes it (the expected string is Python's output).
TEST(PythonJson, FormatsAsJsonDumps) {
  nlohmann::ordered_json value = nlohmann::ordered_json::object();
  value["a b"] = nlohmann::ordered_json::object({{"x", 1}, {"\u00e9t\u00e9", 2}, {"\U0001F600", 3}});
  value["l"] = nlohmann::ordered_json::array({1.0, 1e-05, true, nullptr, "q\"\n\t\\ \x7f\x01"});
  EXPECT_EQ(python_json(value),
            R"({"a b": {"x": 1, "\u00e9t\u00e9": 2, "\ud83d\ude00": 3}, "l": [1.0, 1e-05, true, null, "q\"\n\t\\ \u007f\u0001"]})");
  EXPECT_EQ(python_json(nlohmann::ordered_json::object()), "{}");
}

TEST(LoRAFile, SaveWritesKohyasKeysMetadataAndHashesAndLoadsBack) {
  SdModels models = load_diffusers_folder(kSd + "sd1");
  LoRANetworkConfig config = parse_lora_network_args(4, 2.0, std::nullopt, {"conv_dim=2"});
  LoRANetwork network(config, sd_network_targets(models.text_encoder, models.unet, config.adapts_conv_blocks()), true, true, seeded(7));
  {
    torch::NoGradGuard no_grad;
    for (auto& lora : network->unet_loras) lora->lora_up_weight().normal_(0, 0.1, seeded(8));
  }
  LoRATrainingMetadata training;
  training.output_name = "tiny";
  training.network_dim = python_str(int64_t{4});
  training.network_alpha = python_str(2.0);
  training.network_args_json = R"({"conv_dim": "2"})";
  training.steps = "10";
  const safetensors::Metadata metadata = training.to_metadata();

  const std::string path = std::filesystem::temp_directory_path() / ("sdt_lora_" + std::to_string(::getpid()) + ".safetensors");
  network->save_weights(path, at::kHalf, metadata);
  safetensors::File file(path);

  std::set<std::string> expected_keys;
  for (const auto* list : {&network->text_encoder_loras, &network->unet_loras}) {
    for (const auto& lora : *list) {
      for (const char* suffix : {".lora_down.weight", ".lora_up.weight", ".alpha"}) expected_keys.insert(lora->lora_name + suffix);
    }
  }
  std::set<std::string> keys;
  for (const auto& t : file.tensors()) {
    keys.insert(t.name);
    EXPECT_EQ(t.dtype, safetensors::DType::F16) << t.name;
  }
  EXPECT_EQ(keys, expected_keys);
  EXPECT_TRUE(keys.contains("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"));
  EXPECT_TRUE(keys.contains("lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"));
  EXPECT_TRUE(keys.contains("lora_te_text_model_encoder_layers_0_mlp_fc1.alpha"));

  for (const auto& [key, value] : metadata) EXPECT_EQ(file.metadata().at(key), value) << key;
  EXPECT_EQ(file.metadata().at("ss_network_args"), R"({"conv_dim": "2"})");
  EXPECT_EQ(file.metadata().at("ss_output_name"), "tiny");
  EXPECT_EQ(file.metadata().at("ss_network_dropout"), "None");
  SafetensorsHashes hashes = precalculate_safetensors_hashes(network->state_dict(at::kHalf), metadata);
  EXPECT_EQ(file.metadata().at("sshs_model_hash"), hashes.model_hash);
  EXPECT_EQ(file.metadata().at("sshs_legacy_hash"), hashes.legacy_hash);
  Sha256 data;
  for (const auto& t : file.tensors()) data.update(file.bytes(t).data(), t.nbytes());
  EXPECT_EQ(data.hex_digest(), hashes.model_hash);

  // --network_weights into a network with other initial weights: every value comes back (fp16-exact).
  SdModels other = load_diffusers_folder(kSd + "sd1");
  LoRANetwork loaded(config, sd_network_targets(other.text_encoder, other.unet, config.adapts_conv_blocks()), true, true, seeded(99));
  LoadResult result = loaded->load_weights(path);
  EXPECT_TRUE(result.missing.empty());
  EXPECT_TRUE(result.unexpected.empty());
  auto saved = network->state_dict(at::kHalf), back = loaded->state_dict(at::kHalf);
  ASSERT_EQ(saved.size(), back.size());
  for (size_t i = 0; i < saved.size(); ++i) EXPECT_TRUE(at::equal(saved[i].second, back[i].second)) << saved[i].first;

  // --dim_from_weights: the file's dims and alphas recreate the same modules.
  LoRANetworkConfig from_file;
  from_file.modules_dim_alpha = lora_dims_from_file(file);
  SdModels third = load_diffusers_folder(kSd + "sd1");
  LoRANetwork recreated(from_file, sd_network_targets(third.text_encoder, third.unet, from_file.adapts_conv_blocks()), true, true,
                        seeded(0));
  EXPECT_EQ(recreated->unet_loras.size(), network->unet_loras.size());
  EXPECT_EQ(recreated->text_encoder_loras.size(), network->text_encoder_loras.size());
  std::remove(path.c_str());
}

TEST(LoRAFile, TrainUnetOnlySavesNoTextEncoderModules) {
  SdModels models = load_diffusers_folder(kSd + "sd1");
  LoRANetwork network(parse_lora_network_args(4, 1.0, std::nullopt, {}), sd_network_targets(models.text_encoder, models.unet, false),
                      /*apply_text_encoder=*/false, /*apply_unet=*/true, seeded(0));
  EXPECT_TRUE(network->text_encoder_loras.empty());
  for (const auto& [key, t] : network->state_dict()) EXPECT_EQ(key.rfind("lora_unet_", 0), 0u) << key;
  EXPECT_EQ(network->prepare_optimizer_params({}, std::nullopt, 1e-4).size(), 1u);
}

TEST(PythonStr, FormatsAsPythonPrintsFloatsBoolsAndNone) {
  EXPECT_EQ(python_str(1.0), "1.0");
  EXPECT_EQ(python_str(0.0001), "0.0001");
  EXPECT_EQ(python_str(1e-05), "1e-05");
  EXPECT_EQ(python_str(2e-06), "2e-06");
  EXPECT_EQ(python_str(0.3), "0.3");
  EXPECT_EQ(python_str(100.0), "100.0");
  EXPECT_EQ(python_str(1e16), "1e+16");
  EXPECT_EQ(python_str(true), "True");
  EXPECT_EQ(python_str(std::optional<double>()), "None");
  EXPECT_EQ(python_str(int64_t{16}), "16");
}

}  // namespace
}  // namespace sdt
