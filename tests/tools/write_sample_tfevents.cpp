// Writes a TensorBoard event file with our writer for tests/check_tfevents_with_tensorboard.py:
// tag "loss" = 1 / step for steps 1..5, tag "lr" = 0.001.
#include <cstdio>

#include "src/train/metrics.h"

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s OUT_DIR\n", argv[0]);
    return 2;
  }
  sdt::TensorBoardWriter tb(argv[1]);
  for (int step = 1; step <= 5; ++step) {
    tb.add_scalar("loss", 1.0f / static_cast<float>(step), step);
    tb.add_scalar("lr", 0.001f, step);
  }
  tb.flush();
  return 0;
}
