// The SDXL models against diffusers / transformers / kohya on the same tiny random weights (tests/fixtures/sdxl, made
// by gen_sdxl_fixtures.py), in two shapes: both text encoders' hidden states and projection, kohya's size embedding,
// the U-Net's prediction with the vector conditioning, fp32. And the SGM single file: it holds what the diffusers folder
// holds, and saving it gives it back.
#include <gtest/gtest.h>

#include <filesystem>
#include <map>
#include <set>

#include "src/core/error.h"
#include "src/core/tensor_io.h"
#include "src/models/sdxl_checkpoint.h"
#include "tests/fixture_files.h"
#include "tests/models/compare.h"

namespace sdt {
namespace {

using testing_support::expect_close;

const std::string kFixtures = SDT_FIXTURES "/sdxl/";

struct Variant {
  SdxlModels models;
  std::map<std::string, at::Tensor> ref;
};

Variant& variant(const std::string& name) {
  static std::map<std::string, Variant> cache;
  auto it = cache.find(name);
  if (it != cache.end()) return it->second;
  Variant v;
  v.models = load_sdxl_diffusers_folder(kFixtures + name);
  v.ref = testing_support::read_tensors(kFixtures + name + "/reference.safetensors");
  return cache.emplace(name, std::move(v)).first->second;
}

// The fixtures' architecture, as a single file's loader is told it.
SdxlConfig config_of(const SdxlModels& m) {
  return {m.text_encoder1->config, m.text_encoder2->config, m.vae->config, m.unet->config};
}

void expect_same_parameters(torch::nn::Module& a, torch::nn::Module& b) {
  const auto pa = a.named_parameters(), pb = b.named_parameters();
  ASSERT_EQ(pa.size(), pb.size());
  for (const auto& item : pa) EXPECT_TRUE(at::equal(item.value(), pb[item.key()])) << item.key();
}

class SdxlConformance : public ::testing::TestWithParam<std::string> {};

// Errors here are float reordering over 12 (3) layers of 32 (40, 48) channels: ~1e-6 of the output's scale; 1e-4
// leaves room for other CPUs' kernels.
TEST_P(SdxlConformance, TextEncoderHiddenStatesAndProjectionMatchTransformers) {
  torch::NoGradGuard no_grad;
  Variant& v = variant(GetParam());
  const ClipTextOutput out1 = v.models.text_encoder1->forward(v.ref.at("te.ids1").reshape({-1, 77}));
  expect_close(GetParam() + " te1.hidden_11", out1.hidden_states[11], v.ref.at("te1.hidden_11"));
  const ClipTextOutput out2 = v.models.text_encoder2->forward(v.ref.at("te.ids2").reshape({-1, 77}));
  expect_close(GetParam() + " te2.penultimate", out2.hidden_states[out2.hidden_states.size() - 2], v.ref.at("te2.penultimate"));
  expect_close(GetParam() + " te2.text_embeds", out2.text_embeds, v.ref.at("te2.text_embeds"));
}

// The same fp32 operations in the same order as both references: equal up to the last bit of a cos/sin near 1000 rad.
TEST_P(SdxlConformance, SizeEmbeddingMatchesDiffusersAndKohya) {
  Variant& v = variant(GetParam());
  const at::Tensor sizes = v.ref.at("unet.size_ids");
  expect_close(GetParam() + " size_embedding", size_embedding(sizes, v.models.unet->config.addition_time_embed_dim),
               v.ref.at("unet.size_embedding"), 1e-6);
  expect_close(GetParam() + " kohya size_embedding (256)", size_embedding(sizes, 256), v.ref.at("kohya.size_embedding_256"), 1e-6);
}

TEST_P(SdxlConformance, UNetWithVectorConditioningMatchesDiffusers) {
  torch::NoGradGuard no_grad;
  Variant& v = variant(GetParam());
  UNet2DConditionModel& unet = v.models.unet;
  at::Tensor out = unet->forward(v.ref.at("unet.sample"), v.ref.at("unet.timesteps"), v.ref.at("unet.context"), v.ref.at("unet.vector"));
  expect_close(GetParam() + " unet.out", out, v.ref.at("unet.out"));
  out = unet->forward(v.ref.at("unet.odd_sample"), v.ref.at("unet.odd_timesteps"), v.ref.at("unet.context").slice(0, 0, 1),
                      v.ref.at("unet.vector").slice(0, 0, 1));
  expect_close(GetParam() + " unet.odd_out (10x6)", out, v.ref.at("unet.odd_out"));
}

TEST_P(SdxlConformance, UNetWithoutItsVectorConditioningIsAnError) {
  torch::NoGradGuard no_grad;
  Variant& v = variant(GetParam());
  EXPECT_THROW(v.models.unet->forward(v.ref.at("unet.sample"), v.ref.at("unet.timesteps"), v.ref.at("unet.context")), Error);
}

TEST_P(SdxlConformance, SgmSingleFileHoldsTheDiffusersFoldersWeights) {
  Variant& v = variant(GetParam());
  SdxlModels sgm = load_sgm_checkpoint(kFixtures + GetParam() + "/model_sgm.safetensors", config_of(v.models));
  expect_same_parameters(*sgm.unet, *v.models.unet);
  expect_same_parameters(*sgm.vae, *v.models.vae);
  expect_same_parameters(*sgm.text_encoder1, *v.models.text_encoder1);
  expect_same_parameters(*sgm.text_encoder2, *v.models.text_encoder2);
}

TEST_P(SdxlConformance, KohyasProjectionLoadsUntransposed) {
  Variant& v = variant(GetParam());
  SdxlModels kohya = load_sgm_checkpoint(kFixtures + GetParam() + "/model_sgm.safetensors", config_of(v.models),
                                         at::kFloat, /*projection_as_kohya=*/true);
  const at::Tensor& ours = v.models.text_encoder2->text_projection->weight;
  EXPECT_TRUE(at::equal(kohya.text_encoder2->text_projection->weight, ours.t()));
  EXPECT_FALSE(at::equal(ours, ours.t()));  // a symmetric projection would prove nothing
}

TEST_P(SdxlConformance, SavedSgmFileLoadsBackBitForBit) {
  Variant& v = variant(GetParam());
  const std::string path = ::testing::TempDir() + "/sdxl_" + GetParam() + ".safetensors";
  for (bool kohya : {false, true}) {
    save_sgm_checkpoint(path, v.models, std::nullopt, {{"test", "yes"}}, kohya);
    SdxlModels back = load_sgm_checkpoint(path, config_of(v.models), at::kFloat, kohya);
    expect_same_parameters(*back.unet, *v.models.unet);
    expect_same_parameters(*back.vae, *v.models.vae);
    expect_same_parameters(*back.text_encoder1, *v.models.text_encoder1);
    expect_same_parameters(*back.text_encoder2, *v.models.text_encoder2);
  }
  // The file as Stability's are: the same keys as the fixture's, which kohya's own functions wrote.
  safetensors::File saved(path), fixture(kFixtures + GetParam() + "/model_sgm.safetensors");
  std::set<std::string> saved_keys, fixture_keys;
  for (const auto& t : saved.tensors()) saved_keys.insert(t.name);
  for (const auto& t : fixture.tensors()) fixture_keys.insert(t.name);
  EXPECT_EQ(saved_keys, fixture_keys);
  std::filesystem::remove(path);
}

TEST_P(SdxlConformance, RecognisedAsSdxlInBothLayouts) {
  EXPECT_TRUE(is_sdxl_checkpoint(kFixtures + GetParam()));
  EXPECT_TRUE(is_sdxl_checkpoint(kFixtures + GetParam() + "/model_sgm.safetensors"));
  EXPECT_FALSE(is_sdxl_checkpoint(SDT_FIXTURES "/sd/sd1"));
  EXPECT_FALSE(is_sdxl_checkpoint(SDT_FIXTURES "/sd/sd2/model_ldm.safetensors"));
}

INSTANTIATE_TEST_SUITE_P(Sdxl, SdxlConformance, ::testing::Values("sdxl_a", "sdxl_b"));

}  // namespace
}  // namespace sdt
