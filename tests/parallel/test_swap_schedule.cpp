// SwapSchedule against a simulation of kohya's ModelOffloader (library/custom_offloading_utils.py) in
// training mode: the same blocks arrive at the same points, each into the device storage kohya gives
// it, every block is resident when kohya waits for it, and the blocks with a host master are exactly
// those kohya ever moves off the device.
#include <gtest/gtest.h>

#include <map>
#include <optional>
#include <set>
#include <vector>

#include "src/parallel/swap_schedule.h"

namespace sdt {
namespace {

// kohya's offloader as bookkeeping: `place[b]` is the device storage block b occupies (-1: on the
// host). A move gives the incoming block the storage the outgoing one vacates.
struct KohyaOffloader {
  int64_t n, s;
  std::vector<int64_t> place;
  std::set<int64_t> ever_on_host;
  struct Move {
    int64_t to_device, storage;
    bool operator==(const Move&) const = default;
  };
  std::vector<Move> moves;

  KohyaOffloader(int64_t n, int64_t s) : n(n), s(s), place(n, -1) {
    // prepare_block_devices_before_forward: [0, n-s) on the device, [n-s, n) on the host.
    for (int64_t b = 0; b < n - s; ++b) place[b] = b;
    for (int64_t b = n - s; b < n; ++b) ever_on_host.insert(b);
  }
  void move(int64_t to_host, int64_t to_device) {
    EXPECT_GE(place[to_host], 0) << "block " << to_host << " leaves the device but is not there";
    EXPECT_EQ(place[to_device], -1) << "block " << to_device << " arrives but is already there";
    place[to_device] = place[to_host];
    place[to_host] = -1;
    ever_on_host.insert(to_host);
    moves.push_back({to_device, place[to_device]});
  }
  bool resident(int64_t b) const { return place[b] >= 0; }

  // Flux.forward with an offloader: wait_for_block(i); block i; submit_move_blocks(i).
  void forward() {
    for (int64_t i = 0; i < n; ++i) {
      EXPECT_TRUE(resident(i)) << "forward block " << i;
      if (i < s) move(i, n - s + i);
    }
  }
  // The backward hooks, for b = n-1 down to 0, fired once block b's backward is done.
  void backward() {
    for (int64_t b = n - 1; b >= 0; --b) {
      EXPECT_TRUE(resident(b)) << "backward block " << b;
      const int64_t propagated = n - b - 1;
      if (propagated > 0 && propagated <= s) move(n - propagated, s - propagated);
    }
  }
};

// The same step with SwapSchedule's arrival points.
std::vector<KohyaOffloader::Move> scheduled_moves(const SwapSchedule& schedule) {
  std::vector<KohyaOffloader::Move> out;
  for (int64_t i = 0; i < schedule.blocks; ++i) {
    if (auto next = schedule.fetch_after_forward(i)) out.push_back({*next, schedule.slot_of(*next)});
  }
  for (int64_t b = schedule.blocks - 1; b >= 0; --b) {
    if (auto next = schedule.fetch_after_backward(b)) out.push_back({*next, schedule.slot_of(*next)});
  }
  return out;
}

TEST(SwapSchedule, MatchesKohyasOffloaderForEveryStackAndSwapCount) {
  for (int64_t n = 3; n <= 12; ++n) {
    for (int64_t s = 1; s <= n - 2; ++s) {
      SCOPED_TRACE(::testing::Message() << n << " blocks, " << s << " swapped");
      const SwapSchedule schedule{n, s};
      KohyaOffloader kohya(n, s);
      for (int step = 0; step < 2; ++step) {
        kohya.forward();
        kohya.backward();
        for (int64_t b = 0; b < n; ++b) {
          // Backward leaves kohya's starting layout, so the next step needs no preparation.
          EXPECT_EQ(kohya.place[b], b < n - s ? b : -1) << "after step " << step << ", block " << b;
        }
      }
      std::vector<KohyaOffloader::Move> twice = scheduled_moves(schedule);
      const std::vector<KohyaOffloader::Move> once = twice;
      twice.insert(twice.end(), once.begin(), once.end());
      EXPECT_EQ(kohya.moves, twice);
      for (int64_t b = 0; b < n; ++b) EXPECT_EQ(schedule.on_host(b), kohya.ever_on_host.count(b) == 1) << "block " << b;
      EXPECT_EQ(schedule.host_blocks(), static_cast<int64_t>(kohya.ever_on_host.size()));
      EXPECT_EQ(schedule.slot_count(), n - s);
    }
  }
}

TEST(SwapSchedule, SharedSlotsAreTheOnesHostBlocksUse) {
  for (int64_t n = 3; n <= 12; ++n) {
    for (int64_t s = 1; s <= n - 2; ++s) {
      const SwapSchedule schedule{n, s};
      std::map<int64_t, int64_t> users;  // slot -> blocks that run in it
      for (int64_t b = 0; b < n; ++b) ++users[schedule.slot_of(b)];
      int64_t shared = 0;
      for (const auto& [slot, count] : users) shared += count > 1;
      EXPECT_EQ(schedule.shared_slots(), shared) << n << " blocks, " << s << " swapped";
      for (int64_t b = 0; b < n; ++b) {
        EXPECT_EQ(schedule.on_host(b), users[schedule.slot_of(b)] > 1);
        if (schedule.on_host(b)) {
          EXPECT_LT(schedule.slot_of(b), schedule.shared_slots());
        }
      }
    }
  }
}

TEST(SwapSchedule, NoSwapKeepsEveryBlockOnTheDevice) {
  const SwapSchedule schedule{6, 0};
  for (int64_t b = 0; b < 6; ++b) {
    EXPECT_FALSE(schedule.on_host(b));
    EXPECT_FALSE(schedule.fetch_after_forward(b));
    EXPECT_FALSE(schedule.fetch_after_backward(b));
  }
  EXPECT_EQ(schedule.shared_slots(), 0);
  EXPECT_EQ(schedule.host_blocks(), 0);
}

}  // namespace
}  // namespace sdt
