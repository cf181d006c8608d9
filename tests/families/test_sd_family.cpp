// The family registry and the SD 1.x / 2.x strategies on the tiny fixture models (tests/fixtures/sd), with a CLIP
// vocabulary whose ids fit their 1000-token text encoders (tests/fixtures/sd/sampling/tokenizer); and `sdt sample`
// end to end.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>

#include <ATen/CPUGeneratorImpl.h>
#include <opencv2/imgcodecs.hpp>

#include "src/core/error.h"
#include "src/core/tensor_io.h"
#include "src/families/family.h"
#include "src/models/sd_checkpoint.h"
#include "src/networks/merge.h"
#include "src/families/sd/sd_family.h"
#include "tests/models/compare.h"

namespace sdt {
namespace {

using testing_support::expect_close;

const std::string kFixtures = SDT_FIXTURES "/sd/";

FamilyOptions tiny_options(bool v2, std::optional<int> max_token_length = std::nullopt) {
  FamilyOptions options;
  options.pretrained_model_name_or_path = kFixtures + (v2 ? "sd2" : "sd1");
  options.tokenizer = kFixtures + "sampling/tokenizer";
  options.v2 = v2;
  options.max_token_length = max_token_length;
  return options;
}

// One loaded family per configuration, shared by the tests.
const Family& family(bool v2, std::optional<int> max_token_length = std::nullopt) {
  static std::map<std::pair<bool, int>, std::unique_ptr<Family>> cache;
  auto& slot = cache[{v2, max_token_length.value_or(0)}];
  if (!slot) slot = load_family("sd", tiny_options(v2, max_token_length));
  return *slot;
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

// ~230 characters: one id per character with the byte-level fixture vocabulary, so 75, 150 and 225 all truncate.
const std::string kLongCaption =
    "a watercolor painting of a lighthouse on a rocky coast at dusk, waves breaking, gulls in a pale sky, warm light "
    "in the lantern room, a small boat with a red sail near the shore, fishermen on the pier, mist over the far hills";

TEST(FamilyRegistry, FindsSdByNameAndHandsOutItsModels) {
  const std::vector<std::string> names = family_names();
  EXPECT_NE(std::find(names.begin(), names.end(), "sd"), names.end());
  const ModelBundle& models = family(false).models();
  EXPECT_NE(std::dynamic_pointer_cast<UNet2DConditionModelImpl>(models.denoiser), nullptr);
  EXPECT_NE(std::dynamic_pointer_cast<AutoencoderKLImpl>(models.vae), nullptr);
  ASSERT_EQ(models.text_encoders.size(), 1u);
  EXPECT_NE(std::dynamic_pointer_cast<ClipTextModelImpl>(models.text_encoders[0]), nullptr);
}

TEST(FamilyRegistry, UnknownNameIsAnErrorListingTheKnownOnes) {
  const std::string message = error_of([] { load_family("sd3", tiny_options(false)); });
  EXPECT_NE(message.find("unknown family 'sd3': this build has flux, sd, sdxl"), std::string::npos) << message;
}

// The family comes from the checkpoint (its tensor names, or its diffusers U-Net config) unless --family names it.
TEST(FamilyRegistry, RecognisesSdCheckpointsAndNamesTheFamilyOtherwise) {
  EXPECT_EQ(family_of_checkpoint(std::nullopt, SDT_FIXTURES "/sd/sd1"), "sd") << "a diffusers folder";
  EXPECT_EQ(family_of_checkpoint(std::nullopt, SDT_FIXTURES "/sd/sd1/model_ldm.safetensors"), "sd") << "an LDM single file";
  EXPECT_EQ(family_of_checkpoint(std::string("sd"), SDT_FIXTURES "/networks/lora_sd1.safetensors"), "sd") << "--family wins";
  std::string message = error_of([] { family_of_checkpoint(std::nullopt, SDT_FIXTURES "/networks/lora_sd1.safetensors"); });
  EXPECT_NE(message.find("no model family of this build (flux, sd, sdxl) recognises it"), std::string::npos) << message;
  EXPECT_NE(message.find("--family"), std::string::npos) << message;
  message = error_of([] { family_of_checkpoint(std::string("sd3"), SDT_FIXTURES "/sd/sd1"); });
  EXPECT_NE(message.find("unknown family 'sd3': this build has flux, sd, sdxl"), std::string::npos) << message;
  message = error_of([] { family_of_checkpoint(std::nullopt, SDT_FIXTURES "/sd/no_such_model"); });
  EXPECT_NE(message.find("no such checkpoint file or diffusers folder"), std::string::npos) << message;
}

// What kohya's train_network.py writes about the base model, and what decides the text encoder's outputs.
TEST(SdFamilyTraining, BaseModelMetadataAndTextEncoderSettingsAreKohyas) {
  const Family& sd1 = family(false);
  EXPECT_EQ(sd1.training_metadata().at("ss_v2"), "False");
  EXPECT_EQ(sd1.training_metadata().at("ss_base_model_version"), "sd_v1");
  EXPECT_EQ(sd1.text_encoder_settings(), "v2=false clip_skip=none max_token_length=75");
  const Family& sd2 = family(true, 225);
  EXPECT_EQ(sd2.training_metadata().at("ss_v2"), "True");
  EXPECT_EQ(sd2.training_metadata().at("ss_base_model_version"), "sd_v2_512");
  EXPECT_EQ(sd2.text_encoder_settings(), "v2=true clip_skip=none max_token_length=225");
  EXPECT_FALSE(sd1.parallel_plan().no_block_swap_reason.empty());
  EXPECT_EQ(sd1.parallel_plan().blocks.size(), std::dynamic_pointer_cast<UNet2DConditionModelImpl>(sd1.models().denoiser)->blocks().size());
}

TEST(SdFamilyLoading, VocabularyTooLargeForTheTextEncoderIsAnError) {
  FamilyOptions options = tiny_options(false);
  options.tokenizer = SDT_FIXTURES "/../../data/tokenizers/clip/bpe_simple_vocab_16e6.txt.gz";
  const std::string message = error_of([&] { load_family("sd", options); });
  EXPECT_NE(message.find("the tokenizer's ids reach 49407 but the text encoder has 1000 tokens"), std::string::npos)
      << message;
}

// Token windows and encoded shapes for max_token_length 75 (none), 150 and 225, SD 1.x and 2.x.
class SdTokensAndEncoding : public ::testing::TestWithParam<std::tuple<bool, int>> {};

TEST_P(SdTokensAndEncoding, WindowsAndStitchedHiddenStatesHaveKohyasShapes) {
  const auto [v2, max_token_length] = GetParam();
  const Family& sd = family(v2, max_token_length == 75 ? std::nullopt : std::optional<int>(max_token_length));
  const int64_t windows = max_token_length / 75;
  const Tokens tokens = sd.tokenize_strategy().tokenize({"a cat", kLongCaption}, false);
  ASSERT_EQ(tokens.ids.size(), 1u);
  EXPECT_TRUE(tokens.weights.empty());
  EXPECT_EQ(tokens.ids[0].sizes(), at::IntArrayRef({2, windows, 77}));
  const int64_t bos = 998, eos = 999, pad = v2 ? 0 : eos;
  // Every window starts with BOS; the short caption's first window is BOS, a</w>, c, a, t</w>, EOS, then padding.
  EXPECT_TRUE(at::all(tokens.ids[0].select(2, 0) == bos).item<bool>());
  EXPECT_EQ(tokens.ids[0][0][0][5].item<int64_t>(), eos);
  EXPECT_EQ(tokens.ids[0][0][0][76].item<int64_t>(), pad);

  torch::NoGradGuard no_grad;
  const Conditioning conditioning = sd.text_encoding_strategy().encode(tokens);
  ASSERT_EQ(conditioning.size(), 1u);
  const at::Tensor& hidden = conditioning_tensor(conditioning, "hidden_state");
  EXPECT_EQ(hidden.sizes(), at::IntArrayRef({2, windows == 1 ? 77 : 2 + 75 * windows, 32}));
  // The windows are encoded on their own: the first window's states are the text encoder's on that window alone.
  auto text_encoder = std::dynamic_pointer_cast<ClipTextModelImpl>(sd.models().text_encoders[0]);
  const at::Tensor first_window = text_encoder->encode(tokens.ids[0].select(1, 0));  // (2, 77, D)
  EXPECT_TRUE(at::allclose(hidden.slice(1, 0, 76), first_window.slice(1, 0, 76), 1e-5, 1e-6));
}

INSTANTIATE_TEST_SUITE_P(MaxTokenLength, SdTokensAndEncoding,
                         ::testing::Combine(::testing::Bool(), ::testing::Values(75, 150, 225)),
                         [](const ::testing::TestParamInfo<std::tuple<bool, int>>& info) {
                           return std::string(std::get<0>(info.param) ? "sd2_" : "sd1_") +
                                  std::to_string(std::get<1>(info.param));
                         });

TEST(SdTextEncoding, CaptionWeightsScaleTheirTokensHiddenStates) {
  const Family& sd = family(false, 150);
  const Tokens weighted = sd.tokenize_strategy().tokenize({"a (cat:1.5) on a mat"}, true);
  ASSERT_EQ(weighted.weights.size(), 1u);
  EXPECT_EQ(weighted.weights[0].sizes(), weighted.ids[0].sizes());
  // BOS, a</w>, then c, a, t</w> at weight 1.5 (the fixture vocabulary has one id per byte).
  const at::Tensor w = weighted.weights[0][0][0];
  EXPECT_FLOAT_EQ(w[4].item<float>(), 1.5f);
  EXPECT_FLOAT_EQ(w[0].item<float>(), 1.0f);

  torch::NoGradGuard no_grad;
  const at::Tensor scaled = conditioning_tensor(sd.text_encoding_strategy().encode(weighted), "hidden_state");  // (1, 152, D)
  const at::Tensor plain = conditioning_tensor(sd.text_encoding_strategy().encode(Tokens{weighted.ids, {}}), "hidden_state");
  // Stitched position p of window 0 is that window's id p: the weights apply there, nowhere else changes.
  const at::Tensor expected_scale = at::cat({at::ones({1}), weighted.weights[0][0][0].slice(0, 1, 76),
                                             weighted.weights[0][0][1].slice(0, 1, 76), at::ones({1})});
  EXPECT_TRUE(at::allclose(scaled, plain * expected_scale.reshape({1, -1, 1}), 1e-6, 1e-7));
}

TEST(SdLatentsCaching, MeanTimesScalingFactorMatchesDiffusersAndFlipEncodesTheMirroredImages) {
  torch::NoGradGuard no_grad;
  const Family& sd = family(false);
  const LatentsCachingStrategy& caching = sd.latents_caching_strategy();
  safetensors::File file(kFixtures + "sd1/reference.safetensors");
  const at::Tensor image = load_tensor(file, "vae.image").clone();  // (2, 3, 32, 32)

  const EncodedLatents latents = caching.encode(image, true, LatentSampling::mean);
  expect_close("latents = vae mean x 0.18215", latents.latents, load_tensor(file, "vae.mean") * 0.18215);
  auto vae = std::dynamic_pointer_cast<AutoencoderKLImpl>(sd.models().vae);
  EXPECT_TRUE(at::equal(latents.flipped, vae->encode(image.flip({3})).mean * 0.18215));

  const EncodedLatents sampled =
      caching.encode(image, false, LatentSampling::sample, at::make_generator<at::CPUGeneratorImpl>(7));
  expect_close("latents = vae sample (seed 7) x 0.18215", sampled.latents,
               load_tensor(file, "vae.sample_seed_7") * 0.18215);
  EXPECT_FALSE(sampled.flipped.defined());
}

TEST(SdLatentsCaching, CacheLayoutFollowsTheBucketAndFlip) {
  const LatentsCachingStrategy& caching = family(false).latents_caching_strategy();
  EXPECT_EQ(caching.cache_suffix(), "_sd");
  // The tiny VAE has 2 pixels per latent (SD's has 8).
  const LatentsCacheLayout flipped = caching.cache_layout(32, 24, true);
  EXPECT_EQ(flipped.latents_key, "latents");
  EXPECT_EQ(flipped.flipped_key, "latents_flipped");
  EXPECT_EQ(flipped.shape, (std::vector<int64_t>{4, 12, 16}));
  EXPECT_EQ(caching.cache_layout(32, 24, false).flipped_key, "");
  const std::string message = error_of([&] { caching.cache_layout(33, 24, false); });
  EXPECT_NE(message.find("bucket 33x24: expected positive sides that are multiples of the VAE's 2 pixels"),
            std::string::npos)
      << message;
}

TEST(SdTextEncoderOutputsCaching, StoresTheEncodedHiddenStatesAndGivesThemBack) {
  const Family& sd = family(false, 150);
  const TextEncoderOutputsCachingStrategy& caching = sd.text_encoder_outputs_caching_strategy();
  EXPECT_EQ(caching.cache_suffix(), "_sd_te");
  const NamedTensors stored = caching.outputs_to_cache({"a cat", "a dog"}, false);
  ASSERT_EQ(stored.size(), 1u);
  EXPECT_EQ(stored[0].first, "hidden_state");
  torch::NoGradGuard no_grad;
  const at::Tensor encoded =
      conditioning_tensor(sd.text_encoding_strategy().encode(sd.tokenize_strategy().tokenize({"a cat", "a dog"}, false)), "hidden_state");
  EXPECT_TRUE(at::equal(stored[0].second, encoded));
  EXPECT_TRUE(at::equal(conditioning_tensor(caching.outputs_from_cache(stored), "hidden_state"), encoded));
  const std::string message = error_of([&] { caching.outputs_from_cache({}); });
  EXPECT_NE(message.find("no 'hidden_state'"), std::string::npos) << message;
}

TEST(SdSample, ImageHasTheRoundedSizeAndTheSeedFixesIt) {
  const Family& sd = family(false);
  SampleOptions options;
  options.prompt = "a (red:1.2) boat";
  options.negative_prompt = "blurry";
  options.sampler = "euler_a";
  options.steps = 3;
  options.seed = 5;
  options.width = 70;  // rounded down to 64
  options.height = 64;
  const at::Tensor image = sd.sample(options);
  EXPECT_EQ(image.sizes(), at::IntArrayRef({64, 64, 3}));
  EXPECT_EQ(image.scalar_type(), at::kByte);
  EXPECT_TRUE(at::equal(sd.sample(options), image));
  options.seed = 6;
  EXPECT_FALSE(at::equal(sd.sample(options), image));
}

// Runs a command line; returns its exit status and output (stdout and stderr).
std::pair<int, std::string> run(const std::string& command) {
  std::string output;
  FILE* pipe = popen((command + " 2>&1").c_str(), "r");
  char buffer[4096];
  while (size_t n = fread(buffer, 1, sizeof(buffer), pipe)) output.append(buffer, n);
  const int status = pclose(pipe);
  return {WEXITSTATUS(status), output};
}

TEST(SampleCommand, WritesAPngOfTheRequestedSize) {
  const std::filesystem::path folder = std::filesystem::temp_directory_path() / ("sdt_sample_" + std::to_string(getpid()));
  std::filesystem::create_directories(folder);
  const std::string output = (folder / "out.png").string();
  const std::string common = std::string(SDT_BINARY) + " sample --pretrained_model_name_or_path " + kFixtures +
                             "sd1 --tokenizer_vocab " + kFixtures + "sampling/tokenizer --prompt 'a red boat' ";
  const auto [status, printed] =
      run(common + "--negative_prompt blurry --sampler euler --steps 2 --seed 1 --width 72 --height 64 --output " + output);
  ASSERT_EQ(status, 0) << printed;
  const cv::Mat image = cv::imread(output, cv::IMREAD_UNCHANGED);
  ASSERT_FALSE(image.empty()) << printed;
  EXPECT_EQ(image.cols, 72);
  EXPECT_EQ(image.rows, 64);
  EXPECT_EQ(image.channels(), 3);
  EXPECT_FALSE(std::filesystem::exists(output + ".tmp"));

  const auto [bad_status, bad_printed] = run(common + "--sampler dpm_2 --output " + output);
  EXPECT_NE(bad_status, 0);
  EXPECT_NE(bad_printed.find("--sampler"), std::string::npos) << bad_printed;
  std::filesystem::remove_all(folder);
}

// `sdt merge-lora --sd_model` loads the checkpoint through the family that recognises it and writes the family's
// single-file checkpoint: the same weights as merging the LoRA into the loaded models directly.
TEST(MergeLoraCommand, MergesIntoTheCheckpointOfItsFamily) {
  const std::string lora = SDT_FIXTURES "/networks/lora_sd1.safetensors";
  const std::string output = (std::filesystem::temp_directory_path() / ("sdt_merge_" + std::to_string(getpid()) + ".safetensors")).string();
  const auto [status, printed] = run(std::string(SDT_BINARY) + " merge-lora --sd_model " + kFixtures + "sd1 --tokenizer " + kFixtures +
                                     "sampling/tokenizer --models " + lora + " --ratios 0.5 --save_to " + output);
  ASSERT_EQ(status, 0) << printed;
  SdModels expected = load_diffusers_folder(kFixtures + "sd1");
  merge_loras_into_targets(sd_network_targets(expected.text_encoder, expected.unet, true), {lora}, {0.5}, at::kFloat);
  const SdConfig config{false, expected.text_encoder->config, expected.vae->config, expected.unet->config};
  const SdModels written = load_ldm_checkpoint(output, config, at::kFloat);
  for (const auto& item : expected.unet->named_parameters()) {
    EXPECT_TRUE(at::equal(written.unet->named_parameters()[item.key()], item.value())) << item.key();
  }
  for (const auto& item : expected.text_encoder->named_parameters()) {
    EXPECT_TRUE(at::equal(written.text_encoder->named_parameters()[item.key()], item.value())) << item.key();
  }
  std::filesystem::remove(output);

  const auto [bad_status, bad_printed] = run(std::string(SDT_BINARY) + " merge-lora --models " + lora + " --ratios 1 --save_to " +
                                             output + " --v2");
  EXPECT_NE(bad_status, 0);
  EXPECT_NE(bad_printed.find("without --sd_model"), std::string::npos) << bad_printed;
}

}  // namespace
}  // namespace sdt
