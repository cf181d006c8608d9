// kohya's caption processing (BaseDataset.process_caption), in its order: prefix/suffix, dropout,
// wildcards or first line, keep-tokens split, token warm-up, shuffle, tag dropout, secondary
// separator. Random choices come from the caller's generator (seeded per sample and epoch).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "src/core/dataset_config.h"
#include "src/data/rng.h"

namespace sdt {

struct CaptionContext {
  int64_t epoch = 1;            // 1-based, as kohya's loop counts
  int64_t step = 0;             // global optimizer step, for token warm-up
  int64_t max_train_steps = 0;  // resolves a token_warmup_step below 1 (a ratio of the steps)
};

std::string process_caption(const SubsetConfig& subset, const std::string& caption, const CaptionContext& context, Rng& rng);

// Python's str.split(sep) (empty fields kept) and str.strip() (ASCII whitespace), which kohya relies on.
std::vector<std::string> python_split(const std::string& s, const std::string& sep);
std::string python_strip(const std::string& s);

}  // namespace sdt
