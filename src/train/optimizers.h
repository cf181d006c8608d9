// The optimizers of kohya-ss/sd-scripts' --optimizer_type, each reproducing its reference step:
//
//   AdamW       torch.optim.AdamW (single-tensor CPU path)
//   AdamW8bit   bitsandbytes.optim.AdamW8bit: Adam moments stored as 8-bit codes of a dynamic map, one
//               absmax per block of 256 (tensors below min_8bit_size keep 32-bit moments)
//   Lion        lion_pytorch.Lion
//   SGDNesterov torch.optim.SGD(nesterov=True)
//   Adafactor   transformers.optimization.Adafactor
//   Prodigy     prodigyopt.Prodigy
//
// LibTorch ships AdamW and SGD. Its SGD computes what PyTorch's does, but its AdamW updates the first
// moment with mul+add where PyTorch uses lerp (not bitwise the same). Both are written here so that
// every optimizer keeps one state layout (ParamState), which export_state / import_state turn into
// named tensors and exact scalars for a bitwise resume.
#pragma once

#include <cstdint>
#include <limits>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include <torch/optim/optimizer.h>

#include "src/core/safetensors.h"
#include "src/core/tensor_io.h"

namespace sdt {

// A parameter group as the trainer builds them (U-Net, text encoder, LoRA+ up weights, block-wise
// lrs): kohya varies only the learning rate between groups, every other hyperparameter is
// optimizer-wide.
struct ParamGroup {
  std::vector<at::Tensor> params;
  double lr = 0;
};

// The options LibTorch keeps per group: only the learning rate, which the scheduler sets each step.
class GroupLr final : public torch::optim::OptimizerCloneableOptions<GroupLr> {
 public:
  explicit GroupLr(double lr) : lr_(lr) {}
  double get_lr() const override { return lr_; }
  void set_lr(const double lr) override { lr_ = lr; }

 private:
  double lr_;
};

// One parameter's state: its step count and named tensors (moments, 8-bit codes and block absmax,
// factored second moments, ...). Created at the parameter's first step, as the references do.
struct ParamState final : torch::optim::OptimizerCloneableParamState<ParamState> {
  int64_t step = 0;
  std::map<std::string, at::Tensor> tensors;
};

// Everything an optimizer needs to continue a run bitwise.
struct OptimizerState {
  NamedTensors tensors;             // "<group>.<param index>.<state name>"
  safetensors::Metadata metadata;   // "optimizer", "<group>.<param>.step", optimizer-wide scalars
};

class Optimizer : public torch::optim::Optimizer {
 public:
  Optimizer(std::string kind, const std::vector<ParamGroup>& groups);

  // kohya's --optimizer_type spelling: "AdamW", "AdamW8bit", "Lion", ...
  const std::string& kind() const { return kind_; }

  at::Tensor step(LossClosure closure = nullptr) final;

  // Whether one parameter's update depends on that parameter alone (every optimizer but Prodigy, whose step size is
  // estimated from all of them): then step_parameters() may step some parameters before the others have gradients.
  virtual bool updates_each_parameter_alone() const { return true; }
  // Steps `params` alone (those with a gradient), as step() would step them: kohya's fused steps in backward.
  void step_parameters(const std::vector<at::Tensor>& params);

  OptimizerState export_state() const;
  // Restores a state exported by the same kind of optimizer over parameters of the same shapes;
  // throws sdt::Error naming what does not fit.
  void import_state(const OptimizerState& state);

 protected:
  // One update of every parameter that has a gradient (autograd is off): update_parameter() for each, group by group.
  virtual void update();
  // One update of one parameter of `group` that has a gradient (what every optimizer but Prodigy defines).
  virtual void update_parameter(size_t group, at::Tensor& p);
  // Scalars kept for the whole optimizer rather than per parameter (Prodigy's d estimate).
  virtual std::map<std::string, double> scalars() const { return {}; }
  virtual void set_scalars(const std::map<std::string, double>& values) {}

  double group_lr(size_t group) const { return param_groups_[group].options().get_lr(); }
  // The state of `param`, created empty (step 0, no tensors) on first use.
  ParamState& state_of(const at::Tensor& param);

 private:
  std::string kind_;
  std::map<const void*, size_t> group_of_;  // parameter -> group, for step_parameters()
};

struct AdamWConfig {
  double beta1 = 0.9, beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.01;
};

class AdamW final : public Optimizer {
 public:
  AdamW(const std::vector<ParamGroup>& groups, AdamWConfig config);

 private:
  void update_parameter(size_t group, at::Tensor& p) override;
  AdamWConfig config_;
};

struct AdamW8bitConfig {
  double beta1 = 0.9, beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.01;
  int64_t min_8bit_size = 4096;  // smaller tensors keep 32-bit moments
};

// bitsandbytes' 8-bit AdamW as its CUDA kernel defines it: each step dequantises the moments
// (code value × block absmax), updates them and the parameter in fp32, then re-quantises each block
// of 256 to the nearest code of a dynamic map scaled by the block's new absmax (signed map for the
// first moment, which keeps its sign; unsigned for the second). Decoupled weight decay follows the
// Adam update, as in the kernel.
class AdamW8bit final : public Optimizer {
 public:
  AdamW8bit(const std::vector<ParamGroup>& groups, AdamW8bitConfig config);

  static constexpr int64_t kBlockSize = 256;
  // bitsandbytes' create_dynamic_map(signed): 256 sorted float32 codes in [-1, 1] or [0, 1].
  static at::Tensor dynamic_map(bool is_signed);

 private:
  void update_parameter(size_t group, at::Tensor& p) override;
  AdamW8bitConfig config_;
  at::Tensor signed_map_, unsigned_map_;
  at::Tensor signed_midpoints_, unsigned_midpoints_;  // between neighbouring codes: nearest-code search
};

struct LionConfig {
  double beta1 = 0.9, beta2 = 0.99;
  double weight_decay = 0;
  // lion_pytorch's decoupled_weight_decay divides weight_decay by the lr the optimizer was made with.
  bool decoupled_weight_decay = false;
  double initial_lr = 1e-4;
};

class Lion final : public Optimizer {
 public:
  Lion(const std::vector<ParamGroup>& groups, LionConfig config);

 private:
  void update_parameter(size_t group, at::Tensor& p) override;
  LionConfig config_;
};

struct SGDConfig {
  double momentum = 0;
  double dampening = 0;
  double weight_decay = 0;
  bool nesterov = false;
};

class SGD final : public Optimizer {
 public:
  SGD(const std::vector<ParamGroup>& groups, SGDConfig config);

 private:
  void update_parameter(size_t group, at::Tensor& p) override;
  SGDConfig config_;
};

struct AdafactorConfig {
  double eps1 = 1e-30, eps2 = 1e-3;  // transformers' eps=(1e-30, 1e-3)
  double clip_threshold = 1.0;
  double decay_rate = -0.8;
  std::optional<double> beta1;       // None: no first moment
  double weight_decay = 0;
  bool scale_parameter = true;
  bool relative_step = true;         // lr = min(1e-2, 1/sqrt(step)) (× RMS of the parameter); group lrs unused
  bool warmup_init = false;          // relative lr = min(1e-6 × step, 1/sqrt(step))
  // kohya's fused Adafactor (--fused_backward_pass) writes a bf16 parameter's fp32 update back with stochastic
  // rounding (random low 16 bits added before truncation), transformers' with round-to-nearest.
  bool stochastic_bf16_rounding = false;
};

class Adafactor final : public Optimizer {
 public:
  Adafactor(const std::vector<ParamGroup>& groups, AdafactorConfig config);

  // The lr the last step used for the group's first parameter (what kohya's AdafactorSchedule logs).
  double effective_lr(size_t group) const;

 private:
  void update_parameter(size_t group, at::Tensor& p) override;
  double relative_step_size(size_t group, int64_t step) const;
  AdafactorConfig config_;
};

struct ProdigyConfig {
  double beta1 = 0.9, beta2 = 0.999;
  std::optional<double> beta3;  // None: sqrt(beta2)
  double eps = 1e-8;
  double weight_decay = 0;
  bool decouple = true;
  bool use_bias_correction = false;
  bool safeguard_warmup = false;
  double d0 = 1e-6;
  double d_coef = 1.0;
  double growth_rate = std::numeric_limits<double>::infinity();
  int64_t slice_p = 1;
};

// Prodigy: Adam whose step size d·lr is estimated from the distance travelled. Groups must share one
// lr (or have lr 0, frozen), as the reference requires.
class Prodigy final : public Optimizer {
 public:
  Prodigy(const std::vector<ParamGroup>& groups, ProdigyConfig config);

  double d() const { return d_; }
  bool updates_each_parameter_alone() const override { return false; }

 private:
  void update() override;
  std::map<std::string, double> scalars() const override;
  void set_scalars(const std::map<std::string, double>& values) override;
  ProdigyConfig config_;
  double d_, d_max_, d_numerator_ = 0;
  int64_t k_ = 0;  // completed steps (prodigyopt's group["k"])
};

// The state as one safetensors file (atomically written), and back.
void save_optimizer_state(const Optimizer& optimizer, const std::string& path);
void load_optimizer_state(Optimizer& optimizer, const std::string& path);

}  // namespace sdt
