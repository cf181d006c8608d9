// The SDXL family on the tiny fixture models (tests/fixtures/sdxl, made by gen_sdxl_fixtures.py with kohya's own
// functions): kohya's text conditioning (both hidden states and pool2, one and two windows), the text_projection of
// single files both ways, the latents' scale, the denoiser call with the size conditioning, and kohya's LoRA names.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <tuple>

#include <ATen/CPUGeneratorImpl.h>
#include <nlohmann/json.hpp>

#include "src/core/error.h"
#include "src/core/tensor_io.h"
#include "src/families/family.h"
#include "src/families/sdxl/sdxl_family.h"
#include "src/networks/lora.h"
#include "src/networks/merge.h"
#include "tests/fixture_files.h"
#include "tests/models/compare.h"
#include "tests/networks/kohya_file_checks.h"

namespace sdt {
namespace {

using testing_support::expect_close;

const std::string kFixtures = SDT_FIXTURES "/sdxl/";

FamilyOptions tiny_options(const std::string& variant, const std::string& checkpoint = "") {
  FamilyOptions options;
  options.pretrained_model_name_or_path = kFixtures + variant + checkpoint;
  options.tokenizer = SDT_FIXTURES "/sd/sampling/tokenizer";  // byte-level: its ids fit the tiny text encoders
  return options;
}

const Family& family(const std::string& variant) {
  static std::map<std::string, std::unique_ptr<Family>> cache;
  auto& slot = cache[variant];
  if (!slot) slot = load_family("sdxl", tiny_options(variant));
  return *slot;
}

std::map<std::string, at::Tensor> reference(const std::string& variant) {
  return testing_support::read_tensors(kFixtures + variant + "/reference.safetensors");
}

class SdxlFamilyTest : public ::testing::TestWithParam<std::string> {};

// kohya's get_hidden_states_sdxl on the same ids, fp32: the same layers in the same order (errors ~1e-6 of the
// outputs' scale); 1e-4 leaves room for other CPUs' kernels.
TEST_P(SdxlFamilyTest, TextConditioningMatchesKohyaForOneAndTwoWindows) {
  torch::NoGradGuard no_grad;
  auto ref = reference(GetParam());
  const TextEncodingStrategy& encode = family(GetParam()).text_encoding_strategy();
  for (const auto& [windows, suffix] : {std::pair<int64_t, std::string>{2, ""}, {1, "_75"}}) {
    Tokens tokens;
    tokens.ids = {ref.at("te.ids1").slice(1, 0, windows), ref.at("te.ids2").slice(1, 0, windows)};
    const Conditioning c = encode.encode(tokens);
    expect_close(GetParam() + " hidden_state1" + suffix, conditioning_tensor(c, "hidden_state1"), ref.at("kohya.hidden_state1" + suffix));
    expect_close(GetParam() + " hidden_state2" + suffix, conditioning_tensor(c, "hidden_state2"), ref.at("kohya.hidden_state2" + suffix));
    expect_close(GetParam() + " pool2" + suffix, conditioning_tensor(c, "pool2"), ref.at("kohya.pool2" + suffix));
  }
}

// From an SGM file kohya's pooled vector is x @ Pᵀ: with --text_projection_as_kohya sdt gives it; by default the
// model's own, which OpenCLIP's code and the diffusers folder give, and which differs. (A single file is loaded with SDXL base's architecture; the
// tiny one is told its own.)
TEST_P(SdxlFamilyTest, SingleFileTextProjectionAsTheModelOrAsKohya) {
  torch::NoGradGuard no_grad;
  auto ref = reference(GetParam());
  Tokens tokens;
  tokens.ids = {ref.at("te.ids1"), ref.at("te.ids2")};
  const SdxlModels folder = load_sdxl_diffusers_folder(kFixtures + GetParam());
  const SdxlConfig config{folder.text_encoder1->config, folder.text_encoder2->config, folder.vae->config, folder.unet->config};
  const std::string sgm = kFixtures + GetParam() + "/model_sgm.safetensors";
  FamilyOptions options = tiny_options(GetParam(), "/model_sgm.safetensors");
  const ClipTokenizer tokenizer = load_clip_tokenizer(options);
  const SdxlFamily model(load_sgm_checkpoint(sgm, config), tokenizer, options);
  const at::Tensor ours = conditioning_tensor(model.text_encoding_strategy().encode(tokens), "pool2");
  expect_close(GetParam() + " pool2 from the single file", ours, ref.at("kohya.pool2"));
  // OpenCLIP's own text tower on the file's weights (pooled @ text_projection) is what the default gives: each
  // prompt's first window.
  expect_close(GetParam() + " pool2 from the single file vs OpenCLIP", ours, ref.at("openclip.pooled").slice(0, 0, c10::nullopt, 2));
  options.text_projection_as_kohya = true;
  const SdxlFamily kohya(load_sgm_checkpoint(sgm, config, at::kFloat, true), tokenizer, options);
  const at::Tensor pool2 = conditioning_tensor(kohya.text_encoding_strategy().encode(tokens), "pool2");
  expect_close(GetParam() + " pool2 from the single file as kohya", pool2, ref.at("kohya.pool2_from_sgm"));
  EXPECT_GT((pool2 - ref.at("kohya.pool2")).abs().max().item<double>(), 1e-2);
  EXPECT_NE(model.text_encoder_settings(), kohya.text_encoder_settings());  // caches of one are not the other's
}

// kohya's SdxlNetworkTrainer.call_unet: context = [h1, h2], vector = [pool2, size embeddings]; diffusers' U-Net with
// text_embeds and time_ids is the reference.
TEST_P(SdxlFamilyTest, PredictionTakesTheTextAndSizeConditioning) {
  torch::NoGradGuard no_grad;
  auto ref = reference(GetParam());
  const Family& sdxl = family(GetParam());
  const at::Tensor context = ref.at("unet.context");
  const int64_t d1 = 32, pooled = ref.at("unet.vector").size(1) - 6 * std::static_pointer_cast<UNet2DConditionModelImpl>(
                                                                            sdxl.models().denoiser)->config.addition_time_embed_dim;
  const at::Tensor sizes = ref.at("unet.size_ids");
  std::vector<ImageGeometry> images;
  for (int64_t i = 0; i < sizes.size(0); ++i) {
    const auto v = [&](int64_t j) { return sizes[i][j].item<int64_t>(); };
    images.push_back({v(0), v(1), v(2), v(3), v(4), v(5)});
  }
  Conditioning c{{"hidden_state1", context.slice(2, 0, d1)},
                 {"hidden_state2", context.slice(2, d1)},
                 {"pool2", ref.at("unet.vector").slice(1, 0, pooled)}};
  for (auto& named : sdxl.image_conditioning(images)) c.push_back(named);
  NoisedBatch batch{ref.at("unet.sample"), ref.at("unet.timesteps"), {}, {}};
  expect_close(GetParam() + " predict", sdxl.predict(batch, c), ref.at("unet.out"));
}

TEST_P(SdxlFamilyTest, LatentsAreTheVaeMeanTimesSdxlsScale) {
  torch::NoGradGuard no_grad;
  const Family& sdxl = family(GetParam());
  const at::Tensor image = at::rand({1, 3, 16, 16}) * 2 - 1;
  AutoencoderKL vae = std::static_pointer_cast<AutoencoderKLImpl>(sdxl.models().vae);
  const EncodedLatents latents = sdxl.latents_caching_strategy().encode(image, true, LatentSampling::mean);
  EXPECT_TRUE(at::allclose(latents.latents, vae->encode(image).mean * 0.13025));
  EXPECT_TRUE(at::allclose(latents.flipped, vae->encode(image.flip({3})).mean * 0.13025));
  EXPECT_EQ(sdxl.latents_caching_strategy().cache_suffix(), "_sdxl");
}

TEST_P(SdxlFamilyTest, CachedTextEncoderOutputsAreKohyasThree) {
  const Family& sdxl = family(GetParam());
  const TextEncoderOutputsCachingStrategy& caching = sdxl.text_encoder_outputs_caching_strategy();
  const NamedTensors stored = caching.outputs_to_cache({"a cat", "a dog!"}, false);
  std::vector<std::string> names;
  for (const auto& [name, t] : stored) names.push_back(name);
  EXPECT_EQ(names, (std::vector<std::string>{"hidden_state1", "hidden_state2", "pool2"}));
  const Conditioning back = caching.outputs_from_cache(stored);
  for (size_t i = 0; i < stored.size(); ++i) EXPECT_TRUE(at::equal(back[i].second, stored[i].second));
  EXPECT_THROW(caching.outputs_from_cache({stored[0]}), Error);
}

// kohya's SDXL sample images against diffusers' StableDiffusionXLPipeline run with kohya's schedulers, conditioning,
// seed and size (gen_sdxl_fixtures.py): 4 steps at guidance 7.5 amplify the models' ~1e-6 fp32 differences a little,
// so each pixel may differ by one level of 255.
TEST_P(SdxlFamilyTest, SampleImageMatchesDiffusersSdxlPipeline) {
  auto ref = reference(GetParam());
  for (const auto& [sampler, seed, negative] :
       {std::tuple<std::string, uint64_t, std::string>{"ddim", 11, ""}, {"euler_a", 12, "blurry"}}) {
    SampleOptions options;
    options.prompt = "a red square";
    options.negative_prompt = negative;
    options.sampler = sampler;
    options.steps = 4;
    options.scale = 7.5;
    options.seed = seed;
    options.width = 64;
    options.height = 72;
    testing_support::expect_image_within_one_level(family(GetParam()).sample(options), ref.at("sample." + sampler),
                                                   GetParam() + " " + sampler + " sample");
  }
}

INSTANTIATE_TEST_SUITE_P(Sdxl, SdxlFamilyTest, ::testing::Values("sdxl_a", "sdxl_b"));

// kohya's SdxlTokenizeStrategy: the second tokenizer pads with id 0 where the first pads with EOS, and a "!" in a
// caption stays the word "!</w>" for both (pad_token_id = 0 changes only the padding).
TEST(SdxlTokenize, SecondTokenizerPadsWithZeroAndKeepsExclamationMarks) {
  const Tokens tokens = family("sdxl_a").tokenize_strategy().tokenize({"hi!"}, false);
  ASSERT_EQ(tokens.ids.size(), 2u);
  const at::Tensor first = tokens.ids[0][0][0], second = tokens.ids[1][0][0];  // (77)
  // BOS h i !</w> EOS: the fixture vocabulary has one id per byte, "!</w>" is 256.
  EXPECT_EQ(first.slice(0, 0, 5).equal(second.slice(0, 0, 5)), true);
  EXPECT_EQ(first[3].item<int64_t>(), 256);
  EXPECT_EQ(first[5].item<int64_t>(), 999);   // EOS padding
  EXPECT_EQ(second[5].item<int64_t>(), 0);    // id 0 padding
}

// The names and block indices of kohya's networks/lora.py for SDXL, in its creation order (which decides the initial
// weights drawn and the order of parameter groups), from kohya's full-size U-Net: here a narrow U-Net of the same
// structure (widths doubling at levels 1 and 2, transformer depths 2 and 10) with sdxl_b's text encoders.
TEST(SdxlNetworkTargets, NamesBlocksAndOrderAreKohyas) {
  const nlohmann::json kohya = testing_support::read_json(kFixtures + "lora_names.json");
  UNetConfig config = UNetConfig::sdxl();
  config.block_out_channels = {8, 16, 32};
  config.num_heads = {1, 1, 1};
  config.norm_num_groups = 4;
  config.cross_attention_dim = 8;
  config.vector_conditioning_dim = 8;
  const UNet2DConditionModel unet(config);
  const ModelBundle& tiny = family("sdxl_b").models();
  const ClipTextModel te1 = std::static_pointer_cast<ClipTextModelImpl>(tiny.text_encoders.at(0));
  const ClipTextModel te2 = std::static_pointer_cast<ClipTextModelImpl>(tiny.text_encoders.at(1));
  for (const auto& [key, conv] : {std::pair<std::string, bool>{"linear", false}, {"conv", true}}) {
    const std::vector<NetworkTarget> targets = sdxl_network_targets(te1, te2, unet, conv);
    for (size_t i = 0; i < std::min(targets.size(), kohya[key].size()); ++i) {
      ASSERT_EQ(targets[i].lora_name, kohya[key][i][0].get<std::string>()) << key << " #" << i;
      EXPECT_EQ(targets[i].block, kohya[key][i][1].get<int>()) << targets[i].lora_name;
    }
    EXPECT_EQ(targets.size(), kohya[key].size()) << key;
  }
}

// A LoRA kohya's networks/lora.py made on sdxl_a (gen_sdxl_fixtures.py, conv LoRA included) loads into sdt's network
// with every key used, gives kohya's outputs with it applied (fp32, 1e-4 of their scale as the models' conformance),
// and sdt saves back the very tensors kohya saved: kohya's loader takes sdt's files as its own.
TEST(SdxlLora, KohyasFileLoadsGivesKohyasOutputsAndSavesBackTheSame) {
  torch::NoGradGuard no_grad;
  auto ref = reference("sdxl_a");
  const std::unique_ptr<Family> sdxl = load_family("sdxl", tiny_options("sdxl_a"));  // its own: the LoRA patches it
  const std::string kohya_file = kFixtures + "lora_kohya.safetensors";
  const LoRANetworkConfig config =
      parse_lora_network_args(4, 2.0, std::nullopt, {"conv_dim=2", "conv_alpha=1"}, NetworkBlockLayout::sdxl());
  LoRANetwork network(config, sdxl->network_targets(config.adapts_conv_blocks()), true, true,
                      at::make_generator<at::CPUGeneratorImpl>(1));
  testing_support::expect_loads_every_key(network, kohya_file);
  network->eval();

  const ModelBundle& m = sdxl->models();
  ClipTextModel te1 = std::static_pointer_cast<ClipTextModelImpl>(m.text_encoders.at(0));
  ClipTextModel te2 = std::static_pointer_cast<ClipTextModelImpl>(m.text_encoders.at(1));
  UNet2DConditionModel unet = std::static_pointer_cast<UNet2DConditionModelImpl>(m.denoiser);
  expect_close("kohya LoRA te1 hidden_11", te1->forward(ref.at("te.ids1").reshape({-1, 77})).hidden_states[11],
               ref.at("kohya_lora.te1_hidden_11"));
  expect_close("kohya LoRA te2 text_embeds", te2->forward(ref.at("te.ids2").reshape({-1, 77})).text_embeds,
               ref.at("kohya_lora.te2_text_embeds"));
  const at::Tensor unet_out = unet->forward(ref.at("unet.sample"), ref.at("unet.timesteps"), ref.at("unet.context"), ref.at("unet.vector"));
  expect_close("kohya LoRA unet", unet_out, ref.at("kohya_lora.unet_out"));
  // The LoRA changes the outputs by far more than that, so a module left out cannot pass unnoticed.
  for (const auto& [with, without] : {std::pair{"kohya_lora.unet_out", "unet.out"}, {"kohya_lora.te1_hidden_11", "te1.hidden_11"},
                                      {"kohya_lora.te2_text_embeds", "te2.text_embeds"}}) {
    EXPECT_GT(((ref.at(with) - ref.at(without)).abs().max() / ref.at(without).abs().max()).item<double>(), 1e-2) << with;
  }

  testing_support::expect_saves_back_the_same_tensors(network, kohya_file);
}

// Other trainers write SDXL LoRAs under the diffusers U-Net's module paths (`lora_unet_down_blocks_1_attentions_0_...`);
// kohya renames them to its SGM names on loading (convert_diffusers_to_sai_if_needed), and sdt reads them so: each
// U-Net target's other name is the one kohya maps to its name, and kohya's file with its U-Net keys so renamed loads
// and gives kohya's outputs.
TEST(SdxlLora, DiffusersNamedFilesLoadAsKohyaRenamesThem) {
  torch::NoGradGuard no_grad;
  const nlohmann::json kohya_names = testing_support::read_json(kFixtures + "lora_diffusers_names.json");  // -> SGM name
  const std::unique_ptr<Family> sdxl = load_family("sdxl", tiny_options("sdxl_a"));
  const std::vector<NetworkTarget> targets = sdxl->network_targets(true);
  std::map<std::string, std::string> to_diffusers;
  for (const NetworkTarget& t : targets) {
    if (!t.in_denoiser) continue;
    ASSERT_TRUE(kohya_names.contains(t.other_name)) << t.other_name;
    EXPECT_EQ(kohya_names[t.other_name].get<std::string>(), t.lora_name);
    to_diffusers[t.lora_name] = t.other_name;
  }

  safetensors::File kohya(kFixtures + "lora_kohya.safetensors");
  NamedTensors renamed;
  for (const auto& info : kohya.tensors()) {
    const size_t dot = info.name.find('.');
    const auto it = to_diffusers.find(info.name.substr(0, dot));
    renamed.emplace_back(it == to_diffusers.end() ? info.name : it->second + info.name.substr(dot), load_tensor(kohya, info.name));
  }
  const std::string file = ::testing::TempDir() + "/sdxl_lora_diffusers_names.safetensors";
  save_safetensors(file, renamed, {});
  const LoRANetworkConfig config =
      parse_lora_network_args(4, 2.0, std::nullopt, {"conv_dim=2", "conv_alpha=1"}, NetworkBlockLayout::sdxl());
  LoRANetwork network(config, targets, true, true, at::make_generator<at::CPUGeneratorImpl>(1));
  const LoadResult loaded = network->load_weights(file);
  EXPECT_TRUE(loaded.missing.empty() && loaded.unexpected.empty()) << loaded.missing.size() << " missing, " << loaded.unexpected.size() << " unexpected";
  network->eval();
  auto ref = reference("sdxl_a");
  UNet2DConditionModel unet = std::static_pointer_cast<UNet2DConditionModelImpl>(sdxl->models().denoiser);
  expect_close("diffusers-named kohya LoRA unet", unet->forward(ref.at("unet.sample"), ref.at("unet.timesteps"), ref.at("unet.context"), ref.at("unet.vector")),
               ref.at("kohya_lora.unet_out"));
  std::filesystem::remove(file);
}

// kohya's sdxl_merge_lora.py: the same file merged into the weights (ratio 1) gives the outputs of the applied LoRA,
// to fp32 rounding of the merged weights.
TEST(SdxlLora, MergedIntoTheModelGivesTheOutputsOfTheAppliedLora) {
  torch::NoGradGuard no_grad;
  auto ref = reference("sdxl_a");
  const std::unique_ptr<Family> sdxl = load_family("sdxl", tiny_options("sdxl_a"));
  const std::vector<std::string> skipped =
      merge_loras_into_targets(sdxl->network_targets(true), {kFixtures + "lora_kohya.safetensors"}, {1.0}, at::kFloat);
  EXPECT_TRUE(skipped.empty()) << skipped.size() << " keys skipped, first " << skipped.front();
  const ModelBundle& m = sdxl->models();
  UNet2DConditionModel unet = std::static_pointer_cast<UNet2DConditionModelImpl>(m.denoiser);
  ClipTextModel te2 = std::static_pointer_cast<ClipTextModelImpl>(m.text_encoders.at(1));
  expect_close("merged kohya LoRA unet", unet->forward(ref.at("unet.sample"), ref.at("unet.timesteps"), ref.at("unet.context"), ref.at("unet.vector")),
               ref.at("kohya_lora.unet_out"));
  expect_close("merged kohya LoRA te2 text_embeds", te2->forward(ref.at("te.ids2").reshape({-1, 77})).text_embeds,
               ref.at("kohya_lora.te2_text_embeds"));
}

// kohya's block-wise network args on SDXL's 23 blocks (presets over 9 down and up blocks, 3 mid, the outer two at 1,
// the zero threshold removing blocks), from networks/lora.py itself.
TEST(SdxlLora, BlockListsAreKohyasFor23Blocks) {
  const nlohmann::json kohya = testing_support::read_json(kFixtures + "lora_block_lists.json");
  std::vector<std::string> args;
  for (const auto& [key, value] : kohya["network_args"].items()) args.push_back(key + "=" + value.get<std::string>());
  const LoRANetworkConfig c = parse_lora_network_args(4, 1.0, std::nullopt, args, NetworkBlockLayout::sdxl());
  ASSERT_TRUE(c.block_lr_weight && c.block_dims && c.block_alphas && c.conv_block_dims && c.conv_block_alphas);
  const auto expect_doubles = [](const std::vector<double>& ours, const nlohmann::json& theirs, const char* what) {
    ASSERT_EQ(ours.size(), theirs.size()) << what;
    for (size_t i = 0; i < ours.size(); ++i) EXPECT_NEAR(ours[i], theirs[i].get<double>(), 1e-12) << what << "[" << i << "]";
  };
  expect_doubles(*c.block_lr_weight, kohya["block_lr_weight"], "block_lr_weight");
  expect_doubles(*c.block_alphas, kohya["block_alphas"], "block_alphas");
  expect_doubles(*c.conv_block_alphas, kohya["conv_block_alphas"], "conv_block_alphas");
  EXPECT_EQ(*c.block_dims, kohya["block_dims"].get<std::vector<int64_t>>());
  EXPECT_EQ(*c.conv_block_dims, kohya["conv_block_dims"].get<std::vector<int64_t>>());
  std::string sd_lists = "4";  // SD's 25 values
  for (int i = 1; i < 25; ++i) sd_lists += ",4";
  try {
    parse_lora_network_args(4, 1.0, std::nullopt, {"block_dims=" + sd_lists}, NetworkBlockLayout::sdxl());
    ADD_FAILURE() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("25 values given, expected 23 (kohya's SDXL block layout)"), std::string::npos) << e.what();
  }
}

TEST(SdxlFamilyRegistry, RecognisesBothLayoutsAndRefusesV2) {
  EXPECT_EQ(family_of_checkpoint(std::nullopt, kFixtures + "sdxl_a"), "sdxl");
  EXPECT_EQ(family_of_checkpoint(std::nullopt, kFixtures + "sdxl_a/model_sgm.safetensors"), "sdxl");
  EXPECT_EQ(family_of_checkpoint(std::nullopt, SDT_FIXTURES "/sd/sd1"), "sd");
  FamilyOptions options = tiny_options("sdxl_a");
  options.v2 = true;
  EXPECT_THROW(load_family("sdxl", options), Error);
}

TEST(SdxlFamilyRegistry, MetadataIsKohyasForSdxl) {
  const Family& sdxl = family("sdxl_a");
  EXPECT_EQ(sdxl.training_metadata().at("ss_base_model_version"), "sdxl_base_v1-0");
  EXPECT_EQ(sdxl.model_spec().architecture, "stable-diffusion-xl-v1-base");
  EXPECT_EQ(sdxl.model_spec().native_resolution, 1024);
  EXPECT_EQ(sdxl.network_config(TrainArgs{}).blocks.total(), 23);
}

}  // namespace
}  // namespace sdt
