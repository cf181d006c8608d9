// The dataset config TOML: kohya's levels, kinds, fallback chain and error messages.
#include <gtest/gtest.h>

#include <filesystem>

#include "src/core/dataset_config.h"
#include "src/core/error.h"

namespace sdt {
namespace {

std::string error_of(const std::string& text, const TrainArgs& args = {}) {
  try {
    parse_dataset_config(text, "ds.toml", args);
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

TEST(DatasetConfig, KohyaDocumentationExampleResolvesThroughTheFallbackChain) {
  DatasetBlueprint bp = load_dataset_config(SDT_FIXTURES "/config/kohya_doc_example.toml", TrainArgs{});
  ASSERT_EQ(bp.datasets.size(), 2u);

  const DatasetConfig& db = bp.datasets[0];
  EXPECT_EQ(db.kind, DatasetKind::DreamBooth);
  EXPECT_EQ(db.width, 512);
  EXPECT_EQ(db.height, 512);
  EXPECT_EQ(db.batch_size, 4);
  ASSERT_EQ(db.subsets.size(), 3u);
  EXPECT_EQ(db.subsets[0].keep_tokens, 2);  // from [[datasets]]
  EXPECT_EQ(db.subsets[1].keep_tokens, 3);  // its own
  EXPECT_EQ(db.subsets[2].keep_tokens, 1);
  EXPECT_TRUE(db.subsets[2].is_reg);
  EXPECT_EQ(db.subsets[0].class_tokens, "hoge girl");
  EXPECT_EQ(db.subsets[0].image_dir, "C:\\hoge");
  EXPECT_EQ(db.subsets[0].caption_extension, ".txt");  // from [general]
  EXPECT_TRUE(db.subsets[1].shuffle_caption);          // from [general]
  EXPECT_EQ(db.subsets[0].num_repeats, 1);             // --dataset_repeats default

  const DatasetConfig& ft = bp.datasets[1];
  EXPECT_EQ(ft.kind, DatasetKind::FineTuning);
  EXPECT_EQ(ft.width, 768);
  EXPECT_EQ(ft.batch_size, 2);
  ASSERT_EQ(ft.subsets.size(), 1u);
  EXPECT_EQ(ft.subsets[0].keep_tokens, 1);  // from [general]
  EXPECT_EQ(ft.subsets[0].metadata_file, "C:\\piyo\\piyo_md.json");
}

TEST(DatasetConfig, CommandLineFillsWhatTheFileLeavesOutButNeverOverridesIt) {
  TrainArgs args;
  args.train_batch_size = 3;   // -> batch_size
  args.dataset_repeats = 7;    // -> num_repeats
  args.resolution = "640,384";
  args.caption_extension = ".cap";
  args.flip_aug = true;
  args.prior_loss_weight = 0.5;
  auto bp = parse_dataset_config(R"(
[general]
caption_extension = ".txt"
[[datasets]]
  [[datasets.subsets]]
  image_dir = "a"
  [[datasets.subsets]]
  image_dir = "b"
  flip_aug = false
)",
                                 "ds.toml", args);
  const auto& d = bp.datasets.at(0);
  EXPECT_EQ(d.batch_size, 3);
  EXPECT_EQ(d.width, 640);  // "width,height"
  EXPECT_EQ(d.height, 384);
  EXPECT_DOUBLE_EQ(d.prior_loss_weight, 0.5);
  EXPECT_EQ(d.subsets.at(0).num_repeats, 7);
  EXPECT_EQ(d.subsets.at(0).caption_extension, ".txt");  // [general] beats the command line
  EXPECT_TRUE(d.subsets.at(0).flip_aug);                 // command line beats the default
  EXPECT_FALSE(d.subsets.at(1).flip_aug);                // the subset beats the command line
}

TEST(DatasetConfig, UnknownKeyNamesFileLineAndNearestKey) {
  std::string e = error_of("[[datasets]]\nresolution = 512\n  [[datasets.subsets]]\n  image_dir = 'x'\n  flip_agu = true\n");
  EXPECT_NE(e.find("ds.toml:5"), std::string::npos) << e;
  EXPECT_NE(e.find("'flip_agu'"), std::string::npos) << e;
  EXPECT_NE(e.find("did you mean 'flip_aug'"), std::string::npos) << e;
  EXPECT_NE(e.find("[[datasets.subsets]] #1"), std::string::npos) << e;
}

TEST(DatasetConfig, WrongTypeNamesKeyAndExpectedType) {
  std::string e = error_of("[general]\nbatch_size = \"4\"\n");
  EXPECT_NE(e.find("ds.toml:2"), std::string::npos) << e;
  EXPECT_NE(e.find("'batch_size'"), std::string::npos) << e;
  EXPECT_NE(e.find("expected an integer"), std::string::npos) << e;
}

TEST(DatasetConfig, OutOfRangeValueIsRefused) {
  std::string e = error_of("[general]\ncaption_dropout_rate = 1.5\n");
  EXPECT_NE(e.find("'caption_dropout_rate'"), std::string::npos) << e;
  EXPECT_NE(e.find("between 0 and 1"), std::string::npos) << e;
  EXPECT_NE(error_of("[general]\nnum_repeats = 0\n").find(">= 1"), std::string::npos);
  EXPECT_NE(error_of("[general]\nresize_interpolation = 'lanczoz'\n").find("did you mean 'lanczos'"), std::string::npos);
}

TEST(DatasetConfig, KeyAtTheWrongLevelIsRefused) {
  std::string e = error_of("[general]\nimage_dir = 'x'\n");
  EXPECT_NE(e.find("not allowed at this level"), std::string::npos) << e;
  EXPECT_NE(e.find("[[datasets.subsets]]"), std::string::npos) << e;
  e = error_of("[[datasets]]\nresolution=512\n  [[datasets.subsets]]\n  image_dir='x'\n  batch_size = 2\n");
  EXPECT_NE(e.find("'batch_size'"), std::string::npos) << e;
  EXPECT_NE(e.find("not allowed"), std::string::npos) << e;
}

TEST(DatasetConfig, KeyOfAnotherDatasetKindIsRefused) {
  std::string e = error_of("[[datasets]]\nresolution=512\n  [[datasets.subsets]]\n  metadata_file='m.json'\n  is_reg = true\n");
  EXPECT_NE(e.find("'is_reg'"), std::string::npos) << e;
  EXPECT_NE(e.find("fine-tuning"), std::string::npos) << e;
  e = error_of("[[datasets]]\nresolution=512\ncaption_extension='.txt'\n  [[datasets.subsets]]\n  metadata_file='m.json'\n");
  EXPECT_NE(e.find("'caption_extension'"), std::string::npos) << e;
}

TEST(DatasetConfig, MixingDreamBoothAndFineTuningSubsetsIsRefused) {
  std::string e = error_of(
      "[[datasets]]\nresolution=512\n  [[datasets.subsets]]\n  image_dir='x'\n  [[datasets.subsets]]\n  metadata_file='m'\n");
  EXPECT_NE(e.find("cannot be mixed"), std::string::npos) << e;
}

TEST(DatasetConfig, RequiredKeysAndResolutionAreChecked) {
  EXPECT_NE(error_of("[[datasets]]\nresolution=512\n  [[datasets.subsets]]\n  is_reg=true\n").find("'image_dir' is required"),
            std::string::npos);
  EXPECT_NE(error_of("[[datasets]]\n  [[datasets.subsets]]\n  image_dir='x'\n").find("'resolution' is required"),
            std::string::npos);
}

TEST(DatasetConfig, CommandLineOnlyKeysAreRefusedInTheFile) {
  std::string e = error_of("[general]\nprior_loss_weight = 2.0\n");
  EXPECT_NE(e.find("--prior_loss_weight"), std::string::npos) << e;
}

TEST(DatasetConfig, DuplicateSubsetInOneDatasetIsSkippedButNotAcrossDatasets) {
  auto bp = parse_dataset_config(R"(
[[datasets]]
resolution = 512
  [[datasets.subsets]]
  image_dir = 'C:\hoge'
  [[datasets.subsets]]
  image_dir = 'C:\hoge'
[[datasets]]
resolution = 768
  [[datasets.subsets]]
  image_dir = 'C:\hoge'
)",
                                 "ds.toml", TrainArgs{});
  ASSERT_EQ(bp.datasets.size(), 2u);
  EXPECT_EQ(bp.datasets[0].subsets.size(), 1u);
  EXPECT_EQ(bp.datasets[1].subsets.size(), 1u);
}

TEST(DatasetConfig, ControlNetDatasetIsDetectedWhenEverySubsetHasConditioningImages) {
  auto bp = parse_dataset_config(R"(
[[datasets]]
resolution = [512, 768]
  [[datasets.subsets]]
  image_dir = 'img'
  conditioning_data_dir = 'cond'
  caption_extension = '.txt'
  custom_attributes = { diff_output_preservation = true }
)",
                                 "ds.toml", TrainArgs{});
  const auto& d = bp.datasets.at(0);
  EXPECT_EQ(d.kind, DatasetKind::ControlNet);
  EXPECT_EQ(d.width, 512);
  EXPECT_EQ(d.height, 768);
  EXPECT_EQ(d.subsets.at(0).conditioning_data_dir, "cond");
  EXPECT_EQ(std::get<bool>(d.subsets.at(0).custom_attributes.at("diff_output_preservation")), true);
}

TEST(DatasetConfig, TomlSyntaxErrorNamesTheFile) {
  EXPECT_NE(error_of("[general\n").find("ds.toml: not valid TOML"), std::string::npos);
}

}  // namespace
}  // namespace sdt

namespace sdt {
namespace {

TEST(DatasetConfig, TrainDataDirSubfoldersBecomeDreamBoothSubsetsAsKohyaNamesThem) {
  namespace fs = std::filesystem;
  const fs::path root = fs::path(testing::TempDir()) / "sdt_train_data_dir";
  fs::remove_all(root);
  for (const char* d : {"train/10_sks dog", "train/2_sks_cat", "train/notes", "reg/1_dog"}) fs::create_directories(root / d);
  TrainArgs args;
  args.train_data_dir = (root / "train").string();
  args.reg_data_dir = (root / "reg").string();
  args.resolution = "512";
  DatasetBlueprint bp = resolve_dataset_config(args);
  ASSERT_EQ(bp.datasets.size(), 1u);
  const auto& subsets = bp.datasets[0].subsets;
  ASSERT_EQ(subsets.size(), 3u);  // "notes" has no repeat count
  EXPECT_EQ(subsets[0].num_repeats, 10);
  EXPECT_EQ(subsets[0].class_tokens, "sks dog");
  EXPECT_EQ(subsets[1].class_tokens, "sks_cat");
  EXPECT_TRUE(subsets[2].is_reg);
  EXPECT_EQ(bp.datasets[0].width, 512);
  fs::remove_all(root);
}

TEST(DatasetConfig, InJsonMakesOneFineTuningSubset) {
  TrainArgs args;
  args.train_data_dir = "/data/images";
  args.in_json = "/data/meta.json";
  args.resolution = "768,512";
  DatasetBlueprint bp = resolve_dataset_config(args);
  EXPECT_EQ(bp.datasets.at(0).kind, DatasetKind::FineTuning);
  EXPECT_EQ(bp.datasets.at(0).subsets.at(0).metadata_file, "/data/meta.json");
  EXPECT_EQ(bp.datasets.at(0).width, 768);
  EXPECT_EQ(bp.datasets.at(0).height, 512);
  EXPECT_THROW(resolve_dataset_config(TrainArgs{}), Error);
}

}  // namespace
}  // namespace sdt
