#include "src/parallel/block_engine.h"

#include <algorithm>
#include <unordered_set>

#include <c10/core/Event.h>
#include <c10/core/StreamGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/torch.h>

#include "src/core/error.h"

namespace sdt {

namespace {
constexpr const char* kWhere = "block engine";
}

// A device buffer that host masters take turns in. `block` and `version` say whose copy it holds: the copy is current
// while the master's version counter (bumped by every in-place change, such as an optimizer step or a checkpoint load)
// has not moved. The events order the copy stream and the compute stream on an accelerator; on the CPU they are never
// recorded.
struct BlockEngine::Slot {
  explicit Slot(at::Device device) : arrived(device.type()), released(device.type()) {}
  at::Tensor storage;
  int64_t block = -1;
  int64_t version = -1;
  c10::Event arrived;   // on the copy stream, after the copy into `storage`
  c10::Event released;  // on the compute stream, after the last work that read `storage`
};

// One block's full weights in the compute dtype, assembled for (block, pass, master version). Sized for the largest
// block; a block uses its first padded_numel elements.
struct BlockEngine::GatherBuffer {
  at::Tensor full;
  at::Tensor sending;  // with sharding: this rank's shard in the compute dtype, a snapshot the gather sends
  int64_t block = -1;
  uint64_t pass = 0;
  int64_t version = -1;
  std::unique_ptr<PendingCollective> pending;
};

// One block's full gradient in its master's dtype, while it is computed and averaged.
struct BlockEngine::GradientBuffer {
  at::Tensor full;
  int64_t block = -1;  // whose gradient waits to be added into its master's .grad; -1 when none
  std::unique_ptr<PendingCollective> pending;
};

// Copies host masters into device slots. On an accelerator (CUDA) the copies run on a stream of their own (kohya's
// side stream): the compute stream waits for a slot's copy only where the block is used, and a copy into a slot waits
// for the compute work that last read it. On the CPU a copy is a plain synchronous copy and the waits are nothing.
// Written against c10's device-generic streams and events, so the accelerator path compiles in every build.
// A copy reads its pinned host master asynchronously, so the host must not change a master while one is in flight. It
// does not: an optimizer step follows backward, whose last copy is done before the first block's gradient comes back
// to the host, synchronously.
class BlockEngine::Copier {
 public:
  explicit Copier(at::Device device) : device_(device), guard_(device.type()) {
    if (!device.is_cpu()) copy_stream_ = guard_.getStreamFromGlobalPool(device);
  }
  ~Copier() {
    // Slots are freed after this: no copy may still be writing into one.
    if (copy_stream_) copy_stream_->synchronize();
  }

  at::TensorOptions host_options(at::ScalarType dtype) const {
    // Pinned pages let the copy engine read the host copy directly, asynchronously.
    return at::TensorOptions(dtype).device(at::kCPU).pinned_memory(!device_.is_cpu());
  }

  void copy_in(Slot& slot, const at::Tensor& master) {
    if (!copy_stream_) {
      slot.storage.copy_(master);
      return;
    }
    slot.released.block(*copy_stream_);
    c10::StreamGuard on_copy_stream(*copy_stream_);
    slot.storage.copy_(master, /*non_blocking=*/true);
    slot.arrived.record(*copy_stream_);
  }

  void wait_arrived(Slot& slot) {
    if (copy_stream_) slot.arrived.block(guard_.getStream(device_));
  }

  void mark_released(Slot& slot) {
    if (copy_stream_) slot.released.record(guard_.getStream(device_));
  }

 private:
  at::Device device_;
  c10::impl::VirtualGuardImpl guard_;
  std::optional<c10::Stream> copy_stream_;
};

// ---------------------------------------------------------------- the engine's part in a recomputed block

// checkpointed() (src/models/layers.h) runs the block without keeping activations and recomputes it in backward;
// these hooks bring the block's weights in around both runs and take their gradient. The block's master is the node's
// anchor, so autograd reaches it when only the weights need gradients; their gradient travels through the engine's
// reduction instead of autograd (added into the master's .grad once averaged).
class BlockEngine::Hooks final : public RecomputeHooks {
 public:
  Hooks(BlockEngine& engine, int64_t block) : engine_(engine), block_(block) {}
  void before_run(bool recompute) override { engine_.bring_in(block_, recompute); }
  void after_forward() override {
    engine_.release_parameters(block_);
    engine_.fetch_scheduled(&SwapSchedule::fetch_after_forward, block_);
  }
  std::vector<at::Tensor> weights() const override {
    const ManagedBlock& managed = engine_.blocks_[block_];
    return managed.trainable ? managed.parameters : std::vector<at::Tensor>{};
  }
  void after_backward(const std::vector<at::Tensor>& weight_gradients) override {
    engine_.release_parameters(block_);
    if (engine_.blocks_[block_].trainable) engine_.reduce_gradient(block_, weight_gradients);
    engine_.fetch_scheduled(&SwapSchedule::fetch_after_backward, block_);
  }

 private:
  BlockEngine& engine_;
  int64_t block_;
};

// ---------------------------------------------------------------- construction

BlockEngine::BlockEngine(const std::vector<std::shared_ptr<torch::nn::Module>>& blocks,
                         const std::vector<at::Tensor>& kept_whole, Communicator& communicator, BlockEngineOptions options)
    : communicator_(communicator), options_(std::move(options)), device_(communicator.device()) {
  if (blocks.empty()) fail(kWhere, "no blocks");
  if (options_.sharding != Sharding::none && options_.sharding != Sharding::full) {
    fail(kWhere, "shards blocks with --sharding full or keeps them whole (none), not '{}'", sharding_name(options_.sharding));
  }
  shard_ranks_ = options_.sharding == Sharding::full ? communicator_.size() : 1;
  std::unordered_set<const void*> whole;
  for (const auto& t : kept_whole) whole.insert(t.unsafeGetTensorImpl());

  const int64_t n = static_cast<int64_t>(blocks.size());
  for (int64_t b = 0; b < n; ++b) {
    ManagedBlock block;
    block.module = blocks[b];
    std::vector<std::pair<std::string, std::vector<int64_t>>> shapes;
    for (const auto& item : blocks[b]->named_parameters()) {
      if (whole.contains(item.value().unsafeGetTensorImpl())) continue;
      shapes.emplace_back(item.key(), item.value().sizes().vec());
      block.parameters.push_back(item.value());
    }
    if (block.parameters.empty()) fail(kWhere, "block {} has no weights", b);
    const at::Tensor& first = block.parameters.front();
    block.trainable = first.requires_grad();
    for (size_t i = 0; i < block.parameters.size(); ++i) {
      const at::Tensor& p = block.parameters[i];
      if (p.requires_grad() != block.trainable || p.scalar_type() != first.scalar_type() || p.is_meta() != first.is_meta()) {
        fail(kWhere, "block {}: parameter {} is {}{}{}, the first is {}{}{}: a block's weights are all trained or all frozen, "
             "in one dtype, all loaded or all deferred", b, shapes[i].first, c10::toString(p.scalar_type()),
             p.requires_grad() ? "" : " (frozen)", p.is_meta() ? " (deferred)" : "", c10::toString(first.scalar_type()),
             block.trainable ? "" : " (frozen)", first.is_meta() ? " (deferred)" : "");
      }
    }
    if (first.is_meta() && !options_.read_deferred) fail(kWhere, "block {} was built without its weights and nothing reads them", b);
    block.layout = FlatLayout(shapes);
    index_of_[blocks[b].get()] = b;
    own_.emplace_back();
    for (const auto& p : block.parameters) own_.back().insert(p.unsafeGetTensorImpl());
    blocks_.push_back(std::move(block));
  }

  swap_of_.resize(blocks_.size());
  for (size_t s = 0; s < options_.swap.size(); ++s) {
    const SwapStack& stack = options_.swap[s];
    if (stack.count == 0 || stack.first + stack.count > blocks_.size()) {
      fail(kWhere, "swap stack {} covers blocks [{}, {}) of {}", s, stack.first, stack.first + stack.count, blocks_.size());
    }
    const int64_t limit = std::max<int64_t>(static_cast<int64_t>(stack.count) - 2, 0);
    if (stack.blocks_to_swap < 0 || stack.blocks_to_swap > limit) {
      fail("--blocks_to_swap", "{} of a stack of {} blocks: at most {} (two blocks stay on the device, as kohya requires)",
           stack.blocks_to_swap, stack.count, limit);
    }
    const ManagedBlock& head = blocks_[stack.first];
    for (size_t i = 0; i < stack.count; ++i) {
      const size_t b = stack.first + i;
      if (swap_of_[b]) fail(kWhere, "block {} is in two swap stacks", b);
      const ManagedBlock& block = blocks_[b];
      if (!(block.layout == head.layout) || block.trainable != head.trainable ||
          block.parameters.front().scalar_type() != head.parameters.front().scalar_type()) {
        fail(kWhere, "block {} differs from block {} in its weights' names, shapes, dtype or training: a swap stack's "
             "blocks must be identical", b, stack.first);
      }
      swap_of_[b] = Swap{s, static_cast<int64_t>(i)};
    }
    schedules_.push_back(SwapSchedule{static_cast<int64_t>(stack.count), stack.blocks_to_swap});
  }
  copier_ = std::make_unique<Copier>(device_);

  at::NoGradGuard no_grad;
  for (size_t s = 0; s < schedules_.size(); ++s) {
    const ManagedBlock& head = blocks_[options_.swap[s].first];
    std::vector<std::unique_ptr<Slot>> slots;
    for (int64_t k = 0; k < schedules_[s].shared_slots(); ++k) {
      slots.push_back(std::make_unique<Slot>(device_));
      slots.back()->storage = at::empty({head.layout.shard_numel(shard_ranks_)},
                                        at::TensorOptions(head.parameters.front().scalar_type()).device(device_));
    }
    slots_.push_back(std::move(slots));
  }
  // Masters: each block flattened on the device, made rank 0's, cut, and the piece this rank keeps copied to its home;
  // then the block's own tensors let go of their storage, so the blocks' memory turns into masters one at a time.
  // A block built without weights has its master read in place, this rank's part only.
  for (int64_t b = 0; b < n; ++b) {
    ManagedBlock& block = blocks_[b];
    const at::ScalarType dtype = block.parameters.front().scalar_type();
    const at::TensorOptions device_options = at::TensorOptions(dtype).device(device_);
    const int64_t shard = block.layout.shard_numel(shard_ranks_);
    const at::TensorOptions home = on_host(b) ? copier_->host_options(dtype) : device_options;
    block.master = at::empty({shard}, home);
    if (block.parameters.front().is_meta()) {
      load_block(b, [&](size_t k) { return options_.read_deferred(b, block.layout.entries()[k].name); });
    } else {
      at::Tensor flat = block.layout.flatten(block.parameters, shard_ranks_, device_options);
      if (communicator_.size() > 1) communicator_.broadcast(flat, 0);
      block.master.copy_(flat.narrow(0, shard_index() * shard, shard));
    }
    block.master.set_requires_grad(block.trainable);
    release_parameters(b);
  }
  for (int k = 0; k < 2; ++k) gather_buffers_.push_back(std::make_unique<GatherBuffer>());  // running, arriving
  // One being filled by backward and, with several ranks, the previous block's being averaged.
  for (int k = 0; k < (communicator_.size() > 1 ? 2 : 1); ++k) gradient_buffers_.push_back(std::make_unique<GradientBuffer>());
}

BlockEngine::~BlockEngine() = default;

std::vector<at::Tensor> BlockEngine::masters() const {
  std::vector<at::Tensor> out;
  for (const auto& block : blocks_) out.push_back(block.master);
  return out;
}

at::ScalarType BlockEngine::compute_dtype(int64_t block) const {
  return options_.compute_dtype.value_or(blocks_.at(block).master.scalar_type());
}

bool BlockEngine::assembles(int64_t block) const {
  return shard_ranks_ > 1 || compute_dtype(block) != blocks_[block].master.scalar_type();
}

bool BlockEngine::on_host(int64_t block) const {
  const auto& swap = swap_of_[block];
  return swap && schedules_[swap->stack].on_host(swap->index);
}

// ---------------------------------------------------------------- running a block

std::vector<at::Tensor> BlockEngine::run(const torch::nn::Module& module, Block block, const std::vector<at::Tensor>& inputs,
                                         const std::vector<at::Tensor>& params) {
  const auto found = index_of_.find(&module);
  if (found == index_of_.end()) fail(kWhere, "a block it does not hold ran through it");
  const int64_t b = found->second;
  if (whole_) return block(inputs);  // rank 0 holds every block's whole weights: saving or sampling
  if (b <= last_forward_) ++pass_;
  last_forward_ = b;

  const ManagedBlock& managed = blocks_[b];
  const std::unordered_set<const void*>& own = own_[static_cast<size_t>(b)];
  std::vector<at::Tensor> kept;
  bool differentiate = managed.trainable;
  for (const auto& t : inputs) differentiate = differentiate || t.requires_grad();
  for (const auto& p : params) {
    if (own.contains(p.unsafeGetTensorImpl())) continue;
    kept.push_back(p);
    differentiate = differentiate || p.requires_grad();
  }
  auto hooks = std::make_shared<Hooks>(*this, b);
  if (!differentiate || !at::GradMode::is_enabled()) {
    at::NoGradGuard no_grad;
    hooks->before_run(false);
    std::vector<at::Tensor> outputs = block(inputs);
    hooks->after_forward();
    return outputs;
  }
  return checkpointed(std::move(block), inputs, kept, std::move(hooks), managed.trainable ? managed.master : at::Tensor());
}

// Forward: the next block's weights start arriving while this one runs; backward: the previous block's.
void BlockEngine::bring_in(int64_t block, bool recompute) {
  const at::Tensor full = acquire(block);
  if (!recompute && block + 1 < block_count()) prefetch(block + 1);
  if (recompute && block > 0) prefetch(block - 1);
  point_parameters(block, full);
}

void BlockEngine::reduce_gradient(int64_t block, const std::vector<at::Tensor>& weight_gradients) {
  at::NoGradGuard no_grad;
  const ManagedBlock& managed = blocks_[block];
  // At most one average in flight: the other buffer's lands before this one starts.
  GradientBuffer* buffer = nullptr;
  for (auto& candidate : gradient_buffers_) {
    if (candidate->block < 0 && !buffer) buffer = candidate.get();
  }
  if (!buffer) buffer = gradient_buffers_.front().get();
  for (auto& other : gradient_buffers_) {
    if (other.get() != buffer) finish_reduction(*other);
  }
  finish_reduction(*buffer);
  const int64_t padded = managed.layout.padded_numel(shard_ranks_);
  const at::ScalarType dtype = managed.master.scalar_type();
  if (!buffer->full.defined() || buffer->full.numel() < padded || buffer->full.scalar_type() != dtype) {
    int64_t largest = 0;
    for (const auto& b : blocks_) largest = b.trainable ? std::max(largest, b.layout.padded_numel(shard_ranks_)) : largest;
    buffer->full = at::empty({largest}, at::TensorOptions(dtype).device(device_));
  }
  at::Tensor flat = buffer->full.narrow(0, 0, padded);
  flat.zero_();
  const std::vector<at::Tensor> views = managed.layout.views(flat);
  for (size_t k = 0; k < views.size(); ++k) {
    if (weight_gradients[k].defined()) views[k].copy_(weight_gradients[k]);
  }
  start_reduction(block, *buffer);
  // Block 0 is the last of a backward: the masters' .grad must be whole when it returns. One rank has nothing to wait
  // for, and one buffer, which the next block refills.
  if (block == 0 || communicator_.size() == 1) finish_reduction(*buffer);
}

void BlockEngine::finish() {
  for (auto& buffer : gradient_buffers_) finish_reduction(*buffer);
}

void BlockEngine::start_reduction(int64_t block, GradientBuffer& buffer) {
  buffer.block = block;
  if (communicator_.size() > 1) {
    const at::Tensor flat = buffer.full.narrow(0, 0, blocks_[block].layout.padded_numel(shard_ranks_));
    buffer.pending = communicator_.all_reduce_async(flat, ReduceOp::average);
    traffic_.reduced += static_cast<int64_t>(flat.nbytes());
  }
}

void BlockEngine::finish_reduction(GradientBuffer& buffer) {
  if (buffer.block < 0) return;
  at::NoGradGuard no_grad;
  if (buffer.pending) {
    buffer.pending->wait();
    buffer.pending.reset();
  }
  at::Tensor& master = blocks_[buffer.block].master;
  const int64_t shard = master.numel();
  const at::Tensor mine = buffer.full.narrow(0, shard_index() * shard, shard);
  if (!master.grad().defined()) master.mutable_grad() = at::zeros_like(master);
  master.mutable_grad().add_(mine.to(master.device()));
  if (on_host(buffer.block)) traffic_.device_to_host += static_cast<int64_t>(mine.nbytes());
  buffer.block = -1;
}

// ---------------------------------------------------------------- weights in, weights out

at::Tensor BlockEngine::acquire(int64_t block) {
  if (!assembles(block)) return device_master(block);
  GatherBuffer& buffer = *gather_buffers_[block % 2];
  if (buffer.block != block || buffer.pass != pass_ || buffer.version != static_cast<int64_t>(blocks_[block].master._version())) {
    start_gather(block);
  }
  if (buffer.pending) {
    buffer.pending->wait();
    buffer.pending.reset();
  }
  return buffer.full.narrow(0, 0, blocks_[block].layout.padded_numel(shard_ranks_));
}

// Called for the block that runs next (forward: block+1; backward: block-1) before its neighbour computes. Neighbours
// use different gather buffers, and never share a slot (a stack keeps at least two), so the one arriving never evicts
// the one running.
void BlockEngine::prefetch(int64_t block) {
  if (on_host(block)) fetch(block);
  if (!assembles(block)) return;
  const GatherBuffer& buffer = *gather_buffers_[block % 2];
  if (buffer.block != block || buffer.pass != pass_ || buffer.version != static_cast<int64_t>(blocks_[block].master._version())) {
    start_gather(block);
  }
}

void BlockEngine::fetch_scheduled(std::optional<int64_t> (SwapSchedule::*when)(int64_t) const, int64_t block) {
  const auto& swap = swap_of_[block];
  if (!swap) return;
  if (auto next = (schedules_[swap->stack].*when)(swap->index)) {
    fetch(static_cast<int64_t>(options_.swap[swap->stack].first) + *next);
  }
}

void BlockEngine::fetch(int64_t block) {
  if (!on_host(block)) return;
  const Swap& swap = *swap_of_[block];
  const int64_t index = schedules_[swap.stack].slot_of(swap.index);
  Slot& slot = *slots_[swap.stack][index];
  const at::Tensor& master = blocks_[block].master;
  if (slot.block == block && slot.version == static_cast<int64_t>(master._version())) return;
  at::NoGradGuard no_grad;
  copier_->copy_in(slot, master);
  slot.block = block;
  slot.version = static_cast<int64_t>(master._version());
  traffic_.host_to_device += static_cast<int64_t>(master.nbytes());
  fetch_log_.push_back({block, index});
}

const at::Tensor& BlockEngine::device_master(int64_t block) {
  if (!on_host(block)) return blocks_[block].master;
  fetch(block);
  const Swap& swap = *swap_of_[block];
  Slot& slot = *slots_[swap.stack][schedules_[swap.stack].slot_of(swap.index)];
  copier_->wait_arrived(slot);
  return slot.storage;
}

void BlockEngine::start_gather(int64_t block) {
  at::NoGradGuard no_grad;
  GatherBuffer& buffer = *gather_buffers_[block % 2];
  if (buffer.pending) {  // a prefetch nobody used (a new pass began): let it land first
    buffer.pending->wait();
    buffer.pending.reset();
  }
  const ManagedBlock& managed = blocks_[block];
  const at::ScalarType dtype = compute_dtype(block);
  const int64_t padded = managed.layout.padded_numel(shard_ranks_);
  if (!buffer.full.defined() || buffer.full.numel() < padded || buffer.full.scalar_type() != dtype) {
    int64_t largest = 0;
    for (const auto& b : blocks_) largest = std::max(largest, b.layout.padded_numel(shard_ranks_));
    buffer.full = at::empty({largest}, at::TensorOptions(dtype).device(device_));
    if (shard_ranks_ > 1) buffer.sending = at::empty({largest / shard_ranks_}, buffer.full.options());
  }
  const at::Tensor full = buffer.full.narrow(0, 0, padded);
  const at::Tensor& source = device_master(block);
  if (shard_ranks_ == 1) {
    full.copy_(source);  // no sharding: only the cast to the compute dtype
  } else {
    const at::Tensor sending = buffer.sending.narrow(0, 0, source.numel());
    sending.copy_(source);
    buffer.pending = communicator_.all_gather_async(sending, full.view({shard_ranks_, -1}));
    traffic_.gathered += static_cast<int64_t>(full.nbytes());
  }
  buffer.block = block;
  buffer.pass = pass_;
  buffer.version = static_cast<int64_t>(managed.master._version());
}

void BlockEngine::point_parameters(int64_t block, const at::Tensor& full) {
  const std::vector<at::Tensor> views = blocks_[block].layout.views(full.detach());
  for (size_t i = 0; i < views.size(); ++i) blocks_[block].parameters[i].set_data(views[i]);
}

void BlockEngine::release_parameters(int64_t block) {
  ManagedBlock& managed = blocks_[block];
  for (at::Tensor& p : managed.parameters) {
    set_parameter_data(p, at::empty({0}, at::TensorOptions(p.scalar_type()).device(device_)));
    p.mutable_grad().reset();
  }
  if (on_host(block)) {
    const Swap& swap = *swap_of_[block];
    Slot& slot = *slots_[swap.stack][schedules_[swap.stack].slot_of(swap.index)];
    if (slot.block == block) copier_->mark_released(slot);
  }
}

// ---------------------------------------------------------------- introspection, whole weights, checkpoints

EngineMemory BlockEngine::memory() const {
  EngineMemory m;
  for (int64_t b = 0; b < block_count(); ++b) {
    const at::Tensor& master = blocks_[b].master;
    const int64_t grad = master.grad().defined() ? static_cast<int64_t>(master.grad().nbytes()) : 0;
    (on_host(b) ? m.host_masters : m.device_masters) += static_cast<int64_t>(master.nbytes());
    (on_host(b) ? m.host_gradients : m.device_gradients) += grad;
  }
  for (const auto& slots : slots_) {
    for (const auto& slot : slots) m.swap_slots += static_cast<int64_t>(slot->storage.nbytes());
  }
  for (const auto& buffer : gather_buffers_) {
    if (buffer->full.defined()) m.gather_buffers += static_cast<int64_t>(buffer->full.nbytes());
    if (buffer->sending.defined()) m.gather_buffers += static_cast<int64_t>(buffer->sending.nbytes());
  }
  for (const auto& buffer : gradient_buffers_) {
    if (buffer->full.defined()) m.gradient_buffers += static_cast<int64_t>(buffer->full.nbytes());
  }
  return m;
}

int64_t BlockEngine::running_block_bytes() const {
  int64_t largest = 0;
  for (int64_t b = 0; b < block_count(); ++b) {
    const ManagedBlock& managed = blocks_[b];
    const int64_t padded = managed.layout.padded_numel(shard_ranks_);
    const int64_t compute = static_cast<int64_t>(c10::elementSize(compute_dtype(b)));
    const int64_t master = static_cast<int64_t>(managed.master.element_size());
    // Two full buffers (the running block's, the next one's arriving) and, with sharding, the snapshot of this rank's
    // shard that each of their gathers sends.
    const int64_t snapshot = shard_ranks_ > 1 ? managed.layout.shard_numel(shard_ranks_) : 0;
    const int64_t gathered = assembles(b) ? 2 * (padded + snapshot) * compute : 0;
    largest = std::max(largest, gathered + (managed.trainable ? 2 * padded * master : 0));
  }
  return largest;
}

at::Tensor BlockEngine::gather_to_root(int64_t block, const at::Tensor& shard, int root) const {
  if (block < 0 || block >= block_count()) fail(kWhere, "no block {} (of {})", block, block_count());
  const FlatLayout& layout = blocks_[block].layout;
  const int64_t size = layout.shard_numel(shard_ranks_);
  if (shard.dim() != 1 || shard.numel() != size) {
    fail(kWhere, "a shard of block {} has {} elements, got shape {}", block, size, c10::str(shard.sizes()));
  }
  at::NoGradGuard no_grad;
  if (shard_ranks_ == 1) {
    if (communicator_.rank() != root) return at::Tensor();
    return at::empty({layout.numel()}, shard.options().device(at::kCPU)).copy_(shard.narrow(0, 0, layout.numel()));
  }
  return unshard_to_root(layout, shard.to(device_), communicator_, root);
}

void BlockEngine::gather_whole_to_root() {
  finish();
  at::NoGradGuard no_grad;
  for (int64_t b = 0; b < block_count(); ++b) {
    ManagedBlock& managed = blocks_[b];
    const at::Tensor whole = gather_to_root(b, managed.master.detach());
    if (!whole.defined()) continue;
    const std::vector<at::Tensor> views = managed.layout.views(whole.to(device_));
    for (size_t k = 0; k < views.size(); ++k) managed.parameters[k].set_data(views[k]);
  }
  whole_ = communicator_.rank() == 0;
}

void BlockEngine::release_whole() {
  whole_ = false;
  at::NoGradGuard no_grad;
  for (int64_t b = 0; b < block_count(); ++b) release_parameters(b);
}

void BlockEngine::load_block(int64_t block, const std::function<at::Tensor(size_t k)>& whole_parameter) {
  ManagedBlock& managed = blocks_.at(block);
  at::NoGradGuard no_grad;
  at::Tensor shard = managed.master.detach();
  const FlatLayout::Entry* first = managed.layout.entries().data();
  managed.layout.fill_shard(shard, shard_index(), shard_ranks_, [&](const FlatLayout::Entry& e) {
    return whole_parameter(static_cast<size_t>(&e - first));
  });
}

}  // namespace sdt
