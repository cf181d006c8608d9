// `sdt train` for networks (LoRA), kohya's train_network.py loop: data -> latents and text
// conditioning -> noise, timesteps, targets -> the denoiser with the LoRA applied -> loss ->
// backward -> clip -> optimizer and learning-rate step; progress, logs, LoRA files in kohya's format.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "cluster/world.h"
#include "src/core/train_args.h"

namespace sdt {

struct TrainSummary {
  int64_t steps = 0;
  std::vector<double> losses;  // per optimizer step (the mean over its accumulation micro-steps)
  std::string weights_path;    // the last LoRA file written
};

TrainSummary train_network(const TrainArgs& args, const World& world);

}  // namespace sdt
