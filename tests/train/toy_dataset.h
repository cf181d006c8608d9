// The trainer tests' dataset: two flat-colour images with a bright square at different places, `size` x `size`,
// captioned by colour, in a DreamBooth folder `<repeats>_toy` under `root`/train. Returns `root`/train.
#pragma once

#include <filesystem>
#include <fstream>
#include <string>
#include <utility>

#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

namespace sdt::testing_support {

inline std::filesystem::path make_toy_dataset(const std::filesystem::path& root, int repeats, int size = 32) {
  const std::filesystem::path dir = root / "train" / (std::to_string(repeats) + "_toy");
  std::filesystem::create_directories(dir);
  const std::pair<const char*, cv::Scalar> images[] = {{"red", cv::Scalar(40, 40, 220)}, {"blue", cv::Scalar(220, 60, 40)}};
  int i = 0;
  for (const auto& [name, colour] : images) {
    cv::Mat m(size, size, CV_8UC3, colour);
    cv::rectangle(m, cv::Rect((4 + 14 * i) * size / 32, 8 * size / 32, 10 * size / 32, 10 * size / 32), cv::Scalar(250, 250, 250), cv::FILLED);
    cv::imwrite((dir / (std::string(name) + ".png")).string(), m);
    std::ofstream(dir / (std::string(name) + ".txt")) << "a " << name << " square";
    ++i;
  }
  return root / "train";
}

}  // namespace sdt::testing_support
