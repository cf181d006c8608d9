// --sharding: how much of the training state each rank keeps (docs/distributed.md). One enum for every engine
// of this layer: DataParallel picks the engines from it, ZeroShards cuts by it, BlockEngine shards blocks by it.
//
//   none       DDP: every rank keeps everything
//   optimizer  ZeRO-1: 1/N of the optimizer state
//   gradients  ZeRO-2: and 1/N of the gradients
//   full       ZeRO-3 / FSDP: and 1/N of the weights of the model's blocks
#pragma once

#include <string_view>

namespace sdt {

enum class Sharding { none, optimizer, gradients, full };

// "none" | "optimizer" | "gradients" | "full"; else sdt::Error naming --sharding.
Sharding parse_sharding(std::string_view name);
std::string_view sharding_name(Sharding sharding);

}  // namespace sdt
