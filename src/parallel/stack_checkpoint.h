// Checkpoints of a BlockEngine's blocks that any rank count can load.
//
// The file holds every block's full tensors under the names an unsharded model has
// ("<prefix><block>.<parameter name><suffix>", e.g. "blocks.3.fc1.weight" and
// "blocks.3.fc1.weight.exp_avg"), so it is a plain safetensors file of the unsharded stack. Saving
// gathers one block at a time to root, which streams it into the file: root holds one block's full
// tensors at a time, the other ranks one shard. Loading cuts each rank's shards out of the file as
// the stack's layout at this rank count asks, reading only the parts they cover (the file is
// memory-mapped), so a file written by 2 ranks resumes on 3, or on 1.
#pragma once

#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include "src/core/safetensors.h"
#include "src/parallel/block_engine.h"

namespace sdt {

// Per-element companions of the masters (the masters themselves, each optimizer moment): one 1-D
// tensor per block, shaped and placed like that block's master.
struct StackTensors {
  std::string suffix;  // "" for the parameters, ".exp_avg", ...
  std::vector<at::Tensor> shards;
};

// Collective: every rank calls it. Only root creates `path`.
void save_stack(const BlockEngine& stack, const std::string& path, const std::vector<StackTensors>& tensors,
                const safetensors::Metadata& metadata = {}, const std::string& prefix = "blocks.", int root = 0);

// Fills every shard in `tensors` (which must exist, shaped like the masters) from `file`. Each rank
// calls it on its own; no communication. Throws sdt::Error naming a missing or misshapen tensor.
void load_stack(const BlockEngine& stack, const safetensors::File& file, const std::vector<StackTensors>& tensors,
                const std::string& prefix = "blocks.");

}  // namespace sdt
