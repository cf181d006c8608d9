// safetensors: round trips for every dtype, the reference package's files, each corruption class
// with its own message, and a writer that never leaves a partial file under the final name.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "src/core/error.h"
#include "src/core/safetensors.h"

namespace sdt::safetensors {
namespace {

namespace fs = std::filesystem;

std::vector<uint8_t> pattern(size_t n, uint8_t seed) {
  std::vector<uint8_t> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = static_cast<uint8_t>(seed + 31 * i);
  return v;
}

std::string temp_path(const std::string& name) { return testing::TempDir() + name; }

std::vector<uint8_t> read_all(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), {}};
}

void write_all(const std::string& path, const std::vector<uint8_t>& bytes) {
  std::ofstream(path, std::ios::binary).write(reinterpret_cast<const char*>(bytes.data()), bytes.size());
}

TEST(Safetensors, RoundTripOfEveryDtypeWithMetadata) {
  const std::string path = temp_path("all_dtypes.safetensors");
  const Metadata metadata = {{"ss_network_dim", "16"}, {"ss_note", "caf\xc3\xa9 \"quoted\"\n"}, {"empty", ""}};
  std::vector<TensorSpec> specs;
  std::vector<std::vector<uint8_t>> data;
  for (DType d : all_dtypes()) {
    specs.push_back({"t_" + std::string(dtype_name(d)), d, {3, 5}});
    data.push_back(pattern(15 * dtype_size(d), static_cast<uint8_t>(d)));
  }
  specs.push_back({"scalar", DType::F32, {}});
  data.push_back(pattern(4, 7));
  specs.push_back({"empty", DType::F16, {0, 4}});
  data.push_back({});
  {
    Writer w(path, specs, metadata);
    for (const auto& bytes : data) {
      // Appending in two pieces exercises the streaming path.
      size_t half = bytes.size() / 2;
      w.append(bytes.data(), half);
      w.append(bytes.data() + half, bytes.size() - half);
    }
    w.commit();
  }
  File f(path);
  EXPECT_EQ(f.metadata(), metadata);
  ASSERT_EQ(f.tensors().size(), specs.size());
  for (size_t i = 0; i < specs.size(); ++i) {
    const TensorInfo& t = f.info(specs[i].name);
    EXPECT_EQ(t.dtype, specs[i].dtype);
    EXPECT_EQ(t.shape, specs[i].shape);
    auto bytes = f.bytes(specs[i].name);
    ASSERT_EQ(bytes.size(), data[i].size()) << specs[i].name;
    EXPECT_EQ(std::memcmp(bytes.data(), data[i].data(), bytes.size()), 0) << specs[i].name;
  }
  // The data section starts 8-byte aligned, as the reference writer leaves it.
  uint64_t header_len = 0;
  std::memcpy(&header_len, read_all(path).data(), 8);
  EXPECT_EQ(header_len % 8, 0u);
}

// tests/fixtures/safetensors/gen_fixtures.py wrote this file with the Python `safetensors`
// package and, independently of it, the raw little-endian bytes each tensor must hold.
TEST(Safetensors, ReadsTheFileWrittenByThePythonPackage) {
  File f(SDT_FIXTURES "/safetensors/python_all_dtypes.safetensors");
  std::ifstream in(SDT_FIXTURES "/safetensors/python_all_dtypes.expected.json");
  nlohmann::json expected = nlohmann::json::parse(in);
  EXPECT_EQ(f.metadata(), expected["metadata"].get<Metadata>());
  ASSERT_EQ(f.tensors().size(), expected["tensors"].size());
  for (const auto& [name, e] : expected["tensors"].items()) {
    const TensorInfo& t = f.info(name);
    EXPECT_EQ(dtype_name(t.dtype), e["dtype"].get<std::string>()) << name;
    EXPECT_EQ(t.shape, e["shape"].get<std::vector<int64_t>>()) << name;
    const std::string hex = e["hex"].get<std::string>();
    auto bytes = f.bytes(name);
    ASSERT_EQ(bytes.size() * 2, hex.size()) << name;
    for (size_t i = 0; i < bytes.size(); ++i) {
      ASSERT_EQ(static_cast<int>(bytes[i]), std::stoi(hex.substr(2 * i, 2), nullptr, 16)) << name << " byte " << i;
    }
  }
  std::vector<DType> seen;
  for (const auto& t : f.tensors()) seen.push_back(t.dtype);
  for (DType d : {DType::F64, DType::F32, DType::F16, DType::BF16, DType::F8_E4M3, DType::F8_E5M2, DType::I64, DType::I32,
                  DType::I16, DType::I8, DType::U8, DType::BOOL}) {
    EXPECT_NE(std::find(seen.begin(), seen.end(), d), seen.end()) << dtype_name(d);
  }
}

// ------------------------------------------------------------------------------ corruption
// A file with a hand-written header: 8-byte length, header text, data bytes.
std::vector<uint8_t> file_with_header(const std::string& header, size_t data_bytes, std::optional<uint64_t> length = {}) {
  std::vector<uint8_t> out(8);
  uint64_t n = length.value_or(header.size());
  std::memcpy(out.data(), &n, 8);
  out.insert(out.end(), header.begin(), header.end());
  out.resize(out.size() + data_bytes, 0xAB);
  return out;
}

// ctest runs tests in parallel processes: each test gets its own file name.
std::string error_for(const std::vector<uint8_t>& bytes) {
  const std::string path = temp_path(std::string(testing::UnitTest::GetInstance()->current_test_info()->name()) + "_bad.safetensors");
  write_all(path, bytes);
  try {
    File f(path);
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

void expect_error(const std::vector<uint8_t>& bytes, const std::vector<std::string>& fragments) {
  std::string e = error_for(bytes);
  EXPECT_NE(e.find("bad.safetensors"), std::string::npos) << e;
  for (const auto& f : fragments) EXPECT_NE(e.find(f), std::string::npos) << "missing '" << f << "' in: " << e;
}

const std::string kGood = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"U8","shape":[3],"data_offsets":[8,11]}})";

TEST(SafetensorsCorruption, WellFormedBaselineReads) { EXPECT_EQ(error_for(file_with_header(kGood, 11)), "(no error)"); }

TEST(SafetensorsCorruption, FileShorterThanTheLengthPrefix) { expect_error({1, 2, 3}, {"3 bytes", "too short"}); }

TEST(SafetensorsCorruption, HeaderLengthBeyondFileSize) {
  expect_error(file_with_header(kGood, 11, 5000), {"header length 5000", "past the end"});
}

TEST(SafetensorsCorruption, HeaderLengthAboveTheLimit) {
  expect_error(file_with_header(kGood, 11, 200'000'000), {"200000000", "limit"});
}

TEST(SafetensorsCorruption, HeaderIsNotJson) {
  expect_error(file_with_header(R"({"a": {"dtype": "F32",)", 0), {"not valid JSON"});
  expect_error(file_with_header("\x01garbage", 0), {"does not start with '{'"});
}

// Found by the fuzzer: nlohmann throws out_of_range, not parse_error, for a number that overflows.
TEST(SafetensorsCorruption, NumberTooLargeForJson) {
  expect_error(file_with_header(R"({"a":{"dtype":"F32","shape":[1e999],"data_offsets":[0,4]}})", 4), {"cannot be read"});
}

TEST(SafetensorsCorruption, OffsetsOutOfBounds) {
  expect_error(file_with_header(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", 8),
               {"tensor 'a'", "run past the data section of 8 bytes"});
}

TEST(SafetensorsCorruption, OverlappingOffsets) {
  expect_error(file_with_header(
                   R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", 12),
               {"tensor 'b'", "overlap tensor 'a'"});
}

TEST(SafetensorsCorruption, GapBetweenTensors) {
  expect_error(file_with_header(
                   R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}})", 12),
               {"tensor 'b'", "4 unused bytes"});
}

TEST(SafetensorsCorruption, TrailingBytesAfterTheLastTensor) {
  expect_error(file_with_header(kGood, 20), {"data section is 20 bytes", "cover 11"});
}

TEST(SafetensorsCorruption, DtypeTimesShapeDisagreesWithByteLength) {
  expect_error(file_with_header(R"({"w":{"dtype":"BF16","shape":[3,2],"data_offsets":[0,10]}})", 10),
               {"tensor 'w'", "needs 12 bytes", "span 10"});
}

TEST(SafetensorsCorruption, DuplicateTensorName) {
  expect_error(file_with_header(
                   R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}})", 2),
               {"tensor 'a'", "twice"});
}

TEST(SafetensorsCorruption, UnknownDtype) {
  expect_error(file_with_header(R"({"a":{"dtype":"F128","shape":[1],"data_offsets":[0,16]}})", 16),
               {"tensor 'a'", "unknown dtype 'F128'"});
}

TEST(SafetensorsCorruption, BadShapeOffsetsAndFields) {
  expect_error(file_with_header(R"({"a":{"dtype":"U8","shape":[-1],"data_offsets":[0,1]}})", 1), {"tensor 'a'", "non-negative"});
  expect_error(file_with_header(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[1,0]}})", 1), {"tensor 'a'", "end before"});
  expect_error(file_with_header(R"({"a":{"dtype":"U8","shape":[1]}})", 0), {"tensor 'a'", "data_offsets"});
  expect_error(file_with_header(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"x":1}})", 1), {"unknown field 'x'"});
}

TEST(SafetensorsCorruption, MetadataValuesMustBeStrings) {
  expect_error(file_with_header(R"({"__metadata__":{"ss_network_dim":16}})", 0), {"__metadata__", "'ss_network_dim'", "string"});
}

TEST(SafetensorsCorruption, TruncatedFileIsReportedAsSuch) {
  auto bytes = file_with_header(kGood, 11);
  bytes.resize(bytes.size() - 4);
  expect_error(bytes, {"truncated"});
}

TEST(Safetensors, MissingTensorNamesTheNearest) {
  write_all(temp_path("good.safetensors"), file_with_header(
      R"({"lora_unet_down.alpha":{"dtype":"F32","shape":[],"data_offsets":[0,4]}})", 4));
  File f(temp_path("good.safetensors"));
  try {
    f.info("lora_unet_down.alhpa");
    FAIL() << "no error";
  } catch (const Error& e) {
    std::string m = e.what();
    EXPECT_NE(m.find("'lora_unet_down.alhpa'"), std::string::npos) << m;
    EXPECT_NE(m.find("did you mean 'lora_unet_down.alpha'"), std::string::npos) << m;
  }
}

TEST(Safetensors, MissingFileNamesThePath) {
  try {
    File f(temp_path("nope.safetensors"));
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("nope.safetensors: cannot open"), std::string::npos) << e.what();
  }
}

// ------------------------------------------------------------------------------ atomic writes
TEST(SafetensorsWriter, AFailedWriteLeavesTheExistingFileAndNoTemporary) {
  const std::string path = temp_path("keep.safetensors");
  const auto original = file_with_header(kGood, 11);
  write_all(path, original);
  {
    Writer w(path, {{"x", DType::F32, {4}}}, {});
    float half[2] = {1, 2};
    w.append(half, sizeof(half));
    EXPECT_THROW(w.commit(), Error);  // only half the data
  }
  EXPECT_EQ(read_all(path), original);
  for (const auto& entry : fs::directory_iterator(testing::TempDir())) {
    EXPECT_EQ(entry.path().filename().string().find("keep.safetensors.tmp"), std::string::npos) << entry.path();
  }
}

TEST(SafetensorsWriter, RefusesMoreDataThanDeclaredAndDuplicateNames) {
  const std::string path = temp_path("over.safetensors");
  Writer w(path, {{"x", DType::U8, {2}}}, {});
  uint8_t three[3] = {1, 2, 3};
  EXPECT_THROW(w.append(three, 3), Error);
  EXPECT_THROW(Writer(path, {{"y", DType::U8, {1}}, {"y", DType::U8, {1}}}, {}), Error);
  EXPECT_FALSE(fs::exists(path));
}

}  // namespace
}  // namespace sdt::safetensors
