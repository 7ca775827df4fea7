"""FP8 bases for the tests, made in the test run by the producers' own code.

Block-scaled ("quant_method": "fp8") bases are quantized with transformers'
`Fp8Quantize` (the op `save_pretrained` runs for a FineGrainedFP8Config model; the
config needs a GPU to load that way, the op itself does not). compressed-tensors
bases (per-channel `weight_scale`) are written from compressed-tensors' definition
(scale = amax / 448 per row, stored in bf16, q = w / scale), the package being absent.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import load_file, save_file

QUANTIZED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _is_quantized(name: str) -> bool:
    return name.endswith(".weight") and any(f".{m}." in name for m in QUANTIZED)


def _copy_config(src: Path, out: Path, quantization: dict[str, object]) -> None:
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = quantization
    for key in ("torch_dtype", "dtype"):
        if key in config:
            config[key] = "bfloat16"
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if (src / "generation_config.json").exists():
        shutil.copy(src / "generation_config.json", out / "generation_config.json")


def build_block_fp8_base(src: Path, out: Path, block: tuple[int, int] = (16, 16), scale_fmt: str = "float") -> Path:
    """`src` (an unquantized Llama folder) with every projection in e4m3 and
    `weight_scale_inv` per `block`, the rest in bf16, as DeepSeek-V3 ships."""
    from transformers import FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    config = FineGrainedFP8Config(weight_block_size=list(block), scale_fmt=scale_fmt)
    quantizer = Fp8Quantize(SimpleNamespace(quantization_config=config))
    tensors: dict[str, torch.Tensor] = {}
    for name, value in load_file(src / "model.safetensors").items():
        if _is_quantized(name):
            tensors.update(quantizer._quantize_one(name, value.to(torch.bfloat16)))
        else:
            tensors[name] = value.to(torch.bfloat16)
    assert any(t.dtype == torch.float8_e4m3fn for t in tensors.values())
    quantization = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                    "weight_block_size": list(block)}
    if scale_fmt != "float":
        quantization["scale_fmt"] = scale_fmt
    _copy_config(src, out, quantization)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def build_channel_fp8_base(src: Path, out: Path) -> Path:
    """compressed-tensors FP8_DYNAMIC: per-channel bf16 `weight_scale` (rows, 1)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, value in load_file(src / "model.safetensors").items():
        if _is_quantized(name):
            w = value.to(torch.bfloat16).float()
            scale = (w.abs().amax(dim=1, keepdim=True) / 448.0).to(torch.bfloat16)
            tensors[name] = (w / scale.float()).clamp(-448, 448).to(torch.float8_e4m3fn)
            tensors[name + "_scale"] = scale
        else:
            tensors[name] = value.to(torch.bfloat16)
    quantization = {
        "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {
            "targets": ["Linear"], "format": "float-quantized",
            "weights": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel", "dynamic": False},
            "input_activations": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token", "dynamic": True},
        }},
        "ignore": ["lm_head"],
    }
    _copy_config(src, out, quantization)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def dequantized64(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an FP8 folder as float64 values (codes times scales, exact in
    float64), scales left out: the truth the tests compare with."""
    tensors = load_file(folder / "model.safetensors")
    config = json.loads((folder / "config.json").read_text()).get("quantization_config") or {}
    block = config.get("weight_block_size")
    out: dict[str, torch.Tensor] = {}
    for name, value in tensors.items():
        if name.endswith(("_scale_inv", "_scale")):
            continue
        if value.dtype != torch.float8_e4m3fn:
            out[name] = value.double()
            continue
        scale = (tensors.get(name + "_scale_inv", tensors.get(name + "_scale"))).double()
        rows, cols = value.shape
        if scale.shape[-1] == 1 or block is None:
            full = scale.reshape(-1, 1).expand(rows, cols) if scale.numel() > 1 else scale.reshape(1, 1).expand(rows, cols)
        else:
            full = scale.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
        out[name] = value.double() * full
    return out


def assert_same_fp8_merges(ours, ours_dir: Path, reference, reference_dir: Path) -> None:
    """Two `merge --dtype fp8` results of the same inputs, made two ways: every output
    byte the same, the same unchanged shares and update norms, survival figures equal to
    float32 rounding (the ways sum their squares in different orders)."""
    import pytest

    for path in reference_dir.iterdir():
        assert (ours_dir / path.name).read_bytes() == path.read_bytes(), path.name
    assert [s.name for s in ours.survival] == [s.name for s in reference.survival]
    for mine, theirs in zip(ours.survival, reference.survival):
        assert mine.unchanged == theirs.unchanged and mine.update_norm == theirs.update_norm
        assert mine.survival == pytest.approx(theirs.survival, rel=1e-5)
