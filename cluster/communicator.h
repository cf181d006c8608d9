// Collectives over the job's ranks, on LibTorch tensors. One interface, three backends:
//
//   single  a one-process job: every collective is the identity (no MPI, no thread)
//   mpi     CPU tensors: MPI on a duplicate of MPI_COMM_WORLD, run by one communication thread
//   nccl    CUDA tensors (builds with SDT_CUDA): NCCL on a stream of its own (nccl_communicator.cpp)
//
// Every rank must call the same collectives in the same order with tensors of the same shape and
// dtype, as with MPI itself. Each communicator runs its collectives in the order they were called,
// so a program that calls them in the same order on every rank never crosses two of them.
//
// dtypes: float32, float64, float16 and bfloat16 everywhere; int32, int64 and uint8 for sums,
// broadcast and gather. MPI has no float16 or bfloat16 reduction, so the MPI backend reduces those
// in a float32 copy and rounds once at the end (more exact than NCCL's reduction in the dtype).
#pragma once

#include <memory>
#include <optional>
#include <string>

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include "cluster/world.h"

namespace sdt {

enum class ReduceOp { sum, average };

// A collective that has been started and not yet waited for.
class PendingCollective {
 public:
  virtual ~PendingCollective() = default;
  // MPI: blocks until the result is in the tensor, and rethrows the collective's error if it had
  // one. NCCL: makes the caller's current CUDA stream wait for the result; the host goes on.
  virtual void wait() = 0;
};

class Communicator {
 public:
  virtual ~Communicator() = default;

  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual at::Device device() const = 0;  // where this communicator's tensors live
  virtual std::string backend() const = 0;  // "single", "mpi" or "nccl"

  // In place: afterwards every rank's `tensor` holds the sum (or mean) over the ranks. The tensor
  // must stay alive and untouched until wait() returns.
  virtual std::unique_ptr<PendingCollective> all_reduce_async(const at::Tensor& tensor, ReduceOp op) = 0;
  void all_reduce(const at::Tensor& tensor, ReduceOp op) { all_reduce_async(tensor, op)->wait(); }

  // `input` has shape (size, ...) on every rank; returns input[rank] reduced over the ranks.
  virtual at::Tensor reduce_scatter(const at::Tensor& input, ReduceOp op) = 0;
  // The same into `output`: contiguous, shape input.shape[1:], input's dtype, on this communicator's
  // device. Both tensors must stay alive and untouched until wait() returns (ZeRO-2 reduces a bucket
  // this way while backward computes the next).
  virtual std::unique_ptr<PendingCollective> reduce_scatter_async(const at::Tensor& input, const at::Tensor& output,
                                                                  ReduceOp op) = 0;

  // Returns shape (size, ...input.shape): row r is rank r's `input`.
  virtual at::Tensor all_gather(const at::Tensor& input) = 0;
  // The same into `output`: contiguous, shape (size, ...input.shape), input's dtype, on this communicator's
  // device. Both tensors must stay alive and untouched until wait() returns (a prefetch gathers the next
  // block's weights this way while the current block computes).
  virtual std::unique_ptr<PendingCollective> all_gather_async(const at::Tensor& input, const at::Tensor& output) = 0;

  // In place: afterwards every rank's `tensor` holds root's.
  virtual void broadcast(const at::Tensor& tensor, int root) = 0;

  virtual void barrier() = 0;
};

// How long a collective may wait for the other ranks before the job ends (PyTorch's default for NCCL is 10 minutes;
// a step of a large model with block swap and a slow filesystem can take a few).
constexpr std::chrono::seconds kDefaultCollectiveTimeout = std::chrono::minutes(30);

// The communicator for tensors on `device`: single for a one-process world, NCCL for a CUDA
// device (local_rank's GPU when the device has no index), MPI otherwise. With more than one
// process a DistributedSession must be alive (MPI initialised). MPI: a collective that waits longer than `timeout`
// for the other ranks (one stalled, was stopped or died without the job noticing) ends the job with a named error.
std::unique_ptr<Communicator> make_communicator(const World& world, const at::Device& device,
                                                std::chrono::seconds timeout = kDefaultCollectiveTimeout);

#ifdef SDT_CUDA
// nccl_communicator.cpp: one NCCL communicator over all ranks on GPU `device_index`; its id goes
// from rank 0 to the others over MPI.
std::unique_ptr<Communicator> make_nccl_communicator(const World& world, int device_index);
#endif

// What every backend accepts, checked the same way in all of them, so that a bad call fails on
// every rank alike and before anything is sent. `op` is empty for collectives that do not reduce.
void check_collective_tensor(const at::Tensor& tensor, const char* collective, std::optional<ReduceOp> op);

}  // namespace sdt
