#include "src/parallel/flat_layout.h"

#include <algorithm>

#include <torch/torch.h>

#include "src/core/error.h"

namespace sdt {

FlatLayout::FlatLayout(const std::vector<std::pair<std::string, std::vector<int64_t>>>& parameters) {
  int64_t offset = 0;
  for (const auto& [name, shape] : parameters) {
    Entry entry{name, shape, offset, 1};
    for (int64_t d : shape) entry.numel *= d;
    entries_.push_back(entry);
    numel_ = offset + entry.numel;
    offset = (numel_ + kAlignment - 1) / kAlignment * kAlignment;
  }
}

bool FlatLayout::operator==(const FlatLayout& other) const {
  if (numel_ != other.numel_ || entries_.size() != other.entries_.size()) return false;
  for (size_t i = 0; i < entries_.size(); ++i) {
    if (entries_[i].name != other.entries_[i].name || entries_[i].shape != other.entries_[i].shape) return false;
  }
  return true;
}

at::Tensor FlatLayout::flatten(const std::vector<at::Tensor>& parameters, int ranks, const at::TensorOptions& options) const {
  if (parameters.size() != entries_.size()) {
    fail("flat layout", "{} parameters for a layout of {}", parameters.size(), entries_.size());
  }
  at::NoGradGuard no_grad;
  at::Tensor flat = at::zeros({padded_numel(ranks)}, options);
  const std::vector<at::Tensor> slots = views(flat);
  for (size_t i = 0; i < slots.size(); ++i) slots[i].copy_(parameters[i]);
  return flat;
}

std::vector<at::Tensor> FlatLayout::views(const at::Tensor& flat) const {
  std::vector<at::Tensor> out;
  out.reserve(entries_.size());
  for (const Entry& e : entries_) out.push_back(flat.narrow(0, e.offset, e.numel).view(e.shape));
  return out;
}

void FlatLayout::fill_shard(at::Tensor& shard, int rank, int ranks,
                            const std::function<at::Tensor(const Entry& entry)>& full_parameter) const {
  const int64_t size = shard_numel(ranks);
  if (shard.dim() != 1 || shard.numel() != size) {
    fail("flat layout", "a shard for rank {} of {} has {} elements, got shape {}", rank, ranks, size, c10::str(shard.sizes()));
  }
  at::NoGradGuard no_grad;
  shard.zero_();
  const int64_t begin = static_cast<int64_t>(rank) * size, end = begin + size;
  for (const Entry& e : entries_) {
    const int64_t from = std::max(begin, e.offset), to = std::min(end, e.offset + e.numel);
    if (from >= to) continue;
    const at::Tensor full = full_parameter(e);
    if (full.sizes().vec() != e.shape) {
      fail("flat layout", "parameter {} has shape {}, the layout expects {}", e.name, c10::str(full.sizes()),
           c10::str(at::IntArrayRef(e.shape)));
    }
    shard.narrow(0, from - begin, to - from).copy_(full.reshape({-1}).narrow(0, from - e.offset, to - from));
  }
}

at::Tensor unshard_to_root(const FlatLayout& layout, const at::Tensor& shard, Communicator& communicator, int root) {
  const int ranks = communicator.size();
  const int64_t size = layout.shard_numel(ranks);
  if (shard.dim() != 1 || shard.numel() != size) {
    fail("flat layout", "a shard for {} ranks has {} elements, got shape {}", ranks, size, c10::str(shard.sizes()));
  }
  at::NoGradGuard no_grad;
  const bool is_root = communicator.rank() == root;
  at::Tensor whole = is_root ? at::empty({layout.padded_numel(ranks)}, shard.options().device(at::kCPU)) : at::Tensor();
  at::Tensor piece = at::empty({size}, shard.options().device(communicator.device()));
  for (int r = 0; r < ranks; ++r) {
    if (communicator.rank() == r) piece.copy_(shard);
    if (ranks > 1) communicator.broadcast(piece, r);
    if (is_root) whole.narrow(0, r * size, size).copy_(piece);
  }
  return is_root ? whole.narrow(0, 0, layout.numel()) : at::Tensor();
}

at::Tensor shard_of(const FlatLayout& layout, const at::Tensor& whole, int rank, int ranks) {
  if (whole.numel() != layout.numel()) fail("flat layout", "a whole buffer of {} elements, got {}", layout.numel(), whole.numel());
  at::NoGradGuard no_grad;
  const int64_t size = layout.shard_numel(ranks);
  at::Tensor shard = at::zeros({size}, whole.options());
  const int64_t begin = static_cast<int64_t>(rank) * size, end = std::min(begin + size, layout.numel());
  if (end > begin) shard.narrow(0, 0, end - begin).copy_(whole.reshape({-1}).narrow(0, begin, end - begin));
  return shard;
}

}  // namespace sdt
