// kohya's dataset keys of a trained file (train_network.py), which A1111's and model sites' metadata viewers read.
#pragma once

#include <vector>

#include "src/core/dataset_config.h"
#include "src/core/safetensors.h"
#include "src/core/train_args.h"
#include "src/data/dataset_index.h"

namespace sdt {

// With a dataset config (--dataset_config): ss_datasets (per dataset its settings, tag frequency, bucket_info and
// subsets), ss_tag_frequency (per image folder, how many captions hold each comma-separated tag, lower-cased; a folder
// in several datasets counts once) and ss_dataset_dirs (per folder, regularisation folders left out: repeats and image
// count; a folder met again is "name (2)"). With folders on the command line: the flat keys ss_batch_size_per_device,
// ss_total_batch_size, ss_resolution, ss_color_aug ... ss_keep_tokens, ss_bucket_info, and the regularisation folders
// apart (ss_reg_dataset_dirs). JSON values as Python's json.dumps writes them. `indexes` are the training images (after
// the validation split), with their buckets assigned.
safetensors::Metadata kohya_dataset_metadata(const DatasetBlueprint& blueprint, const std::vector<DatasetIndex>& indexes,
                                             const TrainArgs& args, int world_size);

}  // namespace sdt
