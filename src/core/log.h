// Logging through spdlog. Every line carries the rank when there is more than one; by default only
// rank 0 logs below warnings, so N ranks do not print N copies of the progress.
#pragma once

#include <optional>
#include <string>

#include <spdlog/spdlog.h>

namespace sdt {

struct LogOptions {
  std::optional<std::string> level;  // kohya names: DEBUG INFO WARNING ERROR CRITICAL (default INFO)
  std::optional<std::string> file;   // log to this file instead of stderr (".rank<r>" added when world > 1)
  bool simple = false;               // message only, no time or level
  bool all_ranks = false;            // info from every rank, not only rank 0
};

void init_logging(const LogOptions& options, int rank, int world_size);

}  // namespace sdt
