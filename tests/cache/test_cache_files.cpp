// The cache files without a model: every field of an entry survives writing and reading in each
// dtype, parts commit as documented, a writer killed mid-part leaves only committed entries
// visible, and parts made differently or damaged are refused with the file named.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>

#include "src/cache/latent_cache.h"
#include "src/cache/text_encoder_cache.h"
#include "src/core/error.h"

namespace sdt {
namespace {

namespace fs = std::filesystem;

fs::path fresh_dir(const std::string& name) {
  const fs::path dir = fs::path(testing::TempDir()) / ("sdt_cache_files_" + name);
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

CacheIdentity latents_identity(const std::string& dtype = "float", const std::string& weights = "00ff") {
  return {CacheKind::latents, "sd", weights, dtype, "latent_sampling=mean"};
}

PartWriterOptions writer_options(const fs::path& dir, int64_t commit_every_entries = 0) {
  PartWriterOptions o;
  o.dir = dir.string();
  o.commit_every_entries = commit_every_entries;
  return o;
}

// Entries of two buckets, flipped and not, some with alpha masks, with values that tell them apart.
struct Sample {
  std::vector<LatentKey> keys;
  std::vector<LatentEntry> entries;
};

Sample sample_entries(int count = 6) {
  Sample s;
  for (int i = 0; i < count; ++i) {
    const Resolution bucket = i % 2 ? Resolution{32, 16} : Resolution{16, 16};
    LatentKey key{fmt::format("10_toy/img{}.png", i / 2), bucket, {bucket.width + 2 * i, bucket.height}, i % 3 == 1};
    LatentEntry entry;
    entry.latents = at::randn({4, bucket.height / 2, bucket.width / 2}) + i;
    entry.original_size = {100 + i, 50 + i};
    entry.crop_ltrb = {0.5 * i, 1.25, 16.0 + i, 15.75};
    if (i % 2 == 0) entry.alpha_mask = at::randint(0, 256, {bucket.height, bucket.width}).to(at::kFloat) / 255.0f;
    s.keys.push_back(key);
    s.entries.push_back(entry);
  }
  return s;
}

void expect_same_entry(const LatentEntry& read, const LatentEntry& written, at::ScalarType stored) {
  EXPECT_EQ(read.latents.scalar_type(), stored);
  EXPECT_TRUE(at::equal(read.latents, written.latents.to(stored)));
  EXPECT_EQ(read.original_size, written.original_size);
  EXPECT_EQ(read.crop_ltrb.left, written.crop_ltrb.left);
  EXPECT_EQ(read.crop_ltrb.top, written.crop_ltrb.top);
  EXPECT_EQ(read.crop_ltrb.right, written.crop_ltrb.right);
  EXPECT_EQ(read.crop_ltrb.bottom, written.crop_ltrb.bottom);
  ASSERT_EQ(read.alpha_mask.defined(), written.alpha_mask.defined());
  if (written.alpha_mask.defined()) {
    EXPECT_TRUE(at::equal(read.alpha_mask, written.alpha_mask));
  }
}

TEST(CacheFiles, LatentEntriesKeepEveryFieldInEachDtype) {
  const std::pair<const char*, at::ScalarType> dtypes[] = {{"float", at::kFloat}, {"fp16", at::kHalf}, {"bf16", at::kBFloat16}};
  for (const auto& [dtype, stored] : dtypes) {
    SCOPED_TRACE(dtype);
    const fs::path dir = fresh_dir(std::string("round_trip_") + dtype);
    const Sample s = sample_entries();
    {
      LatentCacheWriter writer(latents_identity(dtype), writer_options(dir));
      writer.add({s.keys.begin(), s.keys.begin() + 4}, {s.entries.begin(), s.entries.begin() + 4});
      writer.add({s.keys.begin() + 4, s.keys.end()}, {s.entries.begin() + 4, s.entries.end()});
      writer.commit();
    }
    const LatentCacheReader reader(dir.string(), latents_identity(dtype));
    ASSERT_EQ(reader.size(), s.keys.size());
    ASSERT_EQ(reader.files().size(), 1u);
    for (size_t i = 0; i < s.keys.size(); ++i) {
      SCOPED_TRACE(s.keys[i].describe());
      ASSERT_TRUE(reader.contains(s.keys[i]));
      expect_same_entry(reader.read(s.keys[i]), s.entries[i], stored);
      const auto info = reader.info(s.keys[i]);
      ASSERT_TRUE(info);
      EXPECT_EQ(info->shape, std::vector<int64_t>(s.entries[i].latents.sizes().begin(), s.entries[i].latents.sizes().end()));
      EXPECT_EQ(info->has_alpha_mask, s.entries[i].alpha_mask.defined());
    }
    // A batch of one bucket: masks where entries have them, ones elsewhere.
    const LatentBatch batch = reader.read_batch({s.keys[1], s.keys[3], s.keys[5]});
    EXPECT_EQ(batch.latents.sizes(), (at::IntArrayRef{3, 4, 8, 16}));
    EXPECT_FALSE(batch.alpha_masks.defined());
    const LatentBatch masked = reader.read_batch({s.keys[0], s.keys[2]});
    ASSERT_TRUE(masked.alpha_masks.defined());
    EXPECT_TRUE(at::equal(masked.alpha_masks[1], s.entries[2].alpha_mask));
    // A key differing in any part is another item.
    LatentKey other = s.keys[0];
    other.flipped = !other.flipped;
    EXPECT_FALSE(reader.contains(other));
    other = s.keys[0];
    other.resized_size.width += 2;
    EXPECT_FALSE(reader.contains(other));
  }
}

TEST(CacheFiles, MissingItemIsAnErrorNamingItAndTheFolder) {
  const fs::path dir = fresh_dir("missing");
  const Sample s = sample_entries(2);
  LatentCacheWriter writer(latents_identity(), writer_options(dir));
  writer.add({s.keys[0]}, {s.entries[0]});
  writer.commit();
  const LatentCacheReader reader(dir.string(), latents_identity());
  try {
    reader.read(s.keys[1]);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(s.keys[1].image), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find(dir.string()), std::string::npos) << e.what();
  }
  // Batches must be of one bucket.
  EXPECT_THROW(reader.read_batch({s.keys[0], s.keys[1]}), Error);
}

TEST(CacheFiles, TextEncoderOutputsKeepEveryOutput) {
  const fs::path dir = fresh_dir("te");
  const CacheIdentity identity{CacheKind::text_encoder_outputs, "sd", "abcd", "fp16", "clip_skip=none"};
  const std::vector<std::string> captions{"a red square", "a blue square", "ünïcode, \"quoted\" caption"};
  const at::Tensor hidden = at::randn({3, 77, 8});
  const at::Tensor pooled = at::randn({3, 8});
  const at::Tensor mask = at::randint(0, 2, {3, 77}, at::kLong);
  const at::Tensor apply_mask = at::tensor({1, 0, 1}, at::kByte).to(at::kBool);
  {
    TextEncoderCacheWriter writer(identity, writer_options(dir));
    writer.add({captions[0], captions[1]}, {{"hidden_state", hidden.slice(0, 0, 2)}, {"pool", pooled.slice(0, 0, 2)},
                                            {"attention_mask", mask.slice(0, 0, 2)}, {"apply_mask", apply_mask.slice(0, 0, 2)}});
    writer.add({captions[2]}, {{"hidden_state", hidden.slice(0, 2)}, {"pool", pooled.slice(0, 2)},
                               {"attention_mask", mask.slice(0, 2)}, {"apply_mask", apply_mask.slice(0, 2)}});
    writer.commit();
  }
  const TextEncoderCacheReader reader(dir.string(), identity);
  ASSERT_EQ(reader.size(), 3u);
  const NamedTensors out = reader.read_batch({captions[2], captions[0]});
  ASSERT_EQ(out.size(), 4u);
  EXPECT_EQ(out[0].first, "hidden_state");
  EXPECT_EQ(out[0].second.scalar_type(), at::kHalf);
  EXPECT_TRUE(at::equal(out[0].second, at::stack({hidden[2], hidden[0]}).to(at::kHalf)));
  EXPECT_EQ(out[1].first, "pool");
  EXPECT_TRUE(at::equal(out[1].second, at::stack({pooled[2], pooled[0]}).to(at::kHalf)));
  EXPECT_EQ(out[2].first, "attention_mask");
  EXPECT_EQ(out[2].second.scalar_type(), at::kLong);
  EXPECT_TRUE(at::equal(out[2].second, at::stack({mask[2], mask[0]})));
  EXPECT_EQ(out[3].first, "apply_mask");
  EXPECT_TRUE(at::equal(out[3].second, at::tensor({1, 1}, at::kByte)));
  EXPECT_THROW(reader.read_batch({"a green square"}), Error);
}

TEST(CacheFiles, PartsCommitByCountUnderTheirWritersName) {
  const fs::path dir = fresh_dir("parts");
  const Sample s = sample_entries(5);
  PartWriterOptions options = writer_options(dir, 2);
  options.rank = 1;
  options.world = 3;
  {
    LatentCacheWriter writer(latents_identity(), options);
    for (size_t i = 0; i < s.keys.size(); ++i) writer.add({s.keys[i]}, {s.entries[i]});
    writer.commit();
  }
  const std::vector<std::string> parts = committed_parts(dir.string(), CacheKind::latents);
  ASSERT_EQ(parts.size(), 3u);
  EXPECT_EQ(fs::path(parts[0]).filename(), "latents.r0001-of-0003.p00000.h5");
  EXPECT_EQ(fs::path(parts[2]).filename(), "latents.r0001-of-0003.p00002.h5");
  const h5::Handle file = h5::open_file_read_only(parts[2]);
  EXPECT_EQ(h5::read_int_attribute(file.get(), "entries"), 1);
  EXPECT_EQ(h5::read_string_attribute(file.get(), "written_by"), "rank 1 of 3");
  EXPECT_EQ(h5::read_string_attribute(file.get(), "weights_sha256"), "00ff");
  EXPECT_EQ(LatentCacheReader(dir.string(), latents_identity()).size(), 5u);
  // A later run of the same writer continues the numbering.
  LatentCacheWriter again(latents_identity(), options);
  again.add({s.keys[0]}, {s.entries[0]});
  again.commit();
  EXPECT_TRUE(fs::exists(dir / "latents.r0001-of-0003.p00003.h5"));
}

TEST(CacheFiles, WriterKilledMidPartLeavesOnlyCommittedEntries) {
  const fs::path dir = fresh_dir("killed");
  const Sample s = sample_entries(5);
  int ready[2];
  ASSERT_EQ(pipe(ready), 0);
  const pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    // Two entries committed, a third written into the open part; then wait to be killed.
    try {
      LatentCacheWriter writer(latents_identity(), writer_options(dir, 2));
      writer.add({s.keys[0], s.keys[1]}, {s.entries[0], s.entries[1]});
      writer.add({s.keys[2]}, {s.entries[2]});
      const char byte = 1;
      if (write(ready[1], &byte, 1) != 1) _exit(2);
      pause();
    } catch (const std::exception& e) {
      fprintf(stderr, "child: %s\n", e.what());
    }
    _exit(3);
  }
  close(ready[1]);
  char byte = 0;
  ASSERT_EQ(read(ready[0], &byte, 1), 1);
  kill(child, SIGKILL);
  int status = 0;
  waitpid(child, &status, 0);
  ASSERT_TRUE(WIFSIGNALED(status));
  close(ready[0]);

  EXPECT_TRUE(fs::exists(dir / "latents.r0000-of-0001.p00001.h5.tmp"));
  const LatentCacheReader after_kill(dir.string(), latents_identity());
  EXPECT_EQ(after_kill.size(), 2u);
  EXPECT_TRUE(after_kill.contains(s.keys[1]));
  EXPECT_FALSE(after_kill.contains(s.keys[2]));
  expect_same_entry(after_kill.read(s.keys[1]), s.entries[1], at::kFloat);

  // The next writer of that rank removes the stale temporary and goes on.
  {
    LatentCacheWriter writer(latents_identity(), writer_options(dir, 2));
    writer.add({s.keys.begin() + 2, s.keys.end()}, {s.entries.begin() + 2, s.entries.end()});
    writer.commit();
  }
  EXPECT_FALSE(fs::exists(dir / "latents.r0000-of-0001.p00001.h5.tmp"));
  const LatentCacheReader resumed(dir.string(), latents_identity());
  ASSERT_EQ(resumed.size(), 5u);
  for (size_t i = 0; i < s.keys.size(); ++i) expect_same_entry(resumed.read(s.keys[i]), s.entries[i], at::kFloat);
}

TEST(CacheFiles, PartMadeDifferentlyIsRefusedNamingFileAndAttribute) {
  const fs::path dir = fresh_dir("mismatch");
  const Sample s = sample_entries(1);
  LatentCacheWriter writer(latents_identity("float", "aaaa"), writer_options(dir));
  writer.add(s.keys, s.entries);
  writer.commit();
  const std::string part = committed_parts(dir.string(), CacheKind::latents).at(0);
  const std::pair<CacheIdentity, std::string> cases[] = {
      {latents_identity("float", "bbbb"), "weights_sha256: the file has 'aaaa', this run expects 'bbbb'"},
      {latents_identity("fp16", "aaaa"), "dtype: the file has 'float', this run expects 'fp16'"},
      {{CacheKind::latents, "sdxl", "aaaa", "float", "latent_sampling=mean"}, "family"},
  };
  for (const auto& [expected, message] : cases) {
    try {
      LatentCacheReader reader(dir.string(), expected);
      FAIL() << "expected a refusal: " << message;
    } catch (const Error& e) {
      EXPECT_EQ(e.where(), part);
      EXPECT_NE(std::string(e.what()).find(message), std::string::npos) << e.what();
    }
  }
}

TEST(CacheFiles, DamagedPartIsAnErrorNamingIt) {
  const fs::path dir = fresh_dir("damaged");
  const Sample s = sample_entries(4);
  LatentCacheWriter writer(latents_identity(), writer_options(dir));
  writer.add(s.keys, s.entries);
  writer.commit();
  const std::string part = committed_parts(dir.string(), CacheKind::latents).at(0);
  fs::resize_file(part, fs::file_size(part) / 2);
  try {
    LatentCacheReader reader(dir.string(), latents_identity());
    for (const auto& key : s.keys) reader.read(key);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(part), std::string::npos) << e.what();
  }
}

// Changes the stored bytes of a part file in place, as a failing disk would: the first run of four floats equal to
// 1.25 (an entry written with that pattern) gets `change` applied at byte `offset` into it.
void corrupt_pattern(const std::string& part, size_t offset, const std::function<void(char*)>& change) {
  std::string bytes;
  {
    std::ifstream in(part, std::ios::binary);
    bytes.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  const float pattern[4] = {1.25f, 1.25f, 1.25f, 1.25f};
  const size_t at = bytes.find(std::string(reinterpret_cast<const char*>(pattern), sizeof(pattern)));
  ASSERT_NE(at, std::string::npos) << "the pattern is not in " << part;
  change(bytes.data() + at + offset);
  std::ofstream(part, std::ios::binary | std::ios::trunc) << bytes;
}

// A bit flipped on disk inside an entry's latents (the part still opens, the value is just wrong) and a NaN written
// into one are errors naming the part and the checksum, not values to train on; the other entries still read.
TEST(CacheFiles, AFlippedBitOrANaNInAStoredEntryIsCaughtByItsChecksum) {
  for (const bool nan : {false, true}) {
    SCOPED_TRACE(nan ? "NaN" : "flipped bit");
    const fs::path dir = fresh_dir(nan ? "nan" : "flipped");
    Sample s = sample_entries(2);
    s.entries[0].latents.fill_(1.25f);  // a pattern to find in the file: 0x3fa00000, repeated
    LatentCacheWriter writer(latents_identity(), writer_options(dir));
    writer.add(s.keys, s.entries);
    writer.commit();
    const std::string part = committed_parts(dir.string(), CacheKind::latents).at(0);
    corrupt_pattern(part, 4, [nan](char* value) {
      if (nan) {
        const float not_a_number = std::nanf("");
        std::memcpy(value, &not_a_number, 4);
      } else {
        value[1] = static_cast<char>(value[1] ^ 0x10);
      }
    });

    const LatentCacheReader reader(dir.string(), latents_identity());
    try {
      reader.read(s.keys[0]);
      FAIL() << "expected an error";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(part), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("checksum"), std::string::npos) << e.what();
    }
    EXPECT_NO_THROW(reader.read(s.keys[1]));
  }
}

// The same for text-encoder outputs: each output of each caption carries its checksum.
TEST(CacheFiles, AFlippedBitInStoredTextEncoderOutputsIsCaughtByItsChecksum) {
  const fs::path dir = fresh_dir("te_flipped");
  const CacheIdentity identity{CacheKind::text_encoder_outputs, "sd", "abcd", "float", "clip_skip=none"};
  {
    TextEncoderCacheWriter writer(identity, writer_options(dir));
    writer.add({"a", "b"}, {{"hidden_state", at::stack({at::full({77, 8}, 1.25f), at::zeros({77, 8})})}});
    writer.commit();
  }
  const std::string part = committed_parts(dir.string(), CacheKind::text_encoder_outputs).at(0);
  corrupt_pattern(part, 9, [](char* byte) { *byte = static_cast<char>(*byte ^ 0x01); });
  const TextEncoderCacheReader reader(dir.string(), identity);
  try {
    reader.read_batch({"a"});
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("checksum"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find(part), std::string::npos) << e.what();
  }
  EXPECT_NO_THROW(reader.read_batch({"b"}));
}

// h5ls shows the layout docs/cache_format.md describes (skipped without hdf5-tools).
TEST(CacheFiles, H5lsShowsTheDocumentedLayout) {
  if (std::system("command -v h5ls > /dev/null 2>&1") != 0) GTEST_SKIP() << "h5ls (hdf5-tools) is not installed";
  const fs::path dir = fresh_dir("h5ls");
  const Sample s = sample_entries(2);
  LatentCacheWriter writer(latents_identity("fp16"), writer_options(dir));
  writer.add(s.keys, s.entries);
  writer.commit();
  const std::string part = committed_parts(dir.string(), CacheKind::latents).at(0);
  FILE* pipe = popen(("h5ls -r " + part).c_str(), "r");
  ASSERT_TRUE(pipe);
  std::string listing;
  char buf[256];
  while (fgets(buf, sizeof(buf), pipe)) {
    for (const char* c = buf; *c; ++c) {
      if (*c != ' ' || listing.empty() || listing.back() != ' ') listing += *c;  // columns padded with spaces: one is enough
    }
  }
  EXPECT_EQ(pclose(pipe), 0);
  for (const char* line : {"/latents/16x16/latents Dataset {1/Inf, 4, 8, 8}", "/latents/32x16/image Dataset {1/Inf}",
                           "/latents/16x16/alpha_mask Dataset {1/Inf, 16, 16}", "/latents/32x16/crop_ltrb Dataset {1/Inf, 4}"}) {
    EXPECT_NE(listing.find(line), std::string::npos) << line << "\nin\n" << listing;
  }
}

}  // namespace
}  // namespace sdt
