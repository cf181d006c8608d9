#!/usr/bin/env python3
"""Loads a file written by sdt's safetensors writer with the reference Python package and compares
every tensor and the metadata with what tests/tools/write_sample_safetensors.cpp put in.

Exit 0: equal; 1: a difference (printed); 77: skipped because torch or safetensors is missing.
"""
import sys

try:
    import torch
    from safetensors import safe_open
except ImportError as e:
    print(f"SKIPPED: the Python reference check needs torch and safetensors ({e})")
    sys.exit(77)

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent / "fixtures" / "safetensors"))
from gen_fixtures import DTYPES, value_pattern  # noqa: E402

path = sys.argv[1]
expected = {f"t_{name}": value_pattern(15, dt).reshape(3, 5) for name, dt in DTYPES.items()}
expected["scalar_f32"] = torch.tensor(1.5, dtype=torch.float32)
expected["empty_f16"] = torch.zeros(0, 4, dtype=torch.float16)
expected_metadata = {"ss_network_module": "networks.lora", "ss_network_dim": "4", "note": "written by sdt"}

problems = []
with safe_open(path, framework="pt") as f:
    if f.metadata() != expected_metadata:
        problems.append(f"metadata {f.metadata()} != {expected_metadata}")
    if set(f.keys()) != set(expected):
        problems.append(f"tensor names {sorted(f.keys())} != {sorted(expected)}")
    for name in sorted(set(f.keys()) & set(expected)):
        got, want = f.get_tensor(name), expected[name]
        if got.dtype != want.dtype or got.shape != want.shape or not torch.equal(got.to(torch.float64), want.to(torch.float64)):
            problems.append(f"{name}: got {got.dtype} {tuple(got.shape)}, want {want.dtype} {tuple(want.shape)}")
for p in problems:
    print("MISMATCH:", p)
print(f"python safetensors read {len(expected)} tensors from {path}: {'OK' if not problems else 'FAILED'}")
sys.exit(1 if problems else 0)
