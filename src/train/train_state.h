// The resume state (--save_state, --resume): where a run stands, and the folder that carries it to another run.
//
// A state folder, as kohya's save_state names it (`<name>-step00000100-state`, `<name>-000002-state`,
// `<name>-state`), holds trained.safetensors (the trained tensors, exact), optimizer.safetensors (every moment and step
// count, in the unsharded layout) and train_state.json (kohya's current_epoch / current_step, and sdt's position). Random
// streams are keyed by position, so there is no generator state, and nothing differs between ranks: rank 0 writes it
// alone, and any number of ranks can resume from it. It is written as `<dir>.partial` and renamed when complete, so a
// folder with the final name is always whole.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <vector>

#include <nlohmann/json.hpp>

#include "cluster/world.h"
#include "src/parallel/data_parallel.h"
#include "src/train/optimizers.h"
#include "src/train/precision.h"
#include "src/train/trained_model.h"

namespace sdt {

// Where a run stands after an optimizer step: the batch it trains next and the loss window of its average.
struct RunPosition {
  int64_t global_step = 0;
  int64_t epoch = 1;       // 1-based, as kohya counts
  int64_t epoch_step = 0;  // batches of `epoch` already trained
  std::vector<double> recent_losses;
};

// Writes the state folder `dir`. Collective: every rank calls it (a sharded optimizer state is gathered to rank 0).
void save_train_state(const std::filesystem::path& dir, const TrainedModel& trained, const Optimizer& optimizer,
                      DataParallel& parallel, const RunPosition& position, uint64_t seed, int64_t samples_per_update,
                      const World& world, const LossScaler& scaler);

// train_state.json of a state folder; a missing folder or file, or another tool's state, is an sdt::Error.
nlohmann::json read_state_json(const std::filesystem::path& dir);

// --resume latest: the state folder in `output_dir` with the highest step (an unfinished `.partial` folder is never
// one; a damaged one is skipped with a warning naming it); nullopt when there is none, so the first run of a requeued
// job starts from scratch.
std::optional<std::filesystem::path> newest_state(const std::filesystem::path& output_dir);

// Loads the trained tensors (each rank its shards under --sharding full), the optimizer state and the loss scale, and
// returns the position. A state of another kind of run or another number of samples per update is an sdt::Error.
RunPosition load_train_state(const std::filesystem::path& dir, const TrainedModel& trained, Optimizer& optimizer,
                             DataParallel& parallel, int64_t samples_per_update, LossScaler& scaler);

// kohya's --save_last_n_*: after saving at step k every N steps, the save of step (k - S - 1) rounded down to a
// multiple of N goes (nullopt: none goes).
std::optional<int64_t> step_to_remove(int64_t step, int64_t every, std::optional<int64_t> keep_steps, bool is_state);

}  // namespace sdt
