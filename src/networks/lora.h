// LoRA networks for the SD 1.x / 2.x models, with kohya-ss/sd-scripts' networks/lora.py semantics and file format.
//
// What a LoRA is here (kohya's LoRAModule): for a target Linear (or Conv2d) with weight W, a `lora_down` (in -> r,
// Linear, or a Conv2d with the target's kernel, stride and padding) and a `lora_up` (r -> out, Linear or 1x1 Conv2d),
// both without bias, and `alpha` (a 0-dim buffer). The layer computes W x + multiplier * (alpha / r) * up(down(x)).
// down starts as torch's default Linear / Conv2d init (kaiming_uniform with a = sqrt(5)), up starts at zero.
//
// Which layers: the family's network targets (network_target.h, e.g. SD's in src/families/sd/sd_family.h), in kohya's
// creation order. A 1x1 Conv2d counts as linear (it takes network_dim), a 3x3 one takes conv_dim. File keys are
// `<name>.lora_down.weight`, `<name>.lora_up.weight`, `<name>.alpha`.
//
// How a LoRA reaches the model's forward: as an adapter on its target layer (src/models/layers.h: every model builds its
// Linear and Conv2d as sdt's adaptable layers), the layer computing W x + b + delta(x) with
// delta(x) = multiplier * scale * up(dropouts(down(x))), kohya's LoRAModule.forward exactly. No merged copy of W is
// made, backward forms only the low-rank gradients, and the LoRA acts on whatever weights the layer holds at the moment
// (gathered shards under --sharding full, swapped-in blocks). The LoRA is also registered as the child `lora` of its
// target, so a block's parameters() include the LoRA weights inside it (gradient checkpointing differentiates them).
// The merged form W + multiplier * scale * dW is for export and merging only (delta_weight, src/networks/merge.h).
//
// Dropouts (training mode only), drawn from the default generator as kohya draws them: module_dropout skips the whole
// LoRA for one forward, network_dropout drops elements of down(x), rank_dropout drops ranks per sample (all tokens or
// pixels of a sample alike) and scales the rest by 1 / (1 - p).
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "src/core/safetensors.h"
#include "src/core/tensor_io.h"
#include "src/models/layers.h"
#include "src/networks/network_target.h"

namespace sdt {

// One LoRA over one Linear or Conv2d (kohya's LoRAModule).
struct LoRAModuleImpl : torch::nn::Module, Adapter {
  // `target` is an sdt::LinearImpl or Conv2dImpl. alpha: nullopt or 0 means alpha = dim (kohya stores that as
  // an integer tensor). Initial weights are drawn from `generator` in the order torch's constructors and kohya's
  // re-init draw them, so a network built after torch.manual_seed(s) in Python and with a generator seeded s here
  // starts from the same weights.
  // With `split_dims` (kohya's lora_flux split_qkv; a Linear target whose outputs are those parts, fused), one down
  // and one up per part, each of rank `dim`: `lora_down.<i>` / `lora_up.<i>`, drawn all downs, all ups, then all downs
  // again, as kohya's ModuleLists are.
  LoRAModuleImpl(std::string lora_name, std::shared_ptr<torch::nn::Module> target, int64_t dim,
                 std::optional<double> alpha, at::Generator generator, std::vector<int64_t> split_dims = {});

  // Makes the target layer add delta(x) to its output (kohya's apply_to), and stops it.
  void apply_to_target();
  void remove_from_target();

  // multiplier * scale * up(dropouts(down(x))); undefined when module_dropout drops the module for this forward.
  at::Tensor delta(const at::Tensor& x) override;

  // multiplier * scale * dW in fp32, the shape of the target's weight (kohya's LoRAInfModule.get_weight).
  at::Tensor delta_weight() const;

  bool is_conv() const { return !conv_down.is_empty(); }
  bool is_split() const { return !split_dims_.empty(); }
  int64_t dim() const { return dim_; }
  double alpha_value() const;
  // alpha / dim as set at construction: like kohya, loading another alpha later changes the saved buffer only.
  double scale() const { return scale_; }
  // The weights of an unsplit module (sdt::Error for a split one).
  const at::Tensor& lora_down_weight() const;
  const at::Tensor& lora_up_weight() const;
  // The weights as a file holds them (differentiable). A split module's parts are combined as kohya's lora_flux saves
  // them: the downs stacked, (parts * dim, in), and the ups block-diagonal, (out, parts * dim). alpha stays: a loader that reads the
  // combined module takes its dim as parts * dim, so it scales the delta by 1 / parts against training (kohya's
  // behaviour, kept so files agree).
  std::pair<at::Tensor, at::Tensor> file_weights() const;
  // Sets the weights from a file's (combined for a split module; shapes are checked, naming `file_key`).
  void set_file_weights(const at::Tensor& down, const at::Tensor& up, const std::string& file_key);

  // LoRA-GGPO's norms (`ggpo` set), from the update's synchronised gradients before the optimizer steps: kohya's
  // update_grad_norms then update_norms.
  void update_ggpo_norms();
  // The standard deviation of each row of GGPO's perturbation, (out, 1); undefined before the first update_ggpo_norms.
  at::Tensor ggpo_perturbation_std() const;

  std::string lora_name;
  int block = -1;         // kohya's block index (block dims and lrs); -1: none
  int text_encoder = 0;   // NetworkTarget::text_encoder
  double multiplier = 1.0;
  std::optional<double> dropout, rank_dropout, module_dropout;
  struct Ggpo {
    double sigma = 0, beta = 0;
    at::Tensor org_weight_norm;  // the mean row norm of the target's weight (fp32), taken at the first forward
    at::Tensor grad_norms, weight_norms, combined_weight_norms;  // (out, 1), from the last update
  };
  std::optional<Ggpo> ggpo;  // unsplit Linear targets only, as in kohya

  std::shared_ptr<torch::nn::Module> target;
  torch::nn::Linear linear_down{nullptr}, linear_up{nullptr};  // registered as lora_down / lora_up
  torch::nn::Conv2d conv_down{nullptr}, conv_up{nullptr};
  torch::nn::ModuleList split_down{nullptr}, split_up{nullptr};  // of Linears, one per part
  at::Tensor alpha;

 private:
  Adaptable& adaptable_target() const;
  int64_t dim_;
  double scale_;
  std::vector<int64_t> split_dims_;
};
TORCH_MODULE(LoRAModule);

// `--network_dim`, `--network_alpha`, `--network_dropout` and `--network_args` as create_network reads them.
struct LoRANetworkConfig {
  int64_t dim = 4;
  double alpha = 1.0;
  std::optional<double> dropout;  // --network_dropout
  double multiplier = 1.0;
  std::optional<int64_t> conv_dim;
  std::optional<double> conv_alpha;
  NetworkBlockLayout blocks;                                         // the family's, for the block lists
  std::optional<std::vector<int64_t>> block_dims, conv_block_dims;    // blocks.total() entries
  std::optional<std::vector<double>> block_alphas, conv_block_alphas;
  std::optional<std::vector<double>> block_lr_weight;                // blocks.total() entries
  std::optional<double> rank_dropout, module_dropout;
  // LoRA-GGPO (lora_flux): while training, each unsplit Linear's output gains x P^T, P a random matrix of the layer's
  // weight's shape whose row j has standard deviation (sigma |c_j| + beta g_j^2) / sqrt(out_features): c_j the row
  // norm of the base weight combined with the LoRA's delta, g_j that of the LoRA's gradient, both from the last update.
  std::optional<std::pair<double, double>> ggpo_sigma_beta;
  std::optional<double> loraplus_lr_ratio, loraplus_unet_lr_ratio, loraplus_text_encoder_lr_ratio;
  // Per module, from a file (create_network_from_weights / --dim_from_weights): only these modules are created.
  std::optional<std::map<std::string, std::pair<int64_t, std::optional<double>>>> modules_dim_alpha;

  // What a family's own network module adds (kohya's networks/lora_flux.py; set by the family's network_config):
  // Which targets it adapts and at which dim where that is not `dim` (lora_flux's train_blocks, train_t5xxl, in_dims,
  // type dims and block selections): nullopt leaves a target out, 0 skips it. Unset: every target, at `dim`.
  std::function<std::optional<int64_t>(const NetworkTarget&)> target_dim;
  // network_reg_dims / network_reg_lrs: the first pattern found in a module's name (Python's re.search) sets its dim
  // (with `alpha`) / its learning rate, in the order given.
  std::vector<std::pair<std::string, int64_t>> reg_dims;
  std::vector<std::pair<std::string, double>> reg_lrs;
  bool split_qkv = false;             // targets with split_dims get a LoRA per part (LoRAModuleImpl)
  bool lr_per_text_encoder = false;   // prepare_optimizer_params_with_multiple_te_lrs: --text_encoder_lr per encoder
  std::string network_module = "networks.lora";  // ss_network_module
  bool verbose = false;  // lists every module with its dim and alpha, and the skipped ones

  // Whether the network adapts the convolution blocks too (kohya's conv LoRA: a conv dim, or a file that may have
  // such modules): the family then adds those blocks' layers to the targets.
  bool adapts_conv_blocks() const { return modules_dim_alpha || conv_dim || conv_block_dims; }
};

// network_args ("key=value" strings, kohya's --network_args) on top of dim / alpha / dropout; an unknown key is an
// error that names it and the nearest known key. Block lists, presets and thresholds are parsed as lora.py does, for
// the family's block layout.
LoRANetworkConfig parse_lora_network_args(std::optional<int64_t> network_dim, std::optional<double> network_alpha,
                                          std::optional<double> network_dropout, const std::vector<std::string>& network_args,
                                          const NetworkBlockLayout& blocks = NetworkBlockLayout::sd());

// --network_args as kohya's train_network.py reads them (`key, value = arg.split("=", 1)`, both trimmed): every key
// must be in `known`, else an sdt::Error names the nearest (`module`, e.g. "networks.lora", in the message).
std::map<std::string, std::string> read_network_args(const std::vector<std::string>& network_args,
                                                     const std::vector<std::string>& known, const std::string& module);
// One number of a network argument; an sdt::Error naming `key` otherwise.
double network_arg_number(const std::string& key, const std::string& text);

// kohya's get_block_lr_weight: comma lists (short ones padded with 1.0, long ones cut) or the presets cosine, sine,
// linear, reverse_linear, zeros (optionally "+base"); weights <= zero_threshold become 0. nullopt when none is given.
std::optional<std::vector<double>> block_lr_weight(const std::optional<std::string>& down, const std::optional<std::string>& mid,
                                                   const std::optional<std::string>& up, double zero_threshold,
                                                   const NetworkBlockLayout& blocks = NetworkBlockLayout::sd());

// The dims and alphas a file holds, per module: alpha is nullopt when the file has none (then alpha = dim).
std::map<std::string, std::pair<int64_t, std::optional<double>>> lora_dims_from_file(const safetensors::File& file);

struct LoraParamGroup {
  std::vector<at::Tensor> params;
  double lr;
  std::string description;  // kohya's lr description: "textencoder", "unet", "unet_block7", each + " plus" for LoRA+
};

struct MaxNormResult {
  int64_t keys_scaled = 0;
  double mean_norm = 0, max_norm = 0;  // of the (scaled) deltas, over all modules
};

struct LoadResult {
  size_t loaded = 0;                    // file tensors read
  std::vector<std::string> missing;     // network keys the file lacks
  std::vector<std::string> unexpected;  // file keys the network lacks
};

// kohya's LoRANetwork: creates a module for each target (in their order; those a dim of 0 leaves out are `skipped`),
// applies them (text encoders' only with apply_text_encoder, the denoiser's only with apply_unet), and owns them under
// their names, so named_parameters() / named_buffers() are the file's keys.
struct LoRANetworkImpl : torch::nn::Module {
  LoRANetworkImpl(const LoRANetworkConfig& config, const std::vector<NetworkTarget>& targets, bool apply_text_encoder,
                  bool apply_unet, at::Generator generator);
  ~LoRANetworkImpl() override;

  // Takes every LoRA off its layer (the models compute without it again).
  void remove();

  void set_multiplier(double multiplier);

  // kohya's prepare_optimizer_params(text_encoder_lr, unet_lr, default_lr): groups "lora" and (with LoRA+) "plus"
  // (the lora_up weights, lr * ratio) for the text encoder, then for the U-Net (per block with block lr weights);
  // groups with lr 0 are dropped. `text_encoder_lrs` is --text_encoder_lr: its first value for every encoder, or with
  // config.lr_per_text_encoder one per encoder (lora_flux's prepare_optimizer_params_with_multiple_te_lrs, which also
  // puts modules matching config.reg_lrs in groups of their own first). Every LoRA parameter is set to require grad.
  std::vector<LoraParamGroup> prepare_optimizer_params(const std::vector<double>& text_encoder_lrs, std::optional<double> unet_lr,
                                                   double default_lr);

  // --scale_weight_norms: kohya's apply_max_norm_regularization.
  MaxNormResult apply_max_norm_regularization(double max_norm);
  // LoRA-GGPO (config.ggpo_sigma_beta): every module's norms from this update's synchronised gradients, before the
  // optimizer steps (train_network.py's update_grad_norms and update_norms); then what kohya logs of them, means over
  // the modules of each module's mean over its rows: norm/avg_key_norm, norm/avg_grad_norm, norm/avg_combined_norm.
  // Nothing without GGPO.
  std::map<std::string, double> update_ggpo_norms();

  // --network_weights: kohya's load_weights (non-strict: keys on one side only are reported, shapes must match). A
  // module's weights under its target's other_name load as under its lora_name.
  LoadResult load_weights(const std::string& path);

  // The state dict in kohya's key order and names, in `dtype` when given (alpha included, as kohya casts it).
  NamedTensors state_dict(std::optional<at::ScalarType> dtype = std::nullopt) const;

  // kohya's save_weights: writes the state dict with `metadata` plus sshs_model_hash / sshs_legacy_hash.
  void save_weights(const std::string& path, std::optional<at::ScalarType> dtype, safetensors::Metadata metadata) const;

  LoRANetworkConfig config;
  std::vector<LoRAModule> text_encoder_loras, unet_loras;  // kohya's creation order
  std::vector<std::string> skipped;                        // modules a dim of 0 left out

 private:
  std::map<std::string, std::string> other_names_;  // lora_name -> the target's other_name
};
TORCH_MODULE(LoRANetwork);

}  // namespace sdt
