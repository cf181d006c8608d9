"""Loads a LoRA that sdt wrote with diffusers' kohya-format loader (load_lora_weights of StableDiffusionPipeline, of
StableDiffusionXLPipeline, which maps kohya's SGM names onto its U-Net, or of FluxPipeline, which maps kohya's lora_flux
names onto its FluxTransformer2DModel, fused qkv split) into the tiny SD 1.x, SDXL or FLUX.1 dev pipeline, and compares
its denoiser and text-encoder outputs with sdt's own (the LoRA's adapters applied).

    check_lora_with_diffusers.py sd|sdxl|flux MODEL_FOLDER LORA.safetensors OURS.safetensors

FLUX: the tiny transformer's BFL file goes into diffusers' FluxTransformer2DModel through diffusers' own single-file
conversion (convert_flux_transformer_checkpoint_to_diffusers), and the LoRA through diffusers' own kohya conversion
(_convert_kohya_flux_lora_to_diffusers), FLUX's widths (3072, 12288) in both set to the tiny model's.

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


def flux_outputs(folder, lora_path, ours):
    import inspect
    import json
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from diffusers.loaders import single_file_utils
    from safetensors import safe_open
    path = os.path.join(folder, "transformer.safetensors")
    weights = load_file(path)
    hidden, in_channels = weights["img_in.weight"].shape
    head = weights["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0]
    mlp = weights["single_blocks.0.linear2.weight"].shape[1] - hidden  # (the conversion below empties `weights`)
    axes = json.loads(safe_open(path, "pt").metadata()["flux_axes_dim"])
    source = inspect.getsource(single_file_utils.convert_flux_transformer_checkpoint_to_diffusers)
    scope = dict(vars(single_file_utils))
    exec(source.replace("inner_dim = 3072", f"inner_dim = {hidden}"), scope)
    count = lambda prefix: len({k.split(".")[1] for k in weights if k.startswith(prefix)})
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=in_channels, num_layers=count("double_blocks."),
                                         num_single_layers=count("single_blocks."), attention_head_dim=head,
                                         num_attention_heads=hidden // head, joint_attention_dim=weights["txt_in.weight"].shape[1],
                                         pooled_projection_dim=weights["vector_in.in_layer.weight"].shape[1],
                                         guidance_embeds=True, axes_dims_rope=tuple(axes))  # mlp ratio 4, as FLUX
    transformer.load_state_dict(scope["convert_flux_transformer_checkpoint_to_diffusers"](weights))
    text = CLIPTextModel.from_pretrained(os.path.join(folder, "..", "..", "sd", "sd1", "text_encoder")).float().eval()
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=text, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=transformer.float().eval())
    # diffusers' kohya FLUX LoRA conversion splits single blocks' linear1 at FLUX's widths: the tiny model's instead.
    from diffusers.loaders import lora_conversion_utils, lora_pipeline
    source = inspect.getsource(lora_conversion_utils)
    scope = {"__name__": "diffusers.loaders.lora_conversion_utils_tiny", "__package__": "diffusers.loaders"}
    exec(source.replace("dims=[3072, 3072, 3072, 12288]", f"dims=[{hidden}, {hidden}, {hidden}, {mlp}]"), scope)
    lora_pipeline._convert_kohya_flux_lora_to_diffusers = scope["_convert_kohya_flux_lora_to_diffusers"]
    pipe.load_lora_weights(lora_path)
    with torch.no_grad():
        out = pipe.transformer(hidden_states=ours["img"], encoder_hidden_states=ours["txt"], pooled_projections=ours["y"],
                               timestep=ours["timesteps"], img_ids=ours["img_ids"][0], txt_ids=ours["txt_ids"][0],
                               guidance=ours["guidance"]).sample
        return [("transformer", out), ("text", pipe.text_encoder(ours["input_ids"]).pooler_output)]


def outputs(family, folder, lora_path, ours):
    """(what, diffusers' output with the LoRA) for the denoiser and each text encoder."""
    if family == "flux":
        return flux_outputs(folder, lora_path, ours)
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
