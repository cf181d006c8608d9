// What the `sdt train` benchmarks share: a folder of images to train on, and a figure's worst value over the ranks.
#pragma once

#include <mpi.h>

#include <filesystem>
#include <fstream>
#include <random>

#include <fmt/format.h>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include "cluster/world.h"

namespace sdt::bench {

// 12 images of `size` pixels (a flat colour and a white square) with captions, in `dir`/1_bench (one repeat).
inline void make_images(const std::filesystem::path& dir, int size = 64) {
  std::filesystem::create_directories(dir / "1_bench");
  std::mt19937 rng(0);
  for (int i = 0; i < 12; ++i) {
    cv::Mat m(size, size, CV_8UC3, cv::Scalar(rng() % 256, rng() % 256, rng() % 256));
    cv::rectangle(m, cv::Rect(rng() % (size * 5 / 8), rng() % (size * 5 / 8), size * 5 / 16, size * 5 / 16),
                  cv::Scalar(250, 250, 250), cv::FILLED);
    cv::imwrite((dir / "1_bench" / fmt::format("{:02d}.png", i)).string(), m);
    std::ofstream(dir / "1_bench" / fmt::format("{:02d}.txt", i)) << "a square, number " << i;
  }
}

inline double max_over_ranks(double value, const World& world) {
  if (world.size > 1) MPI_Allreduce(MPI_IN_PLACE, &value, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  return value;
}

}  // namespace sdt::bench
