#include "src/families/flux/flux_lora_format.h"

#include <map>

#include <fmt/ranges.h>
#include <spdlog/spdlog.h>
#include <torch/torch.h>

#include "src/core/error.h"

namespace sdt {
namespace {

using TensorMap = std::map<std::string, at::Tensor>;

// One kohya module and its ai-toolkit counterpart(s).
struct ModuleMap {
  std::string kohya;
  std::vector<std::string> ai_toolkit;
};

// The modules of the blocks present among `keys` (numbered as in kohya's script; a file may hold any of them).
std::vector<ModuleMap> module_maps(const std::vector<std::string>& keys) {
  int64_t doubles = 0, singles = 0;
  for (const std::string& key : keys) {
    for (const auto& [prefix, count] : {std::pair<std::string, int64_t*>{"lora_unet_double_blocks_", &doubles},
                                        {"transformer.transformer_blocks.", &doubles},
                                        {"lora_unet_single_blocks_", &singles}, {"transformer.single_transformer_blocks.", &singles}}) {
      if (key.starts_with(prefix)) *count = std::max<int64_t>(*count, std::stoll(key.substr(prefix.size())) + 1);
    }
  }
  std::vector<ModuleMap> maps;
  for (int64_t i = 0; i < doubles; ++i) {
    const std::string k = fmt::format("lora_unet_double_blocks_{}_", i), a = fmt::format("transformer.transformer_blocks.{}.", i);
    maps.push_back({k + "img_attn_proj", {a + "attn.to_out.0"}});
    maps.push_back({k + "img_attn_qkv", {a + "attn.to_q", a + "attn.to_k", a + "attn.to_v"}});
    maps.push_back({k + "img_mlp_0", {a + "ff.net.0.proj"}});
    maps.push_back({k + "img_mlp_2", {a + "ff.net.2"}});
    maps.push_back({k + "img_mod_lin", {a + "norm1.linear"}});
    maps.push_back({k + "txt_attn_proj", {a + "attn.to_add_out"}});
    maps.push_back({k + "txt_attn_qkv", {a + "attn.add_q_proj", a + "attn.add_k_proj", a + "attn.add_v_proj"}});
    maps.push_back({k + "txt_mlp_0", {a + "ff_context.net.0.proj"}});
    maps.push_back({k + "txt_mlp_2", {a + "ff_context.net.2"}});
    maps.push_back({k + "txt_mod_lin", {a + "norm1_context.linear"}});
  }
  for (int64_t i = 0; i < singles; ++i) {
    const std::string k = fmt::format("lora_unet_single_blocks_{}_", i), a = fmt::format("transformer.single_transformer_blocks.{}.", i);
    maps.push_back({k + "linear1", {a + "attn.to_q", a + "attn.to_k", a + "attn.to_v", a + "proj_mlp"}});
    maps.push_back({k + "linear2", {a + "proj_out"}});
    maps.push_back({k + "modulation_lin", {a + "norm.linear"}});
  }
  return maps;
}

TensorMap as_map(const NamedTensors& tensors) {
  TensorMap out;
  for (const auto& [name, t] : tensors) out[name] = t;
  return out;
}

at::Tensor take(TensorMap& tensors, const std::string& key) {
  const auto it = tensors.find(key);
  if (it == tensors.end()) fail("FLUX LoRA conversion", "'{}' is missing beside its module's other weights", key);
  at::Tensor t = it->second;
  tensors.erase(it);
  return t;
}

NamedTensors with_leftovers_warned(NamedTensors out, const TensorMap& left, const char* layout) {
  if (!left.empty()) {
    std::vector<std::string> names;
    for (const auto& [name, t] : left) names.push_back(name);
    spdlog::warn("{} keys have no place in the {} layout and are left out (kohya's script leaves them too): {}", left.size(),
                 layout, fmt::join(names.begin(), names.begin() + std::min<size_t>(names.size(), 5), ", "));
  }
  return out;
}

std::vector<std::string> keys_of(const NamedTensors& tensors) {
  std::vector<std::string> keys;
  for (const auto& [name, t] : tensors) keys.push_back(name);
  return keys;
}

}  // namespace

NamedTensors flux_lora_to_ai_toolkit(const NamedTensors& kohya) {
  TensorMap in = as_map(kohya);
  NamedTensors out;
  for (const ModuleMap& m : module_maps(keys_of(kohya))) {
    if (!in.contains(m.kohya + ".lora_down.weight")) continue;
    at::Tensor down = take(in, m.kohya + ".lora_down.weight"), up = take(in, m.kohya + ".lora_up.weight");
    const double rank = static_cast<double>(down.size(0));
    const double alpha = in.contains(m.kohya + ".alpha") ? take(in, m.kohya + ".alpha").item<double>() : rank;
    // alpha / rank folded into the weights, split between them by powers of two as kohya splits it.
    double scale_down = alpha / rank, scale_up = 1.0;
    while (scale_down * 2 < scale_up) {
      scale_down *= 2;
      scale_up /= 2;
    }
    down = down * scale_down;
    up = up * scale_up;
    if (m.ai_toolkit.size() == 1) {
      out.emplace_back(m.ai_toolkit[0] + ".lora_A.weight", down);
      out.emplace_back(m.ai_toolkit[0] + ".lora_B.weight", up);
      continue;
    }
    // The parts' output widths: q, k, v each the hidden size (the down weight's input), the rest the MLP's.
    const auto parts = static_cast<int64_t>(m.ai_toolkit.size());
    const int64_t hidden = down.size(1);
    std::vector<int64_t> dims(static_cast<size_t>(parts), hidden);
    if (parts == 4) dims[3] = up.size(0) - 3 * hidden;
    // Block-diagonal up weight (each part's rows use only its own rank slice): each part keeps its own block.
    bool sparse = down.size(0) % parts == 0;
    const int64_t part_rank = down.size(0) / parts;
    int64_t row = 0;
    for (int64_t j = 0; j < parts && sparse; ++j) {
      for (int64_t k = 0; k < parts && sparse; ++k) {
        if (j != k) sparse = up.narrow(0, row, dims[static_cast<size_t>(j)]).narrow(1, k * part_rank, part_rank).eq(0).all().item<bool>();
      }
      row += dims[static_cast<size_t>(j)];
    }
    row = 0;
    for (int64_t j = 0; j < parts; ++j) {
      const at::Tensor rows = up.narrow(0, row, dims[static_cast<size_t>(j)]);
      row += dims[static_cast<size_t>(j)];
      out.emplace_back(m.ai_toolkit[static_cast<size_t>(j)] + ".lora_A.weight", sparse ? down.narrow(0, j * part_rank, part_rank).contiguous() : down);
      out.emplace_back(m.ai_toolkit[static_cast<size_t>(j)] + ".lora_B.weight", sparse ? rows.narrow(1, j * part_rank, part_rank).contiguous() : rows.contiguous());
    }
  }
  return with_leftovers_warned(std::move(out), in, "ai-toolkit");
}

NamedTensors flux_lora_to_kohya(const NamedTensors& ai_toolkit) {
  TensorMap in = as_map(ai_toolkit);
  NamedTensors out;
  for (const ModuleMap& m : module_maps(keys_of(ai_toolkit))) {
    if (!in.contains(m.ai_toolkit[0] + ".lora_A.weight")) continue;
    std::vector<at::Tensor> downs, ups;
    for (const std::string& part : m.ai_toolkit) {
      downs.push_back(take(in, part + ".lora_A.weight"));
      ups.push_back(take(in, part + ".lora_B.weight"));
    }
    const int64_t rank = downs[0].size(0);
    const auto parts = static_cast<int64_t>(downs.size());
    at::Tensor up = ups[0];
    if (parts > 1) {  // the parts' up weights block-diagonally, each on its own rank slice
      int64_t rows = 0;
      for (const at::Tensor& u : ups) rows += u.size(0);
      up = at::zeros({rows, rank * parts}, ups[0].options());
      int64_t row = 0;
      for (int64_t j = 0; j < parts; ++j) {
        up.narrow(0, row, ups[static_cast<size_t>(j)].size(0)).narrow(1, j * rank, rank).copy_(ups[static_cast<size_t>(j)]);
        row += ups[static_cast<size_t>(j)].size(0);
      }
    }
    out.emplace_back(m.kohya + ".lora_down.weight", parts > 1 ? at::cat(downs, 0) : downs[0]);
    out.emplace_back(m.kohya + ".lora_up.weight", up);
    out.emplace_back(m.kohya + ".alpha", at::scalar_tensor(static_cast<double>(rank * parts), downs[0].options()));
  }
  return with_leftovers_warned(std::move(out), in, "kohya");
}

}  // namespace sdt
