#include "tests/parallel/tiny_stack.h"

#include <filesystem>

#include <fmt/format.h>

#include "src/core/tensor_io.h"
#include "src/parallel/stack_checkpoint.h"

namespace sdt {

ResidualMlpImpl::ResidualMlpImpl(int64_t dim, int64_t hidden) {
  norm = register_module("norm", torch::nn::LayerNorm(torch::nn::LayerNormOptions({dim})));
  fc1 = register_module("fc1", torch::nn::Linear(dim, hidden));
  fc2 = register_module("fc2", torch::nn::Linear(hidden, dim));
  // LayerNorm starts at (1, 0); move it off so its gradients are not special.
  torch::NoGradGuard no_grad;
  norm->weight.normal_(1.0, 0.1);
  norm->bias.normal_(0.0, 0.1);
}

at::Tensor ResidualMlpImpl::forward(const at::Tensor& x) { return x + fc2(torch::gelu(fc1(norm(x)))); }

TinyModel::TinyModel(const TinyConfig& config) {
  torch::manual_seed(42);
  stem = torch::nn::Linear(config.in, config.dim);
  for (int64_t b = 0; b < config.blocks; ++b) {
    blocks.emplace_back(config.dim, config.hidden);
    if (config.frozen_stack) {
      for (auto& p : blocks.back()->parameters()) p.set_requires_grad(false);
    }
  }
  head = torch::nn::Linear(config.dim, config.out);
}

std::vector<at::Tensor> TinyModel::replicated_parameters() const {
  std::vector<at::Tensor> out = stem->parameters();
  for (const auto& p : head->parameters()) out.push_back(p);
  return out;
}

Batch batch_for_step(const TinyConfig& config, int64_t step, int rank, int ranks) {
  torch::manual_seed(1000 + step);
  const at::Tensor x = torch::randn({config.global_rows, config.in});
  const at::Tensor y = torch::randn({config.global_rows, config.out});
  const int64_t rows = config.global_rows / ranks;
  return {x.narrow(0, rank * rows, rows), y.narrow(0, rank * rows, rows)};
}

namespace {

double global_mean(const at::Tensor& loss, Communicator& communicator) {
  const at::Tensor value = loss.detach().reshape({1}).clone();
  communicator.all_reduce(value, ReduceOp::average);
  return value.item<double>();
}

}  // namespace

// ---------------------------------------------------------------- plain data parallel

ReferenceRun::ReferenceRun(const TinyConfig& config, Communicator& communicator)
    : config_(config), communicator_(communicator), model_(config) {
  std::vector<at::Tensor> parameters = model_.stem->parameters();
  for (const auto& block : model_.blocks) {
    for (const auto& p : block->parameters()) parameters.push_back(p);
  }
  for (const auto& p : model_.head->parameters()) parameters.push_back(p);
  reducer_ = std::make_unique<GradientReducer>(parameters, communicator_);
  std::vector<at::Tensor> trained;
  for (const auto& p : parameters) {
    if (p.requires_grad()) trained.push_back(p);
  }
  optimizer_ = std::make_unique<AdamW>(std::vector<ParamGroup>{{trained, config_.lr}}, AdamWConfig{});
}

double ReferenceRun::step(int64_t step) {
  double loss_sum = 0;
  for (int64_t micro = 0; micro < config_.micro_steps; ++micro) {
    const Batch batch = batch_for_step(config_, step * config_.micro_steps + micro, communicator_.rank(), communicator_.size());
    at::Tensor h = model_.stem(batch.x);
    for (auto& block : model_.blocks) h = block(h);
    const at::Tensor loss = torch::mse_loss(model_.head(h), batch.y) / static_cast<double>(config_.micro_steps);
    reducer_->set_sync(micro == config_.micro_steps - 1);  // DDP's no_sync on all but the last
    loss.backward();
    loss_sum += global_mean(loss, communicator_);
  }
  reducer_->finish();
  optimizer_->step();
  optimizer_->zero_grad();
  return loss_sum;
}

// ---------------------------------------------------------------- the block stack

StackRun::StackRun(const TinyConfig& config, Communicator& communicator, StackOptions options)
    : config_(config), communicator_(communicator), model_(config) {
  std::vector<std::shared_ptr<torch::nn::Module>> blocks;
  for (const auto& block : model_.blocks) blocks.push_back(block.ptr());
  BlockEngineOptions engine{.sharding = options.sharding, .compute_dtype = options.compute_dtype};
  if (options.blocks_to_swap > 0) engine.swap.push_back({0, blocks.size(), options.blocks_to_swap});
  stack_ = std::make_unique<BlockEngine>(blocks, std::vector<at::Tensor>{}, communicator_, engine);
  reducer_ = std::make_unique<GradientReducer>(model_.replicated_parameters(), communicator_);
  replicated_optimizer_ =
      std::make_unique<AdamW>(std::vector<ParamGroup>{{model_.replicated_parameters(), config_.lr}}, AdamWConfig{});
  if (!config_.frozen_stack) {
    stack_optimizer_ = std::make_unique<AdamW>(std::vector<ParamGroup>{{stack_->masters(), config_.lr}}, AdamWConfig{});
  }
}

at::Tensor StackRun::forward(const at::Tensor& x) {
  at::Tensor h = x;
  for (ResidualMlp block : model_.blocks) {
    h = stack_->run(*block, [block](const std::vector<at::Tensor>& in) mutable { return std::vector<at::Tensor>{block->forward(in[0])}; },
                    {h}, block->parameters())[0];
  }
  return h;
}

double StackRun::forward_backward(int64_t step) {
  double loss_sum = 0;
  for (int64_t micro = 0; micro < config_.micro_steps; ++micro) {
    const Batch batch = batch_for_step(config_, step * config_.micro_steps + micro, communicator_.rank(), communicator_.size());
    // The casts are what autocast does around a stack that computes in bf16.
    const at::Tensor h = forward(model_.stem(batch.x).to(stack_->compute_dtype(0))).to(at::kFloat);
    const at::Tensor loss = torch::mse_loss(model_.head(h), batch.y) / static_cast<double>(config_.micro_steps);
    reducer_->set_sync(micro == config_.micro_steps - 1);
    loss.backward();  // the stack averages its gradients in every micro-step, as FSDP does
    loss_sum += global_mean(loss, communicator_);
  }
  reducer_->finish();
  stack_->finish();
  return loss_sum;
}

void StackRun::optimizer_step() {
  replicated_optimizer_->step();
  replicated_optimizer_->zero_grad();
  if (stack_optimizer_) {
    stack_optimizer_->step();
    stack_optimizer_->zero_grad();
  }
}

double StackRun::step(int64_t step) {
  const double loss = forward_backward(step);
  optimizer_step();
  return loss;
}

// ---------------------------------------------------------------- comparisons

double relative_difference(const at::Tensor& ours, const at::Tensor& reference) {
  const at::Tensor a = ours.detach().to(at::kDouble), b = reference.detach().to(at::kDouble);
  const double scale = b.abs().max().item<double>();
  const double difference = (a - b).abs().max().item<double>();
  return scale == 0 ? difference : difference / scale;
}

at::Tensor reference_master(const BlockEngine& stack, const ResidualMlp& block) {
  const int ranks = stack.shard_ranks();
  const FlatLayout& layout = stack.layout(0);
  const at::Tensor flat = layout.flatten(block->parameters(), ranks, at::TensorOptions(stack.master(0).scalar_type()));
  const int64_t shard = layout.shard_numel(ranks);
  return flat.narrow(0, stack.shard_index() * shard, shard);
}

double masters_difference(const BlockEngine& stack, const TinyModel& reference) {
  double worst = 0;
  for (int64_t b = 0; b < stack.block_count(); ++b) {
    worst = std::max(worst, relative_difference(stack.master(b), reference_master(stack, reference.blocks[b])));
  }
  return worst;
}

double replicated_difference(const TinyModel& ours, const TinyModel& reference) {
  const auto a = ours.replicated_parameters(), b = reference.replicated_parameters();
  double worst = 0;
  for (size_t i = 0; i < a.size(); ++i) worst = std::max(worst, relative_difference(a[i], b[i]));
  return worst;
}

// ---------------------------------------------------------------- resume files

namespace {

constexpr const char* kMoments[] = {"exp_avg", "exp_avg_sq"};

std::string stack_file(const std::string& folder) { return folder + "/stack.safetensors"; }
std::string replicated_file(const std::string& folder) { return folder + "/replicated.safetensors"; }
std::string replicated_optimizer_file(const std::string& folder) { return folder + "/replicated_optimizer.safetensors"; }

}  // namespace

void save_run(StackRun& run, const std::string& folder) {
  Communicator& communicator = run.stack().communicator();
  const bool root = communicator.rank() == 0;
  if (root) std::filesystem::create_directories(folder);

  // The stack: masters and, per block, the moments and step count of the stack's optimizer.
  std::vector<StackTensors> tensors{{"", run.stack().masters()}};
  safetensors::Metadata metadata;
  const OptimizerState state = run.stack_optimizer() ? run.stack_optimizer()->export_state() : OptimizerState{};
  if (!state.tensors.empty()) {  // a trainable stack after its first step
    for (const char* moment : kMoments) {
      StackTensors t{fmt::format(".{}", moment), {}};
      for (int64_t b = 0; b < run.stack().block_count(); ++b) {
        const std::string name = fmt::format("0.{}.{}", b, moment);
        for (const auto& [key, tensor] : state.tensors) {
          if (key == name) t.shards.push_back(tensor);
        }
      }
      tensors.push_back(t);
    }
    metadata = state.metadata;
  }
  save_stack(run.stack(), stack_file(folder), tensors, metadata);

  if (root) {
    NamedTensors replicated;
    const auto parameters = run.model().replicated_parameters();
    for (size_t i = 0; i < parameters.size(); ++i) replicated.emplace_back(std::to_string(i), parameters[i]);
    save_safetensors(replicated_file(folder), replicated);
    save_optimizer_state(run.replicated_optimizer(), replicated_optimizer_file(folder));
  }
  communicator.barrier();  // the files are whole before any rank reads them
}

void load_run(StackRun& run, const std::string& folder) {
  const safetensors::File file(stack_file(folder));
  std::vector<StackTensors> tensors{{"", run.stack().masters()}};
  if (AdamW* optimizer = run.stack_optimizer()) {
    for (const char* moment : kMoments) {
      StackTensors t{fmt::format(".{}", moment), {}};
      for (const at::Tensor& master : run.stack().masters()) t.shards.push_back(at::zeros_like(master));
      tensors.push_back(t);
    }
    load_stack(run.stack(), file, tensors);
    OptimizerState state;
    state.metadata = file.metadata();
    for (size_t m = 0; m < std::size(kMoments); ++m) {
      for (int64_t b = 0; b < run.stack().block_count(); ++b) {
        state.tensors.emplace_back(fmt::format("0.{}.{}", b, kMoments[m]), tensors[1 + m].shards[b]);
      }
    }
    optimizer->import_state(state);
  } else {
    load_stack(run.stack(), file, tensors);
  }

  const safetensors::File replicated(replicated_file(folder));
  const auto parameters = run.model().replicated_parameters();
  torch::NoGradGuard no_grad;
  for (size_t i = 0; i < parameters.size(); ++i) parameters[i].copy_(load_tensor(replicated, std::to_string(i)));
  load_optimizer_state(run.replicated_optimizer(), replicated_optimizer_file(folder));
}

void load_reference(ReferenceRun& run, const std::string& folder) {
  const safetensors::File stack(stack_file(folder));
  const safetensors::File replicated(replicated_file(folder));
  const safetensors::File replicated_optimizer(replicated_optimizer_file(folder));
  TinyModel& model = run.model();

  // The optimizer's parameters are stem, blocks, head. The replicated files number the stem's and
  // head's tensors 0..3 and their optimizer state "0.<i>.<moment>"; the stack file names the blocks'
  // tensors and their moments "<name>.<moment>", with one step count per block.
  struct Source {
    const safetensors::File* file;        // holds the parameter under `name`
    std::string name;
    const safetensors::File* state_file;  // holds its moments under `state_prefix` + moment
    std::string state_prefix;
    std::string step_key;                 // its step count in state_file's metadata
  };
  std::vector<std::pair<at::Tensor, Source>> parameters;
  const auto add_replicated = [&](const at::Tensor& p, size_t i) {
    const std::string prefix = fmt::format("0.{}.", i);
    parameters.push_back({p, {&replicated, std::to_string(i), &replicated_optimizer, prefix, prefix + "step"}});
  };
  size_t index = 0;
  for (const auto& p : model.stem->parameters()) add_replicated(p, index++);
  for (size_t b = 0; b < model.blocks.size(); ++b) {
    for (const auto& item : model.blocks[b]->named_parameters()) {
      const std::string name = fmt::format("blocks.{}.{}", b, item.key());
      parameters.push_back({item.value(), {&stack, name, &stack, name + ".", fmt::format("0.{}.step", b)}});
    }
  }
  for (const auto& p : model.head->parameters()) add_replicated(p, index++);

  OptimizerState state;
  state.metadata["optimizer"] = "AdamW";
  torch::NoGradGuard no_grad;
  for (size_t k = 0; k < parameters.size(); ++k) {
    const auto& [parameter, source] = parameters[k];
    parameter.copy_(load_tensor(*source.file, source.name));
    state.metadata[fmt::format("0.{}.step", k)] = source.state_file->metadata().at(source.step_key);
    for (const char* moment : kMoments) {
      state.tensors.emplace_back(fmt::format("0.{}.{}", k, moment), load_tensor(*source.state_file, source.state_prefix + moment));
    }
  }
  run.optimizer().import_state(state);
}

}  // namespace sdt
