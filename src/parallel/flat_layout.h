// One block's parameters laid end to end in a single 1-D buffer, and that buffer cut into one
// equal shard per rank: the unit that full sharding gathers, reduces, swaps and checkpoints.
//
//   | weight_a ...... |gap| bias_a |gap| weight_b ........ |gap| ... | tail padding |
//   |<---------------- numel() ---------------------------------------->|
//   |<---------------- padded_numel(ranks): a multiple of ranks ------------------->|
//   | shard 0          | shard 1          | ...              | shard ranks-1        |
//
// Each parameter starts at a multiple of kAlignment elements, so a parameter viewed inside the buffer
// is as aligned as a tensor of its own (vector kernels and BLAS take the same path on it; FSDP pads
// its flat parameters the same way). The gaps and the tail padding hold zeros; their gradients are
// zeros, so an elementwise optimizer keeps them at zero.
//
// The layout depends on the parameters' names and shapes only, never on the rank count: a buffer
// assembled from 2 ranks' shards is the same buffer 3 ranks cut differently, which is what lets a
// checkpoint written by one rank count be loaded by another.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>

#include "cluster/communicator.h"

namespace sdt {

class FlatLayout {
 public:
  static constexpr int64_t kAlignment = 16;  // elements

  struct Entry {
    std::string name;            // as the block's named_parameters() spells it, e.g. "fc1.weight"
    std::vector<int64_t> shape;
    int64_t offset = 0;          // in elements, a multiple of kAlignment
    int64_t numel = 0;
  };

  FlatLayout() = default;
  explicit FlatLayout(const std::vector<std::pair<std::string, std::vector<int64_t>>>& parameters);

  const std::vector<Entry>& entries() const { return entries_; }
  int64_t numel() const { return numel_; }  // through the last parameter, gaps included
  int64_t padded_numel(int ranks) const { return shard_numel(ranks) * ranks; }
  int64_t shard_numel(int ranks) const { return (numel_ + ranks - 1) / ranks; }

  bool operator==(const FlatLayout& other) const;

  // A new buffer of padded_numel(ranks) elements holding `parameters` (one per entry, in order), zeros
  // elsewhere.
  at::Tensor flatten(const std::vector<at::Tensor>& parameters, int ranks, const at::TensorOptions& options) const;

  // Views of `flat` shaped as the parameters, in entry order (no copy).
  std::vector<at::Tensor> views(const at::Tensor& flat) const;

  // Fills `shard` (shard_numel(ranks) elements) with rank `rank`'s part of the buffer, reading each
  // parameter from `full_parameter(entry)`, which returns a tensor of the entry's shape on any device
  // and of any dtype. Only the parts of the parameters that overlap the shard are read (a tensor
  // viewing a memory-mapped file then pages in little more than the shard).
  void fill_shard(at::Tensor& shard, int rank, int ranks,
                  const std::function<at::Tensor(const Entry& entry)>& full_parameter) const;

 private:
  std::vector<Entry> entries_;
  int64_t numel_ = 0;
};

// A per-element companion of a sharded buffer (its values, an Adam moment): root receives the whole buffer
// (layout.numel() elements, on the CPU), the other ranks an undefined tensor. Each rank broadcasts its shard in
// turn; root keeps them, the others hold one shard at a time. Collective.
at::Tensor unshard_to_root(const FlatLayout& layout, const at::Tensor& shard, Communicator& communicator, int root = 0);

// Rank `rank`'s shard of a whole buffer (layout.numel() elements), a new tensor.
at::Tensor shard_of(const FlatLayout& layout, const at::Tensor& whole, int rank, int ranks);

}  // namespace sdt
