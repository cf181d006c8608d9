#!/usr/bin/env python3
"""kohya's LoRA training step on SD 1.5's U-Net from cached latents, the same step bench_lora_step times in sdt:
kohya's own U-Net (library/original_unet.py, as train_network.py builds it for SD 1.x, with --sdpa), kohya's
networks/lora.py on its Transformer2D layers (U-Net only), DDPM noise and timesteps, MSE loss, backward, AdamW.
Prints the same lines as bench_lora_step. Asserts nothing.

    .venv/bin/pip install einops   # kohya's U-Net imports it
    .venv/bin/python bench/bench_lora_step_kohya.py /path/to/sd-scripts [steps=3] [threads=2] [batch=1] [dim=16] [resolution=512] [profile]

(profile: the last step's split over the dense kernels, as bench_lora_step prints it.)

(/path/to/sd-scripts: a checkout, or its library/ and networks/ folders.)
"""

import os
import resource
import sys
import time
import types

import torch


def import_kohya(root):
    # library.utils pulls in torchvision and more; the two modules used here need only its setup_logging.
    library = types.ModuleType("library")
    library.__path__ = [os.path.join(root, "library")]
    utils = types.ModuleType("library.utils")
    utils.setup_logging = lambda *a, **k: None
    sdxl = types.ModuleType("library.sdxl_original_unet")
    sdxl.SdxlUNet2DConditionModel = type("SdxlUNet2DConditionModel", (torch.nn.Module,), {})
    sys.modules.update({"library": library, "library.utils": utils, "library.sdxl_original_unet": sdxl})
    sys.path.insert(0, os.path.join(root, "networks"))
    import lora  # kohya's networks/lora.py
    from library import original_unet

    return lora, original_unet


def kernel_class(op):
    if op in ("aten::convolution", "aten::convolution_backward"):
        return "convolution"
    if op.startswith("aten::_scaled_dot_product"):
        return "attention"
    if op in ("aten::addmm", "aten::mm", "aten::bmm"):
        return "matrix products"
    return None


def print_kernel_split(events, step_seconds):
    """Seconds per dense-kernel class; an op inside an op already counted is not counted again."""
    counted_until, seconds = {}, {}
    for e in sorted(events, key=lambda e: e.time_range.start):
        cls = kernel_class(e.name)
        if cls is None or e.time_range.start < counted_until.get(e.thread, 0):
            continue
        counted_until[e.thread] = e.time_range.end
        seconds[cls] = seconds.get(cls, 0.0) + (e.time_range.end - e.time_range.start) * 1e-6
    for cls in sorted(seconds):
        print(f"  {cls:<16} {seconds[cls]:6.2f} s")
    dense = sum(seconds.values())
    print(f"  dense kernels {dense:.2f} s of the profiled step's {step_seconds:.2f} s ({100 * dense / step_seconds:.0f} %)")


def main():
    root = sys.argv[1]
    defaults = [3, 2, 1, 16, 512]
    steps, threads, batch, dim, resolution = [int(v) for v in sys.argv[2:7]] + defaults[len(sys.argv[2:7]):]
    profile = len(sys.argv) > 7 and sys.argv[7] == "profile"
    torch.set_num_threads(threads)
    lora, original_unet = import_kohya(root)

    torch.manual_seed(0)
    unet = original_unet.UNet2DConditionModel(sample_size=resolution // 8, attention_head_dim=8, cross_attention_dim=768)
    unet.set_use_sdpa(True)
    unet.requires_grad_(False)
    unet.eval()
    parameters = sum(p.numel() for p in unet.parameters())

    lora.LoRANetwork.UNET_TARGET_REPLACE_MODULE = ["Transformer2DModel"]
    network = lora.create_network(1.0, dim, dim / 2, None, torch.nn.Module(), unet)
    network.apply_to(None, unet, apply_text_encoder=False, apply_unet=True)
    network.train()
    params, _ = network.prepare_optimizer_params(None, None, 1e-4)
    with torch.no_grad():
        for m in network.unet_loras:
            m.lora_up.weight.normal_(0, 0.01)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    lora_parameters = sum(p.numel() for g in params for p in g["params"])

    side = resolution // 8
    latents = torch.randn(batch, 4, side, side) * 0.18215
    context = torch.randn(batch, 77, 768)
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    print(f"kohya LoRA step: U-Net full ({parameters / 1e6:.1f} M parameters), LoRA dim {dim} on {len(network.unet_loras)} "
          f"layers ({lora_parameters / 1e6:.2f} M parameters), batch {batch} of {side}x{side} latents, AdamW, fp32, {threads} threads")
    for step in range(steps):
        profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if profile and step == steps - 1 else None
        if profiler:
            profiler.__enter__()
        t = time.perf_counter()
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, 1000, (batch,))
        a = alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        pred = unet(noisy, timesteps, context).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        forward = time.perf_counter() - t
        t = time.perf_counter()
        loss.backward()
        backward = time.perf_counter() - t
        t = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        opt = time.perf_counter() - t
        print(f"step {step + 1}: forward {forward:.2f} s, backward {backward:.2f} s, optimizer {opt:.3f} s, "
              f"total {forward + backward + opt:.2f} s, loss {loss.item():.4f}")
        if profiler:
            profiler.__exit__(None, None, None)
            print_kernel_split(profiler.events(), forward + backward + opt)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 * 1024)
    print(f"peak RSS {rss:.2f} GiB")


if __name__ == "__main__":
    main()
