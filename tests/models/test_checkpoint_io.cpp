// Loading SD weights from every layout users have, and saving back to the single-file LDM layout.
#include <gtest/gtest.h>

#include <filesystem>

#include <fstream>
#include <functional>

#include "src/core/error.h"
#include "src/core/tensor_io.h"
#include "src/models/sd_checkpoint.h"

namespace sdt {
namespace {

const std::string kFixtures = SDT_FIXTURES "/sd/";

// The architecture of the fixtures' models (gen_sd_fixtures.py), which single files do not record.
SdConfig fixture_config(bool v2) {
  SdConfig c;
  c.v2 = v2;
  c.text = read_clip_text_config(kFixtures + (v2 ? "sd2" : "sd1") + "/text_encoder/config.json");
  c.vae = read_vae_config(kFixtures + (v2 ? "sd2" : "sd1") + "/vae/config.json");
  c.unet = read_unet_config(kFixtures + (v2 ? "sd2" : "sd1") + "/unet/config.json");
  return c;
}

// Every parameter of `a` equals the same-named parameter of `b` (same names, same values); returns the count.
size_t expect_same_parameters(const torch::nn::Module& a, const torch::nn::Module& b, const std::string& what) {
  auto pa = a.named_parameters(), pb = b.named_parameters();
  EXPECT_EQ(pa.size(), pb.size()) << what;
  for (const auto& item : pa) {
    const at::Tensor* other = pb.find(item.key());
    if (other == nullptr) {
      ADD_FAILURE() << what << ": " << item.key() << " missing";
      continue;
    }
    EXPECT_TRUE(at::equal(item.value().to(at::kFloat), other->to(at::kFloat))) << what << ": " << item.key();
  }
  return pa.size();
}

void expect_same_models(const SdModels& a, const SdModels& b) {
  EXPECT_GT(expect_same_parameters(*a.text_encoder, *b.text_encoder, "text encoder"), 0u);
  EXPECT_GT(expect_same_parameters(*a.vae, *b.vae, "vae"), 0u);
  EXPECT_GT(expect_same_parameters(*a.unet, *b.unet, "unet"), 0u);
}

// A copy of `from` with keys renamed (or dropped, when `rename` returns "") and tensors added.
std::string rewrite(const std::string& from, const std::string& name, const std::function<std::string(const std::string&)>& rename,
                    const NamedTensors& extra = {}) {
  safetensors::File file(from);
  NamedTensors tensors = extra;
  for (const auto& info : file.tensors()) {
    const std::string key = rename(info.name);
    if (!key.empty()) tensors.emplace_back(key, load_tensor(file, info.name));
  }
  // Named after the source's folder too: the sd1 and sd2 cases run as parallel ctest processes.
  const std::string path = ::testing::TempDir() + std::filesystem::path(from).parent_path().filename().string() + "_" + name;
  save_safetensors(path, tensors);
  return path;
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return std::string(e.where()) + ": " + e.what();
  }
  return "";
}

bool starts_with(const std::string& s, const std::string& prefix) { return s.rfind(prefix, 0) == 0; }

class CheckpointIo : public ::testing::TestWithParam<bool> {
 protected:
  bool v2() const { return GetParam(); }
  std::string dir() const { return kFixtures + (v2() ? "sd2" : "sd1"); }
};

TEST_P(CheckpointIo, SingleFileLdmLoadEqualsDiffusersFolderLoad) {
  SdModels folder = load_diffusers_folder(dir());
  SdModels single = load_ldm_checkpoint(dir() + "/model_ldm.safetensors", fixture_config(v2()));
  expect_same_models(folder, single);
}

TEST_P(CheckpointIo, SavingToLdmAndLoadingAgainRoundTrips) {
  SdModels folder = load_diffusers_folder(dir());
  const std::string path = ::testing::TempDir() + (v2() ? "sd2" : "sd1") + "_saved.safetensors";
  save_ldm_checkpoint(path, folder, fixture_config(v2()), at::kHalf);
  expect_same_models(folder, load_ldm_checkpoint(path, fixture_config(v2())));

  // The saved file has the reference layout: every key and value the generator wrote (SD2's unused extra OpenCLIP
  // layer, projection and logit scale are made up on save, as kohya does, so only their presence is compared).
  safetensors::File saved(path), reference(dir() + "/model_ldm.safetensors");
  EXPECT_EQ(saved.tensors().size(), reference.tensors().size());
  for (const auto& info : reference.tensors()) {
    ASSERT_TRUE(saved.contains(info.name)) << info.name;
    EXPECT_EQ(saved.info(info.name).shape, info.shape) << info.name;
    const bool made_up = v2() && (info.name.find("resblocks.3.") != std::string::npos ||
                                  info.name.find("text_projection") != std::string::npos ||
                                  info.name.find("logit_scale") != std::string::npos);
    if (!made_up) {
      EXPECT_TRUE(at::equal(load_tensor(saved, info.name), load_tensor(reference, info.name))) << info.name;
    }
  }
}

TEST_P(CheckpointIo, LoadsIntoBf16WithoutChangingValuesBeyondRounding) {
  SdModels fp32 = load_diffusers_folder(dir(), at::kFloat);
  SdModels bf16 = load_ldm_checkpoint(dir() + "/model_ldm.safetensors", fixture_config(v2()), at::kBFloat16);
  for (const torch::nn::Module* m : {static_cast<torch::nn::Module*>(bf16.unet.get()), static_cast<torch::nn::Module*>(bf16.vae.get()),
                                     static_cast<torch::nn::Module*>(bf16.text_encoder.get())}) {
    for (const auto& p : m->parameters()) ASSERT_EQ(p.scalar_type(), at::kBFloat16);
  }
  auto expected = fp32.unet->named_parameters();
  for (const auto& item : bf16.unet->named_parameters()) {
    EXPECT_TRUE(at::equal(item.value(), expected[item.key()].to(at::kBFloat16))) << item.key();
  }
  // And the bf16 model runs.
  torch::NoGradGuard no_grad;
  at::Tensor out = bf16.unet->forward(at::randn({1, 4, 8, 8}, at::kBFloat16), at::tensor({10}), at::randn({1, 5, 32}, at::kBFloat16));
  EXPECT_EQ(out.scalar_type(), at::kBFloat16);
  EXPECT_TRUE(out.isfinite().all().item<bool>());
}

TEST_P(CheckpointIo, AMissingKeyIsAnErrorNamingItAndTheCount) {
  const std::string path = rewrite(dir() + "/model_ldm.safetensors", "missing.safetensors", [](const std::string& k) {
    return k.find("input_blocks.1.0.in_layers.0.") != std::string::npos ? "" : k;
  });
  const std::string message = error_of([&] { load_ldm_checkpoint(path, fixture_config(v2())); });
  EXPECT_NE(message.find(path), std::string::npos) << message;
  EXPECT_NE(message.find("2 missing keys"), std::string::npos) << message;
  EXPECT_NE(message.find("model.diffusion_model.input_blocks.1.0.in_layers.0.weight"), std::string::npos) << message;
}

TEST_P(CheckpointIo, AnUnexpectedKeyIsAnErrorButOtherTopLevelKeysAreNot) {
  const std::string source = dir() + "/model_ldm.safetensors";
  auto keep = [](const std::string& k) { return k; };
  // Schedule buffers and EMA weights live outside the three models' prefixes: not ours to complain about.
  const std::string fine = rewrite(source, "fine.safetensors", keep,
                                   {{"alphas_cumprod", at::ones({1000})}, {"model_ema.decay", at::ones({})}});
  EXPECT_NO_THROW(load_ldm_checkpoint(fine, fixture_config(v2())));

  const std::string bad = rewrite(source, "unexpected.safetensors", keep,
                                  {{"model.diffusion_model.input_blocks.99.0.weight", at::ones({2})}});
  const std::string message = error_of([&] { load_ldm_checkpoint(bad, fixture_config(v2())); });
  EXPECT_NE(message.find("1 unexpected keys (model.diffusion_model.input_blocks.99.0.weight)"), std::string::npos) << message;
}

TEST_P(CheckpointIo, AShapeMismatchNamesTheKeyAndBothShapes) {
  SdConfig wider = fixture_config(v2());
  wider.unet.block_out_channels = {8, 16, 24};
  const std::string message = error_of([&] { load_ldm_checkpoint(dir() + "/model_ldm.safetensors", wider); });
  EXPECT_NE(message.find("has shape"), std::string::npos) << message;
  EXPECT_NE(message.find("model.diffusion_model."), std::string::npos) << message;
}

TEST_P(CheckpointIo, ASeparateVaeLoadsFromEveryLayout) {
  SdModels folder = load_diffusers_folder(dir());
  const VaeConfig config = fixture_config(v2()).vae;
  // A VAE-only LDM file without the first_stage_model. prefix (as vae-ft-mse-840000 is), with the kl-f8 training
  // loss weights some such files carry.
  const std::string ldm_only = rewrite(dir() + "/model_ldm.safetensors", "vae_only.safetensors",
                                       [](const std::string& k) {
                                         return starts_with(k, "first_stage_model.") ? k.substr(18) : std::string();
                                       },
                                       {{"loss.logvar", at::zeros({})}});
  expect_same_parameters(*folder.vae, *load_vae(ldm_only, config), "vae from an LDM VAE-only file");
  expect_same_parameters(*folder.vae, *load_vae(dir() + "/model_ldm.safetensors", config), "vae from a full checkpoint");
  expect_same_parameters(*folder.vae, *load_vae(dir() + "/vae", config), "vae from a diffusers folder");
  expect_same_parameters(*folder.vae, *load_vae(dir(), config), "vae from a pipeline folder");
  expect_same_parameters(*folder.vae, *load_vae(dir() + "/vae/diffusion_pytorch_model.safetensors", config),
                         "vae from a diffusers file");
  // diffusers < 0.17 names for the mid-block attention.
  const std::string old_names = rewrite(dir() + "/vae/diffusion_pytorch_model.safetensors", "vae_old_names.safetensors",
                                        [](std::string k) {
                                          for (const auto& [now, before] : std::vector<std::pair<std::string, std::string>>{
                                                   {".to_q.", ".query."}, {".to_k.", ".key."}, {".to_v.", ".value."}, {".to_out.0.", ".proj_attn."}}) {
                                            if (k.find(now) != std::string::npos) k.replace(k.find(now), now.size(), before);
                                          }
                                          return k;
                                        });
  expect_same_parameters(*folder.vae, *load_vae(old_names, config), "vae with diffusers < 0.17 attention names");
}

INSTANTIATE_TEST_SUITE_P(Sd, CheckpointIo, ::testing::Values(false, true),
                         [](const auto& info) { return info.param ? "sd2" : "sd1"; });

TEST(CheckpointIoSd1, OldFilesWithoutTheTextModelLevelLoad) {
  const std::string old = rewrite(kFixtures + "sd1/model_ldm.safetensors", "sd1_old_clip.safetensors", [](const std::string& k) {
    const std::string infix = "cond_stage_model.transformer.text_model.";
    return starts_with(k, infix) ? "cond_stage_model.transformer." + k.substr(infix.size()) : k;
  }, {{"cond_stage_model.transformer.embeddings.position_ids", at::arange(77).unsqueeze(0)}});
  SdModels models = load_ldm_checkpoint(old, fixture_config(false));
  expect_same_parameters(*load_diffusers_folder(kFixtures + "sd1").text_encoder, *models.text_encoder, "text encoder");
}

TEST(CheckpointIoSd1, TextEncoderFilesWrittenByTransformers5WithoutTheTextModelLevelLoad) {
  const std::string flat = rewrite(kFixtures + "sd1/text_encoder/model.safetensors", "te_flat.safetensors",
                                   [](const std::string& k) { return k.substr(std::string("text_model.").size()); });
  ClipTextModel text(read_clip_text_config(kFixtures + "sd1/text_encoder/config.json"));
  load_clip_weights(text, safetensors::File(flat), ClipLayout::transformers, "");
  expect_same_parameters(*load_diffusers_folder(kFixtures + "sd1").text_encoder, *text, "text encoder");
}

TEST(CheckpointIoSd1, TheWrongVersionForTheTextEncoderLayoutIsAnError) {
  const std::string message = error_of([] { load_ldm_checkpoint(kFixtures + "sd2/model_ldm.safetensors", fixture_config(false)); });
  EXPECT_NE(message.find("pass --v2"), std::string::npos) << message;
}

TEST(ModelConfigs, UnsupportedDiffusersSettingsAreErrors) {
  const std::string path = ::testing::TempDir() + "unet_config.json";
  std::ofstream(path) << R"({"block_out_channels": [8, 16], "class_embed_type": "timestep"})";
  const std::string message = error_of([&] { read_unet_config(path); });
  EXPECT_NE(message.find("class_embed_type"), std::string::npos) << message;
}

TEST(ModelConfigs, DiffusersHeadCountsAreReadPerLevel) {
  const UNetConfig sd2 = read_unet_config(kFixtures + "sd2/unet/config.json");
  EXPECT_EQ(sd2.num_heads, (std::vector<int64_t>{1, 2, 4}));
  EXPECT_TRUE(sd2.use_linear_projection);
  EXPECT_EQ(sd2.down_attention, (std::vector<bool>{true, true, false}));
  EXPECT_EQ(sd2.up_attention, (std::vector<bool>{false, true, true}));
  const UNetConfig sd1 = read_unet_config(kFixtures + "sd1/unet/config.json");
  EXPECT_EQ(sd1.num_heads, (std::vector<int64_t>{2, 2, 2}));
  EXPECT_FALSE(sd1.use_linear_projection);
}

}  // namespace
}  // namespace sdt
