#include "src/dist/block_stack.h"

#include <c10/core/Event.h>
#include <c10/core/StreamGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/torch.h>

#include "src/core/error.h"

namespace sdt {

namespace {
constexpr const char* kWhere = "block stack";
}

Sharding parse_sharding(std::string_view name) {
  if (name == "none") return Sharding::none;
  if (name == "full") return Sharding::full;
  fail("--sharding", "unknown mode '{}' (none | full)", name);
}

std::string_view sharding_name(Sharding sharding) { return sharding == Sharding::full ? "full" : "none"; }

// A device buffer that host masters take turns in. `block` and `version` say whose copy it holds:
// the copy is current while the master's version counter (bumped by every in-place change, such as
// an optimizer step or a checkpoint load) has not moved. The events order the copy stream and the
// compute stream on an accelerator; on the CPU they are never recorded.
struct BlockStack::Slot {
  explicit Slot(at::Device device) : arrived(device.type()), released(device.type()) {}
  at::Tensor storage;
  int64_t block = -1;
  int64_t version = -1;
  c10::Event arrived;   // on the copy stream, after the copy into `storage`
  c10::Event released;  // on the compute stream, after the last work that read `storage`
};

// One block's full parameters in the compute dtype, assembled for (block, pass).
struct BlockStack::GatherBuffer {
  at::Tensor full;
  at::Tensor sending;  // with sharding: this rank's shard in the compute dtype, a snapshot the gather sends
  int64_t block = -1;
  uint64_t pass = 0;
  std::unique_ptr<PendingCollective> pending;
};

// One block's full gradient in the compute dtype, while it is computed and averaged.
struct BlockStack::GradientBuffer {
  at::Tensor full;
  int64_t block = -1;  // whose gradient waits to be added into its master's .grad; -1 when none
  std::unique_ptr<PendingCollective> pending;
};

// Copies host masters into device slots. On an accelerator (CUDA) the copies run on a stream of
// their own (kohya's side stream): the compute stream waits for a slot's copy only where the block
// is used, and a copy into a slot waits for the compute work that last read it. On the CPU a copy is
// a plain synchronous copy and the waits are nothing. Written against c10's device-generic streams
// and events, so the accelerator path compiles in every build.
// A copy reads its pinned host master asynchronously, so the host must not change a master while
// one is in flight. It does not: an optimizer step follows backward, whose last copy (block 0, after
// block N-S-1) is done before block 0's gradient comes back to the host, synchronously.
class BlockStack::Copier {
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

// ---------------------------------------------------------------- the per-block autograd node

namespace {
struct StackHandle : torch::CustomClassHolder {
  explicit StackHandle(BlockStack* stack) : stack(stack) {}
  BlockStack* stack;
};
}  // namespace

// Forward runs the block without recording a graph and keeps only its input; backward recomputes it
// with the parameters gathered again. The master is an input so that autograd reaches this node when
// only the parameters need gradients; its gradient travels through the stack's reduction instead of
// autograd (it is added into the master's .grad once averaged), so backward returns none for it.
struct BlockFunction : torch::autograd::Function<BlockFunction> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, c10::IValue handle,
                                                int64_t block, const at::Tensor& x, const at::Tensor& master) {
    ctx->saved_data["stack"] = handle;
    ctx->saved_data["block"] = block;
    ctx->save_for_backward({x});
    return {static_cast<StackHandle*>(handle.toCapsule().get())->stack->run_block(block, x)};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    BlockStack* stack = static_cast<StackHandle*>(ctx->saved_data["stack"].toCapsule().get())->stack;
    const int64_t block = ctx->saved_data["block"].toInt();
    const at::Tensor x = ctx->get_saved_variables()[0];
    // needs_input_grad counts the tensor arguments only: x is 0, the master 1.
    at::Tensor grad_input = stack->backward_block(block, x, grad_outputs[0], ctx->needs_input_grad(0));
    return {at::Tensor(), at::Tensor(), grad_input, at::Tensor()};
  }
};

// ---------------------------------------------------------------- construction

BlockStack::BlockStack(std::vector<torch::nn::AnyModule> blocks, Communicator& communicator, BlockStackOptions options)
    : blocks_(std::move(blocks)), communicator_(communicator), options_(options), device_(communicator.device()) {
  if (blocks_.empty()) fail(kWhere, "no blocks");
  const int64_t n = static_cast<int64_t>(blocks_.size());
  if (options_.blocks_to_swap < 0 || options_.blocks_to_swap > std::max<int64_t>(n - 2, 0)) {
    fail(kWhere, "blocks_to_swap {} with {} blocks: at most {} (two blocks stay on the device, as kohya requires)",
         options_.blocks_to_swap, n, std::max<int64_t>(n - 2, 0));
  }
  schedule_ = SwapSchedule{n, options_.blocks_to_swap};

  // One layout for every block, one dtype and one requires_grad for every parameter.
  for (int64_t b = 0; b < n; ++b) {
    std::vector<std::pair<std::string, std::vector<int64_t>>> shapes;
    std::vector<at::Tensor> parameters;
    for (const auto& item : blocks_[b].ptr()->named_parameters(/*recurse=*/true)) {
      shapes.emplace_back(item.key(), item.value().sizes().vec());
      parameters.push_back(item.value());
    }
    if (parameters.empty()) fail(kWhere, "block {} has no parameters", b);
    FlatLayout layout(shapes);
    if (b == 0) {
      layout_ = layout;
      master_dtype_ = parameters[0].scalar_type();
      trainable_ = parameters[0].requires_grad();
    } else if (!(layout == layout_)) {
      fail(kWhere, "block {} differs from block 0 in its parameter names or shapes: the blocks must be identical", b);
    }
    for (size_t i = 0; i < parameters.size(); ++i) {
      if (parameters[i].scalar_type() != master_dtype_ || parameters[i].requires_grad() != trainable_) {
        fail(kWhere, "block {} parameter {} is {}{}, block 0's first is {}{}: one dtype and all trainable or all frozen", b,
             shapes[i].first, c10::toString(parameters[i].scalar_type()), parameters[i].requires_grad() ? "" : " (frozen)",
             c10::toString(master_dtype_), trainable_ ? "" : " (frozen)");
      }
    }
    parameters_.push_back(std::move(parameters));
  }
  compute_dtype_ = options_.compute_dtype.value_or(master_dtype_);
  shard_ranks_ = options_.sharding == Sharding::full ? communicator_.size() : 1;
  assembles_ = shard_ranks_ > 1 || compute_dtype_ != master_dtype_;
  copier_ = std::make_unique<Copier>(device_);

  at::NoGradGuard no_grad;
  const int64_t shard = layout_.shard_numel(shard_ranks_);
  const at::TensorOptions device_options = at::TensorOptions(master_dtype_).device(device_);
  for (int64_t s = 0; s < schedule_.shared_slots(); ++s) {
    slots_.push_back(std::make_unique<Slot>(device_));
    slots_.back()->storage = at::empty({shard}, device_options);
  }
  // Masters: each block flattened on the communicator's device, made rank 0's, cut, and the piece
  // this rank keeps copied to its home; then the block's own tensors let go of their storage, so
  // the blocks' memory turns into masters one block at a time.
  released_ = at::empty({0}, device_options);
  for (int64_t b = 0; b < n; ++b) {
    at::Tensor flat = layout_.flatten(parameters_[b], shard_ranks_, device_options);
    communicator_.broadcast(flat, 0);
    const at::TensorOptions home = schedule_.on_host(b) ? copier_->host_options(master_dtype_) : device_options;
    at::Tensor master = at::empty({shard}, home);
    master.copy_(flat.narrow(0, shard_index() * shard, shard));
    master.set_requires_grad(trainable_);
    masters_.push_back(master);
    release_parameters(b);
  }

  const int64_t padded = layout_.padded_numel(shard_ranks_);
  const at::TensorOptions compute_options = at::TensorOptions(compute_dtype_).device(device_);
  if (assembles_) {
    for (int k = 0; k < 2; ++k) {  // the running block's, and the next one's arriving
      gather_buffers_.push_back(std::make_unique<GatherBuffer>());
      gather_buffers_.back()->full = at::empty({padded}, compute_options);
      if (shard_ranks_ > 1) gather_buffers_.back()->sending = at::empty({layout_.shard_numel(shard_ranks_)}, compute_options);
    }
  }
  if (trainable_) {
    // One being filled by backward and, with several ranks, the previous block's being averaged.
    for (int k = 0; k < (communicator_.size() > 1 ? 2 : 1); ++k) {
      gradient_buffers_.push_back(std::make_unique<GradientBuffer>());
      gradient_buffers_.back()->full = at::empty({padded}, compute_options);
    }
  }
}

BlockStack::~BlockStack() = default;

// ---------------------------------------------------------------- forward

at::Tensor BlockStack::forward(const at::Tensor& x) {
  ++pass_;
  const bool record = at::GradMode::is_enabled() && (x.requires_grad() || trainable_);
  auto handle = c10::IValue::make_capsule(c10::make_intrusive<StackHandle>(this));
  at::Tensor h = x;
  for (int64_t b = 0; b < blocks(); ++b) {
    h = record ? BlockFunction::apply(handle, b, h, masters_[b])[0] : run_block(b, h);
  }
  return h;
}

at::Tensor BlockStack::run_block(int64_t block, const at::Tensor& x) {
  at::NoGradGuard no_grad;
  const at::Tensor full = acquire(block);
  if (block + 1 < blocks()) prefetch(block + 1);
  point_parameters(block, full);
  at::Tensor y = blocks_[block].forward(x);
  release_parameters(block);
  if (auto next = schedule_.fetch_after_forward(block)) fetch(*next);
  return y;
}

// ---------------------------------------------------------------- backward

at::Tensor BlockStack::backward_block(int64_t block, const at::Tensor& x, const at::Tensor& grad_output,
                                      bool needs_input_grad) {
  const at::Tensor full = acquire(block);
  if (block > 0) prefetch(block - 1);

  GradientBuffer* gradient = trainable_ ? gradient_buffers_[block % gradient_buffers_.size()].get() : nullptr;
  // With two buffers this one last held block+2's gradient, whose average block+1 already finished.
  point_parameters(block, full);
  if (gradient) {
    gradient->full.zero_();
    const std::vector<at::Tensor> slots = layout_.views(gradient->full);
    for (size_t i = 0; i < slots.size(); ++i) parameters_[block][i].mutable_grad() = slots[i];
  }
  at::Tensor input = x.detach().requires_grad_(needs_input_grad);
  {
    // Autograd accumulates each parameter's gradient in place into the .grad view set above.
    at::AutoGradMode enable_grad(true);
    const at::Tensor y = blocks_[block].forward(input);
    std::vector<at::Tensor> wrt;
    if (trainable_) wrt = parameters_[block];
    if (needs_input_grad) wrt.push_back(input);
    torch::autograd::backward({y}, {grad_output}, /*retain_graph=*/false, /*create_graph=*/false, wrt);
  }
  release_parameters(block);

  if (gradient) {
    // At most one average in flight: the previous block's lands before this one's starts.
    for (auto& other : gradient_buffers_) {
      if (other.get() != gradient) finish_reduction(*other);
    }
    start_reduction(block, *gradient);
    // Block 0 is the last of the stack's backward: the masters' .grad must be whole when it returns.
    // One rank has nothing to wait for, and one buffer, which the next block refills.
    if (block == 0 || communicator_.size() == 1) finish_reduction(*gradient);
  }
  if (auto next = schedule_.fetch_after_backward(block)) fetch(*next);
  return needs_input_grad ? input.grad() : at::Tensor();
}

void BlockStack::start_reduction(int64_t block, GradientBuffer& buffer) {
  buffer.block = block;
  if (communicator_.size() > 1) {
    buffer.pending = communicator_.all_reduce_async(buffer.full, ReduceOp::average);
    traffic_.reduced += static_cast<int64_t>(buffer.full.nbytes());
  }
}

void BlockStack::finish_reduction(GradientBuffer& buffer) {
  if (buffer.block < 0) return;
  at::NoGradGuard no_grad;
  if (buffer.pending) {
    buffer.pending->wait();
    buffer.pending.reset();
  }
  at::Tensor& master = masters_[buffer.block];
  const int64_t shard = master.numel();
  const at::Tensor mine = buffer.full.narrow(0, shard_index() * shard, shard);
  if (!master.grad().defined()) master.mutable_grad() = at::zeros_like(master);
  master.mutable_grad().add_(mine.to(master.device()));
  if (schedule_.on_host(buffer.block)) traffic_.device_to_host += static_cast<int64_t>(mine.nbytes());
  buffer.block = -1;
}

// ---------------------------------------------------------------- parameters in, parameters out

at::Tensor BlockStack::acquire(int64_t block) {
  if (!assembles_) return device_master(block);
  GatherBuffer& buffer = *gather_buffers_[block % 2];
  if (buffer.block != block || buffer.pass != pass_) start_gather(block);
  if (buffer.pending) {
    buffer.pending->wait();
    buffer.pending.reset();
  }
  return buffer.full;
}

// Called for the block that runs next (forward: block+1; backward: block-1) before its neighbour
// computes. Two neighbours never share a slot (there are at least two), so the one arriving never
// evicts the one running.
void BlockStack::prefetch(int64_t block) {
  if (schedule_.on_host(block)) fetch(block);
  if (!assembles_) return;
  const GatherBuffer& buffer = *gather_buffers_[block % 2];
  if (buffer.block != block || buffer.pass != pass_) start_gather(block);
}

void BlockStack::fetch(int64_t block) {
  if (!schedule_.on_host(block)) return;
  const int64_t index = schedule_.slot_of(block);
  Slot& slot = *slots_[index];
  const at::Tensor& master = masters_[block];
  if (slot.block == block && slot.version == static_cast<int64_t>(master._version())) return;
  at::NoGradGuard no_grad;
  copier_->copy_in(slot, master);
  slot.block = block;
  slot.version = static_cast<int64_t>(master._version());
  traffic_.host_to_device += static_cast<int64_t>(master.nbytes());
  fetch_log_.push_back({block, index});
}

const at::Tensor& BlockStack::device_master(int64_t block) {
  if (!schedule_.on_host(block)) return masters_[block];
  fetch(block);
  Slot& slot = *slots_[schedule_.slot_of(block)];
  copier_->wait_arrived(slot);
  return slot.storage;
}

void BlockStack::start_gather(int64_t block) {
  at::NoGradGuard no_grad;
  GatherBuffer& buffer = *gather_buffers_[block % 2];
  if (buffer.pending) {  // a prefetch nobody used (a new pass began): let it land first
    buffer.pending->wait();
    buffer.pending.reset();
  }
  const at::Tensor& source = device_master(block);
  if (shard_ranks_ == 1) {
    buffer.full.copy_(source);  // no sharding: only the cast to the compute dtype
  } else {
    buffer.sending.copy_(source);
    buffer.pending = communicator_.all_gather_async(buffer.sending, buffer.full.view({shard_ranks_, -1}));
    traffic_.gathered += static_cast<int64_t>(buffer.full.nbytes());
  }
  buffer.block = block;
  buffer.pass = pass_;
}

void BlockStack::point_parameters(int64_t block, const at::Tensor& full) {
  const std::vector<at::Tensor> views = layout_.views(full.detach());
  for (size_t i = 0; i < views.size(); ++i) parameters_[block][i].set_data(views[i]);
}

void BlockStack::release_parameters(int64_t block) {
  for (at::Tensor& p : parameters_[block]) {
    p.set_data(released_);
    p.mutable_grad().reset();
  }
  if (schedule_.on_host(block)) {
    Slot& slot = *slots_[schedule_.slot_of(block)];
    if (slot.block == block) copier_->mark_released(slot);
  }
}

// ---------------------------------------------------------------- introspection and checkpoints

StackMemory BlockStack::memory() const {
  StackMemory m;
  for (int64_t b = 0; b < blocks(); ++b) {
    const at::Tensor& master = masters_[b];
    const int64_t grad = master.grad().defined() ? static_cast<int64_t>(master.grad().nbytes()) : 0;
    (schedule_.on_host(b) ? m.host_masters : m.device_masters) += static_cast<int64_t>(master.nbytes());
    (schedule_.on_host(b) ? m.host_gradients : m.device_gradients) += grad;
  }
  for (const auto& slot : slots_) m.swap_slots += static_cast<int64_t>(slot->storage.nbytes());
  for (const auto& buffer : gather_buffers_) {
    m.gather_buffers += static_cast<int64_t>(buffer->full.nbytes());
    if (buffer->sending.defined()) m.gather_buffers += static_cast<int64_t>(buffer->sending.nbytes());
  }
  for (const auto& buffer : gradient_buffers_) m.gradient_buffers += static_cast<int64_t>(buffer->full.nbytes());
  return m;
}

at::Tensor BlockStack::gather_to_root(int64_t block, const at::Tensor& shard, int root) const {
  const int64_t size = layout_.shard_numel(shard_ranks_);
  if (block < 0 || block >= blocks()) fail(kWhere, "no block {} (of {})", block, blocks());
  if (shard.dim() != 1 || shard.numel() != size) {
    fail(kWhere, "a shard of block {} has {} elements, got shape {}", block, size, c10::str(shard.sizes()));
  }
  at::NoGradGuard no_grad;
  const bool is_root = communicator_.rank() == root;
  if (shard_ranks_ == 1) {
    if (!is_root) return at::Tensor();
    return at::empty({layout_.numel()}, shard.options().device(at::kCPU)).copy_(shard.narrow(0, 0, layout_.numel()));
  }

  return unshard_to_root(layout_, shard, communicator_, root);
}

}  // namespace sdt
