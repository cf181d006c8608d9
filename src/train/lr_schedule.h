// Learning-rate schedules as kohya's get_scheduler_fix builds them from transformers' schedule
// functions (the same lambdas as diffusers.optimization.get_scheduler for these types): each group's
// lr at optimizer step k (0-based) is its base lr × multiplier(k), which is what LambdaLR sets.
#pragma once

#include <cstdint>
#include <vector>

#include <torch/optim/optimizer.h>

#include "src/core/train_args.h"

namespace sdt {

enum class LrScheduleType { Constant, ConstantWithWarmup, Linear, Cosine, CosineWithRestarts, Polynomial, Adafactor };

struct LrSchedule {
  LrScheduleType type = LrScheduleType::Constant;
  int64_t warmup_steps = 0;
  int64_t training_steps = 0;
  double num_cycles = 0.5;  // cosine: half a wave by default; cosine_with_restarts: --lr_scheduler_num_cycles
  double power = 1.0;       // polynomial
  double lr_init = 0;       // polynomial decays from the optimizer's default lr (--learning_rate) ...
  double lr_end = 1e-7;     // ... to this

  // Linear warm-up from 0 over warmup_steps, then the type's decay over the remaining training steps.
  // Adafactor's relative step computes its own lr: 1.
  double multiplier(int64_t step) const;
};

// kohya's get_scheduler_fix: --lr_scheduler with --lr_warmup_steps (steps, or a ratio of the total),
// --lr_scheduler_num_cycles, --lr_scheduler_power, --lr_scheduler_args (cosine's num_cycles,
// polynomial's lr_end); the total is max_train_steps × num_processes. `adafactor_schedule` is
// MadeOptimizer::uses_adafactor_schedule. Throws sdt::Error naming the argument for a schedule sdt
// lacks, warm-up on a schedule without one, or an unknown scheduler argument.
LrSchedule make_lr_schedule(const TrainArgs& args, int64_t num_processes, bool adafactor_schedule);

// Sets every group's lr from the base lr it had when the scheduler was made (LambdaLR's initial_lr).
// Stateless apart from those base lrs: a resumed run calls set_step with its step and continues.
class LrScheduler {
 public:
  LrScheduler(torch::optim::Optimizer& optimizer, LrSchedule schedule);

  void set_step(int64_t step);
  const LrSchedule& schedule() const { return schedule_; }

 private:
  torch::optim::Optimizer& optimizer_;
  LrSchedule schedule_;
  std::vector<double> base_lrs_;
};

}  // namespace sdt
