#include "src/parallel/stack_checkpoint.h"

#include <optional>

#include <fmt/format.h>
#include <torch/torch.h>

#include "src/core/error.h"
#include "src/core/tensor_io.h"

namespace sdt {

namespace {

std::string tensor_name(const std::string& prefix, int64_t block, const FlatLayout::Entry& entry, const std::string& suffix) {
  return fmt::format("{}{}.{}{}", prefix, block, entry.name, suffix);
}

void check_shards(const BlockEngine& stack, const std::vector<StackTensors>& tensors, const char* where) {
  for (const StackTensors& t : tensors) {
    if (static_cast<int64_t>(t.shards.size()) != stack.block_count()) {
      fail(where, "'{}' has {} shards for {} blocks", t.suffix, t.shards.size(), stack.block_count());
    }
    for (int64_t b = 0; b < stack.block_count(); ++b) {
      if (!t.shards[b].defined() || t.shards[b].sizes() != stack.master(b).sizes()) {
        fail(where, "'{}' of block {} is not shaped like the block's master ({})", t.suffix, b,
             c10::str(stack.master(b).sizes()));
      }
    }
  }
}

}  // namespace

void save_stack(const BlockEngine& stack, const std::string& path, const std::vector<StackTensors>& tensors,
                const safetensors::Metadata& metadata, const std::string& prefix, int root) {
  check_shards(stack, tensors, "save block stack");
  const bool is_root = stack.communicator().rank() == root;

  // The header comes first, so root declares every tensor before the first block is gathered.
  std::optional<safetensors::Writer> writer;
  if (is_root) {
    std::vector<safetensors::TensorSpec> specs;
    for (int64_t b = 0; b < stack.block_count(); ++b) {
      for (const StackTensors& t : tensors) {
        for (const FlatLayout::Entry& e : stack.layout(b).entries()) {
          specs.push_back({tensor_name(prefix, b, e, t.suffix), to_safetensors_dtype(t.shards[b].scalar_type()), e.shape});
        }
      }
    }
    writer.emplace(path, specs, metadata);
  }
  for (int64_t b = 0; b < stack.block_count(); ++b) {
    for (const StackTensors& t : tensors) {
      const at::Tensor full = stack.gather_to_root(b, t.shards[b], root);
      if (!is_root) continue;
      for (const FlatLayout::Entry& e : stack.layout(b).entries()) {
        const at::Tensor piece = full.narrow(0, e.offset, e.numel).contiguous();
        writer->append(piece.data_ptr(), piece.nbytes());
      }
    }
  }
  if (writer) writer->commit();
}

void load_stack(const BlockEngine& stack, const safetensors::File& file, const std::vector<StackTensors>& tensors,
                const std::string& prefix) {
  check_shards(stack, tensors, "load block stack");
  for (const StackTensors& t : tensors) {
    for (int64_t b = 0; b < stack.block_count(); ++b) {
      at::Tensor shard = t.shards[b].detach();
      stack.layout(b).fill_shard(shard, stack.shard_index(), stack.shard_ranks(), [&](const FlatLayout::Entry& e) {
        return load_tensor(file, tensor_name(prefix, b, e, t.suffix));
      });
    }
  }
}

}  // namespace sdt
