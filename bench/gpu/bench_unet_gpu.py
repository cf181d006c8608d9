"""The step bench/gpu/bench_unet_gpu.cpp times, in PyTorch eager with diffusers' UNet2DConditionModel of SD 1.5's
configuration on the same card: forward + backward of every weight under bf16 autocast, 512x512, batch 4. Also counts
the step's floating-point operations (torch.utils.flop_counter), which bench/gpu/check.sh uses for both MFU figures.

    python3 bench/gpu/bench_unet_gpu.py [iterations=10] [batch=4]
"""

import statistics
import sys
import time

import torch
from diffusers import UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode


def main():
    iterations = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    batch = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    device = torch.device("cuda", 0)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, attention_head_dim=8, cross_attention_dim=768).to(device)
    parameters = sum(p.numel() for p in unet.parameters())
    latents = torch.randn(batch, 4, 64, 64, device=device)
    timesteps = torch.randint(0, 1000, (batch,), device=device)
    context = torch.randn(batch, 77, 768, device=device)

    def step():
        unet.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = unet(latents, timesteps, encoder_hidden_states=context).sample.float().square().mean()
        loss.backward()

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    times = []
    torch.cuda.reset_peak_memory_stats()
    for i in range(iterations + 3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        if i >= 3:
            times.append((time.perf_counter() - t0) * 1e3)
    print(f"pytorch U-Net SD1.5 ({parameters / 1e6:.1f} M parameters), batch {batch} x 4 x 64 x 64, bf16 autocast: "
          f"forward + backward {statistics.median(times):.2f} ms (median of {iterations}), "
          f"peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB allocated")
    print(f"flops per step {counter.get_total_flops()}")


if __name__ == "__main__":
    main()
