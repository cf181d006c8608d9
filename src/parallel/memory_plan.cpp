#include "src/parallel/memory_plan.h"

#include <atomic>
#include <cstring>
#include <limits>

#include <c10/core/CPUAllocator.h>
#include <c10/core/alignment.h>
#include <fmt/format.h>

#include "src/core/error.h"

namespace sdt {

int64_t MemoryPlan::device_total() const {
  const EngineMemory& s = stack;
  return s.device_masters + s.device_gradients + s.swap_slots + s.gather_buffers + s.gradient_buffers + device_optimizer_state;
}

int64_t MemoryPlan::host_total() const { return stack.host_masters + stack.host_gradients + host_optimizer_state; }

MemoryPlan plan_memory(const MemoryPlanConfig& c) {
  // The same arithmetic as BlockEngine and FlatLayout.
  const int ranks = c.sharding == Sharding::full ? c.world_size : 1;
  const int64_t shard = (c.block_numel + ranks - 1) / ranks;
  const int64_t padded = shard * ranks;
  const int64_t master_size = c10::elementSize(c.master_dtype), compute_size = c10::elementSize(c.compute_dtype);
  const SwapSchedule schedule{c.blocks, c.blocks_to_swap};
  const int64_t host_blocks = schedule.host_blocks(), device_blocks = c.blocks - host_blocks;

  MemoryPlan plan;
  EngineMemory& s = plan.stack;
  s.device_masters = device_blocks * shard * master_size;
  s.host_masters = host_blocks * shard * master_size;
  if (c.trainable) {
    s.device_gradients = s.device_masters;
    s.host_gradients = s.host_masters;
    plan.device_optimizer_state = device_blocks * shard * c.optimizer_bytes_per_param;
    plan.host_optimizer_state = host_blocks * shard * c.optimizer_bytes_per_param;
    s.gradient_buffers = (c.world_size > 1 ? 2 : 1) * padded * master_size;  // gradients are averaged in the master's dtype
  }
  s.swap_slots = schedule.shared_slots() * shard * master_size;
  // Two whole blocks (the running one, the next arriving), and with sharding the shard each sends.
  if (ranks > 1 || c.compute_dtype != c.master_dtype) s.gather_buffers = 2 * (padded + (ranks > 1 ? shard : 0)) * compute_size;
  return plan;
}

MemoryPlanConfig memory_plan_config(const BlockEngine& engine, int64_t optimizer_bytes_per_param) {
  const BlockEngine::ManagedBlock& first = engine.blocks().front();
  for (const auto& block : engine.blocks()) {
    if (!(block.layout == first.layout) || block.trainable != first.trainable ||
        block.master.scalar_type() != first.master.scalar_type()) {
      fail("memory plan", "plans a stack of identical blocks; this engine's blocks differ");
    }
  }
  if (engine.options().swap.size() > 1 ||
      (engine.options().swap.size() == 1 && engine.options().swap[0].count != engine.blocks().size())) {
    fail("memory plan", "plans one swap stack of all the blocks");
  }
  MemoryPlanConfig c;
  c.block_numel = first.layout.numel();
  c.blocks = engine.block_count();
  c.world_size = engine.communicator().size();
  c.sharding = engine.options().sharding;
  c.blocks_to_swap = engine.options().swap.empty() ? 0 : engine.options().swap[0].blocks_to_swap;
  c.master_dtype = first.master.scalar_type();
  c.compute_dtype = engine.compute_dtype(0);
  c.trainable = first.trainable;
  c.optimizer_bytes_per_param = first.trainable ? optimizer_bytes_per_param : 0;
  return c;
}

std::string describe(const MemoryPlan& plan) {
  const auto mib = [](int64_t bytes) { return static_cast<double>(bytes) / (1024.0 * 1024.0); };
  const EngineMemory& s = plan.stack;
  std::string out;
  out += fmt::format("  {:<18} {:>10} {:>10}\n", "memory per rank", "device MiB", "host MiB");
  out += fmt::format("  {:<18} {:>10.2f} {:>10.2f}\n", "parameters", mib(s.device_masters), mib(s.host_masters));
  out += fmt::format("  {:<18} {:>10.2f} {:>10.2f}\n", "gradients", mib(s.device_gradients), mib(s.host_gradients));
  out += fmt::format("  {:<18} {:>10.2f} {:>10.2f}\n", "optimizer state", mib(plan.device_optimizer_state), mib(plan.host_optimizer_state));
  out += fmt::format("  {:<18} {:>10.2f} {:>10}\n", "swap buffers", mib(s.swap_slots), "");
  out += fmt::format("  {:<18} {:>10.2f} {:>10}\n", "gather buffers", mib(s.gather_buffers), "");
  out += fmt::format("  {:<18} {:>10.2f} {:>10}\n", "gradient buffers", mib(s.gradient_buffers), "");
  out += fmt::format("  {:<18} {:>10.2f} {:>10.2f}\n", "total", mib(plan.device_total()), mib(plan.host_total()));
  return out;
}

// ---------------------------------------------------------------- the counting CPU allocator

namespace {

std::atomic<int64_t> live{0};
std::atomic<int64_t> peak{0};

// Wraps the CPU allocator. LibTorch also allocates through raw_allocate, which needs the context
// to be the data pointer, so the size travels in a header in front of the data instead: one
// alignment unit, which keeps the data as aligned as the inner allocator made the block.
constexpr size_t kHeader = c10::gAlignment;

c10::Allocator* inner_allocator = nullptr;

void release(void* data) {
  void* block = static_cast<char*>(data) - kHeader;
  int64_t bytes;
  std::memcpy(&bytes, block, sizeof bytes);
  live.fetch_sub(bytes);
  inner_allocator->raw_deallocate(block);
}

class CountingAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t bytes) override {
    void* block = inner_allocator->raw_allocate(bytes + kHeader);
    const int64_t size = static_cast<int64_t>(bytes);
    std::memcpy(block, &size, sizeof size);
    const int64_t now = live.fetch_add(size) + size;
    int64_t seen = peak.load();
    while (now > seen && !peak.compare_exchange_weak(seen, now)) {
    }
    void* data = static_cast<char*>(block) + kHeader;
    return {data, data, &release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &release; }

  void copy_data(void* dest, const void* src, size_t count) const override { std::memcpy(dest, src, count); }
};

std::atomic<bool> meter_installed{false};

}  // namespace

void CpuTensorMeter::install() {
  if (meter_installed.exchange(true)) return;
  inner_allocator = c10::GetCPUAllocator();
  static CountingAllocator allocator;
  // The highest priority: a later, lower-priority registration does not replace ours.
  c10::SetCPUAllocator(&allocator, std::numeric_limits<uint8_t>::max());
}

bool CpuTensorMeter::installed() { return meter_installed.load(); }
int64_t CpuTensorMeter::live_bytes() { return live.load(); }
int64_t CpuTensorMeter::peak_bytes() { return peak.load(); }
void CpuTensorMeter::reset_peak() { peak.store(live.load()); }

}  // namespace sdt
