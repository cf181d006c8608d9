// The lr schedules against transformers' (and diffusers', which agree) called as kohya's
// get_scheduler_fix calls them (tests/fixtures/train/lr_schedules.safetensors, 300 steps per case), the
// step and ratio arithmetic of the warm-up, and the errors.
#include <gtest/gtest.h>

#include <iostream>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "src/core/error.h"
#include "src/core/tensor_io.h"
#include "src/train/lr_schedule.h"
#include "src/train/make_optimizer.h"

namespace sdt {
namespace {

struct Case {
  TrainArgs args;
  std::vector<double> group_lrs;
  at::Tensor expected;  // (steps, groups) float64
};

std::vector<Case> cases() {
  safetensors::File file(SDT_FIXTURES "/train/lr_schedules.safetensors");
  std::vector<Case> out;
  size_t index = 0;
  for (const auto& c : nlohmann::json::parse(file.metadata().at("cases"))) {
    Case one;
    one.args.lr_scheduler = c["lr_scheduler"];
    one.args.max_train_steps = c["max_train_steps"];
    const auto& warmup = c["lr_warmup_steps"];
    one.args.lr_warmup_steps =
        warmup.is_number_integer() ? IntOrFloat::integer(warmup.get<int64_t>()) : IntOrFloat::ratio(warmup.get<double>());
    if (c.contains("lr_scheduler_num_cycles")) one.args.lr_scheduler_num_cycles = c["lr_scheduler_num_cycles"];
    if (c.contains("lr_scheduler_power")) one.args.lr_scheduler_power = c["lr_scheduler_power"];
    if (c.contains("lr_scheduler_args")) one.args.lr_scheduler_args = c["lr_scheduler_args"].get<std::vector<std::string>>();
    one.args.learning_rate = c["learning_rate"];
    one.group_lrs = c["group_lrs"].get<std::vector<double>>();
    one.expected = load_tensor(file, fmt::format("case.{}", index++)).clone();
    out.push_back(one);
  }
  return out;
}

// The groups' lrs at each step as LrScheduler sets them, over an optimizer of two groups.
at::Tensor scheduled_lrs(const LrSchedule& schedule, const std::vector<double>& group_lrs, int64_t steps) {
  std::vector<at::Tensor> params = {at::zeros({1}), at::zeros({1})};
  AdamW optimizer({{{params[0]}, group_lrs[0]}, {{params[1]}, group_lrs[1]}}, {});
  LrScheduler scheduler(optimizer, schedule);
  at::Tensor out = at::empty({steps, 2}, at::kDouble);
  for (int64_t step = 0; step < steps; ++step) {
    scheduler.set_step(step);
    for (int g = 0; g < 2; ++g) out[step][g] = optimizer.param_groups()[g].options().get_lr();
  }
  return out;
}

TEST(LrSchedule, EveryTypeMatchesTransformersAtEveryStep) {
  for (const Case& c : cases()) {
    const LrSchedule schedule = make_lr_schedule(c.args, 1, false);
    const at::Tensor actual = scheduled_lrs(schedule, c.group_lrs, c.expected.size(0));
    const double max_abs = (actual - c.expected).abs().max().item<double>();
    std::cout << "[conformance] " << c.args.lr_scheduler << " (warm-up " << schedule.warmup_steps
              << " steps): max abs err " << max_abs << " over " << c.expected.size(0) << " steps\n";
    EXPECT_TRUE(at::equal(actual, c.expected)) << c.args.lr_scheduler << ": max abs err " << max_abs;
  }
}

TEST(LrSchedule, WarmupRatiosCountTheStepsOfEveryProcess) {
  TrainArgs args;
  args.lr_scheduler = "linear";
  args.max_train_steps = 125;
  args.lr_warmup_steps = IntOrFloat::ratio(0.1);
  const LrSchedule schedule = make_lr_schedule(args, 2, false);
  EXPECT_EQ(schedule.training_steps, 250);
  EXPECT_EQ(schedule.warmup_steps, 25);
  args.max_train_steps = 99;
  EXPECT_EQ(make_lr_schedule(args, 1, false).warmup_steps, 9);  // int(0.1 * 99)

  LrSchedule cosine;
  cosine.type = LrScheduleType::Cosine;
  cosine.warmup_steps = 10;
  cosine.training_steps = 110;
  EXPECT_EQ(cosine.multiplier(0), 0.0);
  EXPECT_EQ(cosine.multiplier(5), 0.5);
  EXPECT_EQ(cosine.multiplier(10), 1.0);
  EXPECT_NEAR(cosine.multiplier(60), 0.5, 1e-15);
  EXPECT_NEAR(cosine.multiplier(110), 0.0, 1e-15);
}

std::string error_of(const std::string& name, TrainArgs args, bool adafactor = false) {
  args.lr_scheduler = name;
  try {
    make_lr_schedule(args, 1, adafactor);
  } catch (const sdt::Error& e) {
    return e.where() + ": " + e.what();
  }
  return "";
}

TEST(LrSchedule, MistakesAreNamed) {
  TrainArgs args;
  EXPECT_NE(error_of("cosin", args).find("did you mean 'cosine'?"), std::string::npos);
  EXPECT_NE(error_of("inverse_sqrt", args).find("not a schedule sdt has"), std::string::npos);
  EXPECT_NE(error_of("adafactor", args).find("optimizer_type=Adafactor"), std::string::npos);
  args.lr_warmup_steps = IntOrFloat::integer(10);
  EXPECT_NE(error_of("constant", args).find("lr_warmup_steps"), std::string::npos);
  EXPECT_NE(error_of("constant", args, true).find("lr_warmup_steps"), std::string::npos);
  args.lr_scheduler_args = {"lr_ending=1e-6"};
  EXPECT_NE(error_of("polynomial", args).find("did you mean 'lr_end'?"), std::string::npos);
  args.lr_scheduler_args = {"lr_end=1e-3"};
  args.learning_rate = 1e-4;
  EXPECT_NE(error_of("polynomial", args).find("learning_rate"), std::string::npos);
  args.lr_scheduler_type = "CosineAnnealingLR";
  EXPECT_NE(error_of("constant", args).find("lr_scheduler_type"), std::string::npos);
}

TEST(LrSchedule, AdafactorScheduleLeavesTheOptimizersLrsAlone) {
  TrainArgs args;
  args.optimizer_type = "Adafactor";
  args.lr_scheduler = "cosine";
  at::Tensor p = at::ones({4}).set_requires_grad(true);
  MadeOptimizer made = make_optimizer(args, {{{p}, 1e-3}});
  LrScheduler scheduler(*made.optimizer, make_lr_schedule(args, 1, made.uses_adafactor_schedule));
  EXPECT_EQ(scheduler.schedule().type, LrScheduleType::Adafactor);
  scheduler.set_step(100);
  EXPECT_EQ(made.optimizer->param_groups()[0].options().get_lr(), 1e-3);

  args.optimizer_args = {"relative_step=False"};
  EXPECT_FALSE(make_optimizer(args, {{{p}, 1e-3}}).uses_adafactor_schedule);
}

}  // namespace
}  // namespace sdt
