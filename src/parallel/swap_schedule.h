// kohya's block-swap schedule (sd-scripts library/custom_offloading_utils.py, ModelOffloader) as
// pure arithmetic: which blocks live on the host, which device slot each block runs in, and when a
// block is copied in.
//
// N blocks, S = blocks_to_swap. The device holds N - S blocks' weights ("slots"). At the start of a
// training step blocks [0, N-S) are resident. Forward: after block i < S has run, block N-S+i is
// copied into the slot block i used; so forward ends with [S, N) resident, which is what backward
// needs first. Backward: after block b's backward, for b in [N-S-1, N-2], block b+1 (finished) gives
// its slot to block b+1-(N-S); so backward ends with [0, N-S) resident again and the next step needs
// no preparation. Slot s therefore holds block s or one of s ± (N-S), ...: slot_of(b) = b mod (N-S).
//
// kohya moves a block's weights out and in (the device copy is the only copy while resident). Here
// every block that ever leaves the device, [0, S) and [N-S, N), has its master copy on the host, and a
// slot is a cache: leaving costs nothing, arriving is one host-to-device copy. For a frozen stack that
// is the host-to-device-only mode (2S block copies per step); for a trainable stack the block's
// gradient and optimizer state live on the host with it (see block_engine.h).
#pragma once

#include <algorithm>
#include <cstdint>
#include <optional>

namespace sdt {

struct SwapSchedule {
  int64_t blocks = 0;
  int64_t blocks_to_swap = 0;

  bool swapping() const { return blocks_to_swap > 0; }
  // Device slots, in blocks (kohya's resident set). Without swapping every block is resident.
  int64_t slot_count() const { return blocks - blocks_to_swap; }
  int64_t slot_of(int64_t block) const { return block % slot_count(); }
  // A block shares its slot with another block, so its master lives on the host.
  bool on_host(int64_t block) const { return swapping() && (block < blocks_to_swap || block >= slot_count()); }
  int64_t host_blocks() const { return swapping() ? std::min(2 * blocks_to_swap, blocks) : 0; }
  // Slots that several blocks take turns in: the device buffers swapping allocates. The other
  // slots hold one block each, whose master stays on the device.
  int64_t shared_slots() const { return swapping() ? std::min(blocks_to_swap, slot_count()) : 0; }

  // The block to copy in once `block` has run forward (kohya's submit_move_blocks in training mode).
  std::optional<int64_t> fetch_after_forward(int64_t block) const {
    if (!swapping() || block >= blocks_to_swap) return std::nullopt;
    return block + slot_count();
  }
  // The block to copy in once `block`'s backward is done (kohya's backward hook).
  std::optional<int64_t> fetch_after_backward(int64_t block) const {
    if (!swapping() || block < slot_count() - 1 || block > blocks - 2) return std::nullopt;
    return block + 1 - slot_count();
  }
};

}  // namespace sdt
