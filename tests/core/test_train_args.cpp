// `sdt train` arguments: kohya's names and defaults, the command line forms argparse accepts, and
// the precedence command line > --config_file > defaults.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "src/core/error.h"
#include "src/core/train_args.h"

namespace sdt {
namespace {

std::string write_temp(const std::string& name, const std::string& text) {
  std::string path = testing::TempDir() + name;
  std::ofstream(path) << text;
  return path;
}

std::string error_of(const std::vector<std::string>& argv) {
  try {
    parse_train_args(argv);
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

TEST(TrainArgs, DefaultsAreKohyas) {
  TrainArgs a;
  EXPECT_DOUBLE_EQ(a.learning_rate, 2e-6);
  EXPECT_EQ(a.max_train_steps, 1600);
  EXPECT_FALSE(a.max_train_epochs.has_value());
  EXPECT_EQ(a.train_batch_size, 1);
  EXPECT_EQ(a.gradient_accumulation_steps, 1);
  EXPECT_EQ(a.mixed_precision, "no");
  EXPECT_DOUBLE_EQ(a.max_grad_norm, 1.0);
  EXPECT_EQ(a.lr_scheduler, "constant");
  EXPECT_EQ(a.caption_extension, ".caption");
  EXPECT_EQ(a.caption_separator, ",");
  EXPECT_EQ(a.min_bucket_reso, 256);
  EXPECT_EQ(a.max_bucket_reso, 1024);
  EXPECT_EQ(a.bucket_reso_steps, 64);
  EXPECT_EQ(a.loss_type, "l2");
  EXPECT_EQ(a.huber_schedule, "snr");
  EXPECT_DOUBLE_EQ(a.huber_c, 0.1);
  EXPECT_EQ(a.save_model_as, "safetensors");
  EXPECT_DOUBLE_EQ(a.network_alpha, 1.0);
  EXPECT_FALSE(a.network_dim.has_value());
  EXPECT_TRUE(a.lr_warmup_steps.is_int);
  EXPECT_GT(train_arg_specs().size(), 180u);
}

TEST(TrainArgs, CommandLineFormsOfArgparse) {
  auto p = parse_train_args({"--learning_rate", "1e-4", "--network_dim=16", "--gradient_checkpointing", "--network_args",
                             "conv_dim=4", "conv_alpha=1", "--text_encoder_lr", "1e-5", "2e-5", "--output_name", "my lora"});
  EXPECT_DOUBLE_EQ(p.args.learning_rate, 1e-4);
  EXPECT_EQ(p.args.network_dim, 16);
  EXPECT_TRUE(p.args.gradient_checkpointing);
  EXPECT_EQ(p.args.network_args, (std::vector<std::string>{"conv_dim=4", "conv_alpha=1"}));
  EXPECT_EQ(p.args.text_encoder_lr, (std::vector<double>{1e-5, 2e-5}));
  EXPECT_EQ(p.args.output_name, "my lora");
  EXPECT_EQ(p.config_path, "");
}

// kohya's old spelling --caption_extention, where given, sets --caption_extension (train_util.prepare_dataset_args).
TEST(TrainArgs, OldCaptionExtentionSpellingSetsTheCaptionExtension) {
  EXPECT_EQ(parse_train_args({"--caption_extension", ".caption", "--caption_extention", ".txt"}).args.caption_extension, ".txt");
  EXPECT_EQ(parse_train_args({"--caption_extension", ".tags"}).args.caption_extension, ".tags");
}

TEST(TrainArgs, UnambiguousPrefixIsAcceptedAsArgparseDoes) {
  EXPECT_EQ(parse_train_args({"--max_train_ste", "30"}).args.max_train_steps, 30);
  std::string e = error_of({"--network_d", "4"});
  EXPECT_NE(e.find("ambiguous"), std::string::npos) << e;
  EXPECT_NE(e.find("--network_dim"), std::string::npos) << e;
  EXPECT_NE(e.find("--network_dropout"), std::string::npos) << e;
}

TEST(TrainArgs, IntOrFloatFollowsKohya) {
  auto warmup = [](const std::string& v) { return parse_train_args({"--lr_warmup_steps", v}).args.lr_warmup_steps; };
  EXPECT_EQ(warmup("100"), IntOrFloat::integer(100));
  EXPECT_EQ(warmup("0.1"), IntOrFloat::ratio(0.1));
  EXPECT_EQ(warmup("10%"), IntOrFloat::ratio(0.1));
  EXPECT_NE(error_of({"--lr_warmup_steps", "1.5"}).find("step count"), std::string::npos);
}

TEST(TrainArgs, BadCommandLineValuesNameTheArgument) {
  std::string e = error_of({"--learning_rate", "fast"});
  EXPECT_NE(e.find("--learning_rate"), std::string::npos) << e;
  EXPECT_NE(e.find("expected a number"), std::string::npos) << e;
  e = error_of({"--lerning_rate", "1"});
  EXPECT_NE(e.find("unknown argument 'lerning_rate'"), std::string::npos) << e;
  EXPECT_NE(e.find("did you mean 'learning_rate'"), std::string::npos) << e;
  e = error_of({"--mixed_precision", "fp17"});
  EXPECT_NE(e.find("not one of: no, fp16, bf16"), std::string::npos) << e;
  EXPECT_NE(error_of({"--max_train_steps"}).find("expected one value"), std::string::npos);
  EXPECT_NE(error_of({"--gradient_checkpointing=yes"}).find("takes no value"), std::string::npos);
  EXPECT_NE(error_of({"stray"}).find("unexpected argument 'stray'"), std::string::npos);
}

// kohya's README example of --config_file: sections are only for the reader, they are flattened.
TEST(TrainArgs, ConfigFileSectionsAreFlattenedAndTheCommandLineWins) {
  std::string path = write_temp("kohya_readme.toml", R"(
[model_arguments]
v2 = false
pretrained_model_name_or_path = "runwayml/stable-diffusion-v1-5"

[optimizer_arguments]
optimizer_type = "AdamW8bit"
learning_rate = 1e-4
lr_warmup_steps = 0.05
text_encoder_lr = 5e-5
optimizer_args = [ "weight_decay=0.1", "betas=0.9,0.99" ]

[training_arguments]
max_train_epochs = 10
save_every_n_epochs = 1
gradient_checkpointing = true
mixed_precision = "bf16"
network_train_unet_only = true
)");
  auto p = parse_train_args({"--config_file", path, "--learning_rate", "2e-4", "--max_train_epochs=4"});
  EXPECT_EQ(p.config_path, path);
  EXPECT_EQ(p.args.pretrained_model_name_or_path, "runwayml/stable-diffusion-v1-5");
  EXPECT_EQ(p.args.optimizer_type, "AdamW8bit");
  EXPECT_DOUBLE_EQ(p.args.learning_rate, 2e-4);  // command line
  EXPECT_EQ(p.args.max_train_epochs, 4);         // command line
  EXPECT_EQ(p.args.save_every_n_epochs, 1);      // file
  EXPECT_TRUE(p.args.gradient_checkpointing);
  EXPECT_EQ(p.args.mixed_precision, "bf16");
  EXPECT_EQ(p.args.lr_warmup_steps, IntOrFloat::ratio(0.05));
  EXPECT_EQ(p.args.text_encoder_lr, std::vector<double>{5e-5});  // a scalar is a one-element list
  EXPECT_EQ(p.args.optimizer_args, (std::vector<std::string>{"weight_decay=0.1", "betas=0.9,0.99"}));
  EXPECT_EQ(p.args.max_train_steps, 1600);  // default
}

TEST(TrainArgs, ConfigFileWithoutTomlSuffixIsFoundAsKohyaDoes) {
  std::string path = write_temp("nosuffix.toml", "learning_rate = 5e-5\n");
  auto p = parse_train_args({"--config_file", path.substr(0, path.size() - 5)});
  EXPECT_DOUBLE_EQ(p.args.learning_rate, 5e-5);
}

TEST(TrainArgs, UnknownConfigKeyNamesFileLineKeyAndSuggestion) {
  std::string path = write_temp("typo.toml", "[training]\nmax_train_step = 100\n");
  std::string e = error_of({"--config_file", path});
  EXPECT_NE(e.find(path + ":2"), std::string::npos) << e;
  EXPECT_NE(e.find("'max_train_step'"), std::string::npos) << e;
  EXPECT_NE(e.find("[training]"), std::string::npos) << e;
  EXPECT_NE(e.find("did you mean 'max_train_steps'"), std::string::npos) << e;
}

TEST(TrainArgs, WrongConfigTypeNamesFileKeyAndExpectedType) {
  std::string path = write_temp("type.toml", "max_train_steps = \"100\"\n");
  std::string e = error_of({"--config_file", path});
  EXPECT_NE(e.find(path + ":1"), std::string::npos) << e;
  EXPECT_NE(e.find("'max_train_steps'"), std::string::npos) << e;
  EXPECT_NE(e.find("expected an integer"), std::string::npos) << e;
  path = write_temp("flag.toml", "gradient_checkpointing = 1\n");
  EXPECT_NE(error_of({"--config_file", path}).find("true/false"), std::string::npos);
  path = write_temp("choice.toml", "[a]\nloss_type = \"hubber\"\n");
  e = error_of({"--config_file", path});
  EXPECT_NE(e.find("did you mean 'huber'"), std::string::npos) << e;
}

TEST(TrainArgs, KeySetInTwoSectionsIsRefused) {
  std::string path = write_temp("twice.toml", "[a]\nlearning_rate = 1e-4\n[b]\nlearning_rate = 2e-4\n");
  std::string e = error_of({"--config_file", path});
  EXPECT_NE(e.find("already set in [a]"), std::string::npos) << e;
}

TEST(TrainArgs, MissingConfigFileIsAnErrorUnlessItIsTheOutput) {
  std::string missing = testing::TempDir() + "does_not_exist.toml";
  EXPECT_NE(error_of({"--config_file", missing}).find("config file not found"), std::string::npos);
  EXPECT_NO_THROW(parse_train_args({"--config_file", missing, "--output_config"}));
}

TEST(TrainArgs, OutputConfigReadsBackToTheSameArguments) {
  auto p = parse_train_args({"--learning_rate", "1e-4", "--network_args", "a=1", "b=\"q\"", "--lr_warmup_steps", "0.1",
                             "--gradient_checkpointing", "--output_name", "x\\y", "--max_token_length", "225",
                             "--config_file", testing::TempDir() + "out_never_written.toml", "--output_config"});
  std::string toml = train_args_to_toml(p.args);
  EXPECT_EQ(toml.find("config_file"), std::string::npos);
  EXPECT_EQ(toml.find("output_config"), std::string::npos);
  EXPECT_EQ(toml.find("max_train_steps"), std::string::npos);  // defaults are left out
  std::string path = write_temp("roundtrip.toml", toml);
  auto back = parse_train_args({"--config_file", path});
  for (const auto& spec : train_arg_specs()) {
    if (spec.name == "config_file" || spec.name == "output_config") continue;
    EXPECT_EQ(spec.get(back.args), spec.get(p.args)) << spec.name;
  }
}

}  // namespace
}  // namespace sdt
