// Every collective of the CPU communicator (single process or MPI, as the job was started), for
// float32, float64, float16 and bfloat16, against sums computed here from what each rank holds.
#include <gtest/gtest.h>
#include <gmock/gmock.h>

#include <torch/torch.h>

#include "cluster/communicator.h"
#include "src/core/error.h"
#include "tests/cluster/cluster_test.h"

namespace sdt {
namespace {

const at::ScalarType kFloatTypes[] = {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16};

std::unique_ptr<Communicator> cpu_communicator() { return make_communicator(test_world(), at::kCPU); }

// What rank `rank` contributes: small integers, exact in every float type, and so are their sums.
at::Tensor rank_values(int rank, at::ScalarType dtype, int64_t n = 1000) {
  return (at::arange(n, at::kFloat).remainder(16) + 3 * rank).to(dtype);
}

// The sum over all ranks, and the mean as the backends make it: divided in float64 for float64,
// in float32 for the rest, and rounded once to the dtype.
at::Tensor expected(at::ScalarType dtype, ReduceOp op, int size, int64_t n = 1000) {
  const at::ScalarType exact = dtype == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor sum = at::zeros({n}, exact);
  for (int r = 0; r < size; ++r) sum += rank_values(r, exact, n);
  return (op == ReduceOp::average ? sum / size : sum).to(dtype);
}

TEST(Communicator, BackendFollowsTheWorld) {
  auto communicator = cpu_communicator();
  EXPECT_EQ(communicator->rank(), test_world().rank);
  EXPECT_EQ(communicator->size(), test_world().size);
  EXPECT_EQ(communicator->backend(), test_world().size == 1 ? "single" : "mpi");
}

TEST(Communicator, AllReduceSumsAndAveragesEveryFloatType) {
  auto communicator = cpu_communicator();
  for (at::ScalarType dtype : kFloatTypes) {
    for (ReduceOp op : {ReduceOp::sum, ReduceOp::average}) {
      SCOPED_TRACE(fmt::format("{} {}", c10::toString(dtype), op == ReduceOp::sum ? "sum" : "average"));
      at::Tensor t = rank_values(communicator->rank(), dtype);
      communicator->all_reduce(t, op);
      EXPECT_TRUE(at::equal(t, expected(dtype, op, communicator->size())));
    }
  }
}

TEST(Communicator, AllReduceOfAStridedTensorWritesIntoIt) {
  auto communicator = cpu_communicator();
  at::Tensor storage = rank_values(communicator->rank(), at::kFloat).view({10, 100});
  at::Tensor transposed = storage.t();
  ASSERT_FALSE(transposed.is_contiguous());
  communicator->all_reduce(transposed, ReduceOp::sum);
  EXPECT_TRUE(at::equal(storage.flatten(), expected(at::kFloat, ReduceOp::sum, communicator->size())));
}

TEST(Communicator, AsyncAllReducesCompleteWhicheverIsWaitedFirst) {
  auto communicator = cpu_communicator();
  std::vector<at::Tensor> tensors;
  std::vector<std::unique_ptr<PendingCollective>> pending;
  for (at::ScalarType dtype : kFloatTypes) {
    tensors.push_back(rank_values(communicator->rank(), dtype));
    pending.push_back(communicator->all_reduce_async(tensors.back(), ReduceOp::sum));
  }
  for (size_t i = pending.size(); i-- > 0;) pending[i]->wait();
  for (size_t i = 0; i < tensors.size(); ++i) {
    EXPECT_TRUE(at::equal(tensors[i], expected(kFloatTypes[i], ReduceOp::sum, communicator->size())));
  }
}

TEST(Communicator, IntegersSumButDoNotAverage) {
  auto communicator = cpu_communicator();
  at::Tensor t = rank_values(communicator->rank(), at::kLong);
  communicator->all_reduce(t, ReduceOp::sum);
  EXPECT_TRUE(at::equal(t, expected(at::kLong, ReduceOp::sum, communicator->size())));
  EXPECT_THROW(communicator->all_reduce(t, ReduceOp::average), Error);
}

TEST(Communicator, ReduceScatterGivesEachRankItsRowOfTheReduction) {
  auto communicator = cpu_communicator();
  const int size = communicator->size(), rank = communicator->rank();
  for (at::ScalarType dtype : kFloatTypes) {
    for (ReduceOp op : {ReduceOp::sum, ReduceOp::average}) {
      SCOPED_TRACE(fmt::format("{} {}", c10::toString(dtype), op == ReduceOp::sum ? "sum" : "average"));
      // Row j of every rank's input is its values plus j, so row j of the sum is the sum plus size * j.
      at::Tensor input = rank_values(rank, at::kFloat, 64).unsqueeze(0).repeat({size, 1});
      input += at::arange(size, at::kFloat).unsqueeze(1);
      const at::Tensor mine = communicator->reduce_scatter(input.to(dtype), op);
      const at::ScalarType exact = dtype == at::kDouble ? at::kDouble : at::kFloat;
      at::Tensor want = expected(exact, ReduceOp::sum, size, 64) + size * rank;
      if (op == ReduceOp::average) want = want / size;
      EXPECT_EQ(mine.sizes(), at::IntArrayRef({64}));
      EXPECT_TRUE(at::equal(mine, want.to(dtype)));
    }
  }
  EXPECT_THROW(communicator->reduce_scatter(at::zeros({size + 1, 4}), ReduceOp::sum), Error);
}

TEST(Communicator, AllGatherStacksEveryRanksTensor) {
  auto communicator = cpu_communicator();
  for (at::ScalarType dtype : kFloatTypes) {
    SCOPED_TRACE(c10::toString(dtype));
    const at::Tensor all = communicator->all_gather(rank_values(communicator->rank(), dtype).view({10, 100}));
    ASSERT_EQ(all.sizes(), at::IntArrayRef({communicator->size(), 10, 100}));
    for (int r = 0; r < communicator->size(); ++r) EXPECT_TRUE(at::equal(all[r].flatten(), rank_values(r, dtype)));
  }
}

TEST(Communicator, AsyncReduceScatterFillsTheGivenOutput) {
  auto communicator = cpu_communicator();
  const int size = communicator->size();
  for (at::ScalarType dtype : kFloatTypes) {
    SCOPED_TRACE(c10::toString(dtype));
    const at::Tensor input = at::arange(size * 64, at::TensorOptions(dtype)).view({size, 64}) + communicator->rank();
    const at::Tensor mine = at::empty({64}, input.options());
    communicator->reduce_scatter_async(input, mine, ReduceOp::sum)->wait();
    EXPECT_TRUE(at::equal(mine, communicator->reduce_scatter(input, ReduceOp::sum)));
    communicator->reduce_scatter_async(input, mine, ReduceOp::average)->wait();
    EXPECT_TRUE(at::equal(mine, communicator->reduce_scatter(input, ReduceOp::average)));
  }
  const at::Tensor input = at::zeros({size, 8});
  EXPECT_THROW(communicator->reduce_scatter_async(input, at::empty({9}), ReduceOp::sum), Error);
  EXPECT_THROW(communicator->reduce_scatter_async(input, at::empty({8}, at::kDouble), ReduceOp::sum), Error);
}

TEST(Communicator, AsyncAllGatherFillsTheGivenOutput) {
  auto communicator = cpu_communicator();
  const int size = communicator->size();
  for (at::ScalarType dtype : kFloatTypes) {
    SCOPED_TRACE(c10::toString(dtype));
    const at::Tensor mine = rank_values(communicator->rank(), dtype);
    const at::Tensor all = at::full({size, mine.numel()}, -1, mine.options());
    auto pending = communicator->all_gather_async(mine, all);
    pending->wait();
    for (int r = 0; r < size; ++r) EXPECT_TRUE(at::equal(all[r], rank_values(r, dtype)));
  }
  const at::Tensor mine = rank_values(0, at::kFloat);
  EXPECT_THROW(communicator->all_gather_async(mine, at::empty({size + 1, mine.numel()})), Error);
  EXPECT_THROW(communicator->all_gather_async(mine, at::empty({size, mine.numel()}, at::kDouble)), Error);
}

TEST(Communicator, BroadcastCopiesTheRootsTensor) {
  auto communicator = cpu_communicator();
  const int root = communicator->size() - 1;
  for (at::ScalarType dtype : kFloatTypes) {
    SCOPED_TRACE(c10::toString(dtype));
    at::Tensor t = rank_values(communicator->rank(), dtype);
    communicator->broadcast(t, root);
    EXPECT_TRUE(at::equal(t, rank_values(root, dtype)));
  }
  at::Tensor t = rank_values(0, at::kFloat);
  EXPECT_THROW(communicator->broadcast(t, communicator->size()), Error);
}

// --fp8_base's weights travel as bytes (gathered shards, the root's start values) and are never summed.
TEST(Communicator, Fp8StorageIsGatheredAndBroadcastAsBytesButNeverReduced) {
  auto communicator = cpu_communicator();
  const auto fp8_bytes = [](int rank) { return rank_values(rank, at::kFloat).to(at::kFloat8_e4m3fn).view(at::kByte); };
  const at::Tensor all = communicator->all_gather(fp8_bytes(communicator->rank()).view(at::kFloat8_e4m3fn).view({10, 100}));
  for (int r = 0; r < communicator->size(); ++r) EXPECT_TRUE(at::equal(all[r].flatten().view(at::kByte), fp8_bytes(r)));
  at::Tensor t = fp8_bytes(communicator->rank()).view(at::kFloat8_e4m3fn);
  communicator->broadcast(t, 0);
  EXPECT_TRUE(at::equal(t.view(at::kByte), fp8_bytes(0)));
  EXPECT_THROW(communicator->all_reduce(t, ReduceOp::sum), Error);
}

TEST(Communicator, BarrierReturnsOnEveryRank) {
  auto communicator = cpu_communicator();
  communicator->barrier();
  communicator->barrier();
}

TEST(Communicator, UnsupportedDtypesAreRefused) {
  auto communicator = cpu_communicator();
  at::Tensor flags = at::zeros({4}, at::kBool);
  EXPECT_THROW(communicator->all_reduce(flags, ReduceOp::sum), Error);
  at::Tensor complex = at::zeros({4}, at::kComplexFloat);
  EXPECT_THROW(communicator->all_gather(complex), Error);
}

}  // namespace
}  // namespace sdt
