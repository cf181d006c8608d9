"""Forward and forward + backward time of the U-Net bench/bench_unet.cpp times, in PyTorch with diffusers'
UNet2DConditionModel, on the same CPU and thread counts. Prints the same lines as the C++ program.

    .venv/bin/python bench/bench_unet_pytorch.py [iterations=7] [threads=1,2]
"""

import statistics
import sys
import time

import torch
from diffusers import UNet2DConditionModel


def main():
    iterations = int(sys.argv[1]) if len(sys.argv) > 1 else 7
    thread_counts = [int(n) for n in (sys.argv[2] if len(sys.argv) > 2 else "1,2").split(",")]

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(64, 128, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8,
        cross_attention_dim=768, norm_num_groups=32)
    parameters = sum(p.numel() for p in unet.parameters())

    latents = torch.randn(2, 4, 32, 32)  # (B, C, h, w)
    timesteps = torch.tensor([10, 700])  # (B)
    context = torch.randn(2, 77, 768)  # (B, S, D)
    print(f"pytorch U-Net: {parameters / 1e6:.1f} M parameters, batch 2 x 4 x 32 x 32, context 77 x 768, "
          f"median of {iterations} after 2 warm-up")

    for threads in thread_counts:
        torch.set_num_threads(threads)
        forward_ms, train_ms = [], []
        for i in range(iterations + 2):
            with torch.no_grad():
                t0 = time.perf_counter()
                unet(latents, timesteps, encoder_hidden_states=context)
                if i >= 2:
                    forward_ms.append((time.perf_counter() - t0) * 1e3)
            unet.zero_grad()
            t0 = time.perf_counter()
            unet(latents, timesteps, encoder_hidden_states=context).sample.square().mean().backward()
            if i >= 2:
                train_ms.append((time.perf_counter() - t0) * 1e3)
        print(f"pytorch threads {threads}: forward {statistics.median(forward_ms):.1f} ms, "
              f"forward + backward {statistics.median(train_ms):.1f} ms")


if __name__ == "__main__":
    main()
