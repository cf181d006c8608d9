// What a user watches during training: a progress line on rank 0, a JSONL log of every step,
// TensorBoard event files written natively (no TensorFlow), and a loss-curve PNG at the end.
#pragma once

#include <chrono>
#include <cstdint>
#include <fstream>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace sdt {

// CRC-32C (Castagnoli), the checksum of TFRecord framing.
uint32_t crc32c(const void* data, size_t size);

// TensorBoard's event file: TFRecords (length, masked CRC of the length, an Event protobuf, masked
// CRC of the data) in "<dir>/events.out.tfevents.<time>.<host>". The first record carries the file
// version; each scalar is an Event with wall time, step and a one-value Summary.
class TensorBoardWriter {
 public:
  explicit TensorBoardWriter(const std::string& dir);
  void add_scalar(const std::string& tag, float value, int64_t step);
  void flush();
  const std::string& path() const { return path_; }

 private:
  void write_record(const std::string& event);
  std::string path_;
  std::ofstream out_;
};

// One JSON object per line: {"step": .., "epoch": .., "<metric>": ..}.
class JsonlWriter {
 public:
  explicit JsonlWriter(const std::string& path);
  void write(int64_t step, int64_t epoch, const std::map<std::string, double>& metrics);

 private:
  std::string path_;
  std::ofstream out_;
};

// "steps:  12%|###       | 120/1000 [00:42<05:10, 2.84it/s, avr_loss=0.123, lr=1.0e-04]" on stderr,
// redrawn in place, at most a few times per second.
class ProgressBar {
 public:
  explicit ProgressBar(int64_t total, int64_t start = 0);
  void update(int64_t step, double average_loss, double lr);
  void finish();

 private:
  int64_t total_;
  int64_t start_;
  std::chrono::steady_clock::time_point began_;
  std::chrono::steady_clock::time_point last_draw_{};
};


}  // namespace sdt
