#include "src/train/train_state.h"

#include <fstream>
#include <map>

#include <spdlog/spdlog.h>

#include "src/core/atomic_file.h"
#include "src/core/error.h"
#include "src/core/tensor_io.h"

namespace sdt {

namespace fs = std::filesystem;

void save_train_state(const fs::path& dir, const TrainedModel& trained, const Optimizer& optimizer,
                      DataParallel& parallel, const RunPosition& position, uint64_t seed, int64_t samples_per_update,
                      const World& world, const LossScaler& scaler) {
  const fs::path partial = dir.string() + ".partial";
  if (world.rank == 0) {
    fs::remove_all(partial);
    fs::create_directories(partial);
    NamedTensors tensors;
    for (const auto& [name, p] : trained.named()) tensors.emplace_back(name, p.detach());
    save_safetensors((partial / "trained.safetensors").string(), tensors, {});
  }
  parallel.save_optimizer_state(optimizer, (partial / "optimizer.safetensors").string());
  if (world.rank != 0) return;
  nlohmann::json state = {
      {"current_epoch", position.epoch - (position.epoch_step == 0 ? 1 : 0)},
      {"current_step", position.global_step},
      {"sdt",
       {{"format", 1},
        {"mode", trained.state_name()},
        {"seed", seed},
        {"world_size", world.size},
        {"samples_per_update", samples_per_update},
        {"global_step", position.global_step},
        {"epoch", position.epoch},
        {"epoch_step", position.epoch_step},
        {"recent_losses", position.recent_losses},
        {"loss_scale", scaler.scale},
        {"loss_scale_growth_tracker", scaler.growth_tracker}}}};
  write_file_atomically((partial / "train_state.json").string(), state.dump(1) + "\n");
  fs::remove_all(dir);
  fs::rename(partial, dir);
}

nlohmann::json read_state_json(const fs::path& dir) {
  const fs::path path = dir / "train_state.json";
  if (!fs::is_directory(dir)) fail("--resume " + dir.string(), "no such folder: expected a state folder written by --save_state");
  std::ifstream in(path);
  if (!in) fail(path.string(), "missing: '{}' is not a complete state folder", dir.string());
  try {
    nlohmann::json j = nlohmann::json::parse(in);
    if (!j.contains("sdt")) fail(path.string(), "no 'sdt' section: a state folder of another tool (kohya's Accelerate states cannot be read)");
    return j;
  } catch (const nlohmann::json::exception& e) {
    fail(path.string(), "not valid JSON: {}", e.what());
  }
}

std::optional<fs::path> newest_state(const fs::path& output_dir) {
  std::optional<fs::path> newest;
  int64_t newest_step = -1;
  if (!fs::is_directory(output_dir)) return newest;
  for (const auto& entry : fs::directory_iterator(output_dir)) {
    const std::string name = entry.path().filename().string();
    if (!entry.is_directory() || !name.ends_with("-state")) continue;
    int64_t step = -1;
    try {
      step = read_state_json(entry.path()).at("sdt").at("global_step").get<int64_t>();
    } catch (const std::exception& e) {  // a damaged state must not hide the whole ones beside it
      spdlog::warn("--resume latest: skipping {}, which is not a whole state: {}", entry.path().string(), e.what());
      continue;
    }
    if (step > newest_step) {
      newest_step = step;
      newest = entry.path();
    }
  }
  return newest;
}

RunPosition load_train_state(const fs::path& dir, const TrainedModel& trained, Optimizer& optimizer,
                             DataParallel& parallel, int64_t samples_per_update, LossScaler& scaler) {
  const nlohmann::json j = read_state_json(dir);
  const nlohmann::json& s = j.at("sdt");
  const std::string where = (dir / "train_state.json").string();
  if (s.at("mode").get<std::string>() != trained.state_name()) {
    fail(where, "written by a '{}' run, but this run trains '{}'", s.at("mode").get<std::string>(), trained.state_name());
  }
  if (s.at("samples_per_update").get<int64_t>() != samples_per_update) {
    fail(where,
         "written by a run with {} samples per optimizer update ({} ranks), this run has {}: the data position cannot "
         "carry over; keep train_batch_size x ranks x gradient_accumulation_steps the same",
         s.at("samples_per_update").get<int64_t>(), s.at("world_size").get<int>(), samples_per_update);
  }
  RunPosition position;
  position.global_step = s.at("global_step").get<int64_t>();
  position.epoch = s.at("epoch").get<int64_t>();
  position.epoch_step = s.at("epoch_step").get<int64_t>();
  position.recent_losses = s.at("recent_losses").get<std::vector<double>>();
  scaler.scale = s.at("loss_scale").get<double>();
  scaler.growth_tracker = s.at("loss_scale_growth_tracker").get<int64_t>();

  const std::string trained_path = (dir / "trained.safetensors").string();
  safetensors::File file(trained_path);
  torch::NoGradGuard no_grad;
  std::map<const void*, std::string> name_of;
  for (const auto& [name, p] : trained.named()) {
    if (!parallel.is_block_weight(p)) continue;
    name_of[p.unsafeGetTensorImpl()] = name;
  }
  // Blocks in an engine: each rank cuts its masters out of the (memory-mapped) file.
  parallel.load_weights([&](const at::Tensor& p) { return load_tensor(file, name_of.at(p.unsafeGetTensorImpl())); });
  for (const auto& [name, p] : trained.named()) {
    if (name_of.contains(p.unsafeGetTensorImpl())) continue;
    const at::Tensor saved = load_tensor(file, name);
    if (saved.sizes() != p.sizes() || saved.scalar_type() != p.scalar_type()) {
      fail(trained_path, "'{}' is {} {}, this run trains {} {}", name, c10::toString(saved.scalar_type()),
           fmt::join(saved.sizes(), "x"), c10::toString(p.scalar_type()), fmt::join(p.sizes(), "x"));
    }
    p.copy_(saved);
  }
  if (file.tensors().size() != trained.named().size()) {
    fail(trained_path, "holds {} tensors, this run trains {}: another network or model", file.tensors().size(), trained.named().size());
  }
  parallel.load_optimizer_state(optimizer, (dir / "optimizer.safetensors").string());
  return position;
}

std::optional<int64_t> step_to_remove(int64_t step, int64_t every, std::optional<int64_t> keep_steps, bool is_state) {
  if (!keep_steps) return std::nullopt;
  const int64_t r = (step - *keep_steps - 1) - ((step - *keep_steps - 1) % every);
  if (r < 0 || (is_state && r == 0) || step - *keep_steps - 1 < 0) return std::nullopt;
  return r;
}

}  // namespace sdt
