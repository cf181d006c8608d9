// What the training tests compare: the weight files two runs wrote, stretches of a loss curve, the losses of runs with
// and without caches.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <iostream>
#include <numeric>
#include <string>
#include <vector>

#include <ATen/ATen.h>

#include "src/core/safetensors.h"
#include "src/core/tensor_io.h"
#include "src/train/trainer.h"

namespace sdt::testing_support {

// Whether two weight files hold the same tensors bit for bit.
inline bool bitwise_equal(const std::string& a, const std::string& b) {
  safetensors::File fa(a), fb(b);
  if (fa.tensors().size() != fb.tensors().size()) return false;
  for (const auto& t : fa.tensors()) {
    if (!fb.contains(t.name) || !at::equal(load_tensor(fa, t.name), load_tensor(fb, t.name))) return false;
  }
  return true;
}

// The largest difference between the tensors of two weight files whose names contain `part` (all but a LoRA's
// alphas when empty), relative to the largest of them in `b`.
inline double relative_difference(const std::string& a, const std::string& b, const std::string& part = "") {
  safetensors::File fa(a), fb(b);
  double difference = 0, largest = 1e-30;
  for (const auto& t : fa.tensors()) {
    if (t.name.ends_with(".alpha") || t.name.find(part) == std::string::npos) continue;
    const at::Tensor x = load_tensor(fa, t.name).to(at::kDouble), y = load_tensor(fb, t.name).to(at::kDouble);
    difference = std::max(difference, (x - y).abs().max().item<double>());
    largest = std::max(largest, y.abs().max().item<double>());
  }
  return difference / largest;
}

// kohya's --cache_latents_to_disk and --cache_text_encoder_outputs_to_disk: `args` run encoding the images and the
// captions each step, then from the caches (written to `cached_output_dir`), give the same loss at every step (1e-5
// relative: the same operations, once stored).
inline void expect_cached_runs_give_the_losses_of_encoding(TrainArgs args, const std::string& cached_output_dir) {
  const TrainSummary on_the_fly = train(args, World{}, TrainMode::network);
  args.cache_latents_to_disk = true;
  args.cache_text_encoder_outputs_to_disk = true;
  args.output_dir = cached_output_dir;
  const TrainSummary cached = train(args, World{}, TrainMode::network);
  ASSERT_EQ(cached.losses.size(), on_the_fly.losses.size());
  for (size_t i = 0; i < on_the_fly.losses.size(); ++i) {
    EXPECT_NEAR(cached.losses[i], on_the_fly.losses[i], 1e-5 * on_the_fly.losses[i]) << "step " << i + 1;
  }
}

// The mean of losses[from, to).
inline double mean(const std::vector<double>& losses, size_t from, size_t to) {
  return std::accumulate(losses.begin() + static_cast<std::ptrdiff_t>(from), losses.begin() + static_cast<std::ptrdiff_t>(to),
                         0.0) /
         static_cast<double>(to - from);
}

// The mean loss of a run's first and of its last 20 steps, printed under `what` (the figure a note quotes).
struct LossTrend {
  double first = 0, last = 0;
};
inline LossTrend loss_trend(const std::vector<double>& losses, const std::string& what) {
  const LossTrend trend{mean(losses, 0, 20), mean(losses, losses.size() - 20, losses.size())};
  std::cout << what << ": mean loss of the first 20 steps " << trend.first << ", of the last 20 " << trend.last << "\n";
  return trend;
}

}  // namespace sdt::testing_support
