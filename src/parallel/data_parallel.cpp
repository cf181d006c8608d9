#include "src/parallel/data_parallel.h"

#include <cmath>
#include <map>
#include <set>

#include <fmt/format.h>
#include <torch/torch.h>

#include "src/core/error.h"
#include "src/core/safetensors.h"
#include "src/core/tensor_io.h"

namespace sdt {

void DataParallel::check_optimizer(const std::string& optimizer_kind) const {
  if (replicated()) return;
  // A shard cuts tensors anywhere, and a block's master is its weights laid end to end: only optimizers that treat
  // every element alike can step one.
  static const std::set<std::string> elementwise = {"AdamW", "Lion", "SGDNesterov"};
  if (!elementwise.contains(optimizer_kind)) {
    fail("--optimizer_type", "'{}' cannot step a shard of a tensor (it looks at whole tensors, blocks of them or "
         "sums over all of them); --sharding {}{} works with AdamW, Lion and SGDNesterov", optimizer_kind,
         sharding_name(mode_), engine_ && mode_ == Sharding::none ? " with --blocks_to_swap" : "");
  }
}

DataParallel::DataParallel(const std::vector<ParamGroup>& groups, Communicator& communicator, Sharding mode,
                           int64_t bucket_bytes, std::unique_ptr<BlockEngine> engine)
    : mode_(mode), communicator_(communicator), groups_(groups), engine_(std::move(engine)) {
  if (mode == Sharding::full && !engine_) {
    fail("--sharding full", "needs a model whose blocks can be gathered one at a time; this one has none");
  }
  if (engine_ && (mode == Sharding::optimizer || mode == Sharding::gradients)) {
    fail("--blocks_to_swap", "works with --sharding none or full, not {}", sharding_name(mode));
  }
  // Which group tensors live in blocks: those are the engine's masters; the rest go the mode's way.
  std::map<const void*, std::pair<size_t, size_t>> place;  // tensor -> (group, index)
  for (size_t g = 0; g < groups.size(); ++g) {
    for (size_t i = 0; i < groups[g].params.size(); ++i) place[groups[g].params[i].unsafeGetTensorImpl()] = {g, i};
  }
  std::vector<Stepped> block_masters;
  std::set<const void*> in_blocks;
  if (engine_) {
    for (const auto& block : engine_->blocks()) {
      if (!block.trainable) continue;
      Stepped s{.layout = &block.layout, .ranks = engine_->shard_ranks(), .master = block.master};
      for (size_t k = 0; k < block.parameters.size(); ++k) {
        const auto found = place.find(block.parameters[k].unsafeGetTensorImpl());
        if (found == place.end()) fail("block engine", "a trained block weight is in no optimizer group");
        if (k > 0 && found->second.first != s.group) fail("block engine", "a block's weights span two optimizer groups");
        s.group = found->second.first;
        s.tensors.push_back(found->second.second);
        in_blocks.insert(block.parameters[k].unsafeGetTensorImpl());
      }
      block_masters.push_back(std::move(s));
    }
  }
  std::vector<std::vector<at::Tensor>> rest(groups.size());
  std::vector<std::vector<size_t>> rest_index(groups.size());
  std::vector<at::Tensor> all_rest;
  for (size_t g = 0; g < groups.size(); ++g) {
    for (size_t i = 0; i < groups[g].params.size(); ++i) {
      if (in_blocks.contains(groups[g].params[i].unsafeGetTensorImpl())) continue;
      rest[g].push_back(groups[g].params[i]);
      rest_index[g].push_back(i);
      all_rest.push_back(groups[g].params[i]);
    }
  }
  if (mode == Sharding::none) {
    reducer_ = std::make_unique<GradientReducer>(all_rest, communicator, bucket_bytes);
    if (replicated()) return;
  } else {
    shards_ = std::make_unique<ZeroShards>(rest, communicator, mode == Sharding::optimizer ? Sharding::optimizer : Sharding::gradients,
                                           bucket_bytes);
  }
  // The optimizer's order within a group: its other tensors (ZeroShards' buckets, or the tensors themselves), then
  // its blocks.
  for (size_t g = 0; g < groups.size(); ++g) {
    if (shards_) {
      for (const auto& bucket : shards_->buckets()) {
        if (bucket.group != g) continue;
        Stepped s{.group = g, .layout = &bucket.layout, .ranks = communicator.size(), .master = bucket.master};
        for (size_t i : bucket.tensors) s.tensors.push_back(rest_index[g][i]);
        stepped_.push_back(std::move(s));
      }
    } else {
      for (size_t i = 0; i < rest[g].size(); ++i) stepped_.push_back({.group = g, .tensors = {rest_index[g][i]}, .master = rest[g][i]});
    }
    for (const auto& s : block_masters) {
      if (s.group == g) stepped_.push_back(s);
    }
  }
}

std::vector<ParamGroup> DataParallel::optimizer_groups() const {
  if (replicated()) return groups_;
  std::vector<ParamGroup> out = groups_;
  for (auto& g : out) g.params.clear();
  for (const auto& s : stepped_) out[s.group].params.push_back(s.master);
  return out;
}

std::vector<at::Tensor> DataParallel::stepped() const {
  std::vector<at::Tensor> out;
  for (const auto& g : optimizer_groups()) out.insert(out.end(), g.params.begin(), g.params.end());
  return out;
}

void DataParallel::set_sync(bool sync) {
  if (reducer_) reducer_->set_sync(sync);
  if (shards_) shards_->set_sync(sync);
}

void DataParallel::finish() {
  if (reducer_) reducer_->finish();
  if (shards_) shards_->finish();
  if (engine_) engine_->finish();
}

bool DataParallel::unscale(double scale) {
  const float inverse = static_cast<float>(1.0 / scale);
  at::NoGradGuard no_grad;
  bool finite = true;
  for (const auto& p : stepped()) {
    if (!p.grad().defined()) continue;
    p.grad().mul_(inverse);
    finite = finite && p.grad().isfinite().all().item<bool>();
  }
  if (gradients_replicated()) return finite;  // the same on every rank
  at::Tensor bad = torch::tensor({finite ? 0.0 : 1.0}, at::TensorOptions(at::kDouble)).to(communicator_.device());
  communicator_.all_reduce(bad, ReduceOp::sum);
  return bad.item<double>() == 0;
}

void DataParallel::clip_grad_norm(double max_norm) {
  if (gradients_replicated()) {
    torch::nn::utils::clip_grad_norm_(stepped(), max_norm);
    return;
  }
  // torch's rule on the norm of all ranks' shards together: multiply by min(1, max / (norm + 1e-6)).
  // As torch: each tensor's norm in its own dtype, then the norm of those (here: of every rank's).
  at::NoGradGuard no_grad;
  double squares = 0;
  for (const auto& m : stepped()) {
    if (!m.grad().defined()) continue;
    const double norm = m.grad().norm().item<double>();
    squares += norm * norm;
  }
  at::Tensor sum = torch::tensor({squares}, at::TensorOptions(at::kDouble)).to(communicator_.device());
  communicator_.all_reduce(sum, ReduceOp::sum);
  const double coefficient = std::min(1.0, max_norm / (std::sqrt(sum.item<double>()) + 1e-6));
  for (const auto& m : stepped()) {
    if (m.grad().defined()) m.grad().mul_(coefficient);
  }
}

void DataParallel::set_on_gradient(std::function<void(at::Tensor&)> on_gradient, const std::string& flag) {
  if (!replicated()) {
    fail(flag, "steps each weight inside backward from its whole averaged gradient, so it works with --sharding none "
         "without --blocks_to_swap (got --sharding {}{}); sharding already keeps 1/N of the gradients per rank",
         sharding_name(mode_), engine_ ? " and a block engine" : "");
  }
  reducer_->set_on_gradient(std::move(on_gradient));
}

void DataParallel::after_step() {
  if (shards_) shards_->gather_parameters();  // blocks gather their masters when they next run
}

// Sharded masters are named "<group>.<master of the group>.<state>" by the optimizer; the file names the tensors as
// an unsharded run does ("<group>.<tensor>.<state>"), each whole, gathered master by master.
void DataParallel::save_optimizer_state(const Optimizer& optimizer, const std::string& path) {
  if (replicated()) {
    if (communicator_.rank() == 0) sdt::save_optimizer_state(optimizer, path);
    return;
  }
  const OptimizerState local = optimizer.export_state();
  std::map<std::string, at::Tensor> by_name(local.tensors.begin(), local.tensors.end());
  OptimizerState whole;
  whole.metadata = {{"optimizer", local.metadata.at("optimizer")}};
  std::vector<size_t> seen(groups_.size(), 0);
  for (const Stepped& s : stepped_) {
    const std::string prefix = fmt::format("{}.{}.", s.group, seen[s.group]++);
    const auto step = local.metadata.find(prefix + "step");
    if (step == local.metadata.end()) continue;  // never stepped, on every rank alike
    // The map's order is the same on every rank, so the collectives pair up.
    for (auto it = by_name.lower_bound(prefix); it != by_name.end() && it->first.starts_with(prefix); ++it) {
      if (!s.layout) {  // a whole tensor, the same on every rank
        whole.tensors.emplace_back(fmt::format("{}.{}.{}", s.group, s.tensors[0], it->first.substr(prefix.size())), it->second);
        continue;
      }
      const at::Tensor full = s.ranks == 1 ? it->second.narrow(0, 0, s.layout->numel())
                                           : unshard_to_root(*s.layout, it->second, communicator_);
      if (!full.defined()) continue;
      const std::vector<at::Tensor> views = s.layout->views(full);
      for (size_t k = 0; k < views.size(); ++k) {
        whole.tensors.emplace_back(fmt::format("{}.{}.{}", s.group, s.tensors[k], it->first.substr(prefix.size())), views[k].clone());
      }
    }
    for (size_t i : s.tensors) whole.metadata[fmt::format("{}.{}.step", s.group, i)] = step->second;
  }
  if (communicator_.rank() == 0) save_safetensors(path, whole.tensors, whole.metadata);
}

void DataParallel::load_optimizer_state(Optimizer& optimizer, const std::string& path) {
  if (replicated()) {
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
  for (const Stepped& s : stepped_) {
    const std::string master = fmt::format("{}.{}.", s.group, seen[s.group]++);
    const std::string first = fmt::format("{}.{}.", s.group, s.tensors.front());
    const auto step = metadata.find(first + "step");
    if (step == metadata.end()) continue;
    local.metadata[master + "step"] = step->second;
    for (auto it = names.lower_bound(first); it != names.end() && it->starts_with(first); ++it) {
      const std::string state = it->substr(first.size());
      std::vector<at::Tensor> parts;
      for (size_t i : s.tensors) {
        const std::string name = fmt::format("{}.{}.{}", s.group, i, state);
        if (!names.contains(name)) fail(path, "has '{}' but not '{}': not an optimizer state of this model", *it, name);
        parts.push_back(load_tensor(file, name));
      }
      if (!s.layout) {
        local.tensors.emplace_back(master + state, parts.front().to(s.master.device()));
        continue;
      }
      const at::Tensor flat = s.layout->flatten(parts, 1, parts.front().options());
      const int rank = s.ranks == 1 ? 0 : communicator_.rank();
      local.tensors.emplace_back(master + state, shard_of(*s.layout, flat, rank, s.ranks).to(s.master.device()));
    }
  }
  optimizer.import_state(local);
}

void DataParallel::gather_whole_to_root() {
  if (engine_) engine_->gather_whole_to_root();
}

void DataParallel::release_whole() {
  if (engine_) engine_->release_whole();
}

bool DataParallel::is_block_weight(const at::Tensor& tensor) const {
  if (!engine_) return false;
  for (const auto& block : engine_->blocks()) {
    for (const auto& p : block.parameters) {
      if (p.unsafeGetTensorImpl() == tensor.unsafeGetTensorImpl()) return true;
    }
  }
  return false;
}

void DataParallel::load_weights(const std::function<at::Tensor(const at::Tensor& tensor)>& saved_value) {
  if (!engine_) return;
  for (int64_t b = 0; b < engine_->block_count(); ++b) {
    const auto& block = engine_->blocks()[b];
    if (!block.trainable) continue;
    engine_->load_block(b, [&](size_t k) { return saved_value(block.parameters[k]); });
  }
}

DataParallel::MemoryPlan DataParallel::plan_memory(int64_t frozen_bytes, int64_t bytes_per_element) const {
  MemoryPlan plan;
  plan.frozen = frozen_bytes;
  // The trained tensors as they are held: whole, except block weights (empty between runs, their masters below).
  int64_t elements = 0, bytes = 0;
  for (const auto& g : groups_) {
    for (const auto& p : g.params) {
      elements += p.numel();
      bytes += p.numel() * static_cast<int64_t>(p.element_size());
    }
  }
  plan.trained = bytes;
  if (replicated()) {
    plan.gradients = bytes;
    plan.buffers = communicator_.size() > 1 ? bytes : 0;  // the reducer's buckets (none in one process)
    plan.optimizer_state = elements * bytes_per_element;
    return plan;
  }
  for (const auto& s : stepped_) {
    const int64_t master_bytes = s.master.numel() * static_cast<int64_t>(s.master.element_size());
    plan.gradients += master_bytes;
    plan.optimizer_state += s.master.numel() * bytes_per_element;
  }
  if (shards_) {
    if (shards_->stage() == Sharding::optimizer) plan.gradients += bytes;  // whole gradients until finish()
    // Up to three buckets' flattened gradients while their reduce-scatters are in flight.
    for (const auto& bucket : shards_->buckets()) {
      plan.buffers = std::max(plan.buffers, 3 * bucket.flat.numel() * static_cast<int64_t>(bucket.flat.element_size()));
    }
  }
  if (reducer_ && communicator_.size() > 1) plan.buffers += bytes;  // the reducer's buckets
  if (engine_) {
    // Block weights exist only as masters (the trained ones among `bytes` above are empty between runs).
    for (const auto& block : engine_->blocks()) {
      const int64_t master_bytes = block.master.numel() * static_cast<int64_t>(block.master.element_size());
      (block.trainable ? plan.trained : plan.frozen) += master_bytes;
    }
    plan.buffers += engine_->running_block_bytes() + engine_->memory().swap_slots;
  }
  return plan;
}

std::string DataParallel::describe(const MemoryPlan& plan, Sharding mode, int ranks) {
  auto mib = [](int64_t b) { return static_cast<double>(b) / (1024.0 * 1024.0); };
  return fmt::format("memory plan per rank (--sharding {}, {} ranks): frozen weights {:.1f} MiB, trained weights {:.1f} MiB, "
                     "gradients {:.1f} MiB, optimizer state {:.1f} MiB, communication buffers {:.1f} MiB; total {:.1f} MiB "
                     "before activations",
                     sharding_name(mode), ranks, mib(plan.frozen), mib(plan.trained), mib(plan.gradients), mib(plan.optimizer_state),
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
