// kohya's --sample_prompts files: a .txt of one prompt per line with options
// (`a cat --n blurry --w 512 --h 768 --d 42 --s 28 --l 7.0 --ss euler_a`), a .toml with [prompt] and
// [[prompt.subset]] tables, or a .json list of objects or strings.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace sdt {

struct SamplePrompt {
  int index = 0;  // kohya's "enum": position in the file, used in image names
  std::string prompt;
  std::string negative_prompt;
  std::optional<int64_t> width, height, seed, steps;
  std::optional<double> scale, guidance_scale;
  std::optional<std::string> sampler;
};

// One line in kohya's syntax (line_to_prompt_dict). Like kohya, every " --" piece is matched,
// the prompt itself included, and a piece that does not parse is ignored.
SamplePrompt parse_prompt_line(const std::string& line);

// Throws sdt::Error naming the file for an unknown extension or a malformed file.
std::vector<SamplePrompt> load_sample_prompts(const std::string& path);

// kohya's file name for a sample image: "[<output_name>_]<e000003 | 000120>_<index>_<YYYYmmddHHMMSS>[_<seed>].png",
// with the epoch when sampling at an epoch end, else the step.
std::string sample_image_name(const std::optional<std::string>& output_name, std::optional<int64_t> epoch, int64_t step,
                              const SamplePrompt& prompt, const std::string& timestamp);

}  // namespace sdt
