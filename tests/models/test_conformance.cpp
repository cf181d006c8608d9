// The C++ models against diffusers / transformers on the same tiny random weights (tests/fixtures/sd, made by
// gen_sd_fixtures.py): text-encoder hidden states, VAE encode and decode, U-Net noise prediction, fp32, 1e-4.
#include <gtest/gtest.h>

#include <map>

#include <ATen/CPUGeneratorImpl.h>

#include "src/core/tensor_io.h"
#include "src/models/sd_checkpoint.h"
#include "tests/fixture_files.h"
#include "tests/models/compare.h"

namespace sdt {
namespace {

using testing_support::expect_close;

const std::string kFixtures = SDT_FIXTURES "/sd/";

// Each variant's models and reference tensors, loaded once.
struct Variant {
  SdModels models;
  std::map<std::string, at::Tensor> ref;
};

Variant& variant(const std::string& name) {
  static std::map<std::string, Variant> cache;
  auto it = cache.find(name);
  if (it != cache.end()) return it->second;
  Variant v;
  v.models = load_diffusers_folder(kFixtures + name, at::kFloat);
  v.ref = testing_support::read_tensors(kFixtures + name + "/reference.safetensors");
  return cache.emplace(name, std::move(v)).first->second;
}

class Conformance : public ::testing::TestWithParam<std::string> {};

TEST_P(Conformance, TextEncoderHiddenStatesPooledAndClipSkipMatchTransformers) {
  torch::NoGradGuard no_grad;
  Variant& v = variant(GetParam());
  at::Tensor ids = v.ref.at("te.ids");  // (B, n, 77)
  ClipTextOutput out = v.models.text_encoder->forward(ids.reshape({-1, 77}));
  expect_close(GetParam() + " te.last_hidden_state", out.last_hidden_state, v.ref.at("te.last_hidden_state"));
  expect_close(GetParam() + " te.pooled", out.pooled, v.ref.at("te.pooled"));
  expect_close(GetParam() + " te.clip_skip2", v.models.text_encoder->encode(ids.reshape({-1, 77}), 2), v.ref.at("te.clip_skip2"));
  EXPECT_TRUE(at::equal(v.models.text_encoder->encode(ids.reshape({-1, 77}), 1), out.last_hidden_state));
}

TEST_P(Conformance, LongPromptChunksStitchAsKohyaDoes) {
  torch::NoGradGuard no_grad;
  Variant& v = variant(GetParam());
  at::Tensor stitched = encode_prompt_chunks(v.models.text_encoder, v.ref.at("te.ids"));
  EXPECT_EQ(stitched.sizes(), at::IntArrayRef({2, 2 + 75 * 2, 32}));
  expect_close(GetParam() + " te.stitched", stitched, v.ref.at("te.stitched"));
}

TEST_P(Conformance, UNetNoisePredictionMatchesDiffusers) {
  torch::NoGradGuard no_grad;
  Variant& v = variant(GetParam());
  at::Tensor out = v.models.unet->forward(v.ref.at("unet.sample"), v.ref.at("unet.timesteps"), v.ref.at("unet.context"));
  expect_close(GetParam() + " unet.out", out, v.ref.at("unet.out"));
}

TEST_P(Conformance, UNetHandlesSidesThatAreNotMultiplesOfTheDownscale) {
  torch::NoGradGuard no_grad;
  Variant& v = variant(GetParam());
  at::Tensor out = v.models.unet->forward(v.ref.at("unet.odd_sample"), v.ref.at("unet.odd_timesteps"),
                                          v.ref.at("unet.context").slice(0, 0, 1));
  expect_close(GetParam() + " unet.odd_out (10x6)", out, v.ref.at("unet.odd_out"));
}

INSTANTIATE_TEST_SUITE_P(Sd, Conformance, ::testing::Values("sd1", "sd2"));

TEST(VaeConformance, EncodeMeanSampleAndDecodeMatchDiffusers) {
  torch::NoGradGuard no_grad;
  Variant& v = variant("sd1");
  AutoencoderKL& vae = v.models.vae;
  DiagonalGaussian posterior = vae->encode(v.ref.at("vae.image"));
  expect_close("vae.mean", posterior.mean, v.ref.at("vae.mean"));
  at::Generator generator = at::make_generator<at::CPUGeneratorImpl>(7);
  expect_close("vae.sample (seed 7)", posterior.sample(generator), v.ref.at("vae.sample_seed_7"));
  expect_close("vae.decoded", vae->decode(v.ref.at("vae.latents")), v.ref.at("vae.decoded"));
}

TEST(VaeConformance, TiledEncodeAndDecodeMatchDiffusersTiling) {
  torch::NoGradGuard no_grad;
  AutoencoderKL& vae = variant("sd1").models.vae;
  auto& ref = variant("sd1").ref;
  VaeSplit tiles;
  tiles.tile = true;
  tiles.tile_sample_size = 16;  // the generator sets diffusers' tile_sample_min_size = 16 (latent tiles of 8)
  expect_close("vae.tiled_mean (40x40, 16px tiles)", vae->encode(ref.at("vae.tiled_image"), tiles).mean, ref.at("vae.tiled_mean"));
  expect_close("vae.tiled_decoded (20x20 latents)", vae->decode(ref.at("vae.tiled_latents"), tiles), ref.at("vae.tiled_decoded"));
  // Tiling must actually change something, or the test above would not show that the tiles are blended right.
  EXPECT_FALSE(at::allclose(vae->encode(ref.at("vae.tiled_image")).mean, ref.at("vae.tiled_mean"), 1e-3, 1e-3));
}

TEST(VaeConformance, SlicingTheBatchGivesTheSameResult) {
  torch::NoGradGuard no_grad;
  AutoencoderKL& vae = variant("sd1").models.vae;
  auto& ref = variant("sd1").ref;
  VaeSplit sliced;
  sliced.slice_batch = true;
  expect_close("vae.mean (sliced)", vae->encode(ref.at("vae.image"), sliced).mean, ref.at("vae.mean"));
  expect_close("vae.decoded (sliced)", vae->decode(ref.at("vae.latents"), sliced), ref.at("vae.decoded"));
}

TEST(VaeConformance, LatentHelpersApplyTheScalingFactor) {
  torch::NoGradGuard no_grad;
  AutoencoderKL& vae = variant("sd1").models.vae;
  auto& ref = variant("sd1").ref;
  EXPECT_DOUBLE_EQ(vae->config.scaling_factor, 0.18215);
  at::Tensor latents = images_to_latents(vae, ref.at("vae.image"), at::make_generator<at::CPUGeneratorImpl>(7));
  expect_close("vae latents = sample * 0.18215", latents, ref.at("vae.sample_seed_7") * 0.18215);
  expect_close("vae images from latents", latents_to_images(vae, ref.at("vae.latents") * 0.18215), ref.at("vae.decoded"));
}

}  // namespace
}  // namespace sdt
