"""Loads a LoRA that sdt wrote with diffusers' kohya-format loader (load_lora_weights of StableDiffusionPipeline, or of
StableDiffusionXLPipeline, which maps kohya's SGM names onto its U-Net) into the tiny SD 1.x or SDXL pipeline, and
compares its U-Net and text-encoder outputs with sdt's own (the LoRA's adapters applied).

    check_lora_with_diffusers.py sd|sdxl DIFFUSERS_FOLDER LORA.safetensors OURS.safetensors

OURS holds the inputs and sdt's outputs without and with the LoRA (tests/networks/write_lora_check_files.cpp).
Passes when the outputs agree within 1e-4 of their scale (the base models' own conformance level) and the LoRA
changes them by far more than that, so an ignored module cannot pass unnoticed. Prints the measured errors.
"""

import os
import sys

import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors.torch import load_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection

TOLERANCE = 1e-4


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def outputs(family, folder, lora_path, ours):
    """(what, diffusers' output with the LoRA) for the U-Net and each text encoder."""
    unet = UNet2DConditionModel.from_pretrained(os.path.join(folder, "unet"), torch_dtype=torch.float32).eval()
    text = CLIPTextModel.from_pretrained(os.path.join(folder, "text_encoder"), dtype=torch.float32).eval()
    if family == "sd":
        pipe = StableDiffusionPipeline(vae=None, text_encoder=text, tokenizer=None, unet=unet, scheduler=DDPMScheduler(),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.load_lora_weights(lora_path)
        with torch.no_grad():
            return [("unet", pipe.unet(ours["sample"], ours["timesteps"], encoder_hidden_states=ours["context"]).sample),
                    ("text", pipe.text_encoder(ours["input_ids"]).last_hidden_state)]
    text2 = CLIPTextModelWithProjection.from_pretrained(os.path.join(folder, "text_encoder_2"), dtype=torch.float32).eval()
    pipe = StableDiffusionXLPipeline(vae=None, text_encoder=text, text_encoder_2=text2, tokenizer=None, tokenizer_2=None,
                                     unet=unet, scheduler=DDPMScheduler())
    pipe.load_lora_weights(lora_path)
    added = {"text_embeds": ours["text_embeds"], "time_ids": ours["time_ids"]}
    with torch.no_grad():
        return [("unet", pipe.unet(ours["sample"], ours["timesteps"], encoder_hidden_states=ours["context"],
                                   added_cond_kwargs=added).sample),
                ("text", pipe.text_encoder(ours["input_ids"]).last_hidden_state),
                ("text2", pipe.text_encoder_2(ours["input_ids"]).text_embeds)]


def main(family, folder, lora_path, ours_path):
    ours = load_file(ours_path)
    failed = False
    for what, theirs in outputs(family, folder, lora_path, ours):
        mine, base = ours[what + "_lora"], ours[what + "_base"]
        err, effect = rel_err(theirs, mine), rel_err(base, mine)
        print(f"{family} {what}: diffusers vs sdt max rel err {err:.3g}; the LoRA changes the output by {effect:.3g}")
        if err > TOLERANCE or effect < 100 * TOLERANCE:
            print(f"FAILED: {what}")
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    sys.exit(main(*sys.argv[1:]))
