#include "src/dist/sharded_units.h"

#include <algorithm>
#include <unordered_set>

#include <torch/torch.h>

#include "src/core/error.h"

namespace sdt {
namespace {

constexpr const char* kWhere = "--sharding full";

struct UnitCall : torch::CustomClassHolder {
  UnitCall(ShardedUnits* units, size_t unit, Block block, RecomputeState state)
      : units(units), unit(unit), block(std::move(block)), state(std::move(state)) {}
  ShardedUnits* units;
  size_t unit;
  Block block;
  RecomputeState state;  // of the forward pass, for the recomputation
};

}  // namespace

// One block's node: its variable inputs are the block's inputs, the other tensors it reads (kept whole) and, for a
// trainable block, its master, whose gradient is this rank's reduce-scattered shard.
struct UnitFunction : torch::autograd::Function<UnitFunction> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, c10::IValue holder,
                                                int64_t num_inputs, at::TensorList tensors) {
    auto* call = static_cast<UnitCall*>(holder.toCapsule().get());
    ctx->saved_data["call"] = holder;
    ctx->saved_data["num_inputs"] = num_inputs;
    ctx->save_for_backward(tensors.vec());
    const size_t next = call->unit + 1;
    call->units->acquire(call->unit, next < call->units->units_.size() ? std::optional<size_t>(next) : std::nullopt);
    std::vector<at::Tensor> outputs = call->block(std::vector<at::Tensor>(tensors.begin(), tensors.begin() + num_inputs));
    call->units->release(call->unit);
    return outputs;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    auto* call = static_cast<UnitCall*>(ctx->saved_data["call"].toCapsule().get());
    ShardedUnits& units = *call->units;
    const ShardedUnits::Unit& unit = units.units_[call->unit];
    const int64_t num_inputs = ctx->saved_data["num_inputs"].toInt();
    const std::vector<at::Tensor> saved = ctx->get_saved_variables();
    const size_t master_index = unit.trainable ? saved.size() - 1 : saved.size();

    std::vector<at::Tensor> inputs;
    for (int64_t i = 0; i < num_inputs; ++i) inputs.push_back(saved[i].detach().requires_grad_(ctx->needs_input_grad(i)));
    std::vector<at::Tensor> wrt;
    std::vector<size_t> wrt_index;
    for (size_t i = 0; i < master_index; ++i) {
      if (!ctx->needs_input_grad(i)) continue;
      wrt.push_back(static_cast<int64_t>(i) < num_inputs ? inputs[i] : saved[i]);
      wrt_index.push_back(i);
    }
    const size_t first_parameter = wrt.size();
    if (unit.trainable) wrt.insert(wrt.end(), unit.parameters.begin(), unit.parameters.end());

    units.acquire(call->unit, call->unit > 0 ? std::optional<size_t>(call->unit - 1) : std::nullopt);
    std::vector<at::Tensor> outputs;
    {
      torch::AutoGradMode enable(true);
      RecomputeState::Replay replay(call->state);
      outputs = call->block(inputs);
    }
    // Two undefined gradients for the two non-tensor arguments of forward, then one per tensor.
    torch::autograd::variable_list grads(2 + saved.size());
    if (!wrt.empty()) {
      const std::vector<at::Tensor> computed = gradients_of(outputs, grad_outputs, wrt);
      for (size_t j = 0; j < first_parameter; ++j) grads[2 + wrt_index[j]] = computed[j];
      if (unit.trainable) {
        grads[2 + master_index] = units.reduce_gradient(
            call->unit, std::vector<at::Tensor>(computed.begin() + static_cast<std::ptrdiff_t>(first_parameter), computed.end()));
      }
    }
    outputs.clear();
    units.release(call->unit);
    return grads;
  }
};

ShardedUnits::ShardedUnits(const std::vector<std::shared_ptr<torch::nn::Module>>& units,
                           const std::vector<at::Tensor>& kept_whole, Communicator& communicator,
                           std::optional<at::ScalarType> compute_dtype)
    : communicator_(communicator), compute_dtype_(compute_dtype) {
  std::unordered_set<const void*> whole;
  for (const auto& t : kept_whole) whole.insert(t.unsafeGetTensorImpl());
  const int ranks = communicator_.size();
  at::NoGradGuard no_grad;
  for (size_t u = 0; u < units.size(); ++u) {
    Unit unit;
    unit.module = units[u];
    std::vector<std::pair<std::string, std::vector<int64_t>>> shapes;
    for (const auto& item : units[u]->named_parameters()) {
      if (whole.contains(item.value().unsafeGetTensorImpl())) continue;
      shapes.emplace_back(item.key(), item.value().sizes().vec());
      unit.parameters.push_back(item.value());
    }
    if (unit.parameters.empty()) fail(kWhere, "block {} has no weights to shard", u);
    unit.trainable = unit.parameters.front().requires_grad();
    for (const auto& p : unit.parameters) {
      if (p.requires_grad() != unit.trainable || p.scalar_type() != unit.parameters.front().scalar_type()) {
        fail(kWhere, "block {}: its weights must be all trained or all frozen, in one dtype", u);
      }
    }
    unit.layout = FlatLayout(shapes);
    at::Tensor flat = unit.layout.flatten(unit.parameters, ranks, unit.parameters.front().options().requires_grad(false));
    if (ranks > 1) communicator_.broadcast(flat, 0);
    const int64_t shard = unit.layout.shard_numel(ranks);
    unit.master = flat.narrow(0, communicator_.rank() * shard, shard).clone().requires_grad_(unit.trainable);
    unit_of_[units[u].get()] = u;
    units_.push_back(std::move(unit));
    release(u);
  }
}

void ShardedUnits::acquire(size_t u, std::optional<size_t> next) {
  at::NoGradGuard no_grad;
  Unit& unit = units_[u];
  const at::ScalarType dtype = compute_dtype_.value_or(unit.master.scalar_type());
  at::Tensor flat;
  if (prefetch_ && prefetch_->unit == u) {
    prefetch_->pending->wait();
    if (prefetch_->master_version == static_cast<int64_t>(unit.master._version())) flat = prefetch_->whole.reshape({-1});
    prefetch_.reset();
  }
  if (!flat.defined()) {
    const at::Tensor shard = unit.master.detach().to(dtype);
    flat = communicator_.size() == 1 ? shard : communicator_.all_gather(shard).reshape({-1});
  }
  const std::vector<at::Tensor> views = unit.layout.views(flat);
  for (size_t k = 0; k < views.size(); ++k) unit.parameters[k].set_data(views[k]);
  if (!next || prefetch_ || communicator_.size() == 1) return;
  const Unit& coming = units_[*next];
  auto p = std::make_unique<Prefetch>();
  p->unit = *next;
  p->master_version = static_cast<int64_t>(coming.master._version());
  p->shard = coming.master.detach().to(compute_dtype_.value_or(coming.master.scalar_type())).clone();
  p->whole = at::empty({communicator_.size(), p->shard.numel()}, p->shard.options());
  p->pending = communicator_.all_gather_async(p->shard, p->whole);
  prefetch_ = std::move(p);
}

void ShardedUnits::release(size_t u) {
  at::NoGradGuard no_grad;
  for (at::Tensor& p : units_[u].parameters) p.set_data(at::empty({0}, p.options().requires_grad(false)));
}

at::Tensor ShardedUnits::reduce_gradient(size_t u, const std::vector<at::Tensor>& gradients) {
  at::NoGradGuard no_grad;
  const Unit& unit = units_[u];
  const int ranks = communicator_.size();
  at::Tensor flat = at::zeros({unit.layout.padded_numel(ranks)}, unit.master.options().requires_grad(false));
  const std::vector<at::Tensor> views = unit.layout.views(flat);
  for (size_t k = 0; k < views.size(); ++k) {
    if (gradients[k].defined()) views[k].copy_(gradients[k]);
  }
  return communicator_.reduce_scatter(flat.view({ranks, -1}), ReduceOp::average).reshape({-1});
}

std::vector<at::Tensor> ShardedUnits::run(const torch::nn::Module& module, Block block, const std::vector<at::Tensor>& inputs,
                                          const std::vector<at::Tensor>& params) {
  const auto found = unit_of_.find(&module);
  if (found == unit_of_.end()) fail(kWhere, "a block that was not sharded ran through the sharded runner");
  const size_t u = found->second;
  const Unit& unit = units_[u];
  if (whole_) return block(inputs);  // rank 0 holds every block's whole weights: saving or sampling
  std::unordered_set<const void*> own;
  for (const auto& p : unit.parameters) own.insert(p.unsafeGetTensorImpl());
  std::vector<at::Tensor> tensors = inputs;
  bool differentiate = unit.trainable;
  for (const auto& t : inputs) differentiate = differentiate || t.requires_grad();
  for (const auto& p : params) {
    if (own.contains(p.unsafeGetTensorImpl())) continue;
    tensors.push_back(p);
    differentiate = differentiate || p.requires_grad();
  }
  if (!differentiate || !torch::GradMode::is_enabled()) {
    acquire(u, u + 1 < units_.size() ? std::optional<size_t>(u + 1) : std::nullopt);
    std::vector<at::Tensor> outputs = block(inputs);
    release(u);
    return outputs;
  }
  if (unit.trainable) tensors.push_back(unit.master);
  auto holder = c10::IValue::make_capsule(
      c10::make_intrusive<UnitCall>(this, u, std::move(block), RecomputeState::capture(inputs.front().device().type())));
  return UnitFunction::apply(holder, static_cast<int64_t>(inputs.size()), at::TensorList(tensors));
}

void ShardedUnits::gather_whole_to_root() {
  at::NoGradGuard no_grad;
  for (Unit& unit : units_) {
    const at::Tensor whole = unshard_to_root(unit.layout, unit.master.detach(), communicator_);
    if (!whole.defined()) continue;
    const std::vector<at::Tensor> views = unit.layout.views(whole);
    for (size_t k = 0; k < views.size(); ++k) unit.parameters[k].set_data(views[k].to(unit.master.device()));
  }
  whole_ = communicator_.rank() == 0;
}

void ShardedUnits::release_whole() {
  whole_ = false;
  at::NoGradGuard no_grad;
  for (Unit& unit : units_) {
    for (at::Tensor& p : unit.parameters) p.set_data(at::empty({0}, p.options().requires_grad(false)));
  }
}

int64_t ShardedUnits::running_block_bytes() const {
  int64_t largest = 0;
  for (const Unit& unit : units_) {
    const int64_t numel = unit.layout.padded_numel(communicator_.size());
    const int64_t compute = c10::elementSize(compute_dtype_.value_or(unit.master.scalar_type()));
    const int64_t master = static_cast<int64_t>(unit.master.element_size());
    largest = std::max(largest, numel * (unit.trainable ? 3 * compute + master : 2 * compute));
  }
  return largest;
}

void ShardedUnits::load_unit(size_t u, const std::function<at::Tensor(size_t k)>& whole_parameter) {
  Unit& unit = units_.at(u);
  at::Tensor shard = unit.master.detach();
  std::unordered_map<std::string, size_t> index;
  for (size_t k = 0; k < unit.layout.entries().size(); ++k) index[unit.layout.entries()[k].name] = k;
  unit.layout.fill_shard(shard, communicator_.rank(), communicator_.size(),
                         [&](const FlatLayout::Entry& e) { return whole_parameter(index.at(e.name)); });
}

}  // namespace sdt
