// Shared by the dist tests: stem -> a stack of identical residual MLP blocks -> head, trained a few
// AdamW steps on fixed data with the global batch split over the ranks. Two ways to run it:
//
//   ReferenceRun  plain data parallel: every rank holds the whole model, GradientReducer averages
//                 every trainable gradient (the control, as torchtitan uses 1-D FSDP's DDP twin)
//   StackRun      the stack in a BlockEngine (sharding, block swap); stem and head replicated under a
//                 GradientReducer, as a trainer holds the small layers around a transformer's blocks
//
// Both draw the same initial weights from one seed and see the same batches, so after any number of
// steps their losses and weights must agree.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "cluster/communicator.h"
#include "src/parallel/gradient_reducer.h"
#include "src/parallel/block_engine.h"
#include "src/train/optimizers.h"

namespace sdt {

// A CPU communicator over the job's ranks (dist_test_main.cpp).
Communicator& test_communicator();

struct TinyConfig {
  int64_t in = 8, dim = 64, hidden = 256, out = 4, blocks = 6;
  int64_t global_rows = 6;  // split evenly over 1, 2 or 3 ranks
  int64_t micro_steps = 1;   // gradient accumulation: batches per optimizer step
  bool frozen_stack = false;
  double lr = 1e-3;
};

// LayerNorm -> Linear -> GELU -> Linear, added to the input.
struct ResidualMlpImpl : torch::nn::Module {
  ResidualMlpImpl(int64_t dim, int64_t hidden);
  at::Tensor forward(const at::Tensor& x);
  torch::nn::LayerNorm norm{nullptr};
  torch::nn::Linear fc1{nullptr}, fc2{nullptr};
};
TORCH_MODULE(ResidualMlp);

// The model's layers as one process builds them from the seed.
struct TinyModel {
  explicit TinyModel(const TinyConfig& config);
  torch::nn::Linear stem{nullptr}, head{nullptr};
  std::vector<ResidualMlp> blocks;
  std::vector<at::Tensor> replicated_parameters() const;  // stem's and head's
};

struct Batch {
  at::Tensor x, y;
};
// This rank's rows of step `step`'s global batch.
Batch batch_for_step(const TinyConfig& config, int64_t step, int rank, int ranks);

class ReferenceRun {
 public:
  ReferenceRun(const TinyConfig& config, Communicator& communicator);
  double step(int64_t step);  // the mean loss over the global batches of the step
  TinyModel& model() { return model_; }
  AdamW& optimizer() { return *optimizer_; }  // over stem, blocks, head, in that order

 private:
  TinyConfig config_;
  Communicator& communicator_;
  TinyModel model_;
  std::unique_ptr<GradientReducer> reducer_;
  std::unique_ptr<AdamW> optimizer_;
};

// How StackRun's engine holds the stack: one swap stack of all the blocks.
struct StackOptions {
  Sharding sharding = Sharding::none;
  int64_t blocks_to_swap = 0;
  std::optional<at::ScalarType> compute_dtype;
};

class StackRun {
 public:
  StackRun(const TinyConfig& config, Communicator& communicator, StackOptions options);
  // The blocks through the engine, as a model runs them.
  at::Tensor forward(const at::Tensor& x);
  double step(int64_t step);
  // The two halves of step(), for looking at the state in between.
  double forward_backward(int64_t step);
  void optimizer_step();

  BlockEngine& stack() { return *stack_; }
  TinyModel& model() { return model_; }
  AdamW* stack_optimizer() { return stack_optimizer_.get(); }  // null for a frozen stack
  AdamW& replicated_optimizer() { return *replicated_optimizer_; }

 private:
  TinyConfig config_;
  Communicator& communicator_;
  TinyModel model_;
  std::unique_ptr<BlockEngine> stack_;
  std::unique_ptr<GradientReducer> reducer_;
  std::unique_ptr<AdamW> replicated_optimizer_;
  std::unique_ptr<AdamW> stack_optimizer_;
};

// Largest difference relative to the largest reference magnitude (0 when both are all zeros).
double relative_difference(const at::Tensor& ours, const at::Tensor& reference);

// This rank's piece of block b of the reference model, laid out as `stack` lays out its masters.
at::Tensor reference_master(const BlockEngine& stack, const ResidualMlp& block);

// Largest relative difference over every master, and over the stem and head.
double masters_difference(const BlockEngine& stack, const TinyModel& reference);
double replicated_difference(const TinyModel& ours, const TinyModel& reference);

// Resume files: the stack (masters and AdamW moments, via save_stack) and the replicated layers with
// their optimizer (rank 0 writes them; every rank reads). Collective.
void save_run(StackRun& run, const std::string& folder);
void load_run(StackRun& run, const std::string& folder);
// The same files into the unsharded model and its optimizer: the plain run resumed from them.
void load_reference(ReferenceRun& run, const std::string& folder);

}  // namespace sdt
