// The FLUX.1 and Chroma transformers against kohya-ss/sd-scripts' own (library/flux_models.py, chroma_models.py) on
// tiny random configs (tests/fixtures/flux/gen_flux_fixtures.py): a dev-like and a schnell-like FLUX, with and
// without the T5 attention mask, and a Chroma; the 2x2 packing and the image ids against kohya's flux_utils; the
// transformer stored in fp8 (--fp8_base) against kohya's under the same autocast.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include <ATen/autocast_mode.h>
#include <nlohmann/json.hpp>

#include "src/core/error.h"
#include "src/core/safetensors.h"
#include "src/models/flux.h"
#include "src/models/flux_checkpoint.h"
#include "src/models/sd_checkpoint.h"
#include "src/models/t5.h"
#include "tests/fixture_files.h"
#include "tests/models/compare.h"

namespace sdt {
namespace {

using testing_support::expect_close;

struct Variant {
  FluxConfig config;
  std::map<std::string, at::Tensor> tensors;
  FluxTransformer model{nullptr};
  const at::Tensor& input(const std::string& name) const { return tensors.at("input." + name); }
};

Variant load_variant(const std::string& name) {
  const std::string path = SDT_FIXTURES "/flux/" + name + ".safetensors";
  Variant v;
  const nlohmann::json c = nlohmann::json::parse(safetensors::File(path).metadata().at("config"));
  FluxConfig& f = v.config;
  f.in_channels = c["in_channels"];
  f.vec_in_dim = c["vec_in_dim"];
  f.context_in_dim = c["context_in_dim"];
  f.hidden_size = c["hidden_size"];
  f.mlp_ratio = c["mlp_ratio"];
  f.num_heads = c["num_heads"];
  f.depth = c["depth"];
  f.depth_single_blocks = c["depth_single_blocks"];
  f.axes_dim = c["axes_dim"].get<std::vector<int64_t>>();
  f.theta = c["theta"];
  f.qkv_bias = c["qkv_bias"];
  f.guidance_embed = c["guidance_embed"];
  f.chroma = c.value("chroma", false);
  if (f.chroma) {
    f.approximator_in_dim = c["approximator_in_dim"];
    f.approximator_depth = c["approximator_depth"];
    f.approximator_hidden_size = c["approximator_hidden_size"];
  }
  v.tensors = testing_support::read_tensors(path);
  v.model = FluxTransformer(f);
  torch::NoGradGuard no_grad;
  size_t loaded = 0;
  for (auto& item : v.model->named_parameters()) {
    const std::string& key = item.key();
    at::Tensor& param = item.value();
    const auto found = v.tensors.find(key);
    if (found == v.tensors.end()) {
      ADD_FAILURE() << name << ": the reference has no " << key;
      continue;
    }
    param.copy_(found->second);
    ++loaded;
  }
  size_t weights = 0;
  for (const auto& [key, t] : v.tensors) weights += !key.starts_with("input.") && !key.starts_with("output.");
  EXPECT_EQ(loaded, weights) << name << ": every weight of the reference has its parameter, under the same name";
  v.model->eval();
  return v;
}

at::Tensor run(Variant& v, bool masked) {
  torch::NoGradGuard no_grad;
  return v.model->forward(v.input("img"), v.input("img_ids"), v.input("txt"), v.input("txt_ids"), v.input("timesteps"),
                          v.input("y"), v.config.guidance_embed ? v.input("guidance") : at::Tensor(),
                          masked ? v.input("txt_mask") : at::Tensor());
}

// fp32 throughout, the same operations as kohya's; the differences are the order of sums inside matmuls and attention
// (an ulp, 6e-8, per operation through 3 to 5 blocks of a few dozen operations each): 1e-5 of the output's scale
// leaves a factor of ten, where a wrong modulation chunk, RoPE pair or token order is of the output's own size.
TEST(FluxModels, TransformerMatchesKohyasFluxAndChroma) {
  for (const std::string name : {"flux_a", "flux_b", "chroma_a"}) {
    Variant v = load_variant(name);
    if (!v.config.chroma) expect_close(name + " without mask", run(v, false), v.tensors.at("output.unmasked"), 1e-5);
    expect_close(name + " with the T5 mask", run(v, true), v.tensors.at("output.masked"), 1e-5);
  }
}

TEST(FluxModels, PackingAndImageIdsAreKohyas) {
  for (const std::string name : {"flux_a", "flux_b", "chroma_a"}) {
    const Variant v = load_variant(name);
    const at::Tensor& latents = v.input("latents");
    EXPECT_TRUE(at::equal(pack_latents(latents), v.input("img"))) << name;
    const int64_t h = latents.size(2) / 2, w = latents.size(3) / 2;
    EXPECT_TRUE(at::equal(flux_image_ids(latents.size(0), h, w), v.input("img_ids"))) << name;
    EXPECT_TRUE(at::equal(unpack_latents(v.tensors.at("output.masked"), h, w), v.tensors.at("output.unpacked"))) << name;
    EXPECT_TRUE(at::equal(unpack_latents(pack_latents(latents), h, w), latents)) << name;
  }
}

TEST(FluxModels, ConfigsThatCannotBeBuiltAreRefused) {
  FluxConfig bad = FluxConfig::dev();
  bad.axes_dim = {16, 56, 48};
  EXPECT_THROW(FluxTransformer{bad}, Error);
  EXPECT_EQ(FluxConfig::chroma_base().chroma_modulations(), 3 * 38 + 12 * 19 + 2);  // chroma_models.py's mod_index_length
}

}  // namespace
}  // namespace sdt

namespace sdt {
namespace {

namespace fs = std::filesystem;

// A fixture's weights alone (without its input.* and output.*) in `path`.
void write_weights(const std::map<std::string, at::Tensor>& tensors, const std::string& path) {
  NamedTensors weights;
  for (const auto& [key, t] : tensors) {
    if (!key.starts_with("input.") && !key.starts_with("output.")) weights.emplace_back(key, t);
  }
  save_safetensors(path, weights, {});
}

// fp32 convolutions and GroupNorms over a few hundred values each, a handful of layers deep: 1e-5 of the scale.
void expect_autoencoder_matches(AutoencoderKL& vae, const std::map<std::string, at::Tensor>& f, const std::string& name) {
  torch::NoGradGuard no_grad;
  const DiagonalGaussian posterior = vae->encode(f.at("input.image"));
  expect_close(name + " posterior mean", posterior.mean, f.at("output.mean"), 1e-5);
  expect_close(name + " posterior log-variance", posterior.logvar, f.at("output.logvar"), 1e-5);
  const at::Tensor latents = (posterior.mean - vae->config.shift_factor) * vae->config.scaling_factor;
  expect_close(name + " shifted and scaled latents", latents, f.at("output.latents"), 1e-5);
  expect_close(name + " decoded", latents_to_images(vae, f.at("output.latents")), f.at("output.decoded"), 1e-5);
}

// FLUX's autoencoder: diffusers' AutoencoderKL with FLUX's config, loaded from a diffusers folder (its config.json:
// 16 channels, no quant convs, shift and scale), and BFL's own layout (kohya's AutoEncoder), loaded from a file.
TEST(FluxModels, AutoencoderMatchesDiffusersAndKohyaInBothLayouts) {
  const fs::path root = fs::path(testing::TempDir()) / "sdt_flux_ae";
  fs::remove_all(root);
  fs::create_directories(root / "vae");
  const std::string diffusers_path = SDT_FIXTURES "/flux/ae_diffusers.safetensors";
  const auto diffusers = testing_support::read_tensors(diffusers_path);
  write_weights(diffusers, (root / "vae" / "diffusion_pytorch_model.safetensors").string());
  std::ofstream(root / "vae" / "config.json") << safetensors::File(diffusers_path).metadata().at("config");
  AutoencoderKL from_folder = load_vae((root / "vae").string(), VaeConfig::flux());
  EXPECT_FALSE(from_folder->config.use_quant_conv);
  EXPECT_DOUBLE_EQ(from_folder->config.shift_factor, 0.1159);
  expect_autoencoder_matches(from_folder, diffusers, "diffusers AutoencoderKL (FLUX config)");

  const auto bfl = testing_support::read_tensors(SDT_FIXTURES "/flux/ae_bfl.safetensors");
  write_weights(bfl, (root / "ae.safetensors").string());
  VaeConfig config = VaeConfig::flux();
  config.block_out_channels = {32, 64};
  config.layers_per_block = 1;
  AutoencoderKL from_file = load_vae((root / "ae.safetensors").string(), config);
  expect_autoencoder_matches(from_file, bfl, "kohya's AutoEncoder (BFL layout)");
  fs::remove_all(root);
}

}  // namespace
}  // namespace sdt

namespace sdt {
namespace {

// transformers' T5EncoderModel (gated-gelu T5 v1.1) in two shapes, its config read from config.json as a user's
// folder holds it, with and without the attention mask. fp32; softmax over up to 40 keys and 2-3 layers: 1e-5 of the
// scale.
TEST(FluxModels, T5EncoderMatchesTransformers) {
  const fs::path root = fs::path(testing::TempDir()) / "sdt_t5_config";
  fs::create_directories(root);
  for (const std::string name : {"t5_a", "t5_b"}) {
    const std::string path = SDT_FIXTURES "/flux/" + name + ".safetensors";
    std::ofstream(root / "config.json") << safetensors::File(path).metadata().at("config");
    const T5Config config = read_t5_config((root / "config.json").string());
    const auto f = testing_support::read_tensors(path);
    T5EncoderModel t5(config);
    {
      torch::NoGradGuard no_grad;
      for (auto& item : t5->named_parameters()) item.value().copy_(f.at(item.key()));
    }
    EXPECT_TRUE(at::equal(f.at("shared.weight"), f.at("encoder.embed_tokens.weight")));
    torch::NoGradGuard no_grad;
    expect_close(name + " last_hidden_state", t5->forward(f.at("input.ids")), f.at("output.unmasked"), 1e-5);
    expect_close(name + " last_hidden_state with the mask", t5->forward(f.at("input.ids"), f.at("input.mask")), f.at("output.masked"), 1e-5);
  }
  fs::remove_all(root);
}

// transformers' buckets for relative positions -300..300 with FLUX's 32 buckets and max distance 128, computed here
// from the formula's definition in double precision (exact bins below 8, logarithmic bins to 128, one bin beyond).
TEST(FluxModels, T5RelativePositionBucketsFollowTheDefinition) {
  const at::Tensor relative = at::arange(-300, 301, at::kLong);
  const at::Tensor buckets = t5_relative_position_bucket(relative, 32, 128);
  for (int64_t r = -300; r <= 300; ++r) {
    const int64_t distance = std::abs(r);
    int64_t expected = r > 0 ? 16 : 0;
    expected += distance < 8 ? distance : std::min<int64_t>(15, 8 + static_cast<int64_t>(std::log(distance / 8.0) / std::log(16.0) * 8));
    EXPECT_EQ(buckets[r + 300].item<int64_t>(), expected) << "relative position " << r;
  }
}

// kohya's --fp8_base: every transformer weight stored in float8_e4m3fn, the forward under bf16 autocast, which
// widens each fp8 weight to bf16 as its matmul runs (gen_fp8_fixtures.py runs kohya's Flux the same way on the tiny
// model). Both compute in bf16 and only their op order differs: within 1e-2 of the output's scale (a bf16 rounding is
// 2^-9 of a value, over three double and four single blocks). Storing fp8 itself moves the output by 4e-2 against
// bf16 weights, so the check tells fp8 storage from none.
TEST(FluxModels, Fp8WeightsUnderBf16AutocastGiveKohyasFp8Output) {
  torch::NoGradGuard no_grad;
  const auto ref = testing_support::read_tensors(SDT_FIXTURES "/flux/tiny/fp8_reference.safetensors");
  FluxTransformer flux = load_flux_transformer(SDT_FIXTURES "/flux/tiny/transformer.safetensors");
  flux->to(at::kFloat8_e4m3fn);
  at::autocast::set_autocast_dtype(at::kCPU, at::kBFloat16);
  at::autocast::set_autocast_enabled(at::kCPU, true);
  const auto in = [&](const char* name) { return ref.at(std::string("input.") + name); };
  const at::Tensor out = flux->forward(in("img"), in("img_ids"), in("txt"), in("txt_ids"), in("timesteps"), in("y"),
                                       in("guidance"), at::Tensor()).to(at::kFloat);
  at::autocast::set_autocast_enabled(at::kCPU, false);
  at::autocast::clear_cache();
  expect_close("fp8 transformer under bf16 autocast", out, ref.at("output.fp8"), 1e-2);
  const double from_bf16 = ((out - ref.at("output.bf16")).abs().max() / ref.at("output.bf16").abs().max()).item<double>();
  EXPECT_GT(from_bf16, 2e-2) << "the weights were not stored in fp8";
}

}  // namespace
}  // namespace sdt
