// Building blocks shared by the models (diffusers names and semantics): the adaptable Linear and Conv2d every model
// is made of, the ResNet block, down- and up-sampling, multi-head attention on top of at::scaled_dot_product_attention,
// and gradient checkpointing.
#pragma once

#include <functional>
#include <memory>
#include <vector>

#include <torch/torch.h>

namespace sdt {

// Something that adds to a layer's output from the layer's input: y = layer(x) + adapter(x). A LoRA is one
// (src/networks/lora.h: scale * up(down(x)), with its dropouts). An undefined result adds nothing (a module dropped
// for this forward).
class Adapter {
 public:
  virtual ~Adapter() = default;
  virtual at::Tensor delta(const at::Tensor& x) = 0;
};

// The layers an adapter can attach to. LibTorch's C++ modules have no forward hooks and a parent calls its children
// through typed members, so the hook lives in the layer: every model builds its Linear and Conv2d from these. They are
// torch's modules (same options, parameters `weight` / `bias`, same init) plus one `adapter` pointer (not owned; set
// and cleared by whoever attaches it).
struct Adaptable {
  Adapter* adapter = nullptr;
};

struct LinearImpl : torch::nn::LinearImpl, Adaptable {
  using torch::nn::LinearImpl::LinearImpl;
  at::Tensor forward(const at::Tensor& x);
};
TORCH_MODULE(Linear);

struct Conv2dImpl : torch::nn::Conv2dImpl, Adaptable {
  using torch::nn::Conv2dImpl::Conv2dImpl;
  at::Tensor forward(const at::Tensor& x);
};
TORCH_MODULE(Conv2d);

// diffusers ResnetBlock2D: GroupNorm -> SiLU -> conv3x3 (+ projected time embedding) -> GroupNorm -> SiLU -> conv3x3,
// plus a 1x1 `conv_shortcut` when the channel count changes. temb_channels == 0: no time embedding (the VAE).
struct ResnetBlock2DImpl : torch::nn::Module {
  ResnetBlock2DImpl(int64_t in_channels, int64_t out_channels, int64_t temb_channels, int64_t groups, double eps);
  at::Tensor forward(const at::Tensor& x, const at::Tensor& temb = {});  // (B, C_in, H, W), (B, T) -> (B, C_out, H, W)

  torch::nn::GroupNorm norm1{nullptr}, norm2{nullptr};
  Conv2d conv1{nullptr}, conv2{nullptr}, conv_shortcut{nullptr};
  Linear time_emb_proj{nullptr};
};
TORCH_MODULE(ResnetBlock2D);

// diffusers Downsample2D with use_conv: a stride-2 conv3x3 named `conv`. The U-Net pads by 1 on every side; the VAE
// pads 0 and adds one row and one column of zeros at the bottom and right first (asymmetric, as the LDM VAE did).
struct Downsample2DImpl : torch::nn::Module {
  Downsample2DImpl(int64_t channels, bool asymmetric_padding);
  at::Tensor forward(const at::Tensor& x);  // (B, C, H, W) -> (B, C, ceil(H/2), ceil(W/2))

  Conv2d conv{nullptr};
  bool asymmetric_padding;
};
TORCH_MODULE(Downsample2D);

// diffusers Upsample2D with use_conv: nearest-neighbour resize, then conv3x3 named `conv`. `size` is the output
// height and width; when empty it doubles them. The U-Net passes the size of the skip connection it is about to
// meet, so inputs whose sides are not multiples of 2^levels come back to the right size.
struct Upsample2DImpl : torch::nn::Module {
  explicit Upsample2DImpl(int64_t channels);
  at::Tensor forward(const at::Tensor& x, std::vector<int64_t> size = {});

  Conv2d conv{nullptr};
};
TORCH_MODULE(Upsample2D);

// The device of a module's first parameter (or buffer); the CPU for a module that has none. Whoever calls a model
// with host tensors (token ids, images) moves them there.
c10::Device module_device(const torch::nn::Module& module);

// Standard normal numbers drawn on the host from `generator` (a CPU generator) and copied to `options`' device: a
// seeded draw gives the same numbers on every device.
at::Tensor randn_from_host(at::IntArrayRef sizes, at::Generator& generator, const at::TensorOptions& options);

// diffusers get_timestep_embedding with flip_sin_to_cos=True, freq_shift=0: (B) -> (B, dim) = [cos, sin] of
// t * 10000^(-k / (dim/2)), k = 0 .. dim/2 - 1, in fp32.
at::Tensor timestep_embedding(const at::Tensor& timesteps, int64_t dim);

// Multi-head attention of already projected q, k, v: (B, Nq, H*D), (B, Nk, H*D), (B, Nk, H*D) -> (B, Nq, H*D).
at::Tensor multi_head_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t heads,
                                bool causal = false);

// A model's repeated block as the seams below run it: several tensors in, several out (a FLUX double block takes the
// image and text streams and the vector, and returns both streams).
using Block = std::function<std::vector<at::Tensor>(const std::vector<at::Tensor>& inputs)>;

// What a block runner does around the two runs of a recomputed block: the block engine (src/parallel/block_engine.h)
// brings the block's weights in before each run, lets them go after, and takes the gradient of the weights it holds.
class RecomputeHooks {
 public:
  virtual ~RecomputeHooks() = default;
  virtual void before_run(bool recompute) = 0;  // forward (false) and backward's recomputation (true)
  virtual void after_forward() = 0;
  // Tensors the recomputation also differentiates, whose gradients go to after_backward instead of autograd.
  virtual std::vector<at::Tensor> weights() const = 0;
  virtual void after_backward(const std::vector<at::Tensor>& weight_gradients) = 0;
};

// Gradient checkpointing, the one recompute-in-backward of every runner: runs `block(inputs)` without keeping its
// activations, and in backward runs it again with grad enabled to get the gradients of `inputs` and `params` (the
// tensors the block reads besides its inputs). The recomputation sees the forward's autocast state and random-generator
// state (RecomputeState), so a block with dropout (a LoRA's) draws the same masks twice. Inputs must be defined tensors.
// `hooks` (optional) run around both runs; `anchor` (optional) is a tensor that makes autograd reach the node when
// nothing else needs a gradient (a sharded block's master): it receives none.
std::vector<at::Tensor> checkpointed(Block block, const std::vector<at::Tensor>& inputs, const std::vector<at::Tensor>& params,
                                     std::shared_ptr<RecomputeHooks> hooks = nullptr, const at::Tensor& anchor = {});

// The backward of a recomputed block: the gradients of `wrt` given the gradients of its outputs (an undefined one: the
// output fed nothing; unused tensors of `wrt` get undefined gradients).
std::vector<at::Tensor> gradients_of(const std::vector<at::Tensor>& outputs, const std::vector<at::Tensor>& grad_outputs,
                                     const std::vector<at::Tensor>& wrt);

// The autocast state (on or off, and the dtype) of a device type: captured when a block first runs and restored
// while backward recomputes it, so the recomputation is the same computation (torch.utils.checkpoint does this too;
// backward itself runs outside the forward's autocast scope).
struct AutocastState {
  c10::DeviceType device = c10::DeviceType::CPU;
  bool enabled = false;
  at::ScalarType dtype = at::kBFloat16;
  static AutocastState current(c10::DeviceType device);
};
class AutocastRestore {
 public:
  explicit AutocastRestore(const AutocastState& state);
  ~AutocastRestore();
  AutocastRestore(const AutocastRestore&) = delete;
  AutocastRestore& operator=(const AutocastRestore&) = delete;

 private:
  AutocastState state_, previous_;
};

// What a block's recomputation in backward must see as its forward saw it: the autocast state and the states of the
// default CPU generator and of the inputs' device's (torch.utils.checkpoint's preserve_rng_state), so dropout draws
// the same masks. `capture` when the block first runs; `Replay` while backward recomputes it, putting the generators
// back afterwards so the recomputation draws nothing from the stream of the rest of the step.
struct RecomputeState {
  AutocastState autocast;
  at::Tensor cpu_rng;
  std::optional<c10::Device> device;  // a non-CPU device, whose generator state is kept too
  at::Tensor device_rng;
  static RecomputeState capture(c10::Device device);

  class Replay {
   public:
    explicit Replay(const RecomputeState& state);
    ~Replay();
    Replay(const Replay&) = delete;
    Replay& operator=(const Replay&) = delete;

   private:
    AutocastRestore autocast_;
    std::optional<c10::Device> device_;
    at::Tensor saved_cpu_rng_, saved_device_rng_;
  };
};

// Blocks [first, first + count) of a runner's blocks are identical and swap kohya's way, blocks_to_swap of them (at
// most count - 2): a family's parallel plan names them, the block engine moves them.
struct SwapStack {
  size_t first = 0, count = 0;
  int64_t blocks_to_swap = 0;
};

// Runs a model's repeated blocks (the U-Net's ResNets and Transformer2Ds, a DiT's double and single blocks) when the
// model's weights are not all resident: full sharding gathers a block's weights just before it runs, block swap copies
// them in from the host, and both recompute the block in backward (src/parallel/block_engine.h). `module` is the
// block, `params` the tensors it reads besides its inputs (its own weights and a LoRA's on its layers).
class BlockRunner {
 public:
  virtual ~BlockRunner() = default;
  virtual std::vector<at::Tensor> run(const torch::nn::Module& module, Block block, const std::vector<at::Tensor>& inputs,
                                      const std::vector<at::Tensor>& params) = 0;
};

// Whether a model's repeated blocks are built with their weights, or without them (parameters of their shape and dtype
// on the meta device, no storage): a block engine then reads each rank's part of them straight from the checkpoint
// into where it will live (its shard, its swap master), so no process ever holds the whole model
// (ParallelPlan::deferred_weights).
enum class BlockWeights { allocated, deferred };

// Replaces every parameter of `module` with a meta tensor of its shape and dtype, freeing its storage.
void defer_weights(torch::nn::Module& module);
// Tensor::set_data that also crosses between a dense tensor and a meta one (a deferred weight getting its storage, or
// losing it). set_data refuses any change of backend kind; both are plain TensorImpls, so swapping the metadata is
// what set_data does after its check.
void set_parameter_data(at::Tensor& parameter, const at::Tensor& data);

// How a model runs one of its blocks: through its runner when it has one (the block engine), recomputed in backward
// under gradient checkpointing (while grad mode is on), or plainly. `block` must hold what it calls (the module by
// shared pointer), since the recomputation in backward calls it again.
std::vector<at::Tensor> run_block(BlockRunner* runner, bool gradient_checkpointing, const torch::nn::Module& module, Block block,
                                  const std::vector<at::Tensor>& inputs);

}  // namespace sdt
