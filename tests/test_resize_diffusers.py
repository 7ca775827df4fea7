"""`resize` of a kohya LoRA, read back by diffusers itself: `load_lora_weights` into a tiny
Stable Diffusion pipeline built from configs in the test run (no hub), UNet and text
encoder. Each loaded PEFT layer's ΔW must be the float64 Eckart–Young truncation of the
input's s·up·down at the rank written.

A finding kept in the test: diffusers' kohya converter names the alphas of attention
layers (`…attn1.processor.to_q_lora.down.weight.alpha`) so that they never match a module,
so those layers get the file's most common alpha. A resized file's per-module alphas
(alpha = s·k, exact in the kohya format, and what kohya's own resize writes) are then
misread there (text-encoder attention too); `--bake` writes one alpha for all and folds
the rest into the factors, so diffusers reads it right. Both are checked: the baked file
layer by layer, the per-module file for every layer that is not an attention projection.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_run import run_cli
from safetensors.torch import load_file, save_file
from sd_pipeline import tiny_pipeline as _pipeline

diffusers = pytest.importorskip("diffusers")  # a test dependency ([test] extra); the skip only guards odd installs

RANK = 8


@pytest.fixture(scope="module")
def kohya_sd_lora(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A kohya LoRA over the tiny pipeline's UNet and text encoder, made by PEFT and
    diffusers' own kohya converter, with decaying spectra and per-module alphas."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    tmp = tmp_path_factory.mktemp("kohya_sd")
    pipe = _pipeline(tmp)
    pipe.unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights=False, target_modules=[
        "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]))
    inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights=False,
                                       target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]), pipe.text_encoder)
    peft_keys = {f"unet.{k}": v for k, v in get_peft_model_state_dict(pipe.unet).items()}
    peft_keys |= {f"text_encoder.{k}": v for k, v in get_peft_model_state_dict(pipe.text_encoder).items()}
    kohya = convert_state_dict_to_kohya(peft_keys)
    tensors: dict[str, torch.Tensor] = {}
    for index, module in enumerate(sorted({k.split(".")[0] for k in kohya})):
        down = kohya[f"{module}.lora_down.weight"]  # (r, in) or a 1×1 conv's (r, in, 1, 1)
        decay = torch.logspace(0, -0.4 - 0.3 * (index % 4), RANK)  # σ spreads that differ: several ranks kept
        tensors[f"{module}.lora_down.weight"] = (down * decay.reshape(-1, *(1,) * (down.ndim - 1))).contiguous()
        tensors[f"{module}.lora_up.weight"] = kohya[f"{module}.lora_up.weight"].contiguous()
        tensors[f"{module}.alpha"] = torch.tensor(float(2 + index % 5))
    source = tmp / "lora.safetensors"
    save_file(tensors, source, metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(RANK),
                                         "ss_network_alpha": "Dynamic"})
    return tmp, source


def _loaded_deltas(tmp: Path, lora: Path) -> dict[str, tuple[np.ndarray, float]]:
    """kohya module name -> (ΔW diffusers applies, its scaling), via load_lora_weights."""
    from peft.tuners.lora import LoraLayer

    pipe = _pipeline(tmp)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe.load_lora_weights(lora)
    deltas = {}
    for prefix, model in (("lora_unet_", pipe.unet), ("lora_te1_", pipe.text_encoder)):  # diffusers' kohya names
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer):
                adapter = module.active_adapters[0]
                delta = module.get_delta_weight(adapter).detach().double().numpy()
                deltas[prefix + name.removeprefix("text_model.").replace(".", "_")] = (delta, module.scaling[adapter])
    return deltas


def _truncated(source: dict[str, torch.Tensor], module: str, k: int) -> np.ndarray:
    """The input's s·up·down (float64) truncated to rank k by a dense SVD."""
    up = source[f"{module}.lora_up.weight"].double().numpy()
    down = source[f"{module}.lora_down.weight"].double().numpy()
    delta = float(source[f"{module}.alpha"]) / down.shape[0] * (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1))
    u, sigma, vt = np.linalg.svd(delta, full_matrices=False)
    return (u[:, :k] * sigma[:k]) @ vt[:k]


@pytest.mark.parametrize("bake", [True, False])
def test_diffusers_loads_the_resized_kohya_file(kohya_sd_lora: tuple[Path, Path], tmp_path: Path, bake: bool) -> None:
    tmp, source_path = kohya_sd_lora
    out = tmp_path / "small.safetensors"
    code, stdout, stderr = run_cli("resize", source_path, "--energy", "0.9", *(["--bake"] if bake else []), "-o", out,
                                   "--json")
    assert code == 0, stderr
    report = json.loads(stdout)
    source, written = load_file(source_path), load_file(out)
    ranks = {layer["name"]: layer["rank_out"] for layer in report["layers"]}
    assert len(set(ranks.values())) > 1  # mixed ranks: the case where alphas matter
    deltas = _loaded_deltas(tmp, out)
    assert sorted(deltas) == sorted(ranks)  # every layer loaded, none missing
    checked = 0
    for module, k in ranks.items():
        assert written[f"{module}.lora_down.weight"].shape[0] == k
        attention = "_attn" in module.removeprefix("lora_unet_").split("transformer_blocks")[-1] or "self_attn" in module
        if attention and not bake:
            continue  # diffusers may give it another module's alpha (see the module docstring)
        expected = _truncated(source, module, k)
        got = deltas[module][0].reshape(expected.shape)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max(), err_msg=module)
        checked += 1
    assert checked == len(ranks) if bake else checked >= len(ranks) // 4
