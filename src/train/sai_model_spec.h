// kohya's SAI model-spec metadata (library/sai_model_spec.py, train_util.get_sai_model_spec): the modelspec.* keys every
// file kohya trains carries, which A1111, ComfyUI and model sites show.
#pragma once

#include <string>

#include "src/core/safetensors.h"
#include "src/core/train_args.h"
#include "src/families/family.h"

namespace sdt {

// The keys for a file saved at `timestamp` (seconds since the epoch): the family's architecture (with "/lora" for a
// LoRA) and implementation, --metadata_title (else --output_name), the resolution (--resolution, else the family's),
// the date (local time, as Python's datetime.fromtimestamp(...).isoformat()), the prediction type, the timestep range
// (--min_timestep / --max_timestep), the encoder layer (--clip_skip), --metadata_author / description / license / tags,
// and the other --metadata_* flags as modelspec.<name> (a --metadata_thumbnail file becomes a data URL).
safetensors::Metadata sai_model_spec(const ModelSpec& family, const TrainArgs& args, bool lora, double timestamp);

}  // namespace sdt
