#!/usr/bin/env python3
"""Regenerates src/core/train_args_table.inc: the table of `sdt train` arguments under kohya's names.

The names, kinds, defaults and choices are kohya-ss/sd-scripts' train_network.py command line, with train_db.py's,
SDXL's (sdxl_train.py) and the transformer families' (flux_train_network.py) arguments (a kohya user's flags and config files must mean the
same here); the help texts are the English half
of kohya's (Apache-2.0). sdt's own arguments are appended from SDT_ARGS below.

Usage: tools/gen_train_args_table.py /path/to/sd-scripts > src/core/train_args_table.inc
It reads the argparse calls with `ast` and runs only them, so it needs no torch/accelerate.
"""
import argparse
import ast
import pathlib
import sys

# (kohya module, function, positional args after parser, group shown in docs)
KOHYA_GROUPS = [
    ("library/utils.py", "add_logging_arguments", (), "logging"),
    ("library/train_util.py", "add_sd_models_arguments", (), "model"),
    ("library/sai_model_spec.py", "add_model_spec_arguments", (), "model spec metadata"),
    ("library/train_util.py", "add_dataset_arguments", (True, True, True), "dataset"),
    ("library/train_util.py", "add_training_arguments", (True,), "training"),
    ("library/train_util.py", "add_masked_loss_arguments", (), "masked loss"),
    ("library/deepspeed_utils.py", "add_deepspeed_arguments", (), "deepspeed"),
    ("library/train_util.py", "add_optimizer_arguments", (), "optimizer"),
    ("library/config_util.py", "add_config_arguments", (), "dataset config"),
    ("library/custom_train_functions.py", "add_custom_train_arguments", (), "loss weighting"),
    # The transformer families' scripts (flux_train_network.py and the others): flow matching, block swap, the
    # text-encoder output cache; and FLUX.1 / Chroma's own.
    ("library/train_util.py", "add_dit_training_arguments", (), "transformer families"),
    ("library/flux_train_utils.py", "add_flux_train_arguments", (), "FLUX.1 / Chroma"),
]

# sdt's own arguments: (name, kind, default C++ literal, choices, help, group)
SDT_ARGS = [
    ("log_all_ranks", "Flag", "false", [], "log info messages from every rank, not only rank 0", "logging"),
    ("skip_bad_images", "Flag", "false", [], "skip an unreadable or corrupt image with a warning instead of stopping", "dataset"),
    ("log_time_every_n_steps", "Int", "100", [], "every N optimizer steps, log each rank's time split: data, forward, backward, communication, optimizer (0: only at the end)", "logging"),
    ("ddp_bucket_mb", "Int", "25", [], "data parallel: gradients are averaged over the ranks in buckets of about this many MiB, each as soon as backward has filled it", "training"),
    ("vae_latents", "Str", '"sample"', ["sample", "mean"], "latents encoded during training: a sample of the VAE's posterior (kohya), or its mean (deterministic; what sdt's latent caches store)", "dataset"),
    ("check_replicas_every_n_steps", "Int", "0", [], "data parallel: every N steps compare a checksum of the trained weights across ranks and stop, naming the ranks, if a replica diverged (0: never)", "training"),
    ("sharding", "Str", '"none"', ["none", "optimizer", "gradients", "full"], "data parallel: what each rank keeps only 1/N of: none (plain data parallel), optimizer (its state, ZeRO-1), gradients (and the gradients, ZeRO-2), full (and the weights, ZeRO-3/FSDP; block-stack models only)", "training"),
    ("device", "Str", '"auto"', ["auto", "cuda", "cpu"], "where each rank computes: cuda (the GPU of its rank on the node; one GPU when CUDA_VISIBLE_DEVICES leaves it one), cpu, or auto (cuda when a GPU is visible)", "training"),
    ("family", "OptStr", "std::nullopt", [], "the model family to train (sd, ...); default: the family that recognises the checkpoint given by --pretrained_model_name_or_path", "model"),
    ("text_projection_as_kohya", "Flag", "false", [], "SDXL single files: load the second text encoder's text_projection untransposed, as kohya's sdxl_model_util does (kohya's pooled vector), instead of as OpenCLIP and diffusers use it", "model"),
    ("tokenizer", "OptStr", "std::nullopt", [], "CLIP vocabulary: bpe_simple_vocab_16e6.txt.gz, or a folder with vocab.json and merges.txt (default: the diffusers model folder's tokenizer/, else the vocabulary sdt ships in data/tokenizers/clip)", "model"),
]

# Alternative spellings accepted on the command line and in config files.
ALIASES = {"log_level": "console_log_level"}


def collect(root: pathlib.Path):
    parser = argparse.ArgumentParser()
    groups = {}
    for module, function, args, group in KOHYA_GROUPS:
        tree = ast.parse((root / module).read_text())
        env = {"argparse": argparse, "Path": pathlib.Path, "__builtins__": __builtins__}
        for node in tree.body:
            if isinstance(node, ast.Assign) or (isinstance(node, ast.FunctionDef) and node.name == function):
                try:
                    exec(compile(ast.Module([node], []), module, "exec"), env)
                except Exception:
                    pass  # module-level assignments that need heavy imports are not used by the argparse code
        before = len(parser._actions)
        env[function](parser, *args)
        for action in parser._actions[before:]:
            groups[action.dest] = group
    add_script_arguments(parser, groups, root / "train_network.py", "network", {})
    # The full fine-tuning scripts' own arguments, those the parser lacks: train_db.py (`sdt train_db`: DreamBooth /
    # fine-tuning) and sdxl_train.py (`sdt sdxl_train`, and `sdt train_db` on SDXL).
    add_script_arguments(parser, groups, root / "train_db.py", "fine-tuning (train_db)", {})
    add_script_arguments(parser, groups, root / "sdxl_train.py", "SDXL", {"UNET_NUM_BLOCKS_FOR_BLOCK_LR": 23})
    return [(a, groups[a.dest]) for a in parser._actions if a.option_strings and a.dest != "help"]


def add_script_arguments(parser, groups, script: pathlib.Path, group: str, constants: dict):
    """The add_argument calls of the script's setup_parser for options the parser lacks, run with `constants`."""
    tree = ast.parse(script.read_text())
    setup = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "setup_parser")
    known = {o for a in parser._actions for o in a.option_strings}
    calls = [s for s in setup.body if isinstance(s, ast.Expr) and getattr(s.value.func, "attr", "") == "add_argument"
             and s.value.args[0].value not in known]
    before = len(parser._actions)
    exec(compile(ast.Module(calls, []), script.name, "exec"), {"parser": parser, "argparse": argparse, **constants})
    for action in parser._actions[before:]:
        groups[action.dest] = group


def cxx_string(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ") + '"'


def row(action, group):
    t = getattr(action.type, "__name__", None)
    d = action.default
    if type(action).__name__ == "_StoreTrueAction":
        kind, default = "Flag", "false"
    elif action.nargs == "*":
        kind = {"str": "StrList", "float": "FloatList"}[t]
        default = "{}"
    elif t == "int_or_float":
        kind, default = "IntOrFloat", f"IntOrFloat::integer({int(d)})"
    elif t == "int":
        kind, default = ("OptInt", "std::nullopt") if d is None else ("Int", str(int(d)))
    elif t == "float":
        kind, default = ("OptFloat", "std::nullopt") if d is None else ("Float", repr(float(d)))
    else:  # str and Path
        kind, default = ("OptStr", "std::nullopt") if d is None else ("Str", cxx_string(str(d)))
    choices = [str(c) for c in (action.choices or []) if c is not None]
    help_text = (action.help or "").split(" / ")[0].strip()
    return action.dest, kind, default, choices, help_text, group


def main():
    root = pathlib.Path(sys.argv[1])
    rows = [row(a, g) for a, g in collect(root)]
    for extra in SDT_ARGS:  # after the last argument of the same group, so the docs keep groups together
        last = max((i for i, r in enumerate(rows) if r[5] == extra[5]), default=len(rows) - 1)
        rows.insert(last + 1, extra)
    print("// Generated by tools/gen_train_args_table.py from kohya-ss/sd-scripts train_network.py and train_db.py; edit the script.")
    print("// SDT_ARG(name, kind, default, choices separated by |, group, help)")
    for name, kind, default, choices, help_text, group in rows:
        choice_list = cxx_string("|".join(choices))
        print(f"SDT_ARG({name}, {kind}, {default}, {choice_list}, {cxx_string(group)}, {cxx_string(help_text)})")
    for alias, target in ALIASES.items():
        print(f"SDT_ARG_ALIAS({alias}, {target})")


if __name__ == "__main__":
    main()
