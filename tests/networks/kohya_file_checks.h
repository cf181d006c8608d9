// What a family's LoRA tests check of a LoRA file kohya wrote: that it loads into sdt's network with every key used,
// and that sdt writes back the very tensors kohya saved (so kohya's loader takes sdt's files as its own).
#pragma once

#include <gtest/gtest.h>

#include <filesystem>
#include <string>

#include "src/core/safetensors.h"
#include "src/core/tensor_io.h"
#include "src/networks/lora.h"

namespace sdt::testing_support {

inline void expect_loads_every_key(LoRANetwork& network, const std::string& kohya_file) {
  const LoadResult loaded = network->load_weights(kohya_file);
  EXPECT_TRUE(loaded.missing.empty()) << loaded.missing.size() << " missing, first " << loaded.missing.front();
  EXPECT_TRUE(loaded.unexpected.empty()) << loaded.unexpected.size() << " unexpected, first " << loaded.unexpected.front();
}

inline void expect_saves_back_the_same_tensors(LoRANetwork& network, const std::string& kohya_file) {
  const std::string ours = ::testing::TempDir() + "/lora_saved_back.safetensors";
  network->save_weights(ours, at::kFloat, {});
  safetensors::File saved(ours), kohya(kohya_file);
  EXPECT_EQ(saved.tensors().size(), kohya.tensors().size());
  for (const auto& t : kohya.tensors()) {
    ASSERT_TRUE(saved.contains(t.name)) << t.name;
    EXPECT_TRUE(at::equal(load_tensor(saved, t.name), load_tensor(kohya, t.name))) << t.name;
  }
  std::filesystem::remove(ours);
}

}  // namespace sdt::testing_support
