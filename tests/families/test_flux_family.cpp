// The FLUX.1 family on the tiny fixture models (tests/fixtures/flux/tiny, made by gen_flux_fixtures.py with kohya's own
// code): kohya's text conditioning with and without T5's mask, its sample images (FLUX and Chroma), its lora_flux module
// names and network arguments (split_qkv included), LoRA files kohya wrote (loaded, merged, saved back) and its
// ai-toolkit conversion, the latents' shift and scale under kohya's size keys, the block-swap split, the registry's
// recognition of files and diffusers folders, metadata.
#include <gtest/gtest.h>

#include <ATen/CPUGeneratorImpl.h>
#include <nlohmann/json.hpp>

#include "src/core/error.h"
#include "src/core/tensor_io.h"
#include "src/families/family.h"
#include "src/families/flux/flux_family.h"
#include "src/families/flux/flux_lora_format.h"
#include "src/networks/lora.h"
#include "src/networks/merge.h"
#include "tests/fixture_files.h"
#include "tests/models/compare.h"
#include "tests/networks/kohya_file_checks.h"

namespace sdt {
namespace {

using testing_support::expect_close;

const std::string kTiny = SDT_FIXTURES "/flux/tiny/";

FamilyOptions tiny_options(bool apply_t5_attn_mask = false) {
  FamilyOptions options;
  options.pretrained_model_name_or_path = kTiny + "transformer.safetensors";
  options.clip_l = SDT_FIXTURES "/sd/sd1/text_encoder";
  options.t5xxl = kTiny + "t5";
  options.ae = kTiny + "ae";
  options.tokenizer = SDT_FIXTURES "/sd/sampling/tokenizer";  // byte-level: its ids fit the tiny CLIP-L
  options.t5xxl_max_token_length = 16;
  options.apply_t5_attn_mask = apply_t5_attn_mask;
  return options;
}

const Family& family(bool apply_t5_attn_mask) {
  static std::unique_ptr<Family> plain = load_family("flux", tiny_options(false)), masked = load_family("flux", tiny_options(true));
  return apply_t5_attn_mask ? *masked : *plain;
}

const std::map<std::string, at::Tensor>& reference() {
  static const auto tensors = testing_support::read_tensors(kTiny + "reference.safetensors");
  return tensors;
}

nlohmann::json reference_metadata(const char* key) {
  return nlohmann::json::parse(safetensors::File(kTiny + "reference.safetensors").metadata().at(key));
}

// kohya's FluxTextEncodingStrategy on the same captions (its tokenizers' ids, T5 with 16 tokens), fp32: the same
// layers in the same order; 1e-5 of the outputs' scale.
TEST(FluxFamily, TextConditioningMatchesKohyaWithAndWithoutT5sMask) {
  torch::NoGradGuard no_grad;
  const auto captions = reference_metadata("captions").get<std::vector<std::string>>();
  for (bool masked : {false, true}) {
    const Family& f = family(masked);
    const Conditioning c = f.text_encoding_strategy().encode(f.tokenize_strategy().tokenize(captions, false));
    expect_close("l_pooled", conditioning_tensor(c, "l_pooled"), reference().at("text.l_pooled"), 1e-5);
    expect_close(masked ? "t5_out with the mask" : "t5_out", conditioning_tensor(c, "t5_out"),
                 reference().at(masked ? "text.t5_out_masked" : "text.t5_out"), 1e-5);
    EXPECT_TRUE(at::equal(conditioning_tensor(c, "t5_attn_mask"), reference().at("text.t5_attn_mask")));
    EXPECT_TRUE(at::equal(conditioning_tensor(c, "txt_ids"), at::zeros({2, 16, 3})));
  }
  EXPECT_THROW(family(false).tokenize_strategy().tokenize({"a"}, true), Error);  // kohya's FLUX has no weighted captions
}

// A sample of the fixture's metadata (gen_flux_fixtures.py's SAMPLES) as `sdt sample` takes it.
SampleOptions sample_options(const nlohmann::json& s) {
  SampleOptions options;
  options.prompt = s["prompt"];
  options.negative_prompt = s["negative_prompt"];
  options.width = s["width"];
  options.height = s["height"];
  options.steps = s["steps"];
  options.scale = s["scale"];
  options.guidance_scale = s["guidance"];
  options.seed = s["seed"];
  return options;
}

// kohya's sample_image_inference on the tiny model (gen_flux_fixtures.py): the shifted schedule, Euler steps with the
// embedded guidance, classifier-free guidance and T5's mask in the second; 3 to 4 steps of fp32 models, 1 level of 255.
TEST(FluxFamily, SampleImagesMatchKohyasFluxSampler) {
  const nlohmann::json samples = reference_metadata("samples");
  for (size_t i = 0; i < samples.size(); ++i) {
    testing_support::expect_image_within_one_level(family(samples[i]["mask"]).sample(sample_options(samples[i])),
                                                   reference().at(fmt::format("sample.{}", i)), fmt::format("FLUX sample {}", i));
  }
}

// Chroma (tests/fixtures/flux/tiny/chroma.safetensors, kohya's Chroma of the tiny model's widths) through the family:
// no CLIP-L (its pooled vector is zeros, as kohya's dummy), T5's mask required, the approximator's modulations from the
// timestep and the guidance; kohya's sampler on it, 1 level of 255.
TEST(FluxFamily, ChromaSampleMatchesKohyasSampler) {
  FamilyOptions options = tiny_options(true);
  options.pretrained_model_name_or_path = kTiny + "chroma.safetensors";
  options.model_type = "chroma";
  options.clip_l.reset();
  const std::unique_ptr<Family> chroma = load_family("flux", options);
  EXPECT_EQ(chroma->model_spec().architecture, "chroma");
  EXPECT_EQ(chroma->training_metadata().at("ss_base_model_version"), "chroma");
  EXPECT_EQ(chroma->models().text_encoders.size(), 1u) << "T5 alone";
  testing_support::expect_image_within_one_level(chroma->sample(sample_options(reference_metadata("chroma_samples")[0])),
                                                 reference().at("chroma_sample.0"), "Chroma sample");
  options.apply_t5_attn_mask = false;
  EXPECT_THROW(load_family("flux", options), Error) << "kohya requires --apply_t5_attn_mask for Chroma";
}

// networks/lora_flux.py's modules for the tiny model, CLIP-L's and T5's included (train_t5xxl), in kohya's order.
TEST(FluxFamily, LoraModuleNamesAreKohyasLoraFluxNames) {
  const ModelBundle& models = family(false).models();
  const auto clip = std::dynamic_pointer_cast<ClipTextModelImpl>(models.text_encoders.at(0));
  const auto t5 = std::dynamic_pointer_cast<T5EncoderModelImpl>(models.text_encoders.at(1));
  const auto transformer = std::dynamic_pointer_cast<FluxTransformerImpl>(models.denoiser);
  ASSERT_TRUE(clip && t5 && transformer);
  std::vector<std::string> names;
  for (const NetworkTarget& t : flux_network_targets(ClipTextModel(clip), T5EncoderModel(t5), FluxTransformer(transformer))) {
    names.push_back(t.lora_name);
  }
  const auto kohya = testing_support::read_json(kTiny + "lora_names.json").get<std::vector<std::string>>();
  names.resize(kohya.size());  // the input layers, which only in_dims adapts, come last
  EXPECT_EQ(names, kohya);
  for (bool train_t5xxl : {true, false}) {
    TrainArgs args;
    if (train_t5xxl) args.network_args = {"train_t5xxl=True"};
    LoRANetwork network(family(false).network_config(args), family(false).network_targets(false), true, true,
                        at::make_generator<at::CPUGeneratorImpl>(1));
    std::vector<std::string> created;
    for (const auto* list : {&network->text_encoder_loras, &network->unet_loras}) {
      for (const auto& lora : *list) created.push_back(lora->lora_name);
    }
    EXPECT_EQ(created.size(), kohya.size() - (train_t5xxl ? 0 : 14)) << "T5's 14 only with train_t5xxl";
    network->remove();
  }
}

// kohya's FLUX latents: the autoencoder's mean less 0.1159, times 0.3611, under "latents_<h>x<w>".
TEST(FluxFamily, LatentsAreShiftedAndScaledUnderSizeKeys) {
  torch::NoGradGuard no_grad;
  const LatentsCachingStrategy& latents = family(false).latents_caching_strategy();
  const LatentsCacheLayout layout = latents.cache_layout(32, 24, true);
  EXPECT_EQ(layout.latents_key, "latents_12x16");
  EXPECT_EQ(layout.flipped_key, "latents_flipped_12x16");
  EXPECT_EQ(layout.shape, (std::vector<int64_t>{16, 12, 16}));
  EXPECT_EQ(latents.cache_suffix(), "_flux");
  const at::Tensor images = at::rand({1, 3, 24, 32}) * 2 - 1;
  auto ae = std::dynamic_pointer_cast<AutoencoderKLImpl>(family(false).models().vae);
  const at::Tensor expected = (ae->encode(images).mean - 0.1159) * 0.3611;
  EXPECT_TRUE(at::allclose(latents.encode(images, false, LatentSampling::mean).latents, expected));
}

TEST(FluxFamily, BlockSwapSplitsAsKohyaAndKeepsTwoOfEachStack) {
  const ParallelPlan plan = family(false).parallel_plan();
  ASSERT_EQ(plan.blocks.size(), 7u);
  const auto stacks = plan.swap(2);  // 1 double block, 2 single blocks
  ASSERT_EQ(stacks.size(), 2u);
  EXPECT_EQ(std::tie(stacks[0].first, stacks[0].count, stacks[0].blocks_to_swap), std::make_tuple(size_t{0}, size_t{3}, int64_t{1}));
  EXPECT_EQ(std::tie(stacks[1].first, stacks[1].count, stacks[1].blocks_to_swap), std::make_tuple(size_t{3}, size_t{4}, int64_t{2}));
  EXPECT_THROW(plan.swap(3), Error);  // 4 single blocks would leave none... of the 2 kohya keeps
}

TEST(FluxFamily, RecognisedFromTheTransformerFileWithItsMetadata) {
  EXPECT_EQ(family_of_checkpoint(std::nullopt, kTiny + "transformer.safetensors"), "flux");
  EXPECT_FALSE(is_flux_checkpoint(SDT_FIXTURES "/sdxl/sdxl_a/unet/diffusion_pytorch_model.safetensors"));
  const Family& f = family(false);
  EXPECT_EQ(f.training_metadata().at("ss_base_model_version"), "flux1");
  EXPECT_EQ(f.model_spec().architecture, "flux-1-dev");
  EXPECT_EQ(f.text_encoder_settings(), "flux dev t5xxl_max_token_length=16 apply_t5_attn_mask=false");
}

}  // namespace
}  // namespace sdt

namespace sdt {
namespace {

at::Tensor flux_out(const Family& f) {
  const auto& r = reference();
  auto transformer = std::dynamic_pointer_cast<FluxTransformerImpl>(f.models().denoiser);
  return transformer->forward(r.at("lora.input.img"), r.at("lora.input.img_ids"), r.at("lora.input.txt"), r.at("lora.input.txt_ids"),
                              r.at("lora.input.timesteps"), r.at("lora.input.y"), r.at("lora.input.guidance"), at::Tensor());
}

at::Tensor clip_pooled(const Family& f) {
  auto clip = std::dynamic_pointer_cast<ClipTextModelImpl>(f.models().text_encoders.at(0));
  return clip->forward(reference().at("lora.input.ids")).pooled;
}

// A LoRA kohya's networks/lora_flux.py made on the tiny model (gen_flux_fixtures.py: the transformer and CLIP-L, random
// non-zero weights) loads into sdt's network with every key used, gives kohya's outputs with it applied (fp32, 1e-5 of
// their scale as the models' conformance), and sdt saves back the very tensors kohya saved: kohya's loader takes sdt's
// files as its own.
TEST(FluxLora, KohyasFileLoadsGivesKohyasOutputsAndSavesBackTheSame) {
  torch::NoGradGuard no_grad;
  const std::unique_ptr<Family> flux = load_family("flux", tiny_options());  // its own: the LoRA patches it
  const std::string kohya_file = kTiny + "lora_kohya.safetensors";
  TrainArgs args;
  args.network_dim = 4;
  args.network_alpha = 2.0;
  LoRANetwork network(flux->network_config(args), flux->network_targets(false), true, true, at::make_generator<at::CPUGeneratorImpl>(1));
  testing_support::expect_loads_every_key(network, kohya_file);
  network->eval();
  expect_close("kohya LoRA transformer", flux_out(*flux), reference().at("lora.flux_out"), 1e-5);
  expect_close("kohya LoRA CLIP-L pooled", clip_pooled(*flux), reference().at("lora.clip_pooled"), 1e-5);
  // The LoRA changes the outputs by far more than that, so a module left out cannot pass unnoticed.
  for (const auto& [with, without] : {std::pair{"lora.flux_out", "lora.flux_base"}, {"lora.clip_pooled", "lora.clip_base"}}) {
    const auto& r = reference();
    EXPECT_GT(((r.at(with) - r.at(without)).abs().max() / r.at(without).abs().max()).item<double>(), 1e-2) << with;
  }
  testing_support::expect_saves_back_the_same_tensors(network, kohya_file);
}

// kohya's flux_merge_lora.py: the same file merged into the weights (ratio 1) gives the outputs of the applied LoRA, to
// fp32 rounding of the merged weights.
TEST(FluxLora, MergedIntoTheModelGivesTheOutputsOfTheAppliedLora) {
  torch::NoGradGuard no_grad;
  const std::unique_ptr<Family> flux = load_family("flux", tiny_options());
  const std::vector<std::string> skipped = merge_loras_into_targets(flux->network_targets(false), {kTiny + "lora_kohya.safetensors"},
                                                                    {1.0}, at::kFloat);
  EXPECT_TRUE(skipped.empty()) << skipped.size() << " keys skipped, first " << skipped.front();
  expect_close("merged kohya LoRA transformer", flux_out(*flux), reference().at("lora.flux_out"), 1e-5);
  expect_close("merged kohya LoRA CLIP-L pooled", clip_pooled(*flux), reference().at("lora.clip_pooled"), 1e-5);
  // flux_merge_lora.py's --clip_l_save_to: the merged CLIP-L as the file --clip_l reads (here in a folder with the tiny
  // CLIP-L's config.json, which a file of CLIP ViT-L/14's own size does not need), giving the same output.
  const std::filesystem::path folder = std::filesystem::path(::testing::TempDir()) / "merged_clip_l";
  std::filesystem::create_directories(folder);
  std::filesystem::copy_file(SDT_FIXTURES "/sd/sd1/text_encoder/config.json", folder / "config.json",
                             std::filesystem::copy_options::overwrite_existing);
  flux->save_text_encoder("clip_l", (folder / "model.safetensors").string(), std::nullopt);
  ClipTextModel reloaded = load_flux_clip_l(folder.string());
  expect_close("saved merged CLIP-L pooled", reloaded->forward(reference().at("lora.input.ids")).pooled, clip_pooled(*flux), 0.0);
  EXPECT_EQ(flux->separate_text_encoders(), (std::vector<std::string>{"clip_l", "t5xxl"}));
  std::filesystem::remove_all(folder);
}

}  // namespace
}  // namespace sdt

namespace sdt {
namespace {

NamedTensors with_prefix(const std::map<std::string, at::Tensor>& tensors, const std::string& prefix) {
  NamedTensors out;
  for (const auto& [name, t] : tensors) {
    if (name.starts_with(prefix)) out.emplace_back(name.substr(prefix.size()), t);
  }
  return out;
}

void expect_same_tensors(const NamedTensors& actual, const NamedTensors& expected, const std::string& what) {
  std::map<std::string, at::Tensor> mine(actual.begin(), actual.end());
  ASSERT_EQ(mine.size(), expected.size()) << what;
  for (const auto& [name, t] : expected) {
    ASSERT_TRUE(mine.contains(name)) << what << ": " << name;
    EXPECT_TRUE(at::equal(mine.at(name), t)) << what << ": " << name;
  }
}

// kohya's networks/convert_flux_lora.py on the kohya-written LoRA (gen_flux_fixtures.py): to ai-toolkit's layout (qkv
// and linear1 split into their parts, alpha / rank folded in) and back (parts stacked block-diagonally, alpha = rank);
// the same tensors bit for bit. Every module's up · down · alpha / rank survives the round trip.
TEST(FluxLora, ConvertsToAndFromAiToolkitAsKohyasScript) {
  torch::NoGradGuard no_grad;
  const auto converted = testing_support::read_tensors(kTiny + "lora_converted.safetensors");
  NamedTensors kohya;
  for (const auto& [name, t] : testing_support::read_tensors(kTiny + "lora_kohya.safetensors")) kohya.emplace_back(name, t);
  const NamedTensors ai_toolkit = flux_lora_to_ai_toolkit(kohya);
  expect_same_tensors(ai_toolkit, with_prefix(converted, "ai_toolkit."), "to ai-toolkit");
  const NamedTensors back = flux_lora_to_kohya(with_prefix(converted, "ai_toolkit."));
  expect_same_tensors(back, with_prefix(converted, "back."), "back to kohya");

  std::map<std::string, at::Tensor> before(kohya.begin(), kohya.end()), after(back.begin(), back.end());
  for (const std::string module : {"lora_unet_double_blocks_1_img_attn_qkv", "lora_unet_single_blocks_2_linear1",
                                   "lora_unet_double_blocks_0_txt_mlp_2"}) {
    const auto delta = [](std::map<std::string, at::Tensor>& m, const std::string& k) {
      const at::Tensor down = m.at(k + ".lora_down.weight");
      return at::matmul(m.at(k + ".lora_up.weight"), down) * (m.at(k + ".alpha").item<double>() / down.size(0));
    };
    expect_close(module + " up.down.scale after the round trip", delta(after, module), delta(before, module), 1e-6);
  }
}

}  // namespace
}  // namespace sdt

namespace sdt {
namespace {

// The tiny transformer as diffusers saves it (gen_flux_fixtures.py: diffusers' own conversion of the BFL file, three
// shards and their index) loads to the same weights: the same outputs bit for bit; the family recognises the folder.
TEST(FluxFamily, DiffusersTransformerFolderLoadsAsTheBflFile) {
  torch::NoGradGuard no_grad;
  const std::string folder = kTiny + "diffusers_transformer";
  EXPECT_EQ(family_of_checkpoint(std::nullopt, folder), "flux");
  const FluxTransformer bfl = load_flux_transformer(kTiny + "transformer.safetensors"), diffusers = load_flux_transformer(folder);
  EXPECT_EQ(diffusers->config.depth, 3);
  EXPECT_EQ(diffusers->config.axes_dim, (std::vector<int64_t>{4, 6, 6}));
  const auto& r = reference();
  const auto run = [&](FluxTransformer t) {
    return t->forward(r.at("lora.input.img"), r.at("lora.input.img_ids"), r.at("lora.input.txt"), r.at("lora.input.txt_ids"),
                      r.at("lora.input.timesteps"), r.at("lora.input.y"), r.at("lora.input.guidance"), at::Tensor());
  };
  EXPECT_TRUE(at::equal(run(diffusers), run(bfl)));
}

// With defer_block_weights (a trainer whose block engine shards or swaps the blocks) the double and single blocks are
// built without weights, everything else is read, and the parallel plan reads each block's tensors from the checkpoint
// (BFL file or diffusers folder) in the dtype the rest was read in: the tensors a whole load holds, bit for bit.
TEST(FluxFamily, DeferredBlockWeightsAreReadFromTheCheckpointByThePlan) {
  const FluxTransformer whole = load_flux_transformer(kTiny + "transformer.safetensors", at::kBFloat16);
  for (const std::string checkpoint : {kTiny + "transformer.safetensors", kTiny + "diffusers_transformer"}) {
    SCOPED_TRACE(checkpoint);
    FamilyOptions options = tiny_options();
    options.pretrained_model_name_or_path = checkpoint;
    options.weights_dtype = WeightsDtype::bfloat16;
    options.defer_block_weights = true;
    const std::unique_ptr<Family> deferred = load_family("flux", options);
    const auto& transformer = *deferred->models().denoiser;
    const auto whole_parameters = whole->named_parameters();
    for (const auto& item : transformer.named_parameters()) {
      const bool in_block = item.key().starts_with("double_blocks.") || item.key().starts_with("single_blocks.");
      EXPECT_EQ(item.value().is_meta(), in_block) << item.key();
      EXPECT_EQ(item.value().scalar_type(), at::kBFloat16) << item.key();
      if (!in_block) EXPECT_TRUE(at::equal(item.value(), whole_parameters[item.key()])) << item.key();
    }
    const ParallelPlan plan = deferred->parallel_plan();
    ASSERT_TRUE(plan.deferred_weights);
    const auto blocks = whole->blocks();
    ASSERT_EQ(plan.blocks.size(), blocks.size());
    for (size_t b = 0; b < blocks.size(); ++b) {
      for (const auto& item : blocks[b]->named_parameters()) {
        const at::Tensor read = plan.deferred_weights(static_cast<int64_t>(b), item.key());
        EXPECT_EQ(read.scalar_type(), at::kBFloat16);
        EXPECT_TRUE(at::equal(read, item.value())) << "block " << b << " " << item.key();
      }
    }
  }
  EXPECT_FALSE(family(false).parallel_plan().deferred_weights);  // loaded whole: the blocks hold their weights
}

}  // namespace
}  // namespace sdt

namespace sdt {
namespace {

// networks/lora_flux.py's create_network arguments (gen_lora_flux_args_fixtures.py runs kohya's code on the tiny model,
// three cases: type dims, block selections, train_t5xxl, LoRA+; in_dims, train_blocks, regex dims and learning rates;
// double blocks only with default learning rates): the same modules in the same order with the same dims and alphas,
// and prepare_optimizer_params_with_multiple_te_lrs's groups (learning rates, descriptions, parameters in order).
TEST(FluxLoraArgs, MakeKohyasModulesAndOptimizerGroups) {
  const nlohmann::json cases = testing_support::read_json(kTiny + "lora_flux_args.json");
  for (const auto& [name, c] : cases.items()) {
    SCOPED_TRACE(name);
    TrainArgs args;
    args.network_dim = c["dim"].get<int64_t>();
    args.network_alpha = c["alpha"].get<double>();
    args.network_args = c["args"].get<std::vector<std::string>>();
    args.text_encoder_lr = c["te_lr"].get<std::vector<double>>();
    if (!c["unet_lr"].is_null()) args.unet_lr = c["unet_lr"].get<double>();
    args.learning_rate = c["lr"].get<double>();
    const LoRANetworkConfig config = family(false).network_config(args);
    EXPECT_EQ(config.network_module, "networks.lora_flux");
    LoRANetwork network(config, family(false).network_targets(false), true, true, at::make_generator<at::CPUGeneratorImpl>(1));
    std::vector<std::tuple<std::string, int64_t, double>> modules;
    for (const auto* list : {&network->text_encoder_loras, &network->unet_loras}) {
      for (const auto& lora : *list) modules.emplace_back(lora->lora_name, lora->dim(), lora->alpha_value());
    }
    EXPECT_EQ(modules, (c["modules"].get<std::vector<std::tuple<std::string, int64_t, double>>>()));
    std::map<const void*, std::string> names;
    for (const auto& item : network->named_parameters()) names[item.value().unsafeGetTensorImpl()] = item.key();
    const std::vector<LoraParamGroup> groups = network->prepare_optimizer_params(args.text_encoder_lr, args.unet_lr, args.learning_rate);
    ASSERT_EQ(groups.size(), c["groups"].size());
    for (size_t i = 0; i < groups.size(); ++i) {
      const auto& expected = c["groups"][i];
      EXPECT_EQ(groups[i].description, expected["description"].get<std::string>());
      EXPECT_DOUBLE_EQ(groups[i].lr, expected["lr"].get<double>()) << groups[i].description;
      std::vector<std::string> params;
      for (const at::Tensor& p : groups[i].params) params.push_back(names.at(p.unsafeGetTensorImpl()));
      EXPECT_EQ(params, expected["params"].get<std::vector<std::string>>()) << groups[i].description;
    }
    network->remove();
  }
}

// lora_flux's split_qkv (kohya's code with its two blocking lines fixed, see the generator): a LoRA per part of the
// double blocks' fused q, k, v and of the single blocks' q, k, v, MLP. kohya's combined file loads (each part from
// its diagonal block), the transformer then gives kohya's output (fp32, 1e-5 of its scale, as the model's
// conformance), and sdt saves the very tensors back.
TEST(FluxLoraArgs, SplitQkvLoadsKohyasCombinedFileGivesItsOutputAndSavesItBack) {
  torch::NoGradGuard no_grad;
  const std::unique_ptr<Family> flux = load_family("flux", tiny_options());  // its own: the LoRAs patch it
  const auto fixture = testing_support::read_tensors(kTiny + "lora_split_qkv.safetensors");
  std::vector<LoRANetwork> networks;
  for (const std::string blocks : {"double", "single"}) {
    TrainArgs args;
    args.network_dim = 2;
    args.network_alpha = 3.0;
    args.network_args = {"train_blocks=" + blocks, "split_qkv=True"};
    LoRANetwork network(flux->network_config(args), flux->network_targets(false), false, true, at::make_generator<at::CPUGeneratorImpl>(1));
    int split = 0;
    for (const auto& lora : network->unet_loras) split += lora->is_split();
    EXPECT_EQ(split, blocks == "double" ? 6 : 4) << blocks;
    NamedTensors kohya;
    for (const auto& [key, t] : fixture) {
      if (key.starts_with(blocks + ".")) kohya.emplace_back(key.substr(blocks.size() + 1), t);
    }
    const std::string file = ::testing::TempDir() + "/split_qkv_" + blocks + ".safetensors";
    save_safetensors(file, kohya, {});
    testing_support::expect_loads_every_key(network, file);
    testing_support::expect_saves_back_the_same_tensors(network, file);
    network->eval();
    networks.push_back(network);
  }
  auto transformer = std::dynamic_pointer_cast<FluxTransformerImpl>(flux->models().denoiser);
  const auto in = [&](const char* name) { return fixture.at(std::string("input.") + name); };
  const at::Tensor out = transformer->forward(in("img"), in("img_ids"), in("txt"), in("txt_ids"), in("timesteps"), in("y"), in("guidance"), at::Tensor());
  expect_close("split_qkv LoRA transformer", out, fixture.at("output"), 1e-5);
  EXPECT_GT(((fixture.at("output") - reference().at("lora.flux_base")).abs().max() / reference().at("lora.flux_base").abs().max()).item<double>(), 1e-2)
      << "the LoRAs change the output by far more than the tolerance";
}

// LoRA-GGPO is on where kohya's lora_flux turns it on: with ggpo_sigma and ggpo_beta both given, on every module.
TEST(FluxLoraArgs, GgpoNeedsSigmaAndBeta) {
  for (const std::vector<std::string> given : std::vector<std::vector<std::string>>{
           {"ggpo_sigma=0.03", "ggpo_beta=0.01"}, {"ggpo_sigma=0.03"}, {"ggpo_beta=0.01"}}) {
    SCOPED_TRACE(given.size());
    TrainArgs args;
    args.network_args = given;
    args.network_args.push_back("train_t5xxl=True");
    LoRANetwork network(family(false).network_config(args), family(false).network_targets(false), true, true,
                        at::make_generator<at::CPUGeneratorImpl>(1));
    for (const auto* list : {&network->text_encoder_loras, &network->unet_loras}) {
      for (const auto& lora : *list) {
        ASSERT_EQ(lora->ggpo.has_value(), given.size() == 2) << lora->lora_name;
        if (lora->ggpo) EXPECT_EQ(std::make_pair(lora->ggpo->sigma, lora->ggpo->beta), std::make_pair(0.03, 0.01));
      }
    }
  }
}

// What kohya reads silently wrong or crashes on is a named error here.
TEST(FluxLoraArgs, BadArgumentsAreNamedErrors) {
  for (const std::vector<std::string> bad : std::vector<std::vector<std::string>>{
           {"train_blocks=some"}, {"split_qkv=true"}, {"train_t5xxl=1"}, {"in_dims=[1,2,3,4]"}, {"train_double_block_indices=0,3"},
           {"train_single_block_indices=2-1"}, {"network_reg_dims=single_blocks=two"}, {"network_reg_lrs=(=1e-4"},
           {"block_dims=4,4"}, {"ggpo_sigma=0.03", "ggpo_beta=0.01", "split_qkv=True"}, {"ggpo_sigma=x", "ggpo_beta=1"},
           {"img_attn_dim=2.5"}}) {
    TrainArgs args;
    args.network_args = bad;
    EXPECT_THROW(LoRANetwork(family(false).network_config(args), family(false).network_targets(false), true, true,
                             at::make_generator<at::CPUGeneratorImpl>(1))->prepare_optimizer_params({}, std::nullopt, 1e-4),
                 Error)
        << bad[0];
  }
}

}  // namespace
}  // namespace sdt
