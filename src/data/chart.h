// A line chart of (step, value) points with a moving-average trend, written as PNG (OpenCV's drawing): the loss curve
// a training run writes beside its weights.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace sdt {

// 800x450 pixels: the points as a thin line, their moving average over ~2% of them as a thick one, the extremes and
// the first and last step as labels. sdt::Error naming `path` when it cannot be written.
void write_line_chart_png(const std::string& path, const std::vector<std::pair<int64_t, double>>& losses,
                          const std::string& title);

}  // namespace sdt
