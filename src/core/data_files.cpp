#include "src/core/data_files.h"

#include <cstdlib>
#include <filesystem>
#include <vector>

#include "src/core/error.h"

namespace sdt {

std::string shipped_data_file(const std::string& relative, const std::string& what, const std::string& flag) {
  namespace fs = std::filesystem;
  std::vector<fs::path> candidates;
  if (const char* data_dir = std::getenv("SDT_DATA_DIR")) candidates.push_back(fs::path(data_dir) / relative);
  std::error_code error;
  const fs::path executable = fs::read_symlink("/proc/self/exe", error);
  if (!error) {
    candidates.push_back(executable.parent_path() / "data" / relative);                        // the build folder
    candidates.push_back(executable.parent_path().parent_path() / "data" / relative);          // build/ in the checkout
    candidates.push_back(executable.parent_path().parent_path() / "share" / "sdt" / relative);  // an installed prefix
  }
  for (const auto& path : candidates) {
    if (fs::is_regular_file(path)) return path.string();
  }
  fail("tokenizer", "the {} the project ships (data/{}) is not beside the executable; pass {} or set SDT_DATA_DIR to "
       "the project's data/ folder", what, relative, flag);
}

}  // namespace sdt
