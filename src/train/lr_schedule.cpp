#include "src/train/lr_schedule.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <string>

#include <fmt/ranges.h>

#include "src/core/error.h"
#include "src/core/text.h"
#include "src/train/make_optimizer.h"

namespace sdt {

// Each branch follows transformers' lambda expression by expression, in doubles, so the multipliers
// are bitwise the reference's.
double LrSchedule::multiplier(int64_t step) const {
  const double current = static_cast<double>(step);
  if (type == LrScheduleType::Constant || type == LrScheduleType::Adafactor) return 1.0;
  if (step < warmup_steps) return current / static_cast<double>(std::max<int64_t>(1, warmup_steps));
  if (type == LrScheduleType::ConstantWithWarmup) return 1.0;

  const double decay_steps = static_cast<double>(std::max<int64_t>(1, training_steps - warmup_steps));
  const double progress = static_cast<double>(step - warmup_steps) / decay_steps;
  switch (type) {
    case LrScheduleType::Linear:
      return std::max(0.0, static_cast<double>(training_steps - step) / decay_steps);
    case LrScheduleType::Cosine:
      return std::max(0.0, 0.5 * (1.0 + std::cos(M_PI * num_cycles * 2.0 * progress)));
    case LrScheduleType::CosineWithRestarts:
      if (progress >= 1.0) return 0.0;
      return std::max(0.0, 0.5 * (1.0 + std::cos(M_PI * std::fmod(num_cycles * progress, 1.0))));
    case LrScheduleType::Polynomial: {
      if (step > training_steps) return lr_end / lr_init;
      const double remaining = 1 - static_cast<double>(step - warmup_steps) /
                                       static_cast<double>(training_steps - warmup_steps);
      return ((lr_init - lr_end) * std::pow(remaining, power) + lr_end) / lr_init;
    }
    default:
      return 1.0;
  }
}

namespace {

const std::map<std::string, LrScheduleType> kScheduleTypes = {
    {"constant", LrScheduleType::Constant},
    {"constant_with_warmup", LrScheduleType::ConstantWithWarmup},
    {"linear", LrScheduleType::Linear},
    {"cosine", LrScheduleType::Cosine},
    {"cosine_with_restarts", LrScheduleType::CosineWithRestarts},
    {"polynomial", LrScheduleType::Polynomial},
    {"adafactor", LrScheduleType::Adafactor},
};

// kohya's int_or_float: a ratio is truncated to whole steps of the total.
int64_t to_steps(const IntOrFloat& value, int64_t total) {
  return value.is_int ? static_cast<int64_t>(value.value) : static_cast<int64_t>(value.value * static_cast<double>(total));
}

}  // namespace

LrSchedule make_lr_schedule(const TrainArgs& args, int64_t num_processes, bool adafactor_schedule) {
  if (!args.lr_scheduler_type.empty())
    fail("lr_scheduler_type", "custom scheduler classes ('{}') are not available in sdt; use lr_scheduler",
         args.lr_scheduler_type);
  // kohya replaces the scheduler by "adafactor:<lr>" whenever Adafactor takes relative steps.
  const std::string name = adafactor_schedule ? "adafactor" : args.lr_scheduler;
  auto type = kScheduleTypes.find(name);
  if (type == kScheduleTypes.end() || (type->second == LrScheduleType::Adafactor && !adafactor_schedule)) {
    std::vector<std::string> names;
    for (const auto& [known, unused] : kScheduleTypes)
      if (known != "adafactor") names.push_back(known);
    fail("lr_scheduler", "'{}' is not a schedule sdt has ({}){}{}", name, fmt::join(names, ", "),
         did_you_mean(name, names),
         name == "adafactor" ? "; the adafactor schedule comes with optimizer_type=Adafactor and relative_step=True" : "");
  }

  LrSchedule out;
  out.type = type->second;
  out.training_steps = args.max_train_steps * num_processes;
  out.warmup_steps = to_steps(args.lr_warmup_steps, out.training_steps);
  out.power = args.lr_scheduler_power;
  out.lr_init = args.learning_rate;
  if (out.type == LrScheduleType::CosineWithRestarts) out.num_cycles = static_cast<double>(args.lr_scheduler_num_cycles);
  if ((out.type == LrScheduleType::Constant || out.type == LrScheduleType::Adafactor) && out.warmup_steps != 0)
    fail("lr_warmup_steps", "{} does not warm up; set lr_warmup_steps to 0 (it is {})", name, out.warmup_steps);

  // kohya passes --lr_scheduler_args to the schedule function; these are the keyword arguments the
  // functions take that kohya does not pass itself.
  std::vector<std::string> accepted;
  if (out.type == LrScheduleType::Cosine) accepted = {"num_cycles"};
  if (out.type == LrScheduleType::Polynomial) accepted = {"lr_end"};
  for (const auto& [key, value] : parse_optimizer_args(args.lr_scheduler_args)) {
    if (std::find(accepted.begin(), accepted.end(), key) == accepted.end())
      fail("lr_scheduler_args", "{} takes no argument '{}'{}", name, key,
           accepted.empty() ? "" : fmt::format(" (it takes {}){}", fmt::join(accepted, ", "), did_you_mean(key, accepted)));
    if (!value.is_number()) fail("lr_scheduler_args " + key, "expects a number, got {}", value.repr());
    (key == "lr_end" ? out.lr_end : out.num_cycles) = value.number();
  }
  if (out.type == LrScheduleType::Polynomial && !(out.lr_init > out.lr_end))
    fail("learning_rate", "polynomial decays to lr_end={} and needs a larger learning_rate, got {}", out.lr_end,
         out.lr_init);
  return out;
}

LrScheduler::LrScheduler(torch::optim::Optimizer& optimizer, LrSchedule schedule)
    : optimizer_(optimizer), schedule_(schedule) {
  for (const auto& group : optimizer_.param_groups()) base_lrs_.push_back(group.options().get_lr());
}

void LrScheduler::set_step(int64_t step) {
  if (schedule_.type == LrScheduleType::Adafactor) return;
  const double factor = schedule_.multiplier(step);
  auto& groups = optimizer_.param_groups();
  for (size_t g = 0; g < groups.size(); ++g) groups[g].options().set_lr(base_lrs_[g] * factor);
}

}  // namespace sdt
