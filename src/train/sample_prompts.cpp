#include "src/train/sample_prompts.h"

#include <algorithm>
#include <fstream>
#include <regex>
#include <sstream>

#include <nlohmann/json.hpp>
#include <toml.hpp>

#include "src/core/error.h"

namespace sdt {
namespace {

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(path, "cannot read the sample prompts file");
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

std::string strip(const std::string& s) {
  const char* ws = " \t\r\n\v\f";
  size_t b = s.find_first_not_of(ws);
  return b == std::string::npos ? "" : s.substr(b, s.find_last_not_of(ws) - b + 1);
}

void apply_json(SamplePrompt& p, const nlohmann::json& j, const std::string& where) {
  try {
    for (const auto& [key, v] : j.items()) {
      if (key == "prompt") p.prompt = v.get<std::string>();
      else if (key == "negative_prompt") p.negative_prompt = v.get<std::string>();
      else if (key == "width") p.width = v.get<int64_t>();
      else if (key == "height") p.height = v.get<int64_t>();
      else if (key == "seed") p.seed = v.get<int64_t>();
      else if (key == "sample_steps") p.steps = std::clamp<int64_t>(v.get<int64_t>(), 1, 1000);
      else if (key == "scale") p.scale = v.get<double>();
      else if (key == "guidance_scale") p.guidance_scale = v.get<double>();
      else if (key == "sample_sampler") p.sampler = v.get<std::string>();
    }
  } catch (const nlohmann::json::exception& e) {
    fail(where, "a value has the wrong type: {}", e.what());
  }
}

nlohmann::json toml_to_json(const toml::value& v) {
  if (v.is_table()) {
    nlohmann::json j = nlohmann::json::object();
    for (const auto& [k, e] : v.as_table()) j[k] = toml_to_json(e);
    return j;
  }
  if (v.is_array()) {
    nlohmann::json j = nlohmann::json::array();
    for (const auto& e : v.as_array()) j.push_back(toml_to_json(e));
    return j;
  }
  if (v.is_string()) return v.as_string().str;
  if (v.is_integer()) return v.as_integer();
  if (v.is_floating()) return v.as_floating();
  if (v.is_boolean()) return v.as_boolean();
  return nullptr;
}

// Python's float(): the whole string must be the number ("1.2.3" is an error, not 1.2).
double python_float(const std::string& text) {
  size_t used = 0;
  double v = std::stod(text, &used);
  if (used != text.size()) throw std::invalid_argument(text);
  return v;
}

}  // namespace

SamplePrompt parse_prompt_line(const std::string& line) {
  SamplePrompt p;
  std::vector<std::string> pieces;
  size_t start = 0;
  while (true) {
    size_t pos = line.find(" --", start);
    pieces.push_back(line.substr(start, pos == std::string::npos ? std::string::npos : pos - start));
    if (pos == std::string::npos) break;
    start = pos + 3;
  }
  p.prompt = pieces[0];
  // Python's re.match: anchored at the start, not at the end; IGNORECASE.
  static const std::regex w(R"(^w (\d+))", std::regex::icase), h(R"(^h (\d+))", std::regex::icase),
      d(R"(^d (\d+))", std::regex::icase), s(R"(^s (\d+))", std::regex::icase), l(R"(^l ([\d\.]+))", std::regex::icase),
      g(R"(^g ([\d\.]+))", std::regex::icase), n(R"(^n (.+))", std::regex::icase), ss(R"(^ss (.+))", std::regex::icase);
  for (const auto& piece : pieces) {
    std::smatch m;
    try {
      if (std::regex_search(piece, m, w)) p.width = std::stoll(m[1]);
      else if (std::regex_search(piece, m, h)) p.height = std::stoll(m[1]);
      else if (std::regex_search(piece, m, d)) p.seed = std::stoll(m[1]);
      else if (std::regex_search(piece, m, s)) p.steps = std::clamp<int64_t>(std::stoll(m[1]), 1, 1000);
      else if (std::regex_search(piece, m, l)) p.scale = python_float(m[1]);
      else if (std::regex_search(piece, m, g)) p.guidance_scale = python_float(m[1]);
      else if (std::regex_search(piece, m, n)) p.negative_prompt = m[1];
      else if (std::regex_search(piece, m, ss)) p.sampler = m[1];
    } catch (const std::exception&) {
      // kohya logs and ignores a piece that does not convert ("--l 1.2.3").
    }
  }
  return p;
}

std::vector<SamplePrompt> load_sample_prompts(const std::string& path) {
  std::vector<SamplePrompt> prompts;
  if (path.ends_with(".txt")) {
    std::istringstream in(read_text(path));
    std::string line;
    while (std::getline(in, line)) {
      // kohya: skip blank lines and lines that start with '#'
      if (strip(line).empty() || line[0] == '#') continue;
      prompts.push_back(parse_prompt_line(strip(line)));
    }
  } else if (path.ends_with(".json")) {
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(read_text(path));
    } catch (const nlohmann::json::exception& e) {
      fail(path, "not valid JSON: {}", e.what());
    }
    if (!j.is_array()) fail(path, "expected a JSON list of prompts (strings or objects)");
    for (const auto& e : j) {
      if (e.is_string()) {
        prompts.push_back(parse_prompt_line(e.get<std::string>()));
      } else {
        SamplePrompt p;
        apply_json(p, e, path);
        prompts.push_back(p);
      }
    }
  } else if (path.ends_with(".toml")) {
    toml::value root;
    try {
      root = toml::parse(path);
    } catch (const std::exception& e) {
      fail(path, "not valid TOML: {}", e.what());
    }
    // kohya: dict(**data["prompt"], **subset) for each [[prompt.subset]]
    nlohmann::json all = toml_to_json(root);
    if (!all.contains("prompt") || !all["prompt"].contains("subset")) fail(path, "expected [prompt] with [[prompt.subset]] tables");
    nlohmann::json base = all["prompt"];
    base.erase("subset");
    for (const auto& subset : all["prompt"]["subset"]) {
      SamplePrompt p;
      apply_json(p, base, path);
      apply_json(p, subset, path);
      prompts.push_back(p);
    }
  } else {
    fail(path, "sample prompts must be a .txt, .toml or .json file");
  }
  for (size_t i = 0; i < prompts.size(); ++i) prompts[i].index = static_cast<int>(i);
  return prompts;
}

std::string sample_image_name(const std::optional<std::string>& output_name, std::optional<int64_t> epoch, int64_t step,
                              const SamplePrompt& prompt, const std::string& timestamp) {
  const std::string number = epoch ? fmt::format("e{:06d}", *epoch) : fmt::format("{:06d}", step);
  const std::string seed = prompt.seed ? fmt::format("_{}", *prompt.seed) : "";
  return fmt::format("{}{}_{:02d}_{}{}.png", output_name ? *output_name + "_" : "", number, prompt.index, timestamp, seed);
}

}  // namespace sdt
