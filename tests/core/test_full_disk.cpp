// A full disk while writing: the write is a named error, the file under its final name is the old one (or none), and
// no temporary is left behind. The full disk is /dev/full (every write fails with ENOSPC), reached through a symbolic
// link where the writer puts its temporary file.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <iterator>

#include "src/core/atomic_file.h"
#include "src/core/error.h"
#include "src/core/safetensors.h"

namespace sdt {
namespace {

namespace fs = std::filesystem;

fs::path scratch(const std::string& name) {
  const fs::path dir = fs::path(testing::TempDir()) / ("sdt_full_disk_" + name);
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

// The temporary a writer of `path` in this process uses, pointed at a disk that is full.
void fill_disk_under(const fs::path& path) { fs::create_symlink("/dev/full", path.string() + ".tmp-" + std::to_string(::getpid())); }

std::string read(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

TEST(FullDisk, AnAtomicWriteFailsByNameAndKeepsTheOldFile) {
  ASSERT_TRUE(fs::exists("/dev/full"));
  const fs::path dir = scratch("atomic");
  const fs::path path = dir / "train_state.json";
  write_file_atomically(path.string(), "old\n");
  fill_disk_under(path);
  try {
    write_file_atomically(path.string(), std::string(1 << 16, 'x'));
    FAIL() << "expected a full-disk error";
  } catch (const Error& e) {
    const std::string message = e.what();
    EXPECT_NE(message.find(path.string()), std::string::npos) << message;
    EXPECT_NE(message.find("No space left on device"), std::string::npos) << message;
    EXPECT_NE(message.find("65536 bytes"), std::string::npos) << message;
  }
  EXPECT_EQ(read(path), "old\n");
  EXPECT_EQ(std::distance(fs::directory_iterator(dir), fs::directory_iterator{}), 1) << "a temporary was left behind";
}

TEST(FullDisk, ASafetensorsWriterWhoseHeaderCannotBeWrittenLeavesNoTemporary) {
  const fs::path dir = scratch("safetensors");
  const fs::path path = dir / "lora.safetensors";
  fill_disk_under(path);
  EXPECT_THROW(safetensors::Writer(path.string(), {{"w", safetensors::DType::F32, {4}}}, {}), Error);
  EXPECT_FALSE(fs::exists(path));
  EXPECT_TRUE(fs::is_empty(dir)) << "a temporary was left behind";
}

}  // namespace
}  // namespace sdt
