#include "src/core/log.h"

#include <spdlog/sinks/basic_file_sink.h>
#include <spdlog/sinks/stdout_color_sinks.h>

#include "src/core/error.h"

namespace sdt {
namespace {

spdlog::level::level_enum parse_level(const std::string& name) {
  if (name == "DEBUG") return spdlog::level::debug;
  if (name == "INFO") return spdlog::level::info;
  if (name == "WARNING") return spdlog::level::warn;
  if (name == "ERROR") return spdlog::level::err;
  if (name == "CRITICAL") return spdlog::level::critical;
  fail("--console_log_level", "'{}' is not one of DEBUG, INFO, WARNING, ERROR, CRITICAL", name);
}

}  // namespace

void init_logging(const LogOptions& options, int rank, int world_size) {
  std::shared_ptr<spdlog::logger> logger;
  if (options.file) {
    std::string path = world_size > 1 ? *options.file + ".rank" + std::to_string(rank) : *options.file;
    logger = spdlog::basic_logger_mt("sdt", path);
  } else {
    logger = spdlog::stderr_color_mt("sdt");
  }
  const std::string rank_tag = world_size > 1 ? fmt::format("[rank {}/{}] ", rank, world_size) : "";
  logger->set_pattern(options.simple ? rank_tag + "%v" : "%Y-%m-%d %H:%M:%S.%e %^%-5l%$ " + rank_tag + "%v");
  auto level = parse_level(options.level.value_or("INFO"));
  if (rank != 0 && !options.all_ranks) level = std::max(level, spdlog::level::warn);
  logger->set_level(level);
  logger->flush_on(spdlog::level::warn);
  spdlog::set_default_logger(logger);
}

}  // namespace sdt
