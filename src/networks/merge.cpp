#include "src/networks/merge.h"

#include <cmath>
#include <map>
#include <set>

#include <spdlog/spdlog.h>

#include "src/core/error.h"
#include "src/networks/lora.h"
#include "src/networks/lora_metadata.h"

namespace sdt {

namespace nn = torch::nn;

namespace {

void check_ratios(const std::vector<std::string>& paths, const std::vector<double>& ratios) {
  if (paths.empty()) fail("merge-lora", "no LoRA files given");
  if (paths.size() != ratios.size()) {
    fail("merge-lora", "{} LoRA files but {} ratios: give one ratio per file", paths.size(), ratios.size());
  }
}

std::string file_tensor(const std::string& path, const std::string& key) { return path + ": tensor '" + key + "'"; }

}  // namespace

std::vector<std::string> merge_loras_into_targets(const std::vector<NetworkTarget>& targets, const std::vector<std::string>& lora_paths,
                                                  const std::vector<double>& ratios, at::ScalarType merge_dtype) {
  check_ratios(lora_paths, ratios);
  std::map<std::string, std::shared_ptr<nn::Module>> name_to_module;
  for (const NetworkTarget& t : targets) {
    name_to_module.emplace(t.lora_name, t.module);
    if (!t.other_name.empty()) name_to_module.emplace(t.other_name, t.module);
  }

  torch::NoGradGuard no_grad;
  std::vector<std::string> unmatched;
  for (size_t f = 0; f < lora_paths.size(); ++f) {
    const std::string& path = lora_paths[f];
    const double ratio = ratios[f];
    safetensors::File file(path);
    for (const auto& info : file.tensors()) {
      const std::string& key = info.name;
      const auto down_at = key.find("lora_down");
      if (down_at == std::string::npos) continue;
      const std::string up_key = key.substr(0, down_at) + "lora_up" + key.substr(down_at + 9);
      const std::string alpha_key = key.substr(0, down_at) + "alpha";
      const std::string module_name = key.substr(0, key.rfind('.', key.rfind('.') - 1));
      auto it = name_to_module.find(module_name);
      if (it == name_to_module.end()) {
        spdlog::info("no module found for LoRA weight: {}", key);
        unmatched.push_back(key);
        continue;
      }
      if (!file.contains(up_key)) fail(file_tensor(path, up_key), "missing: every lora_down needs its lora_up");
      at::Tensor down = load_tensor(file, key, merge_dtype), up = load_tensor(file, up_key, merge_dtype);
      const int64_t dim = down.size(0);
      at::Tensor scale = file.contains(alpha_key) ? load_tensor(file, alpha_key, merge_dtype) / dim
                                                  : at::scalar_tensor(1.0, down.options());

      at::Tensor weight = it->second->named_parameters(false)["weight"];
      at::Tensor delta;
      if (weight.dim() == 2) {
        if (up.dim() == 4) {  // a conv-shaped LoRA on a linear projection (SD1 LoRA on SD2's proj_in / proj_out)
          up = up.flatten(1);
          down = down.flatten(1);
        }
        delta = at::matmul(up, down);
      } else if (down.size(2) == 1 && down.size(3) == 1) {
        delta = at::matmul(up.flatten(1), down.flatten(1)).unsqueeze(2).unsqueeze(3);
      } else {
        delta = at::conv2d(down.permute({1, 0, 2, 3}), up).permute({1, 0, 2, 3});
      }
      if (delta.sizes() != weight.sizes()) {
        fail(file_tensor(path, key), "gives a delta of shape [{}] for a weight of shape [{}] (LoRA for another model?)",
             fmt::join(delta.sizes(), ", "), fmt::join(weight.sizes(), ", "));
      }
      // kohya's order of operations: W + ratio * dW * scale.
      weight.copy_(weight.to(merge_dtype) + delta * ratio * scale);
    }
  }
  return unmatched;
}

MergedLoRA merge_lora_files(const std::vector<std::string>& lora_paths, const std::vector<double>& ratios,
                            at::ScalarType merge_dtype, bool concat, bool shuffle, std::optional<at::Generator> generator) {
  check_ratios(lora_paths, ratios);
  std::map<std::string, double> base_alphas;
  std::map<std::string, int64_t> base_dims;
  std::vector<std::string> module_order;
  std::map<std::string, at::Tensor> merged;
  std::vector<std::string> key_order;
  std::optional<std::string> v2, base_model;

  for (size_t f = 0; f < lora_paths.size(); ++f) {
    const std::string& path = lora_paths[f];
    safetensors::File file(path);
    if (!v2 && file.metadata().contains("ss_v2")) v2 = file.metadata().at("ss_v2");
    if (!base_model && file.metadata().contains("ss_base_model_version")) {
      base_model = file.metadata().at("ss_base_model_version");
    }

    std::map<std::string, double> alphas;
    std::map<std::string, int64_t> dims;
    for (const auto& info : file.tensors()) {
      const std::string& key = info.name;
      if (key.find("alpha") != std::string::npos) {
        const std::string module = key.substr(0, key.rfind(".alpha"));
        alphas[module] = load_tensor(file, key, merge_dtype).to(at::kDouble).item<double>();
        base_alphas.emplace(module, alphas[module]);
      } else if (key.find("lora_down") != std::string::npos) {
        const std::string module = key.substr(0, key.rfind(".lora_down"));
        dims[module] = info.shape.at(0);
        if (base_dims.emplace(module, dims[module]).second) module_order.push_back(module);
      }
    }
    for (const auto& [module, dim] : dims) {
      if (alphas.contains(module)) continue;
      alphas[module] = static_cast<double>(dim);
      base_alphas.emplace(module, alphas[module]);
    }

    for (const auto& info : file.tensors()) {
      const std::string& key = info.name;
      if (key.find("alpha") != std::string::npos) continue;
      const bool is_up = key.find("lora_up") != std::string::npos;
      const bool is_down = key.find("lora_down") != std::string::npos;
      const std::string module = key.substr(0, key.rfind(".lora_"));
      if (!alphas.contains(module) || !base_alphas.contains(module)) {
        fail(file_tensor(path, key), "has no lora_down weight for its module, so its dim is unknown");
      }
      double scale = std::sqrt(alphas[module] / base_alphas[module]) * ratios[f];
      if (is_up) scale = std::abs(scale);  // so that a negative ratio flips the sign of up @ down once
      at::Tensor value = load_tensor(file, key, merge_dtype) * scale;
      auto it = merged.find(key);
      if (it == merged.end()) {
        merged.emplace(key, value);
        key_order.push_back(key);
      } else if (concat && (is_up || is_down)) {
        it->second = at::cat({it->second, value}, is_up ? 1 : 0);
      } else {
        if (it->second.sizes() != value.sizes()) {
          fail(file_tensor(path, key), "shape [{}] differs from the earlier files' [{}]: LoRAs of different dims (or "
               "for SD 1.x and 2.x) merge only with --concat", fmt::join(value.sizes(), ", "), fmt::join(it->second.sizes(), ", "));
        }
        it->second = it->second + value;
      }
    }
  }

  MergedLoRA result;
  std::set<int64_t> dim_values;
  std::set<double> alpha_values;
  for (const auto& [module, alpha] : base_alphas) {
    merged[module + ".alpha"] = at::scalar_tensor(alpha, at::kFloat);
    key_order.push_back(module + ".alpha");
    alpha_values.insert(alpha);
    if (shuffle) {
      const std::string down_key = module + ".lora_down.weight", up_key = module + ".lora_up.weight";
      at::Tensor perm = at::randperm(merged.at(down_key).size(0), generator, at::TensorOptions(at::kLong));
      merged[down_key] = merged[down_key].index_select(0, perm);
      merged[up_key] = merged[up_key].index_select(1, perm);
    }
  }
  for (const auto& [module, dim] : base_dims) dim_values.insert(dim);
  for (const std::string& key : key_order) result.tensors.emplace_back(key, merged.at(key));

  const std::string dims = dim_values.size() == 1 ? std::to_string(*dim_values.begin()) : "Dynamic";
  const std::string alphas = alpha_values.size() == 1 ? python_str(*alpha_values.begin()) : "Dynamic";
  result.metadata = build_minimum_network_metadata(v2, base_model, "networks.lora", dims, alphas);
  result.v2 = v2 == "True";
  return result;
}

}  // namespace sdt
