"""Loads a LoRA that sdt wrote with diffusers' kohya-format loader (StableDiffusionPipeline.load_lora_weights) into
the tiny SD 1.x pipeline, and compares its U-Net and text-encoder outputs with sdt's own (merged weights).

    check_lora_with_diffusers.py SD1_FOLDER LORA.safetensors OURS.safetensors

OURS holds the inputs and sdt's outputs without and with the LoRA (tests/networks/write_lora_check_files.cpp).
Passes when the outputs agree within 1e-4 of their scale (the base models' own conformance level) and the LoRA
changes them by far more than that, so an ignored module cannot pass unnoticed. Prints the measured errors.
"""

import os
import sys

import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file
from transformers import CLIPTextModel

TOLERANCE = 1e-4


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def main(sd1, lora_path, ours_path):
    unet = UNet2DConditionModel.from_pretrained(os.path.join(sd1, "unet"), torch_dtype=torch.float32).eval()
    text = CLIPTextModel.from_pretrained(os.path.join(sd1, "text_encoder"), dtype=torch.float32).eval()
    pipe = StableDiffusionPipeline(vae=None, text_encoder=text, tokenizer=None, unet=unet, scheduler=DDPMScheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.load_lora_weights(lora_path)
    ours = load_file(ours_path)
    with torch.no_grad():
        unet_out = pipe.unet(ours["sample"], ours["timesteps"], encoder_hidden_states=ours["context"]).sample
        text_out = pipe.text_encoder(ours["input_ids"]).last_hidden_state
    failed = False
    for what, theirs, mine, base in [("unet", unet_out, ours["unet_lora"], ours["unet_base"]),
                                     ("text encoder", text_out, ours["text_lora"], ours["text_base"])]:
        err, effect = rel_err(theirs, mine), rel_err(base, mine)
        print(f"{what}: diffusers vs sdt max rel err {err:.3g}; the LoRA changes the output by {effect:.3g}")
        if err > TOLERANCE or effect < 100 * TOLERANCE:
            print(f"FAILED: {what}")
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    sys.exit(main(*sys.argv[1:]))
