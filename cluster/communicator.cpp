// The single-process and MPI backends of the Communicator, and the choice between the backends.
#include "cluster/communicator.h"

#include <mpi.h>

#include <climits>
#include <condition_variable>
#include <deque>
#include <exception>
#include <future>
#include <mutex>
#include <thread>

#include <fmt/format.h>

#include <torch/torch.h>

#include "src/core/error.h"

namespace sdt {

void check_collective_tensor(const at::Tensor& tensor, const char* collective, std::optional<ReduceOp> op) {
  const std::string where = std::string("communicator: ") + collective;
  if (!tensor.defined()) fail(where, "the tensor is undefined");
  switch (tensor.scalar_type()) {
    case at::kFloat:
    case at::kDouble:
    case at::kHalf:
    case at::kBFloat16:
      return;
    case at::kInt:
    case at::kLong:
    case at::kByte:
      if (op == ReduceOp::average) fail(where, "cannot average an integer tensor ({}); sum it and divide", c10::toString(tensor.scalar_type()));
      return;
    case at::kFloat8_e4m3fn:
    case at::kFloat8_e5m2:
      // fp8 storage (--fp8_base) is moved as bytes (broadcast, gather), never reduced.
      if (op) fail(where, "cannot reduce {} (fp8 weights are stored, not summed)", c10::toString(tensor.scalar_type()));
      return;
    default:
      fail(where, "dtype {} is not supported (float32, float64, float16, bfloat16, int32, int64, uint8; fp8 moved only)",
           c10::toString(tensor.scalar_type()));
  }
}

namespace {

void check_device(const at::Tensor& tensor, const at::Device& device, const char* collective) {
  if (tensor.device() != device) {
    fail(std::string("communicator: ") + collective, "the tensor is on {}, this communicator's tensors live on {}",
         tensor.device().str(), device.str());
  }
}

void check_leading_dim(const at::Tensor& input, int size, const char* collective) {
  if (input.dim() == 0 || input.size(0) != size) {
    fail(std::string("communicator: ") + collective, "the input needs shape ({}, ...), one row per rank; got {}", size,
         c10::str(input.sizes()));
  }
}

// all_gather_async's output: (size, ...input.shape), contiguous, the input's dtype and device.
void check_gather_output(const at::Tensor& input, const at::Tensor& output, int size, const at::Device& device) {
  check_collective_tensor(input, "all_gather", std::nullopt);
  check_device(input, device, "all_gather");
  std::vector<int64_t> shape{size};
  shape.insert(shape.end(), input.sizes().begin(), input.sizes().end());
  if (output.sizes() != at::IntArrayRef(shape) || !output.is_contiguous() || output.scalar_type() != input.scalar_type() ||
      output.device() != input.device()) {
    fail("communicator: all_gather", "the output must be a contiguous {} tensor of shape {} on {}; got {} {}",
         c10::toString(input.scalar_type()), c10::str(at::IntArrayRef(shape)), input.device().str(),
         c10::toString(output.scalar_type()), c10::str(output.sizes()));
  }
}

// reduce_scatter_async's output: input.shape[1:], contiguous, the input's dtype and device.
void check_scatter_output(const at::Tensor& input, const at::Tensor& output, int size, const at::Device& device, ReduceOp op) {
  check_collective_tensor(input, "reduce_scatter", op);
  check_device(input, device, "reduce_scatter");
  check_leading_dim(input, size, "reduce_scatter");
  if (output.sizes() != input.sizes().slice(1) || !output.is_contiguous() || output.scalar_type() != input.scalar_type() ||
      output.device() != input.device()) {
    fail("communicator: reduce_scatter", "the output must be a contiguous {} tensor of shape {} on {}; got {} {}",
         c10::toString(input.scalar_type()), c10::str(input.sizes().slice(1)), input.device().str(),
         c10::toString(output.scalar_type()), c10::str(output.sizes()));
  }
}

// ---------------------------------------------------------------- single process

class DonePending final : public PendingCollective {
 public:
  void wait() override {}
};

class SingleProcessCommunicator final : public Communicator {
 public:
  explicit SingleProcessCommunicator(at::Device device) : device_(device) {}

  int rank() const override { return 0; }
  int size() const override { return 1; }
  at::Device device() const override { return device_; }
  std::string backend() const override { return "single"; }

  std::unique_ptr<PendingCollective> all_reduce_async(const at::Tensor& tensor, ReduceOp op) override {
    check_collective_tensor(tensor, "all_reduce", op);
    check_device(tensor, device_, "all_reduce");
    return std::make_unique<DonePending>();
  }
  at::Tensor reduce_scatter(const at::Tensor& input, ReduceOp op) override {
    check_collective_tensor(input, "reduce_scatter", op);
    check_device(input, device_, "reduce_scatter");
    check_leading_dim(input, 1, "reduce_scatter");
    return input[0].clone();
  }
  std::unique_ptr<PendingCollective> reduce_scatter_async(const at::Tensor& input, const at::Tensor& output, ReduceOp op) override {
    check_scatter_output(input, output, 1, device_, op);
    at::NoGradGuard no_grad;
    output.copy_(input[0]);
    return std::make_unique<DonePending>();
  }
  at::Tensor all_gather(const at::Tensor& input) override {
    check_collective_tensor(input, "all_gather", std::nullopt);
    check_device(input, device_, "all_gather");
    return input.unsqueeze(0).clone();
  }
  std::unique_ptr<PendingCollective> all_gather_async(const at::Tensor& input, const at::Tensor& output) override {
    check_gather_output(input, output, 1, device_);
    at::NoGradGuard no_grad;
    output[0].copy_(input);
    return std::make_unique<DonePending>();
  }
  void broadcast(const at::Tensor& tensor, int root) override {
    check_collective_tensor(tensor, "broadcast", std::nullopt);
    check_device(tensor, device_, "broadcast");
    if (root != 0) fail("communicator: broadcast", "root {} is not a rank of a one-process job", root);
  }
  void barrier() override {}

 private:
  at::Device device_;
};

// ---------------------------------------------------------------- MPI

// Runs work items one at a time, in the order they were submitted, on a thread of its own: the
// rank's MPI calls then happen in program order, while the caller (autograd's backward) goes on.
// A watchdog thread (PyTorch's NCCL watchdog does the same) looks at the item that runs: one that has
// waited longer than the timeout for the other ranks (a rank stalled, stopped or lost) calls
// `on_timeout` with what it is, instead of waiting forever.
class CommunicationThread {
 public:
  using TimeoutHandler = std::function<void(const std::string& what, double waited_seconds)>;

  CommunicationThread(std::chrono::seconds timeout, TimeoutHandler on_timeout) : state_(std::make_shared<State>()) {
    thread_ = std::thread([state = state_] {
      // Broadcasts copy into parameters that require grad; that copy is not part of any graph.
      c10::AutoGradMode no_grad(false);
      for (;;) {
        Work work;
        {
          std::unique_lock lock(state->mutex);
          state->wake.wait(lock, [&] { return state->closing || !state->queue.empty(); });
          if (state->queue.empty()) return;
          work = std::move(state->queue.front());
          state->queue.pop_front();
          state->busy = true;
          state->running = std::move(work.what);
          state->since = std::chrono::steady_clock::now();
        }
        work.task();
        std::lock_guard lock(state->mutex);
        state->busy = false;
      }
    });
    watchdog_ = std::thread([state = state_, timeout, on_timeout = std::move(on_timeout)] {
      std::unique_lock lock(state->mutex);
      while (!state->closing) {
        state->watch.wait_for(lock, std::chrono::seconds(1));
        if (!state->busy) continue;
        const std::chrono::duration<double> waited = std::chrono::steady_clock::now() - state->since;
        if (waited < timeout) continue;
        const std::string what = state->running;
        lock.unlock();
        on_timeout(what, waited.count());  // ends the job
        return;
      }
    });
  }

  ~CommunicationThread() {
    if (thread_.joinable()) close();
  }

  // `what` names the collective for the watchdog's message.
  std::future<void> submit(std::string what, std::function<void()> function) {
    Work work{std::move(what), std::packaged_task<void()>(std::move(function))};
    std::future<void> done = work.task.get_future();
    {
      std::lock_guard lock(state_->mutex);
      state_->queue.push_back(std::move(work));
    }
    state_->wake.notify_one();
    return done;
  }

  // Finishes the queued work and ends the thread; returns true then. While an exception unwinds the
  // stack with work still queued or running, the other ranks may never join that collective, and
  // joining would hang this rank before main can report the error and abort the job: the thread is
  // left to the abort (it owns what it touches) and this returns false.
  bool close() {
    bool idle = false;
    {
      std::lock_guard lock(state_->mutex);
      state_->closing = true;
      idle = !state_->busy && state_->queue.empty();
    }
    state_->wake.notify_one();
    state_->watch.notify_one();
    if (!idle && std::uncaught_exceptions() > 0) {
      thread_.detach();
      watchdog_.detach();
      return false;
    }
    thread_.join();
    watchdog_.join();
    return true;
  }

 private:
  struct Work {
    std::string what;
    std::packaged_task<void()> task;
  };
  struct State {
    std::mutex mutex;
    std::condition_variable wake, watch;
    std::deque<Work> queue;
    bool busy = false;
    bool closing = false;
    std::string running;                            // what the busy item is
    std::chrono::steady_clock::time_point since;    // when it started
  };
  std::shared_ptr<State> state_;
  std::thread thread_, watchdog_;
};

class FuturePending final : public PendingCollective {
 public:
  explicit FuturePending(std::future<void> done) : done_(std::move(done)) {}
  void wait() override { done_.get(); }

 private:
  std::future<void> done_;
};

bool reduces_in_float32(at::ScalarType dtype) { return dtype == at::kHalf || dtype == at::kBFloat16; }

// The MPI type of a contiguous buffer. float16 and bfloat16 travel as 16-bit words and fp8 as bytes where they
// are only moved (broadcast, gather); they are never reduced as such (see reducible()).
MPI_Datatype mpi_type(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return MPI_FLOAT;
    case at::kDouble: return MPI_DOUBLE;
    case at::kInt: return MPI_INT32_T;
    case at::kLong: return MPI_INT64_T;
    case at::kByte:
    case at::kFloat8_e4m3fn:
    case at::kFloat8_e5m2: return MPI_UINT8_T;
    case at::kHalf:
    case at::kBFloat16: return MPI_UINT16_T;
    default: fail("communicator", "no MPI type for {}", c10::toString(dtype));
  }
}

int mpi_count(int64_t numel, const char* collective) {
  if (numel > INT_MAX) fail(std::string("communicator: ") + collective, "{} elements exceed MPI's int count", numel);
  return static_cast<int>(numel);
}

// A contiguous buffer MPI can sum: the tensor itself when it already is one, else a copy
// (float32 for float16 and bfloat16).
at::Tensor reducible(const at::Tensor& tensor) {
  return reduces_in_float32(tensor.scalar_type()) ? tensor.to(at::kFloat).contiguous() : tensor.contiguous();
}

class MpiCommunicator final : public Communicator {
 public:
  MpiCommunicator(const World& world, std::chrono::seconds timeout)
      : rank_(world.rank), size_(world.size), thread_(timeout, [world, timeout](const std::string& what, double waited) {
          // Every rank that waits says so; the ranks that do not are the ones that stalled or died. A few seconds
          // let the other waiting ranks print theirs before the abort ends them all.
          fmt::print(stderr, "rank {} of {}: the {} has waited {:.0f} s for the other ranks (timeout {} s)\n", world.rank,
                     world.size, what, waited, timeout.count());
          std::fflush(stderr);
          std::this_thread::sleep_for(std::chrono::seconds(5));
          abort_job(world, fmt::format("a collective timed out after {} s (--ddp_timeout): a rank stalled, was stopped or "
                                       "lost its node; the ranks that did not report waiting above are the ones to look at",
                                       timeout.count()));
        }) {
    // A communicator of our own: no collective of another library on MPI_COMM_WORLD can
    // interleave with ours.
    MPI_Comm_dup(MPI_COMM_WORLD, &comm_);
  }
  ~MpiCommunicator() override {
    if (thread_.close()) MPI_Comm_free(&comm_);
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  at::Device device() const override { return at::kCPU; }
  std::string backend() const override { return "mpi"; }

  std::unique_ptr<PendingCollective> all_reduce_async(const at::Tensor& tensor, ReduceOp op) override {
    check_collective_tensor(tensor, "all_reduce", op);
    check_device(tensor, at::kCPU, "all_reduce");
    const int count = mpi_count(tensor.numel(), "all_reduce");
    return std::make_unique<FuturePending>(thread_.submit(fmt::format("all-reduce of {} elements", count), [comm = comm_, size = size_, tensor, op, count] {
      at::Tensor buffer = reducible(tensor);
      MPI_Allreduce(MPI_IN_PLACE, buffer.data_ptr(), count, mpi_type(buffer.scalar_type()), MPI_SUM, comm);
      if (op == ReduceOp::average) buffer.div_(size);
      if (!buffer.is_same(tensor)) tensor.copy_(buffer);
    }));
  }

  at::Tensor reduce_scatter(const at::Tensor& input, ReduceOp op) override {
    check_collective_tensor(input, "reduce_scatter", op);
    check_device(input, at::kCPU, "reduce_scatter");
    check_leading_dim(input, size_, "reduce_scatter");
    const int count = mpi_count(input[0].numel(), "reduce_scatter");
    at::Tensor result;
    thread_.submit(fmt::format("reduce-scatter of {} elements", count), [&, comm = comm_] {
      const at::Tensor buffer = reducible(input);
      at::Tensor mine = at::empty(input.sizes().slice(1), buffer.options());
      MPI_Reduce_scatter_block(buffer.data_ptr(), mine.data_ptr(), count, mpi_type(buffer.scalar_type()), MPI_SUM, comm);
      if (op == ReduceOp::average) mine.div_(size_);
      result = mine.to(input.scalar_type());
    }).get();
    return result;
  }

  std::unique_ptr<PendingCollective> reduce_scatter_async(const at::Tensor& input, const at::Tensor& output, ReduceOp op) override {
    check_scatter_output(input, output, size_, at::kCPU, op);
    const int count = mpi_count(input[0].numel(), "reduce_scatter");
    return std::make_unique<FuturePending>(thread_.submit(fmt::format("reduce-scatter of {} elements", count), [comm = comm_, size = size_, input, output, op, count] {
      const at::Tensor buffer = reducible(input);
      at::Tensor mine = buffer.scalar_type() == output.scalar_type() ? output : at::empty(output.sizes(), buffer.options());
      MPI_Reduce_scatter_block(buffer.data_ptr(), mine.data_ptr(), count, mpi_type(buffer.scalar_type()), MPI_SUM, comm);
      if (op == ReduceOp::average) mine.div_(size);
      if (!mine.is_same(output)) output.copy_(mine);
    }));
  }

  at::Tensor all_gather(const at::Tensor& input) override {
    check_collective_tensor(input, "all_gather", std::nullopt);
    check_device(input, at::kCPU, "all_gather");
    const int count = mpi_count(input.numel(), "all_gather");
    at::Tensor result;
    thread_.submit(fmt::format("all-gather of {} elements", count), [&, comm = comm_] {
      const at::Tensor mine = input.contiguous();
      std::vector<int64_t> shape{size_};
      shape.insert(shape.end(), input.sizes().begin(), input.sizes().end());
      result = at::empty(shape, mine.options());
      const MPI_Datatype type = mpi_type(mine.scalar_type());
      MPI_Allgather(mine.data_ptr(), count, type, result.data_ptr(), count, type, comm);
    }).get();
    return result;
  }

  std::unique_ptr<PendingCollective> all_gather_async(const at::Tensor& input, const at::Tensor& output) override {
    check_gather_output(input, output, size_, at::kCPU);
    const int count = mpi_count(input.numel(), "all_gather");
    return std::make_unique<FuturePending>(thread_.submit(fmt::format("all-gather of {} elements", count), [comm = comm_, mine = input.contiguous(), output, count] {
      const MPI_Datatype type = mpi_type(mine.scalar_type());
      MPI_Allgather(mine.data_ptr(), count, type, output.data_ptr(), count, type, comm);
    }));
  }

  void broadcast(const at::Tensor& tensor, int root) override {
    check_collective_tensor(tensor, "broadcast", std::nullopt);
    check_device(tensor, at::kCPU, "broadcast");
    if (root < 0 || root >= size_) fail("communicator: broadcast", "root {} is not a rank of {}", root, size_);
    const int count = mpi_count(tensor.numel(), "broadcast");
    thread_.submit(fmt::format("broadcast of {} elements", count), [&, comm = comm_] {
      at::Tensor buffer = tensor.contiguous();
      MPI_Bcast(buffer.data_ptr(), count, mpi_type(buffer.scalar_type()), root, comm);
      if (!buffer.is_same(tensor)) tensor.copy_(buffer);
    }).get();
  }

  void barrier() override {
    thread_.submit("barrier", [comm = comm_] { MPI_Barrier(comm); }).get();
  }

 private:
  int rank_;
  int size_;
  MPI_Comm comm_ = MPI_COMM_NULL;
  CommunicationThread thread_;
};

}  // namespace

std::unique_ptr<Communicator> make_communicator(const World& world, const at::Device& device, std::chrono::seconds timeout) {
  const at::Device where = device.is_cuda() && !device.has_index() ? at::Device(at::kCUDA, world.local_rank) : device;
  if (world.size == 1) return std::make_unique<SingleProcessCommunicator>(where);

  int mpi_initialized = 0;
  MPI_Initialized(&mpi_initialized);
  if (!mpi_initialized) {
    fail("communicator", "the job has {} processes but MPI is not initialised: main must construct a DistributedSession first",
         world.size);
  }
  if (where.is_cuda()) {
#ifdef SDT_CUDA
    return make_nccl_communicator(world, where.index());
#else
    fail("communicator", "CUDA tensors across ranks need NCCL, and this sdt was built without CUDA (SDT_CUDA=OFF)");
#endif
  }
  if (!where.is_cpu()) fail("communicator", "no backend for {} tensors across ranks", where.str());
  return std::make_unique<MpiCommunicator>(world, timeout);
}

}  // namespace sdt
