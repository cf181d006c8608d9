// `sdt flux_train_network` / `flux_train` on the tiny FLUX.1 dev fixture (tests/fixtures/flux/tiny): through the same
// trainer as SD and SDXL, a LoRA lowers the loss and carries kohya's FLUX metadata; block swap changes no bit;
// full fine-tuning writes BFL's transformer file, which loads back.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "src/core/error.h"
#include "src/core/safetensors.h"
#include "src/families/family.h"
#include "src/models/flux_checkpoint.h"
#include "src/networks/merge.h"
#include "src/train/trainer.h"
#include "tests/train/toy_dataset.h"
#include "tests/train/weight_files.h"

namespace sdt {
namespace {

namespace fs = std::filesystem;

// A LoRA of the transformer and CLIP-L at lr 1e-2 for 120 steps: the mean loss of the last 20 steps falls below 0.9x
// the first 20's (the tiny model fits the toy images' colours; seed 1 goes from 1.33 to 1.14).
TEST(FluxTraining, LoraLossFallsAndTheFileIsKohyasFluxLora) {
  const fs::path root = fs::path(testing::TempDir()) / "sdt_flux_lora";
  fs::remove_all(root);
  TrainArgs args = testing_support::tiny_flux_run(root);
  args.learning_rate = 1e-2;
  args.max_train_steps = 120;
  const TrainSummary summary = train(args, World{}, TrainMode::network);
  ASSERT_EQ(summary.losses.size(), 120u);
  const auto [first, last] = testing_support::loss_trend(summary.losses, "FLUX LoRA");
  EXPECT_LT(last, 0.9 * first);
  const safetensors::File file(summary.weights_path);
  EXPECT_EQ(file.metadata().at("ss_base_model_version"), "flux1");
  EXPECT_EQ(file.metadata().at("ss_network_module"), "networks.lora_flux");
  EXPECT_EQ(file.metadata().at("modelspec.architecture"), "flux-1-dev/lora");
  EXPECT_TRUE(file.contains("lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"));
  EXPECT_TRUE(file.contains("lora_unet_single_blocks_3_linear2.lora_up.weight"));
  EXPECT_TRUE(file.contains("lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha"));
  fs::remove_all(root);
}

// lora_flux's train_t5xxl with a learning rate per text encoder (--text_encoder_lr 1e-2 0): CLIP-L's LoRA trains,
// T5's is created and saved but its group (lr 0) is left out, so its lora_up stays zero; kohya's metadata keeps the
// list. With train_blocks=single the double blocks get no LoRA; with split_qkv each single block's linear1 has a LoRA
// per part (q, k, v, MLP), saved combined: its down 4 x dim rows.
TEST(FluxTraining, T5LoraAndALearningRatePerTextEncoder) {
  const fs::path root = fs::path(testing::TempDir()) / "sdt_flux_t5";
  fs::remove_all(root);
  TrainArgs args = testing_support::tiny_flux_run(root);
  args.learning_rate = 1e-2;
  args.max_train_steps = 3;
  args.network_train_unet_only = false;
  args.network_args = {"train_t5xxl=True", "train_blocks=single", "split_qkv=True"};
  args.text_encoder_lr = {1e-2, 0.0};
  const safetensors::File file(train(args, World{}, TrainMode::network).weights_path);
  EXPECT_EQ(file.metadata().at("ss_text_encoder_lr"), "[0.01, 0.0]");
  const at::Tensor t5_up = load_tensor(file, "lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight");
  const at::Tensor clip_up = load_tensor(file, "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight");
  EXPECT_EQ(t5_up.abs().max().item<double>(), 0.0);
  EXPECT_GT(clip_up.abs().max().item<double>(), 0.0);
  EXPECT_FALSE(file.contains("lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"));
  EXPECT_EQ(file.info("lora_unet_single_blocks_0_linear1.lora_down.weight").shape, (std::vector<int64_t>{4 * 4, 32}));
  fs::remove_all(root);
}

// kohya's --fp8_base under --mixed_precision bf16: the frozen transformer in fp8 (its forward is checked against
// kohya's in test_flux_models), the LoRA in fp32, with --gradient_checkpointing. The loss falls (last 20 of 60 steps
// below the first 20); block swap moves the fp8 blocks and changes no bit against the same run without swap (both
// recompute each block: under bf16 autocast a recomputed block's backward is not bitwise a kept graph's); the file
// records the flag. On the CPU the text encoders stay bf16, as kohya leaves them; full fine-tuning refuses the flag.
TEST(FluxTraining, Fp8BaseTrainsALoraAndSwapsItsBlocks) {
  const fs::path root = fs::path(testing::TempDir()) / "sdt_flux_fp8";
  fs::remove_all(root);
  const auto run = [&](const std::string& name, int64_t steps, int64_t swap) {
    TrainArgs args = testing_support::tiny_flux_run(root);
    args.mixed_precision = "bf16";
    args.fp8_base = true;
    args.learning_rate = 1e-2;
    args.max_train_steps = steps;
    args.blocks_to_swap = swap;
    args.gradient_checkpointing = true;
    args.output_dir = (root / name).string();
    return train(args, World{}, TrainMode::network);
  };
  const TrainSummary summary = run("long", 60, 0);
  const auto [first, last] = testing_support::loss_trend(summary.losses, "FLUX fp8 LoRA");
  EXPECT_LT(last, first);
  EXPECT_EQ(safetensors::File(summary.weights_path).metadata().at("ss_fp8_base"), "True");
  EXPECT_TRUE(testing_support::bitwise_equal(run("plain", 3, 0).weights_path, run("swapped", 3, 2).weights_path));
  TrainArgs full = testing_support::tiny_flux_run(root);
  full.mixed_precision = "bf16";
  full.fp8_base = true;
  full.output_dir = (root / "full").string();
  EXPECT_THROW(train(full, World{}, TrainMode::whole_model), Error);
  fs::remove_all(root);
}

// kohya's --base_weights: a LoRA merged into the base model before training (here at 0.7) trains exactly as the
// same LoRA merged into the checkpoint beforehand (the family's merge, written as BFL's file): the same weights bit for
// bit. --dim_from_weights makes the network from --network_weights' modules and dims (4, not --network_dim 8).
TEST(FluxTraining, BaseWeightsAndDimFromWeightsAreKohyas) {
  const fs::path root = fs::path(testing::TempDir()) / "sdt_flux_base_weights";
  fs::remove_all(root);
  const auto run = [&](const std::string& name, const std::function<void(TrainArgs&)>& configure) {
    TrainArgs args = testing_support::tiny_flux_run(root);
    args.learning_rate = 1e-2;
    args.max_train_steps = 3;
    args.network_train_unet_only = true;  // the merged checkpoint holds the transformer only
    args.output_dir = (root / name).string();
    configure(args);
    return train(args, World{}, TrainMode::network).weights_path;
  };
  const std::string lora = run("lora", [](TrainArgs&) {});
  const std::string merged = (root / "merged.safetensors").string();
  {
    TrainArgs args = testing_support::tiny_flux_run(root);
    const std::unique_ptr<Family> flux = load_family("flux", family_options_from_args(args));
    merge_loras_into_targets(flux->network_targets(true), {lora}, {0.7}, at::kFloat);
    flux->save_checkpoint(merged, std::nullopt, {});
  }
  const std::string on_merged = run("on_merged", [&](TrainArgs& a) { a.pretrained_model_name_or_path = merged; });
  const std::string with_base = run("with_base", [&](TrainArgs& a) {
    a.base_weights = {lora};
    a.base_weights_multiplier = {0.7};
  });
  EXPECT_TRUE(testing_support::bitwise_equal(with_base, on_merged));
  EXPECT_FALSE(testing_support::bitwise_equal(with_base, lora)) << "the same run without the merge";
  const std::string from_weights = run("from_weights", [&](TrainArgs& a) {
    a.network_weights = lora;
    a.dim_from_weights = true;
    a.network_dim = 8;
  });
  EXPECT_EQ(safetensors::File(from_weights).info("lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight").shape[0], 4);
  fs::remove_all(root);
}

// --blocks_to_swap 2 (1 of 3 double blocks and 2 of 4 single blocks on the host, recomputed in backward) gives the
// weights of the same run without swap: bit for bit for the transformer's LoRA; with CLIP-L's LoRA too, bit for bit
// against --gradient_checkpointing (recomputing each block sums the gradient of the vector every block reads in
// another order than one backward through the whole graph does).
TEST(FluxTraining, BlockSwapChangesNoBit) {
  const fs::path root = fs::path(testing::TempDir()) / "sdt_flux_swap";
  fs::remove_all(root);
  const auto run = [&](const std::string& name, bool unet_only, bool checkpointing, int64_t swap) {
    TrainArgs args = testing_support::tiny_flux_run(root);
    args.learning_rate = 1e-2;
    args.max_train_steps = 4;
    args.network_train_unet_only = unet_only;
    args.gradient_checkpointing = checkpointing;
    args.blocks_to_swap = swap;
    args.output_dir = (root / name).string();
    return train(args, World{}, TrainMode::network).weights_path;
  };
  EXPECT_TRUE(testing_support::bitwise_equal(run("plain", true, false, 0), run("swapped", true, false, 2))) << "transformer LoRA";
  EXPECT_TRUE(testing_support::bitwise_equal(run("checkpointed", false, true, 0), run("checkpointed_swapped", false, true, 2)))
      << "with CLIP-L's LoRA";
  fs::remove_all(root);
}

// LoRA-GGPO (lora_flux's ggpo_sigma and ggpo_beta; the perturbation itself is checked against kohya's module in
// test_lora_ggpo): the first update measures the norms, later forwards are perturbed, inside the blocks the engine swaps
// too: with --blocks_to_swap 2 the LoRA is the same bit for bit (each recomputed block draws its forward's
// perturbation again), and it differs from the LoRA trained without GGPO. Each step's metrics carry what kohya logs.
TEST(FluxTraining, GgpoPerturbsTheTransformerInSwappedBlocksToo) {
  const fs::path root = fs::path(testing::TempDir()) / "sdt_flux_ggpo";
  fs::remove_all(root);
  const auto run = [&](const std::string& name, bool ggpo, int64_t swap) {
    TrainArgs args = testing_support::tiny_flux_run(root);
    args.learning_rate = 1e-2;
    args.max_train_steps = 4;
    args.network_train_unet_only = true;
    args.blocks_to_swap = swap;
    if (ggpo) args.network_args = {"ggpo_sigma=0.03", "ggpo_beta=0.01"};
    args.output_dir = (root / name).string();
    return train(args, World{}, TrainMode::network).weights_path;
  };
  const std::string plain = run("ggpo", true, 0);
  EXPECT_TRUE(testing_support::bitwise_equal(plain, run("ggpo_swapped", true, 2)));
  EXPECT_FALSE(testing_support::bitwise_equal(plain, run("no_ggpo", false, 0)));
  std::ifstream metrics(root / "ggpo" / "logs" / "metrics.jsonl");
  std::string line, last;
  while (std::getline(metrics, line)) last = line;
  const nlohmann::json logged = nlohmann::json::parse(last);
  for (const char* key : {"norm/avg_key_norm", "norm/avg_grad_norm", "norm/avg_combined_norm"}) {
    ASSERT_TRUE(logged.contains(key)) << key << " in " << last;
    EXPECT_GT(logged[key].get<double>(), 0.0) << key;
  }
  fs::remove_all(root);
}

// kohya's --cache_text_encoder_outputs for FLUX: the cached l_pooled, t5_out, txt_ids and t5_attn_mask give the
// losses of encoding each step (the transformer's LoRA, and with CLIP-L's too), with T5's mask applied in T5 and in
// the transformer; so do cached latents (the autoencoder's mean, shifted and scaled, under kohya's size keys).
// Outputs cached with the mask are refused by a run without it.
TEST(FluxTraining, CachedLatentsAndTextEncoderOutputsGiveTheLossesOfEncodingOnTheFly) {
  const fs::path root = fs::path(testing::TempDir()) / "sdt_flux_cache";
  fs::remove_all(root);
  TrainArgs args = testing_support::tiny_flux_run(root);
  args.max_train_steps = 6;
  args.network_train_unet_only = true;
  args.apply_t5_attn_mask = true;
  args.flip_aug = true;
  args.vae_latents = "mean";
  testing_support::expect_cached_runs_give_the_losses_of_encoding(args, (root / "cached").string());
  // kohya's partial cache: with CLIP-L's LoRA trained, T5's outputs come from the cache and CLIP-L encodes every step;
  // the losses are those of encoding both on the fly. T5's LoRA with the cache is refused, as in kohya.
  args.network_train_unet_only = false;
  args.learning_rate = 5e-2;  // CLIP-L's LoRA moves l_pooled well beyond the tolerance within the run
  args.output_dir = (root / "with_clip_l").string();
  testing_support::expect_cached_runs_give_the_losses_of_encoding(args, (root / "cached_with_clip_l").string());
  args.network_args = {"train_t5xxl=True"};
  args.cache_text_encoder_outputs = true;
  EXPECT_THROW(train(args, World{}, TrainMode::network), Error);
  args.network_args.clear();
  args.cache_text_encoder_outputs = false;
  args.network_train_unet_only = true;
  args.learning_rate = 2e-6;
  // Outputs cached with T5's mask are not this run's without it (kohya does not use them either): a named error.
  args.apply_t5_attn_mask = false;
  args.cache_latents_to_disk = true;
  args.cache_text_encoder_outputs_to_disk = true;
  args.output_dir = (root / "unmasked").string();
  try {
    train(args, World{}, TrainMode::network);
    ADD_FAILURE() << "expected the cache to be refused";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("apply_t5_attn_mask=true"), std::string::npos) << e.what();
  }
  fs::remove_all(root);
}

// flux_train_network.py --model_type chroma: a LoRA of the Chroma transformer alone (no CLIP-L), T5's mask applied,
// guidance 0 as kohya's docs advise; the loss falls (mean of the last 20 of 60 steps below the first 20's).
TEST(FluxTraining, ChromaLoraTrainsTheTransformerAlone) {
  const fs::path root = fs::path(testing::TempDir()) / "sdt_chroma_lora";
  fs::remove_all(root);
  TrainArgs args = testing_support::tiny_flux_run(root);
  args.pretrained_model_name_or_path = SDT_FIXTURES "/flux/tiny/chroma.safetensors";
  args.model_type = "chroma";
  args.clip_l.reset();
  args.apply_t5_attn_mask = true;
  args.guidance_scale = 0.0;
  args.learning_rate = 1e-2;
  args.max_train_steps = 60;
  const TrainSummary summary = train(args, World{}, TrainMode::network);
  const auto [first, last] = testing_support::loss_trend(summary.losses, "Chroma LoRA");
  EXPECT_LT(last, first);
  const safetensors::File file(summary.weights_path);
  EXPECT_EQ(file.metadata().at("ss_base_model_version"), "chroma");
  EXPECT_EQ(file.metadata().at("modelspec.architecture"), "chroma/lora");
  EXPECT_TRUE(file.contains("lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"));
  EXPECT_FALSE(file.contains("lora_unet_double_blocks_0_img_mod_lin.lora_down.weight")) << "Chroma has no modulation layers";
  for (const auto& t : file.tensors()) EXPECT_FALSE(t.name.starts_with("lora_te")) << t.name;
  fs::remove_all(root);
}

// flux_train.py's output: the transformer in BFL's single file, trained, loading back with the tiny model's config.
TEST(FluxTraining, FullFineTuneWritesTheTransformerInBflsLayout) {
  const fs::path root = fs::path(testing::TempDir()) / "sdt_flux_full";
  fs::remove_all(root);
  TrainArgs args = testing_support::tiny_flux_run(root);
  args.learning_rate = 1e-4;
  args.max_train_steps = 2;
  const TrainSummary summary = train(args, World{}, TrainMode::whole_model);
  const FluxTransformer base = load_flux_transformer(SDT_FIXTURES "/flux/tiny/transformer.safetensors");
  const FluxTransformer trained = load_flux_transformer(summary.weights_path);
  EXPECT_EQ(trained->config.depth, 3);
  EXPECT_EQ(trained->config.depth_single_blocks, 4);
  EXPECT_FALSE(at::equal(trained->img_in->weight, base->img_in->weight));
  EXPECT_EQ(safetensors::File(summary.weights_path).metadata().at("modelspec.architecture"), "flux-1-dev");
  fs::remove_all(root);
}

TEST(FluxTraining, KohyasRefusalsAreNamed) {
  const fs::path root = fs::path(testing::TempDir()) / "sdt_flux_refused";
  fs::remove_all(root);
  const auto expect_refused = [&](const std::function<void(TrainArgs&)>& configure, const std::string& words) {
    TrainArgs args = testing_support::tiny_flux_run(root);
    configure(args);
    try {
      train(args, World{}, TrainMode::network);
      ADD_FAILURE() << "expected an error with " << words;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(words), std::string::npos) << e.what();
    }
  };
  expect_refused([](TrainArgs& a) { a.t5xxl.reset(); }, "--t5xxl");
  expect_refused([](TrainArgs& a) { a.ae.reset(); }, "--ae");
  expect_refused([](TrainArgs& a) { a.model_type = "chroma"; a.apply_t5_attn_mask = true; }, "holds a FLUX.1 transformer");
  expect_refused([](TrainArgs& a) { a.blocks_to_swap = 3; }, "--blocks_to_swap");
  expect_refused([](TrainArgs& a) { a.weighted_captions = true; }, "--weighted_captions");
  expect_refused([](TrainArgs& a) { a.network_module = "networks.lora"; }, "networks.lora_flux");
  expect_refused([](TrainArgs& a) { a.network_args = {"split_qkv=True"}; a.scale_weight_norms = 1.0; }, "--scale_weight_norms");
  expect_refused([](TrainArgs& a) { a.network_args = {"ggpo_sigma=0.03", "ggpo_beta=0.01"}; a.sharding = "gradients"; }, "LoRA-GGPO");
  fs::remove_all(root);
}

}  // namespace
}  // namespace sdt
