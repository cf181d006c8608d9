// What a run trains, behind one object so the loop never asks which: a network (LoRA) on frozen models, as kohya's
// train_network.py (`sdt train`), or the models themselves, as train_db.py (`sdt train_db`: DreamBooth and fine-tuning).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include <ATen/ATen.h>

#include "src/core/train_args.h"
#include "src/families/family.h"
#include "src/networks/lora_metadata.h"
#include "src/train/optimizers.h"
#include "src/train/precision.h"
#include "src/train/trainer.h"

namespace sdt {

class TrainedModel {
 public:
  virtual ~TrainedModel() = default;

  // The optimizer's groups, and every trained tensor under a stable name (the resume state's keys), in group order.
  const std::vector<ParamGroup>& groups() const { return groups_; }
  const std::vector<std::pair<std::string, at::Tensor>>& named() const { return named_; }
  std::vector<at::Tensor> params() const;

  // "network" or "full": what a resume state records, so a state resumes only the same kind of run.
  virtual const char* state_name() const = 0;
  // Whether the denoiser's own weights are trained (then they are what a weight file holds, and full sharding
  // gathers them in the autocast dtype).
  virtual bool trains_denoiser_weights() const = 0;
  bool trains_text_encoder() const { return trains_text_encoder_; }
  // Which of the family's text encoders train (NetworkTarget::text_encoder indices); empty when none does.
  virtual std::set<int> trained_text_encoders() const = 0;
  // Tensors a block runner must keep whole: a LoRA's weights inside sharded blocks.
  virtual std::vector<at::Tensor> kept_whole() const = 0;

  // Moves what this model owns beyond the family's models (a LoRA network) to `device`; the trainer moves the
  // family's models.
  virtual void to(c10::Device device) = 0;
  // Training mode (dropouts on) or evaluation mode (validation, sample images) of what is trained.
  virtual void set_training(bool training) = 0;
  // After the update's gradients are averaged over the ranks, unscaled and clipped, before the optimizer steps: a
  // network's LoRA-GGPO norms. What it returns is logged with the step (kohya's norm/avg_key_norm, ...).
  virtual std::map<std::string, double> before_optimizer_step() = 0;
  // After each optimizer update (global_step counts it): LoRA's --scale_weight_norms, the whole model's
  // --stop_text_encoder_training.
  virtual void after_update(int64_t global_step) = 0;
  // The weights as the file users load: a kohya LoRA file with `metadata`, or the family's single checkpoint.
  virtual void save(const std::string& path, const LoRATrainingMetadata& metadata) const = 0;

 protected:
  std::vector<ParamGroup> groups_;
  std::vector<std::pair<std::string, at::Tensor>> named_;
  bool trains_text_encoder_ = false;
};

// The trained part of a `mode` run on `family`'s models (frozen models cast to the frozen dtype, trained ones to the
// trained dtype); a network's initial weights are drawn from `generator`.
std::unique_ptr<TrainedModel> make_trained_model(TrainMode mode, const TrainArgs& args, Family& family,
                                                 const Precision& precision, at::Generator generator);

}  // namespace sdt
