// `sdt train` / `sdt train_db`: kohya's train_network.py and train_db.py loops in one:
// data -> latents and text conditioning -> noise, timesteps, targets -> the denoiser (with the LoRA applied, or
// itself trained) -> loss -> backward -> clip -> optimizer and learning-rate step; progress, logs, weight files in
// the formats users load, and a resume state that continues a run bitwise.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "cluster/world.h"
#include "src/core/train_args.h"

namespace sdt {

// What is trained: a network (LoRA) on frozen models (train_network.py), or the models themselves (train_db.py:
// DreamBooth and fine-tuning).
enum class TrainMode { network, whole_model };

// Seconds spent per phase, summed over the run's optimizer steps on this rank.
struct StepTimes {
  double data = 0;           // waiting for the loader's next batch
  double forward = 0;        // latents, text conditioning, noise, the denoiser and the loss
  double backward = 0;
  double communication = 0;  // waiting for gradient all-reduces that backward did not hide
  double optimizer = 0;      // clipping, the update, the lr schedule, max-norm regularisation
  int64_t steps = 0;

  double total() const { return data + forward + backward + communication + optimizer; }
};

struct TrainSummary {
  int64_t first_step = 0;      // 0, or the step a resumed run started from
  int64_t steps = 0;           // the global step reached
  std::vector<double> losses;  // per optimizer step of this run (the mean over its accumulation micro-steps)
  std::string weights_path;    // the last weight file written (LoRA or whole model)
  std::string state_path;      // the last resume state written, if any
  std::vector<std::pair<int64_t, double>> validation_losses;  // (global step, validation loss), in order
  StepTimes times;
  int64_t planned_bytes = 0;   // this rank's memory plan: weights, gradients, optimizer state, buffers
  int64_t peak_bytes = 0;      // this rank's measured peak of live CPU tensor bytes during the run
  int64_t device_peak_bytes = 0;  // on a GPU: the caching allocator's peak of allocated bytes during the run
  bool interrupted = false;    // stopped by SIGUSR1 / SIGTERM after saving state_path; rerun with --resume latest
};

// `--resume latest` takes the newest complete state in --output_dir (none: start from the beginning), which is
// what a requeued job passes every time.
TrainSummary train(const TrainArgs& args, const World& world, TrainMode mode);

}  // namespace sdt
