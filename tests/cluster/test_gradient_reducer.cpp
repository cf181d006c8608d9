// GradientReducer on a small MLP: N ranks with batch b must produce the gradients of one process
// with batch N*b, with and without accumulation micro-steps, with frozen and unused parameters;
// and an exception on one rank must end the whole job, not hang it.
#include <gtest/gtest.h>
#include <gmock/gmock.h>

#include <sys/wait.h>

#include <csignal>

#include <chrono>
#include <cstdio>
#include <filesystem>

#include <torch/torch.h>

#include "cluster/communicator.h"
#include "src/parallel/gradient_reducer.h"
#include "src/core/error.h"
#include "tests/cluster/cluster_test.h"

namespace sdt {
namespace {

using ::testing::HasSubstr;

// Three layers, the first in float64, so the reducer sees two dtypes, and `extra` and `spare`,
// which only some ranks (extra) or none (spare) use.
struct Mlp : torch::nn::Module {
  Mlp() {
    first = register_module("first", torch::nn::Linear(8, 16));
    first->to(at::kDouble);
    second = register_module("second", torch::nn::Linear(16, 16));
    third = register_module("third", torch::nn::Linear(16, 4));
    extra = register_module("extra", torch::nn::Linear(16, 4));
    spare = register_module("spare", torch::nn::Linear(16, 4));
  }
  at::Tensor forward(const at::Tensor& x, bool use_extra = false) {
    const at::Tensor h = torch::tanh(second(torch::tanh(first(x.to(at::kDouble))).to(at::kFloat)));
    return use_extra ? third(h) + extra(h) : third(h);
  }
  torch::nn::Linear first{nullptr}, second{nullptr}, third{nullptr}, extra{nullptr}, spare{nullptr};
};

// Every rank draws its own initial weights: the reducer's broadcast must make them rank 0's.
std::shared_ptr<Mlp> model_for_this_rank() {
  torch::manual_seed(100 + test_world().rank);
  return std::make_shared<Mlp>();
}

// The reference: one process, rank 0's weights as the reducer left them.
std::shared_ptr<Mlp> copy_of(const Mlp& model) {
  auto copy = std::make_shared<Mlp>();
  torch::NoGradGuard no_grad;
  const auto from = model.parameters();
  const auto to = copy->parameters();
  for (size_t i = 0; i < from.size(); ++i) to[i].copy_(from[i]);
  return copy;
}

struct Batch {
  at::Tensor x, y;
  Batch rows(int64_t first, int64_t count) const { return {x.narrow(0, first, count), y.narrow(0, first, count)}; }
};

// The same global batch on every rank.
Batch global_batch(int64_t rows) {
  torch::manual_seed(7);
  return {torch::randn({rows, 8}), torch::randn({rows, 4})};
}

at::Tensor loss_of(Mlp& model, const Batch& batch, bool use_extra = false) {
  return torch::mse_loss(model.forward(batch.x, use_extra), batch.y);
}

// Largest difference relative to the largest reference value, per parameter.
void expect_same_gradients(Mlp& model, Mlp& reference) {
  const auto ours = model.named_parameters();
  const auto theirs = reference.named_parameters();
  for (size_t i = 0; i < ours.size(); ++i) {
    SCOPED_TRACE(ours[i].key());
    const at::Tensor g = ours[i].value().grad(), want = theirs[i].value().grad();
    ASSERT_EQ(g.defined(), want.defined());
    if (!want.defined()) continue;
    const double scale = want.abs().max().item<double>();
    ASSERT_GT(scale, 0);
    EXPECT_LE((g - want).abs().max().item<double>() / scale, 1e-6);
  }
}

std::vector<at::Tensor> trainable(Mlp& model) {
  std::vector<at::Tensor> out;
  for (const auto& p : model.parameters()) {
    if (p.requires_grad()) out.push_back(p);
  }
  return out;
}

constexpr int64_t kSmallBuckets = 300;  // bytes: the MLP's parameters fill several buckets

TEST(GradientReducer, RanksWithBatchBMatchOneProcessWithTheWholeBatch) {
  auto communicator = make_communicator(test_world(), at::kCPU);
  const int size = communicator->size(), rank = communicator->rank();
  auto model = model_for_this_rank();
  GradientReducer reducer(model->parameters(), *communicator, kSmallBuckets);
  EXPECT_GE(reducer.bucket_count(), size > 1 ? 4u : 0u);  // one process needs no buckets
  auto reference = copy_of(*model);

  const int64_t b = 5;
  const Batch batch = global_batch(size * b);
  loss_of(*model, batch.rows(rank * b, b)).backward();
  reducer.finish();
  loss_of(*reference, batch).backward();
  expect_same_gradients(*model, *reference);
  EXPECT_GE(reducer.last_wait_seconds(), 0);
}

TEST(GradientReducer, BucketsStartDuringBackwardWhenEveryParameterIsUsed) {
  auto communicator = make_communicator(test_world(), at::kCPU);
  torch::manual_seed(100 + communicator->rank());
  torch::nn::Sequential model(torch::nn::Linear(8, 16), torch::nn::Tanh(), torch::nn::Linear(16, 16), torch::nn::Tanh(),
                              torch::nn::Linear(16, 4));
  if (communicator->size() == 1) GTEST_SKIP() << "one process reduces nothing: no buckets";
  GradientReducer reducer(model->parameters(), *communicator, kSmallBuckets);
  ASSERT_GE(reducer.bucket_count(), 3u);
  const Batch batch = global_batch(4);
  torch::mse_loss(model->forward(batch.x), batch.y).backward();
  reducer.finish();
  EXPECT_EQ(reducer.last_overlapped_buckets(), reducer.bucket_count());
}

TEST(GradientReducer, AccumulationWithoutSyncMatchesOneBigBatch) {
  auto communicator = make_communicator(test_world(), at::kCPU);
  const int size = communicator->size(), rank = communicator->rank();
  auto model = model_for_this_rank();
  GradientReducer reducer(model->parameters(), *communicator, kSmallBuckets);
  auto reference = copy_of(*model);

  const int64_t b = 3, micro_steps = 4;
  const Batch batch = global_batch(micro_steps * size * b);
  for (int64_t m = 0; m < micro_steps; ++m) {
    reducer.set_sync(m == micro_steps - 1);
    (loss_of(*model, batch.rows((m * size + rank) * b, b)) / static_cast<double>(micro_steps)).backward();
    if (reducer.sync()) reducer.finish();
  }
  loss_of(*reference, batch).backward();
  expect_same_gradients(*model, *reference);
}

TEST(GradientReducer, FrozenParametersAreNeitherBroadcastNorReduced) {
  auto communicator = make_communicator(test_world(), at::kCPU);
  auto model = model_for_this_rank();
  model->first->weight.requires_grad_(false);
  model->first->bias.requires_grad_(false);
  const at::Tensor own_first_weight = model->first->weight.clone();
  GradientReducer reducer(model->parameters(), *communicator, kSmallBuckets);

  EXPECT_TRUE(at::equal(model->first->weight, own_first_weight));
  replica_checksum(trainable(*model), *communicator);  // the trainable ones are rank 0's
  loss_of(*model, global_batch(4)).backward();
  reducer.finish();
  EXPECT_FALSE(model->first->weight.grad().defined());
  EXPECT_TRUE(at::equal(model->first->weight, own_first_weight));
  EXPECT_TRUE(model->second->weight.grad().defined());
}

TEST(GradientReducer, ParametersUnusedOnSomeRanksCountAsZeroAndUnusedEverywhereStayUndefined) {
  auto communicator = make_communicator(test_world(), at::kCPU);
  const int size = communicator->size(), rank = communicator->rank();
  auto model = model_for_this_rank();
  GradientReducer reducer(model->parameters(), *communicator, kSmallBuckets);
  auto reference = copy_of(*model);

  // Only rank 0's batch goes through `extra`; no batch goes through `spare`.
  const int64_t b = 4;
  const Batch batch = global_batch(size * b);
  loss_of(*model, batch.rows(rank * b, b), rank == 0).backward();
  reducer.finish();
  at::Tensor reference_loss = at::zeros({}, at::kFloat);
  for (int r = 0; r < size; ++r) reference_loss = reference_loss + loss_of(*reference, batch.rows(r * b, b), r == 0) / size;
  reference_loss.backward();

  expect_same_gradients(*model, *reference);
  if (size > 1) EXPECT_LT(reducer.last_overlapped_buckets(), reducer.bucket_count());  // `spare` holds the first bucket back
  EXPECT_TRUE(model->extra->weight.grad().defined());
  EXPECT_FALSE(model->spare->weight.grad().defined());
}

TEST(GradientReducer, ASecondSyncedBackwardBeforeFinishIsAnError) {
  auto communicator = make_communicator(test_world(), at::kCPU);
  if (communicator->size() == 1) GTEST_SKIP() << "one process reduces nothing: gradients just accumulate";
  auto model = model_for_this_rank();
  GradientReducer reducer(model->parameters(), *communicator, kSmallBuckets);
  const Batch batch = global_batch(4);
  loss_of(*model, batch).backward();
  try {
    loss_of(*model, batch).backward();
    ADD_FAILURE() << "no error";
  } catch (const std::exception& e) {
    EXPECT_THAT(e.what(), HasSubstr("second gradient before finish()"));
  }
  reducer.finish();  // the first backward's reductions, started on every rank
}

TEST(GradientReducer, ReplicaChecksumNamesTheRanksThatDiverge) {
  auto communicator = make_communicator(test_world(), at::kCPU);
  auto model = model_for_this_rank();
  GradientReducer reducer(model->parameters(), *communicator, kSmallBuckets);
  const uint64_t checksum = replica_checksum(model->parameters(), *communicator);
  EXPECT_EQ(replica_checksum(model->parameters(), *communicator), checksum);
  if (communicator->size() == 1) return;

  {
    torch::NoGradGuard no_grad;
    if (communicator->rank() == 1) model->third->bias[0] += 1e-6;
  }
  try {
    replica_checksum(model->parameters(), *communicator);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("rank(s) 1 differ from rank 0"));
  }
}

TEST(World, PlacesRanksOnNodesByHostName) {
  const std::vector<std::string> hosts = {"a", "b", "a", "c", "b"};
  World w;
  w.size = 5;
  w.rank = 4;
  place_on_nodes(w, hosts);
  EXPECT_EQ(w.node_count, 3);
  EXPECT_EQ(w.node, 1);
  EXPECT_EQ(w.local_rank, 1);
  w.rank = 3;
  place_on_nodes(w, hosts);
  EXPECT_EQ(w.node, 2);
  EXPECT_EQ(w.local_rank, 0);
}

TEST(World, SessionAgreesWithTheLauncherOnOneHost) {
  const World& w = test_world();
  EXPECT_EQ(w.node_count, 1);
  EXPECT_EQ(w.node, 0);
  EXPECT_EQ(w.local_rank, w.rank);
}

// What an mpiexec job of this binary playing `role` printed, how it ended and how long it took; `timeout` kills a hang.
struct JobResult {
  int status = 0;
  std::string output;
  double seconds = 0;
};
JobResult run_job(int ranks, const char* role, int timeout) {
  const std::string self = std::filesystem::read_symlink("/proc/self/exe").string();
  const std::string command = fmt::format("timeout -k 5 {} {} -n {} {} {} 2>&1", timeout, SDT_MPIEXEC, ranks, self, role);
  const auto started = std::chrono::steady_clock::now();
  JobResult result;
  FILE* job = popen(command.c_str(), "r");
  if (!job) return result;
  char chunk[4096];
  while (size_t n = fread(chunk, 1, sizeof(chunk), job)) result.output.append(chunk, n);
  result.status = pclose(job);
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  return result;
}

void expect_ended_with_an_error(const JobResult& job, int timeout) {
  ASSERT_TRUE(WIFEXITED(job.status)) << job.output;
  EXPECT_NE(WEXITSTATUS(job.status), 124) << "the job hung until timeout killed it:\n" << job.output;
  EXPECT_NE(WEXITSTATUS(job.status), 0) << job.output;
  EXPECT_LT(job.seconds, timeout);
}

TEST(FailingRank, AnExceptionOnOneRankEndsTheWholeJobWithItsMessage) {
  if (test_world().size > 1) GTEST_SKIP() << "starts an mpiexec job of its own";
  const JobResult job = run_job(3, "--failing-rank-job", 60);
  expect_ended_with_an_error(job, 60);
  EXPECT_THAT(job.output, HasSubstr("error: rank 1 of 3"));
  EXPECT_THAT(job.output, HasSubstr("deliberate failure"));
}

// A rank that stops (SIGSTOP: a hung filesystem, a debugger, a node that froze) holds the others in a collective. They
// wait the timeout, each says so, and the job ends with a named error instead of spinning forever.
TEST(FailingRank, AStalledRankEndsTheJobAfterTheCollectiveTimeout) {
  if (test_world().size > 1) GTEST_SKIP() << "starts an mpiexec job of its own";
  const JobResult job = run_job(2, "--stalled-rank-job", 90);
  expect_ended_with_an_error(job, 90);
  EXPECT_THAT(job.output, HasSubstr("rank 0 of 2: the all-reduce of 65536 elements has waited"));
  EXPECT_THAT(job.output, HasSubstr("a collective timed out after 3 s"));
}

}  // namespace

void run_stalled_rank_job(const World& world) {
  auto communicator = make_communicator(world, at::kCPU, std::chrono::seconds(3));
  at::Tensor x = at::ones({1 << 16});
  communicator->all_reduce(x, ReduceOp::sum);
  if (world.rank == 1) ::raise(SIGSTOP);  // stopped until the job's abort kills it
  communicator->all_reduce(x, ReduceOp::sum);
  abort_job(world, "the stalled-rank job was not stopped by the watchdog");
}

void run_failing_rank_job(const World& world) {
  try {
    auto communicator = make_communicator(world, at::kCPU);
    at::Tensor x = at::ones({1 << 16});
    communicator->all_reduce(x, ReduceOp::sum);
    if (world.rank == 1) {
      // Thrown with a reduction in flight: the communicator's thread sits in MPI while the
      // exception unwinds, as it would when a trainer fails in the middle of backward.
      auto pending = communicator->all_reduce_async(x, ReduceOp::sum);
      fail("failing-rank job", "deliberate failure");
    }
    communicator->all_reduce(x, ReduceOp::sum);
    communicator->all_reduce(x, ReduceOp::sum);  // rank 1 never gets here: only the abort ends this wait
  } catch (const std::exception& e) {
    abort_job(world, e.what());
  }
  abort_job(world, "the failing-rank job did not fail");
}

}  // namespace sdt
