#include "src/train/metrics.h"

#include <unistd.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cerrno>
#include <cstring>
#include <filesystem>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "src/core/error.h"

namespace sdt {
namespace {

const std::array<uint32_t, 256>& crc32c_table() {
  static const std::array<uint32_t, 256> table = [] {
    std::array<uint32_t, 256> t{};
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;  // reflected Castagnoli polynomial
      t[i] = c;
    }
    return t;
  }();
  return table;
}

uint32_t masked_crc(const void* data, size_t size) {
  const uint32_t c = crc32c(data, size);
  return ((c >> 15) | (c << 17)) + 0xa282ead8u;
}

// Minimal protobuf encoding for the few Event fields we write.
void put_varint(std::string& out, uint64_t v) {
  while (v >= 0x80) {
    out.push_back(static_cast<char>((v & 0x7F) | 0x80));
    v >>= 7;
  }
  out.push_back(static_cast<char>(v));
}
void put_key(std::string& out, int field, int wire_type) { put_varint(out, static_cast<uint64_t>(field << 3 | wire_type)); }
void put_bytes(std::string& out, int field, const std::string& bytes) {
  put_key(out, field, 2);
  put_varint(out, bytes.size());
  out += bytes;
}
template <typename T>
void put_fixed(std::string& out, int field, T value) {
  put_key(out, field, sizeof(T) == 8 ? 1 : 5);
  char raw[sizeof(T)];
  std::memcpy(raw, &value, sizeof(T));
  out.append(raw, sizeof(T));
}

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

// Event { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5; }
std::string event_header(int64_t step) {
  std::string e;
  put_fixed(e, 1, now_seconds());
  put_key(e, 2, 0);
  put_varint(e, static_cast<uint64_t>(step));
  return e;
}

std::string format_duration(double seconds) {
  const auto s = static_cast<int64_t>(seconds);
  return s >= 3600 ? fmt::format("{}:{:02d}:{:02d}", s / 3600, s / 60 % 60, s % 60) : fmt::format("{:02d}:{:02d}", s / 60, s % 60);
}

}  // namespace

uint32_t crc32c(const void* data, size_t size) {
  const auto& table = crc32c_table();
  uint32_t c = 0xFFFFFFFFu;
  const auto* p = static_cast<const uint8_t*>(data);
  for (size_t i = 0; i < size; ++i) c = table[(c ^ p[i]) & 0xFF] ^ (c >> 8);
  return c ^ 0xFFFFFFFFu;
}

TensorBoardWriter::TensorBoardWriter(const std::string& dir) {
  std::filesystem::create_directories(dir);
  char host[256] = "localhost";
  ::gethostname(host, sizeof(host) - 1);
  path_ = (std::filesystem::path(dir) / fmt::format("events.out.tfevents.{}.{}", static_cast<int64_t>(now_seconds()), host)).string();
  out_.open(path_, std::ios::binary);
  if (!out_) fail(path_, "cannot create the TensorBoard event file");
  std::string e = event_header(0);
  put_bytes(e, 3, "brain.Event:2");
  write_record(e);
}

void TensorBoardWriter::write_record(const std::string& event) {
  const uint64_t length = event.size();
  const uint32_t length_crc = masked_crc(&length, sizeof(length));
  const uint32_t data_crc = masked_crc(event.data(), event.size());
  out_.write(reinterpret_cast<const char*>(&length), sizeof(length));
  out_.write(reinterpret_cast<const char*>(&length_crc), sizeof(length_crc));
  out_.write(event.data(), static_cast<std::streamsize>(event.size()));
  out_.write(reinterpret_cast<const char*>(&data_crc), sizeof(data_crc));
  if (!out_) fail(path_, "cannot write the TensorBoard event file: {}", std::strerror(errno));
}

void TensorBoardWriter::add_scalar(const std::string& tag, float value, int64_t step) {
  // Summary { repeated Value value = 1; }  Value { string tag = 1; float simple_value = 2; }
  std::string value_msg;
  put_bytes(value_msg, 1, tag);
  put_fixed(value_msg, 2, value);
  std::string summary;
  put_bytes(summary, 1, value_msg);
  std::string e = event_header(step);
  put_bytes(e, 5, summary);
  write_record(e);
}

void TensorBoardWriter::flush() {
  out_.flush();
  if (!out_) fail(path_, "cannot write the TensorBoard event file: {}", std::strerror(errno));
}

JsonlWriter::JsonlWriter(const std::string& path) : path_(path), out_(path, std::ios::app) {
  if (!out_) fail(path, "cannot open the metrics log: {}", std::strerror(errno));
}

void JsonlWriter::write(int64_t step, int64_t epoch, const std::map<std::string, double>& metrics) {
  nlohmann::ordered_json j;
  j["step"] = step;
  j["epoch"] = epoch;
  j["time"] = now_seconds();
  for (const auto& [k, v] : metrics) j[k] = v;
  out_ << j.dump() << '\n';
  out_.flush();
  if (!out_) fail(path_, "cannot write the metrics log: {}", std::strerror(errno));
}

ProgressBar::ProgressBar(int64_t total, int64_t start) : total_(total), start_(start), began_(std::chrono::steady_clock::now()) {}

void ProgressBar::update(int64_t step, double average_loss, double lr) {
  const auto now = std::chrono::steady_clock::now();
  if (step < total_ && now - last_draw_ < std::chrono::milliseconds(200)) return;
  last_draw_ = now;
  const double elapsed = std::chrono::duration<double>(now - began_).count();
  const int64_t done = step - start_;
  const double rate = done > 0 ? done / elapsed : 0.0;
  const double eta = rate > 0 ? (total_ - step) / rate : 0.0;
  const int width = 20;
  const int filled = total_ > 0 ? static_cast<int>(width * step / total_) : 0;
  const std::string speed = rate >= 1 || rate == 0 ? fmt::format("{:.2f}it/s", rate) : fmt::format("{:.2f}s/it", 1 / rate);
  fmt::print(stderr, "\rsteps: {:3d}%|{}{}| {}/{} [{}<{}, {}, avr_loss={:.4g}, lr={:.2e}]", total_ > 0 ? 100 * step / total_ : 0,
             std::string(static_cast<size_t>(filled), '#'), std::string(static_cast<size_t>(width - filled), ' '), step, total_,
             format_duration(elapsed), format_duration(eta), speed, average_loss, lr);
}

void ProgressBar::finish() { fmt::print(stderr, "\n"); }

}  // namespace sdt
