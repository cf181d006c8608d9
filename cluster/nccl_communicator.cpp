// The NCCL backend of the Communicator, for CUDA tensors (built with SDT_CUDA).
//
// One NCCL communicator per process over all ranks, one GPU per rank. Its unique id is made by
// rank 0 and broadcast over MPI (llm.c's bootstrap). Collectives run on a stream of their own,
// ordered after the caller's work by an event, so compute queued meanwhile on the caller's stream
// overlaps them; the caller's stream waits for a collective's result through another event, and
// the host never blocks except in barrier().
#include <mpi.h>
#include <nccl.h>

#include <exception>
#include <utility>

#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/torch.h>

#include "cluster/communicator.h"
#include "src/core/error.h"

namespace sdt {
namespace {

void nccl_check(ncclResult_t result, const char* call) {
  if (result != ncclSuccess) fail("NCCL", "{} failed: {}", call, ncclGetErrorString(result));
}

ncclDataType_t nccl_type(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return ncclFloat32;
    case at::kDouble: return ncclFloat64;
    case at::kHalf: return ncclFloat16;
    case at::kBFloat16: return ncclBfloat16;
    case at::kInt: return ncclInt32;
    case at::kLong: return ncclInt64;
    case at::kByte:
    case at::kFloat8_e4m3fn:
    case at::kFloat8_e5m2: return ncclUint8;  // fp8 storage is only moved
    default: fail("NCCL", "no NCCL type for {}", c10::toString(dtype));
  }
}

ncclRedOp_t nccl_op(ReduceOp op) { return op == ReduceOp::average ? ncclAvg : ncclSum; }

// A CUDA event recorded on one stream, for other streams to wait on. (c10's own event wrapper
// lives in ATen/cuda, whose headers pull in cuBLAS and cuSPARSE; this needs only the runtime.)
class StreamEvent {
 public:
  explicit StreamEvent(cudaStream_t recorded_on) {
    C10_CUDA_CHECK(cudaEventCreateWithFlags(&event_, cudaEventDisableTiming));
    C10_CUDA_CHECK(cudaEventRecord(event_, recorded_on));
  }
  ~StreamEvent() {
    if (event_) cudaEventDestroy(event_);
  }
  StreamEvent(StreamEvent&& other) noexcept : event_(std::exchange(other.event_, nullptr)) {}
  StreamEvent(const StreamEvent&) = delete;
  StreamEvent& operator=(const StreamEvent&) = delete;

  void make_wait(cudaStream_t stream) const { C10_CUDA_CHECK(cudaStreamWaitEvent(stream, event_, 0)); }

 private:
  cudaEvent_t event_ = nullptr;
};

class EventPending final : public PendingCollective {
 public:
  EventPending(StreamEvent done, c10::DeviceIndex device) : done_(std::move(done)), device_(device) {}
  void wait() override { done_.make_wait(c10::cuda::getCurrentCUDAStream(device_).stream()); }

 private:
  StreamEvent done_;
  c10::DeviceIndex device_;
};

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(const World& world, int device_index)
      : rank_(world.rank),
        size_(world.size),
        device_(at::kCUDA, static_cast<c10::DeviceIndex>(device_index)),
        stream_(c10::cuda::getStreamFromPool(/*isHighPriority=*/true, device_.index())) {
    c10::cuda::CUDAGuard guard(device_);
    ncclUniqueId id;
    if (rank_ == 0) nccl_check(ncclGetUniqueId(&id), "ncclGetUniqueId");
    MPI_Bcast(&id, sizeof(id), MPI_BYTE, 0, MPI_COMM_WORLD);
    nccl_check(ncclCommInitRank(&comm_, size_, id, rank_), "ncclCommInitRank");
  }
  ~NcclCommunicator() override {
    // While an exception unwinds the stack, collectives may wait for ranks that will never join
    // them; ncclCommDestroy would wait too, ncclCommAbort does not.
    if (std::uncaught_exceptions() > 0) {
      ncclCommAbort(comm_);
    } else {
      ncclCommDestroy(comm_);
    }
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  at::Device device() const override { return device_; }
  std::string backend() const override { return "nccl"; }

  std::unique_ptr<PendingCollective> all_reduce_async(const at::Tensor& tensor, ReduceOp op) override {
    check(tensor, "all_reduce", op);
    const at::Tensor buffer = tensor.contiguous();
    StreamEvent done = on_nccl_stream({buffer}, [&](cudaStream_t stream) {
      nccl_check(ncclAllReduce(buffer.data_ptr(), buffer.data_ptr(), buffer.numel(), nccl_type(buffer.scalar_type()),
                               nccl_op(op), comm_, stream),
                 "ncclAllReduce");
    });
    auto pending = std::make_unique<EventPending>(std::move(done), device_.index());
    if (buffer.is_same(tensor)) return pending;
    // A strided tensor was reduced in a contiguous copy: its copy back goes after the reduction.
    pending->wait();
    at::NoGradGuard no_grad;
    tensor.copy_(buffer);
    return std::make_unique<EventPending>(record_current(), device_.index());
  }

  at::Tensor reduce_scatter(const at::Tensor& input, ReduceOp op) override {
    check(input, "reduce_scatter", op);
    if (input.dim() == 0 || input.size(0) != size_) {
      fail("communicator: reduce_scatter", "the input needs shape ({}, ...), one row per rank; got {}", size_,
           c10::str(input.sizes()));
    }
    const at::Tensor buffer = input.contiguous();
    at::Tensor mine = at::empty(input.sizes().slice(1), buffer.options());
    EventPending(on_nccl_stream({buffer, mine}, [&](cudaStream_t stream) {
                   nccl_check(ncclReduceScatter(buffer.data_ptr(), mine.data_ptr(), mine.numel(),
                                                nccl_type(buffer.scalar_type()), nccl_op(op), comm_, stream),
                              "ncclReduceScatter");
                 }),
                 device_.index())
        .wait();
    return mine;
  }

  std::unique_ptr<PendingCollective> reduce_scatter_async(const at::Tensor& input, const at::Tensor& output, ReduceOp op) override {
    check(input, "reduce_scatter", op);
    if (input.dim() == 0 || input.size(0) != size_ || output.numel() * size_ != input.numel() || !output.is_contiguous() ||
        output.scalar_type() != input.scalar_type() || output.device() != device_) {
      fail("communicator: reduce_scatter", "the input needs shape ({}, ...) and the output its row's shape, contiguous, "
           "same dtype, on {}; got {} and {}", size_, device_.str(), c10::str(input.sizes()), c10::str(output.sizes()));
    }
    const at::Tensor buffer = input.contiguous();
    StreamEvent done = on_nccl_stream({buffer, output}, [&](cudaStream_t stream) {
      nccl_check(ncclReduceScatter(buffer.data_ptr(), output.data_ptr(), output.numel(), nccl_type(buffer.scalar_type()),
                                   nccl_op(op), comm_, stream),
                 "ncclReduceScatter");
    });
    return std::make_unique<EventPending>(std::move(done), device_.index());
  }

  at::Tensor all_gather(const at::Tensor& input) override {
    check(input, "all_gather", std::nullopt);
    const at::Tensor buffer = input.contiguous();
    std::vector<int64_t> shape{size_};
    shape.insert(shape.end(), input.sizes().begin(), input.sizes().end());
    at::Tensor all = at::empty(shape, buffer.options());
    EventPending(on_nccl_stream({buffer, all}, [&](cudaStream_t stream) {
                   nccl_check(ncclAllGather(buffer.data_ptr(), all.data_ptr(), buffer.numel(),
                                            nccl_type(buffer.scalar_type()), comm_, stream),
                              "ncclAllGather");
                 }),
                 device_.index())
        .wait();
    return all;
  }

  std::unique_ptr<PendingCollective> all_gather_async(const at::Tensor& input, const at::Tensor& output) override {
    check(input, "all_gather", std::nullopt);
    if (output.numel() != size_ * input.numel() || !output.is_contiguous() || output.scalar_type() != input.scalar_type() ||
        output.device() != device_) {
      fail("communicator: all_gather", "the output must be a contiguous {} tensor of {} x {} elements on {}",
           c10::toString(input.scalar_type()), size_, input.numel(), device_.str());
    }
    const at::Tensor buffer = input.contiguous();
    StreamEvent done = on_nccl_stream({buffer, output}, [&](cudaStream_t stream) {
      nccl_check(ncclAllGather(buffer.data_ptr(), output.data_ptr(), buffer.numel(), nccl_type(buffer.scalar_type()), comm_,
                               stream),
                 "ncclAllGather");
    });
    return std::make_unique<EventPending>(std::move(done), device_.index());
  }

  void broadcast(const at::Tensor& tensor, int root) override {
    check(tensor, "broadcast", std::nullopt);
    if (root < 0 || root >= size_) fail("communicator: broadcast", "root {} is not a rank of {}", root, size_);
    const at::Tensor buffer = tensor.contiguous();
    EventPending(on_nccl_stream({buffer}, [&](cudaStream_t stream) {
                   nccl_check(ncclBroadcast(buffer.data_ptr(), buffer.data_ptr(), buffer.numel(),
                                            nccl_type(buffer.scalar_type()), root, comm_, stream),
                              "ncclBroadcast");
                 }),
                 device_.index())
        .wait();
    if (!buffer.is_same(tensor)) {
      at::NoGradGuard no_grad;
      tensor.copy_(buffer);
    }
  }

  void barrier() override {
    // llm.c's barrier: a one-element all-reduce the host waits for.
    const at::Tensor one = at::ones({1}, at::TensorOptions(at::kFloat).device(device_));
    all_reduce(one, ReduceOp::sum);
    c10::cuda::getCurrentCUDAStream(device_.index()).synchronize();
  }

 private:
  void check(const at::Tensor& tensor, const char* collective, std::optional<ReduceOp> op) const {
    check_collective_tensor(tensor, collective, op);
    if (tensor.device() != device_) {
      fail(std::string("communicator: ") + collective, "the tensor is on {}, this NCCL communicator's GPU is {}",
           tensor.device().str(), device_.str());
    }
  }

  StreamEvent record_current() const { return StreamEvent(c10::cuda::getCurrentCUDAStream(device_.index()).stream()); }

  // Runs `collective` on the NCCL stream after everything queued so far on the caller's stream;
  // returns the event that marks its end. The tensors' memory is marked as in use by the NCCL
  // stream, so the caching allocator does not hand it out again before the collective is done.
  template <typename Collective>
  StreamEvent on_nccl_stream(std::initializer_list<at::Tensor> tensors, Collective&& collective) {
    c10::cuda::CUDAGuard guard(device_);
    record_current().make_wait(stream_.stream());
    collective(stream_.stream());
    for (const at::Tensor& t : tensors) c10::cuda::CUDACachingAllocator::recordStream(t.storage().data_ptr(), stream_);
    return StreamEvent(stream_.stream());
  }

  int rank_;
  int size_;
  at::Device device_;
  c10::cuda::CUDAStream stream_;
  ncclComm_t comm_ = nullptr;
};

}  // namespace

std::unique_ptr<Communicator> make_nccl_communicator(const World& world, int device_index) {
  return std::make_unique<NcclCommunicator>(world, device_index);
}

}  // namespace sdt
