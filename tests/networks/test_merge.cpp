// merge-lora against kohya's merge_lora.py run on the same files (gen_lora_fixtures.py): LoRAs merged into the tiny
// SD 1.x model, and LoRAs merged into one LoRA (summed and concatenated).
#include <gtest/gtest.h>

#include <cstdio>
#include <filesystem>

#include "src/core/error.h"
#include "src/networks/merge.h"
#include "tests/networks/lora_fixtures.h"

namespace sdt {
namespace {

using namespace lora_test;
using testing_support::expect_close;

const std::vector<std::string> kLoras{kNetworks + "lora_sd1.safetensors", kNetworks + "lora_sd1_b.safetensors"};
const std::vector<double> kRatios{0.7, -0.4};

TEST(MergeIntoModel, LdmCheckpointMergedEqualsKohyaAndSurvivesSaving) {
  auto ref = read_tensors(kNetworks + "reference_sd1.safetensors");
  const SdConfig config = fixture_config(false);
  SdModels models = load_ldm_checkpoint(kSd + "sd1/model_ldm.safetensors", config, at::kFloat);
  std::vector<std::string> unmatched = merge_loras_into_targets(sd_network_targets(models.text_encoder, models.unet, true), kLoras, kRatios, at::kFloat);
  EXPECT_TRUE(unmatched.empty());
  Outputs merged = run_models(models, ref);
  expect_close("unet merged", merged.unet, ref.at("unet_out_merged"), 2e-5);
  expect_close("text encoder merged", merged.text, ref.at("text_out_merged"), 2e-5);
  expect_close("unet merge delta", merged.unet - ref.at("unet_out_base"), ref.at("unet_out_merged") - ref.at("unet_out_base"), 2e-5);

  // What `sdt merge-lora --sd_model` writes loads back to the same model.
  const std::string path = std::filesystem::temp_directory_path() / ("sdt_merged_" + std::to_string(::getpid()) + ".safetensors");
  save_ldm_checkpoint(path, models, config, at::kFloat);
  SdModels reloaded = load_ldm_checkpoint(path, config, at::kFloat);
  Outputs again = run_models(reloaded, ref);
  EXPECT_TRUE(at::equal(again.unet, merged.unet));
  EXPECT_TRUE(at::equal(again.text, merged.text));
  std::remove(path.c_str());
}

TEST(MergeIntoModel, EqualsTheNetworkAppliedWithTheSameMultiplier) {
  auto ref = read_tensors(kNetworks + "reference_sd1.safetensors");
  SdModels merged_models = load_diffusers_folder(kSd + "sd1");
  merge_loras_into_targets(sd_network_targets(merged_models.text_encoder, merged_models.unet, true), {kLoras[0]}, {0.75}, at::kFloat);
  expect_close("unet merged vs kohya LoRA forward", run_models(merged_models, ref).unet, ref.at("unet_out_lora"), 2e-5);

  SdModels applied = load_diffusers_folder(kSd + "sd1");
  LoRANetwork network = network_from_file(kLoras[0], applied, 0.75);
  network->eval();
  torch::NoGradGuard no_grad;
  // W + s*up*down rounded once per weight against W x + s up(down x): other fp32 roundings in every adapted layer, as
  // between kohya's forward and ours, so the same 2e-5 bound (measured 0.8e-6 to 1.0e-6, depending on the CPU kernels).
  expect_close("unet merged vs applied network", run_models(merged_models, ref).unet, run_models(applied, ref).unet, 2e-5);
}

class MergeFiles : public ::testing::TestWithParam<bool> {};

TEST_P(MergeFiles, MatchKohyasMergeLoraModels) {
  const bool concat = GetParam();
  const std::string expected_path = kNetworks + (concat ? "merged_concat.safetensors" : "merged_sum.safetensors");
  MergedLoRA merged = merge_lora_files(kLoras, kRatios, at::kFloat, concat, /*shuffle=*/false);
  auto expected = read_tensors(expected_path);
  ASSERT_EQ(merged.tensors.size(), expected.size());
  for (const auto& [key, tensor] : merged.tensors) {
    ASSERT_TRUE(expected.contains(key)) << key;
    ASSERT_EQ(tensor.sizes(), expected.at(key).sizes()) << key;
    EXPECT_TRUE(at::allclose(tensor, expected.at(key), 1e-6, 1e-7)) << key;
  }
  EXPECT_EQ(merged.metadata, safetensors::File(expected_path).metadata());
  EXPECT_FALSE(merged.v2);
}

INSTANTIATE_TEST_SUITE_P(SumAndConcat, MergeFiles, ::testing::Values(false, true),
                         [](const auto& info) { return info.param ? "concat" : "sum"; });

TEST(MergeFilesShuffle, PermutesRanksWithoutChangingTheProduct) {
  MergedLoRA plain = merge_lora_files(kLoras, kRatios, at::kFloat, false, false);
  MergedLoRA shuffled = merge_lora_files(kLoras, kRatios, at::kFloat, false, true, seeded(3));
  std::map<std::string, at::Tensor> a(plain.tensors.begin(), plain.tensors.end()), b(shuffled.tensors.begin(), shuffled.tensors.end());
  const std::string name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
  at::Tensor pa = at::matmul(a.at(name + ".lora_up.weight"), a.at(name + ".lora_down.weight"));
  at::Tensor pb = at::matmul(b.at(name + ".lora_up.weight"), b.at(name + ".lora_down.weight"));
  EXPECT_TRUE(at::allclose(pa, pb, 1e-5, 1e-6));
}

TEST(MergeFilesErrors, DifferentDimsNeedConcat) {
  try {
    merge_lora_files({kLoras[0], kNetworks + "lora_sd2.safetensors"}, {1.0, 1.0}, at::kFloat, false, false);
    ADD_FAILURE() << "expected a shape error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("--concat"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace sdt
