#include "src/data/chart.h"

#include <algorithm>

#include <fmt/format.h>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include "src/core/atomic_file.h"
#include "src/core/error.h"

namespace sdt {

void write_line_chart_png(const std::string& path, const std::vector<std::pair<int64_t, double>>& losses,
                          const std::string& title) {
  const int W = 800, H = 450, left = 70, right = 20, top = 40, bottom = 50;
  cv::Mat img(H, W, CV_8UC3, cv::Scalar(255, 255, 255));
  if (!losses.empty()) {
    double lo = losses[0].second, hi = losses[0].second;
    for (const auto& [s, l] : losses) {
      lo = std::min(lo, l);
      hi = std::max(hi, l);
    }
    if (hi - lo < 1e-12) hi = lo + 1e-12;
    const double s0 = static_cast<double>(losses.front().first), s1 = std::max(s0 + 1, static_cast<double>(losses.back().first));
    auto to_px = [&](double step, double loss) {
      return cv::Point(left + static_cast<int>((step - s0) / (s1 - s0) * (W - left - right)),
                       top + static_cast<int>((hi - loss) / (hi - lo) * (H - top - bottom)));
    };
    for (size_t i = 1; i < losses.size(); ++i) {
      cv::line(img, to_px(losses[i - 1].first, losses[i - 1].second), to_px(losses[i].first, losses[i].second),
               cv::Scalar(230, 190, 150), 1, cv::LINE_AA);
    }
    // Moving average over ~2% of the run, as a trend line.
    const size_t window = std::max<size_t>(1, losses.size() / 50);
    double sum = 0;
    std::vector<cv::Point> trend;
    for (size_t i = 0; i < losses.size(); ++i) {
      sum += losses[i].second;
      if (i >= window) sum -= losses[i - window].second;
      trend.push_back(to_px(losses[i].first, sum / static_cast<double>(std::min(i + 1, window))));
    }
    cv::polylines(img, trend, false, cv::Scalar(180, 80, 20), 2, cv::LINE_AA);
    cv::putText(img, fmt::format("{:.4g}", hi), {5, top + 5}, cv::FONT_HERSHEY_SIMPLEX, 0.45, cv::Scalar(0, 0, 0), 1, cv::LINE_AA);
    cv::putText(img, fmt::format("{:.4g}", lo), {5, H - bottom}, cv::FONT_HERSHEY_SIMPLEX, 0.45, cv::Scalar(0, 0, 0), 1, cv::LINE_AA);
    cv::putText(img, fmt::format("step {}", losses.front().first), {left, H - 20}, cv::FONT_HERSHEY_SIMPLEX, 0.45,
                cv::Scalar(0, 0, 0), 1, cv::LINE_AA);
    cv::putText(img, fmt::format("step {}", losses.back().first), {W - right - 90, H - 20}, cv::FONT_HERSHEY_SIMPLEX, 0.45,
                cv::Scalar(0, 0, 0), 1, cv::LINE_AA);
  }
  cv::rectangle(img, {left, top}, {W - right, H - bottom}, cv::Scalar(120, 120, 120), 1);
  cv::putText(img, title, {left, 25}, cv::FONT_HERSHEY_SIMPLEX, 0.6, cv::Scalar(0, 0, 0), 1, cv::LINE_AA);
  std::vector<uchar> png;
  if (!cv::imencode(".png", img, png)) fail(path, "OpenCV cannot encode the chart as PNG");
  write_file_atomically(path, std::string_view(reinterpret_cast<const char*>(png.data()), png.size()));
}

}  // namespace sdt
