// kohya's optimizer steps inside backward (--fused_backward_pass, --fused_optimizer_groups) through the trainer's own
// path (DataParallel's per-tensor gradient callback, FusedSteps, Optimizer::step_parameters) against sdxl_train.py's
// hooks run on the same MLP (tests/fixtures/train/fused_steps.safetensors, made by gen_fused_step_fixtures.py with
// kohya's library/adafactor_fused.py and its group split).
#include <gtest/gtest.h>

#include <iostream>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "cluster/communicator.h"
#include "src/core/error.h"
#include "src/parallel/data_parallel.h"
#include "src/train/fused_steps.h"
#include "src/train/make_optimizer.h"
#include "tests/fixture_files.h"

namespace sdt {
namespace {

constexpr int kSteps = 4;
const std::string kFixture = SDT_FIXTURES "/train/fused_steps.safetensors";

const std::map<std::string, at::Tensor>& fixture() {
  static const std::map<std::string, at::Tensor> tensors = testing_support::read_tensors(kFixture);
  return tensors;
}

nlohmann::json fixture_metadata(const char* key) { return nlohmann::json::parse(safetensors::File(kFixture).metadata().at(key)); }

at::Tensor forward(const std::vector<at::Tensor>& p, const at::Tensor& x) {
  const at::Tensor h = at::gelu(at::linear(x, p[0], p[1]));
  return at::linear(h, p[2], p[3]);
}

// The fixture's MLP trained on its inputs with the run's flags: fused steps inside each backward, or (fused = false)
// the ordinary step after it. The parameters after every step.
std::vector<std::vector<at::Tensor>> train_mlp(const TrainArgs& args, const std::vector<double>& group_lrs, bool fused) {
  std::vector<at::Tensor> params;
  for (int i = 0; i < 4; ++i) params.push_back(fixture().at(fmt::format("init.{}", i)).clone().set_requires_grad(true));
  const std::vector<ParamGroup> groups{{{params[0], params[1]}, group_lrs[0]}, {{params[2], params[3]}, group_lrs[1]}};
  const std::unique_ptr<Communicator> communicator = make_communicator(World{}, at::kCPU);
  DataParallel parallel(groups, *communicator, Sharding::none, 1 << 20);
  MadeOptimizer made = make_optimizer(args, parallel.optimizer_groups());
  std::unique_ptr<FusedSteps> fused_steps;
  if (fused) {
    fused_steps = std::make_unique<FusedSteps>(*made.optimizer, parallel.optimizer_groups(), args, false);
    parallel.set_on_gradient([&](at::Tensor& t) { fused_steps->on_gradient(t); }, FusedSteps::flag(args));
  }
  std::vector<std::vector<at::Tensor>> history;
  for (int step = 0; step < kSteps; ++step) {
    at::mse_loss(forward(params, fixture().at("x")), fixture().at("y")).backward();
    parallel.finish();
    if (fused) {
      fused_steps->finish_backward();
      for (const at::Tensor& p : params) EXPECT_FALSE(p.grad().defined()) << "a fused step frees its gradient";
    } else {
      if (args.max_grad_norm > 0) parallel.clip_grad_norm(args.max_grad_norm);
      made.optimizer->step();
      made.optimizer->zero_grad();
    }
    history.emplace_back();
    for (const at::Tensor& p : params) history.back().push_back(p.detach().clone());
  }
  return history;
}

TrainArgs args_of(const nlohmann::json& run) {
  TrainArgs args;
  args.optimizer_type = run["optimizer_type"];
  args.optimizer_args = run["optimizer_args"].get<std::vector<std::string>>();
  args.learning_rate = run["learning_rate"];
  args.max_grad_norm = run["max_grad_norm"];
  args.fused_backward_pass = run["fused_backward_pass"];
  if (!run["fused_optimizer_groups"].is_null()) args.fused_optimizer_groups = run["fused_optimizer_groups"].get<int64_t>();
  return args;
}

// The same operations in the same order as kohya's hooks and optimizers, in fp32: the kernels may round an ulp apart
// per operation (vectorisation), so the parameters may drift by an ulp or two of their magnitude per step (2 allowed).
// Clipping by the norm of all tensors instead of each tensor's own moves them by a sizeable part of the step.
TEST(FusedSteps, StepsInBackwardMatchKohyasHooksAfterEveryStep) {
  for (const nlohmann::json& run : fixture_metadata("runs")) {
    const std::string name = run["name"];
    const auto history = train_mlp(args_of(run), run["group_lrs"].get<std::vector<double>>(), true);
    double worst_ulps = 0, max_abs = 0;
    for (int step = 0; step < kSteps; ++step) {
      for (int i = 0; i < 4; ++i) {
        const at::Tensor expected = fixture().at(fmt::format("{}.{}.{}", name, step, i));
        const double abs = (history[step][i] - expected).abs().max().item<double>();
        const double ulp = expected.abs().max().item<double>() / (1 << 23);
        max_abs = std::max(max_abs, abs);
        worst_ulps = std::max(worst_ulps, abs / ulp / (step + 1));
      }
    }
    std::cout << "[conformance] fused " << name << " vs kohya's hooks: max abs err " << max_abs << ", " << worst_ulps
              << " ulp per step\n";
    EXPECT_LE(worst_ulps, 2.0) << name;
  }
}

// kohya clips each tensor's gradient by its own norm: with SGD (Nesterov momentum 0.9, lr 1) the first step moves
// every tensor by 1.9 x its gradient scaled to norm 0.05 (each gradient here is larger), where clipping by the norm of
// all of them together would make the moves' norms add up, in squares, to 1.9 x 0.05.
TEST(FusedSteps, ClippingIsPerTensorNotGlobal) {
  TrainArgs args;
  args.optimizer_type = "SGDNesterov";
  args.learning_rate = 1.0;
  args.max_grad_norm = 0.05;
  args.fused_optimizer_groups = 1;
  const auto moved = train_mlp(args, {1.0, 1.0}, true);
  for (int i = 0; i < 4; ++i) {
    const double norm = (moved[0][i] - fixture().at(fmt::format("init.{}", i))).norm().item<double>();
    EXPECT_NEAR(norm, 1.9 * 0.05, 1e-6) << "tensor " << i;  // fp32 sums of a few dozen values of size 0.05
  }
}

// Without clipping, stepping group by group in backward computes exactly what one step after backward computes.
TEST(FusedSteps, WithoutClippingEqualOneStepAfterBackwardBitwise) {
  for (const nlohmann::json& run : fixture_metadata("runs")) {
    TrainArgs args = args_of(run);
    args.max_grad_norm = 0;
    const auto group_lrs = run["group_lrs"].get<std::vector<double>>();
    const auto fused = train_mlp(args, group_lrs, true), plain = train_mlp(args, group_lrs, false);
    for (int i = 0; i < 4; ++i) EXPECT_TRUE(at::equal(fused.back()[i], plain.back()[i])) << run["name"] << " tensor " << i;
  }
}

TEST(FusedSteps, GroupsSplitAsKohyaSplitsThem) {
  for (const nlohmann::json& split : fixture_metadata("splits")) {
    std::vector<ParamGroup> groups;
    const auto sizes = split["sizes"].get<std::vector<int64_t>>();
    const auto lrs = split["lrs"].get<std::vector<double>>();
    for (size_t g = 0; g < sizes.size(); ++g) groups.push_back({std::vector<at::Tensor>(sizes[g], at::zeros({1})), lrs[g]});
    std::vector<int64_t> group_of;
    const auto fused_groups = fused_optimizer_groups(groups, split["count"].get<int64_t>());
    for (size_t g = 0; g < fused_groups.size(); ++g) {
      for (size_t i : fused_groups[g]) {
        EXPECT_EQ(i, group_of.size()) << "tensors stay in order";
        group_of.push_back(static_cast<int64_t>(g));
      }
    }
    const at::Tensor expected = fixture().at("split." + split["name"].get<std::string>());
    EXPECT_TRUE(at::equal(at::tensor(group_of), expected)) << split["name"];
  }
}

// A tensor no batch uses gets no gradient: its group still steps its other tensors once backward is over (kohya's
// counter would wait for it for ever and never step the group).
TEST(FusedSteps, AGroupWithAnUnusedTensorStepsTheOthersAfterBackward) {
  const at::Tensor used = at::ones({3}).set_requires_grad(true), unused = at::ones({3}).set_requires_grad(true);
  const std::vector<ParamGroup> groups{{{used, unused}, 0.1}};
  const std::unique_ptr<Communicator> communicator = make_communicator(World{}, at::kCPU);
  DataParallel parallel(groups, *communicator, Sharding::none, 1 << 20);
  TrainArgs args;
  args.optimizer_type = "SGDNesterov";
  args.fused_optimizer_groups = 1;
  args.max_grad_norm = 0;
  MadeOptimizer made = make_optimizer(args, parallel.optimizer_groups());
  FusedSteps fused(*made.optimizer, parallel.optimizer_groups(), args, false);
  parallel.set_on_gradient([&](at::Tensor& t) { fused.on_gradient(t); }, FusedSteps::flag(args));
  (used * 2).sum().backward();
  parallel.finish();
  EXPECT_TRUE(at::equal(used.detach(), at::ones({3}))) << "the group waits for its last tensor";
  fused.finish_backward();
  EXPECT_TRUE(at::allclose(used.detach(), at::full({3}, 1.0 - 0.1 * 1.9 * 2))) << used;  // SGD, Nesterov momentum 0.9
  EXPECT_TRUE(at::equal(unused.detach(), at::ones({3})));
}

void expect_refused(const TrainArgs& args, bool loss_scaling, const std::string& words, Sharding sharding = Sharding::none) {
  const at::Tensor w = at::ones({4, 4}).set_requires_grad(true);
  const std::vector<ParamGroup> groups{{{w}, 1e-3}};
  const std::unique_ptr<Communicator> communicator = make_communicator(World{}, at::kCPU);
  try {
    DataParallel parallel(groups, *communicator, sharding, 1 << 20);
    MadeOptimizer made = make_optimizer(args, parallel.optimizer_groups());
    FusedSteps fused(*made.optimizer, parallel.optimizer_groups(), args, loss_scaling);
    parallel.set_on_gradient([&](at::Tensor& t) { fused.on_gradient(t); }, FusedSteps::flag(args));
    ADD_FAILURE() << "expected an error with " << words;
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(words), std::string::npos) << e.what();
  }
}

TEST(FusedSteps, RefusesWhatCannotBeFusedNamingTheFlag) {
  TrainArgs adafactor;
  adafactor.optimizer_type = "Adafactor";
  adafactor.fused_backward_pass = true;
  TrainArgs adamw = adafactor;
  adamw.optimizer_type = "AdamW";
  expect_refused(adamw, false, "works with --optimizer_type Adafactor only");
  TrainArgs accumulating = adafactor;
  accumulating.gradient_accumulation_steps = 2;
  expect_refused(accumulating, false, "--gradient_accumulation_steps 2");
  expect_refused(adafactor, true, "--mixed_precision bf16");
  TrainArgs both = adafactor;
  both.fused_optimizer_groups = 2;
  expect_refused(both, false, "choose one");
  TrainArgs prodigy;
  prodigy.optimizer_type = "Prodigy";
  prodigy.learning_rate = 1.0;
  prodigy.fused_optimizer_groups = 2;
  expect_refused(prodigy, false, "Prodigy computes one step size from all weights");
  TrainArgs groups;
  groups.fused_optimizer_groups = 0;
  expect_refused(groups, false, "must be at least 1");
  TrainArgs sharded;
  sharded.fused_optimizer_groups = 2;
  expect_refused(sharded, false, "--sharding none", Sharding::optimizer);
}

}  // namespace
}  // namespace sdt

namespace sdt {
namespace {

// kohya's fused Adafactor writes a bf16 weight's update back with stochastic rounding: an update of 0.001 to weights
// of 1.0 (bf16's spacing just below 1 is 2^-8) is lost by round-to-nearest, but moves a quarter of the weights one
// spacing down, so the mean moves by the update (4096 weights: the mean's standard deviation is 2.7e-5).
TEST(FusedSteps, Bf16WeightsTakeAdafactorsUpdateWithStochasticRounding) {
  const auto step_once = [](bool stochastic) {
    at::Tensor w = at::ones({64, 64}, at::kBFloat16).set_requires_grad(true);
    AdafactorConfig config;
    config.relative_step = false;
    config.scale_parameter = false;
    config.stochastic_bf16_rounding = stochastic;
    Adafactor optimizer({{{w}, 1e-3}}, config);
    w.mutable_grad() = at::ones_like(w);
    at::manual_seed(3);
    optimizer.step();
    return w.detach().to(at::kFloat);
  };
  EXPECT_TRUE(at::equal(step_once(false), at::ones({64, 64})));
  const at::Tensor rounded = step_once(true);
  EXPECT_NEAR(rounded.mean().item<double>(), 1.0 - 1e-3, 1.5e-4);
  EXPECT_TRUE(at::all((rounded == 1.0) | (rounded == 1.0 - 1.0 / 256)).item<bool>());
}

}  // namespace
}  // namespace sdt
