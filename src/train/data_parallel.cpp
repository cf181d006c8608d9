#include "src/train/data_parallel.h"

#include <cmath>
#include <map>
#include <set>

#include <fmt/format.h>
#include <torch/torch.h>

#include "src/core/error.h"
#include "src/core/safetensors.h"
#include "src/core/tensor_io.h"

namespace sdt {

ShardingMode parse_sharding_mode(std::string_view name) {
  if (name == "none") return ShardingMode::none;
  if (name == "optimizer") return ShardingMode::optimizer;
  if (name == "gradients") return ShardingMode::gradients;
  if (name == "full") return ShardingMode::full;
  fail("--sharding", "'{}' is not one of none, optimizer, gradients, full", name);
}

namespace {

const char* mode_name(ShardingMode mode) {
  switch (mode) {
    case ShardingMode::none: return "none";
    case ShardingMode::optimizer: return "optimizer";
    case ShardingMode::gradients: return "gradients";
    case ShardingMode::full: return "full";
  }
  return "?";
}

std::vector<std::vector<at::Tensor>> tensors_of(const std::vector<ParamGroup>& groups) {
  std::vector<std::vector<at::Tensor>> out;
  for (const auto& g : groups) out.push_back(g.params);
  return out;
}

}  // namespace

void DataParallel::check_optimizer(ShardingMode mode, const std::string& optimizer_kind) {
  if (mode == ShardingMode::none) return;
  // A shard cuts tensors anywhere: only optimizers that treat every element alike can step one.
  static const std::set<std::string> elementwise = {"AdamW", "Lion", "SGDNesterov"};
  if (!elementwise.contains(optimizer_kind)) {
    fail("--optimizer_type", "'{}' cannot step a shard of a tensor (it looks at whole tensors, blocks of them or "
         "sums over all of them); --sharding {} works with AdamW, Lion and SGDNesterov", optimizer_kind, mode_name(mode));
  }
}

DataParallel::DataParallel(const std::vector<ParamGroup>& groups, Communicator& communicator, ShardingMode mode,
                           int64_t bucket_bytes)
    : mode_(mode), communicator_(communicator), groups_(groups) {
  switch (mode) {
    case ShardingMode::none: {
      std::vector<at::Tensor> all;
      for (const auto& g : groups) all.insert(all.end(), g.params.begin(), g.params.end());
      reducer_ = std::make_unique<GradientReducer>(all, communicator, bucket_bytes);
      break;
    }
    case ShardingMode::optimizer:
    case ShardingMode::gradients:
      shards_ = std::make_unique<ZeroShards>(tensors_of(groups), communicator,
                                             mode == ShardingMode::optimizer ? ZeroStage::optimizer : ZeroStage::gradients,
                                             bucket_bytes);
      break;
    case ShardingMode::full:
      fail("--sharding full", "needs a model made of a stack of blocks to gather one at a time (the transformer "
                              "families); SD 1.x/2.x's U-Net trains with --sharding none, optimizer or gradients");
  }
}

std::vector<ParamGroup> DataParallel::optimizer_groups() const {
  if (!shards_) return groups_;
  std::vector<ParamGroup> out = groups_;
  const auto masters = shards_->masters();
  for (size_t g = 0; g < out.size(); ++g) out[g].params = masters[g];
  return out;
}

void DataParallel::set_sync(bool sync) {
  if (reducer_) reducer_->set_sync(sync);
  if (shards_) shards_->set_sync(sync);
}

void DataParallel::finish() {
  if (reducer_) reducer_->finish();
  if (shards_) shards_->finish();
}

bool DataParallel::unscale(double scale) {
  const float inverse = static_cast<float>(1.0 / scale);
  at::NoGradGuard no_grad;
  for (const auto& g : optimizer_groups()) {
    for (const auto& p : g.params) {
      if (p.grad().defined()) p.grad().mul_(inverse);
    }
  }
  if (shards_) return shards_->gradients_finite();
  // Replicated gradients are the same on every rank: no collective needed.
  bool finite = true;
  for (const auto& g : groups_) {
    for (const auto& p : g.params) finite = finite && (!p.grad().defined() || p.grad().isfinite().all().item<bool>());
  }
  return finite;
}

void DataParallel::clip_grad_norm(double max_norm) {
  if (!shards_) {
    std::vector<at::Tensor> all;
    for (const auto& g : groups_) all.insert(all.end(), g.params.begin(), g.params.end());
    torch::nn::utils::clip_grad_norm_(all, max_norm);
    return;
  }
  // torch's rule on the norm of all ranks' shards together: multiply by min(1, max / (norm + 1e-6)).
  const double norm = std::sqrt(shards_->squared_gradient_norm());
  const double coefficient = std::min(1.0, max_norm / (norm + 1e-6));
  at::NoGradGuard no_grad;
  for (const auto& g : optimizer_groups()) {
    for (const auto& p : g.params) {
      if (p.grad().defined()) p.grad().mul_(coefficient);
    }
  }
}

void DataParallel::after_step() {
  if (shards_) shards_->gather_parameters();
}

// The sharded optimizer's state names masters ("<group>.<bucket of the group>.<state>"); the file names the
// tensors as an unsharded run does ("<group>.<tensor>.<state>"), each whole, gathered bucket by bucket.
void DataParallel::save_optimizer_state(const Optimizer& optimizer, const std::string& path) {
  if (!shards_) {
    if (communicator_.rank() == 0) sdt::save_optimizer_state(optimizer, path);
    return;
  }
  const OptimizerState local = optimizer.export_state();
  std::map<std::string, at::Tensor> by_name(local.tensors.begin(), local.tensors.end());
  OptimizerState whole;
  whole.metadata = {{"optimizer", local.metadata.at("optimizer")}};
  std::vector<size_t> seen(groups_.size(), 0);  // buckets of each group so far: the master's index
  for (size_t b = 0; b < shards_->buckets().size(); ++b) {
    const ZeroShards::Bucket& bucket = shards_->buckets()[b];
    const std::string prefix = fmt::format("{}.{}.", bucket.group, seen[bucket.group]++);
    const auto step = local.metadata.find(prefix + "step");
    if (step == local.metadata.end()) continue;  // never stepped, on every rank alike
    // The map's order is the same on every rank, so the collectives pair up.
    for (auto it = by_name.lower_bound(prefix); it != by_name.end() && it->first.starts_with(prefix); ++it) {
      const at::Tensor full = shards_->unshard(b, it->second);
      if (!full.defined()) continue;
      const std::vector<at::Tensor> views = bucket.layout.views(full);
      for (size_t k = 0; k < views.size(); ++k) {
        whole.tensors.emplace_back(fmt::format("{}.{}.{}", bucket.group, bucket.tensors[k], it->first.substr(prefix.size())),
                                   views[k].clone());
      }
    }
    for (size_t i : bucket.tensors) whole.metadata[fmt::format("{}.{}.step", bucket.group, i)] = step->second;
  }
  if (communicator_.rank() == 0) save_safetensors(path, whole.tensors, whole.metadata);
}

void DataParallel::load_optimizer_state(Optimizer& optimizer, const std::string& path) {
  if (!shards_) {
    sdt::load_optimizer_state(optimizer, path);
    return;
  }
  safetensors::File file(path);
  const safetensors::Metadata& metadata = file.metadata();
  std::set<std::string> names;
  for (const auto& info : file.tensors()) names.insert(info.name);
  OptimizerState local;
  if (auto kind = metadata.find("optimizer"); kind != metadata.end()) local.metadata["optimizer"] = kind->second;
  std::vector<size_t> seen(groups_.size(), 0);
  for (size_t b = 0; b < shards_->buckets().size(); ++b) {
    const ZeroShards::Bucket& bucket = shards_->buckets()[b];
    const std::string master = fmt::format("{}.{}.", bucket.group, seen[bucket.group]++);
    const std::string first = fmt::format("{}.{}.", bucket.group, bucket.tensors.front());
    const auto step = metadata.find(first + "step");
    if (step == metadata.end()) continue;
    local.metadata[master + "step"] = step->second;
    for (auto it = names.lower_bound(first); it != names.end() && it->starts_with(first); ++it) {
      const std::string state = it->substr(first.size());
      std::vector<at::Tensor> parts;
      for (size_t i : bucket.tensors) {
        const std::string name = fmt::format("{}.{}.{}", bucket.group, i, state);
        if (!names.contains(name)) fail(path, "has '{}' but not '{}': not an optimizer state of this model", *it, name);
        parts.push_back(load_tensor(file, name));
      }
      const at::Tensor flat = bucket.layout.flatten(parts, 1, parts.front().options());
      local.tensors.emplace_back(master + state, shards_->shard(b, flat).to(bucket.master.device()));
    }
  }
  optimizer.import_state(local);
}

DataParallel::MemoryPlan DataParallel::plan_memory(int64_t frozen_bytes, int64_t bytes_per_element) const {
  MemoryPlan plan;
  plan.frozen = frozen_bytes;
  int64_t elements = 0, bytes = 0;
  for (const auto& g : groups_) {
    for (const auto& p : g.params) {
      elements += p.numel();
      bytes += p.numel() * static_cast<int64_t>(p.element_size());
    }
  }
  plan.trained = bytes;
  const int64_t element_size = elements ? bytes / elements : 4;
  if (!shards_) {
    plan.gradients = bytes;
    plan.buffers = communicator_.size() > 1 ? bytes : 0;  // the reducer's buckets (none in one process)
    plan.optimizer_state = elements * bytes_per_element;
    return plan;
  }
  int64_t shard_elements = 0, largest_bucket = 0;
  for (const auto& bucket : shards_->buckets()) {
    shard_elements += bucket.master.numel();
    largest_bucket = std::max(largest_bucket, bucket.flat.numel());
  }
  plan.optimizer_state = shard_elements * bytes_per_element;
  plan.gradients = shard_elements * element_size;                          // the masters' gradients
  if (shards_->stage() == ZeroStage::optimizer) plan.gradients += bytes;  // whole gradients until finish()
  plan.buffers = largest_bucket * element_size;                             // one bucket being reduced
  return plan;
}

std::string DataParallel::describe(const MemoryPlan& plan, ShardingMode mode, int ranks) {
  auto mib = [](int64_t b) { return static_cast<double>(b) / (1024.0 * 1024.0); };
  return fmt::format("memory plan per rank (--sharding {}, {} ranks): frozen weights {:.1f} MiB, trained weights {:.1f} MiB, "
                     "gradients {:.1f} MiB, optimizer state {:.1f} MiB, communication buffers {:.1f} MiB; total {:.1f} MiB "
                     "before activations",
                     mode_name(mode), ranks, mib(plan.frozen), mib(plan.trained), mib(plan.gradients), mib(plan.optimizer_state),
                     mib(plan.buffers), mib(plan.total()));
}

int64_t optimizer_bytes_per_element(const std::string& kind, int64_t element_size) {
  if (kind == "AdamW") return 2 * element_size;
  if (kind == "Prodigy") return 4 * element_size;  // moments, s and the initial weights
  if (kind == "AdamW8bit") return 2;
  if (kind == "Lion" || kind == "SGDNesterov") return element_size;
  return element_size;  // Adafactor: factored moments are smaller; the unfactored worst case
}

}  // namespace sdt
