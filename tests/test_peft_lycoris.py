"""PEFT's own LoHa and LoKr adapters (its tuners on the tiny Llama, patterns and both LoKr
forms): lora-tools reads them into exact LoRA layers, merges them equal to PEFT's
`merge_and_unload`, verify proves the merge and catches corrupted ones, inspect's σ are
the dense float64 SVD's, and convert writes them as plain LoRA exactly."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from builders import PeftCase
from cli_run import run_cli
from safetensors.torch import load_file, save_file

from lora_tools.formats import load_adapter
from lora_tools.inspect import inspect_adapter

CONFIGS = {
    "loha": ("LoHaConfig", dict(r=4, alpha=6, target_modules=["q_proj", "v_proj", "down_proj"],
                                rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 3})),
    "lokr": ("LoKrConfig", dict(r=4, alpha=6, target_modules=["q_proj", "v_proj", "down_proj"], decompose_both=True,
                                alpha_pattern={"v_proj": 3})),
    "lokr_full": ("LoKrConfig", dict(r=16, alpha=6, target_modules=["q_proj", "down_proj"])),
}


@pytest.fixture(scope="module")
def peft_lycoris(tmp_path_factory: pytest.TempPathFactory,
                 peft_case_factory: Callable[[str], PeftCase]) -> Callable[[str], tuple[Path, Path, dict[str, torch.Tensor]]]:
    """kind -> (base dir, adapter dir, PEFT's merge_and_unload state dict)."""
    import peft
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    base_dir = peft_case_factory("llama_plain").base_dir
    root = tmp_path_factory.mktemp("peft_lycoris")
    cache: dict[str, tuple[Path, Path, dict[str, torch.Tensor]]] = {}

    def build(kind: str) -> tuple[Path, Path, dict[str, torch.Tensor]]:
        if kind not in cache:
            name, options = CONFIGS[kind]
            torch.manual_seed(5)
            model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), getattr(peft, name)(**options))
            with torch.no_grad():  # PEFT zeroes one side at init: make every factor count
                for param_name, param in model.named_parameters():
                    if "hada_" in param_name or "lokr_" in param_name:
                        param.copy_(torch.randn_like(param) * 0.2)
            adapter = root / kind
            model.save_pretrained(adapter)
            cache[kind] = (base_dir, adapter, {k: v.clone() for k, v in model.merge_and_unload().state_dict().items()})
        return cache[kind]

    return build


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_merge_equals_peft_and_verify_proves_it(peft_lycoris: Callable[[str], tuple[Path, Path, dict[str, torch.Tensor]]],
                                                tmp_path: Path, kind: str) -> None:
    base, adapter, expected = peft_lycoris(kind)
    merged = tmp_path / "merged"
    code, _, stderr = run_cli("merge", base, adapter, "-o", merged, "-q")
    assert code == 0, stderr
    got = load_file(merged / "model.safetensors")
    original = load_file(base / "model.safetensors")
    changed = 0
    for key, tensor in expected.items():
        if key not in got:
            continue  # tied lm_head
        scale = float(tensor.abs().max())
        torch.testing.assert_close(got[key], tensor.to(got[key].dtype), rtol=0, atol=2e-7 * max(scale, 1.0), msg=key)
        changed += not torch.equal(got[key], original[key])
    assert changed == len(load_adapter(adapter).layers)
    code, stdout, stderr = run_cli("verify", base, adapter, merged)
    assert code == 0, stdout + stderr
    victim = next(k for k in got if "v_proj" in k or "down_proj" in k)
    delta = got[victim] - original[victim]
    for defect, tensor in {"not applied": original[victim], "half": original[victim] + delta / 2,
                           "double": original[victim] + 2 * delta, "sign": original[victim] - delta,
                           "5 % too strong": original[victim] + delta * 1.05}.items():
        bad = tmp_path / defect.replace(" ", "_").replace("%", "pct")
        bad.mkdir()
        for extra in merged.iterdir():
            if extra.name != "model.safetensors":
                (bad / extra.name).write_bytes(extra.read_bytes())
        save_file({**got, victim: tensor}, bad / "model.safetensors", metadata={"format": "pt"})
        code, stdout, _ = run_cli("verify", base, adapter, bad)
        assert code == 1 and victim in stdout, defect


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_inspect_sigma_is_the_dense_svd(peft_lycoris: Callable[[str], tuple[Path, Path, dict[str, torch.Tensor]]],
                                        kind: str) -> None:
    _, adapter, _ = peft_lycoris(kind)
    source = load_adapter(adapter)
    report = inspect_adapter(adapter)
    assert {layer.algo for layer in report.layers} == {kind.split("_")[0]}
    for layer, figures in zip(source.layers, report.layers):
        sigma = np.linalg.svd(layer.dense_update().reshape(layer.b.shape[0], -1), compute_uv=False)
        k = min(len(sigma), len(figures.singular_values))
        np.testing.assert_allclose(figures.singular_values[:k], sigma[:k], rtol=0, atol=1e-9 * sigma[0])
        assert all(s <= 1e-9 * sigma[0] for s in figures.singular_values[k:])


def test_convert_to_plain_lora_is_exact(peft_lycoris: Callable[[str], tuple[Path, Path, dict[str, torch.Tensor]]],
                                        tmp_path: Path) -> None:
    """LoHa → LoRA at rank r₁·r₂ in float64 (products of float32 values), proven by the
    read-back, and PEFT merges the result like the original."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, adapter, expected = peft_lycoris("loha")
    out = tmp_path / "lora"
    code, stdout, stderr = run_cli("convert", adapter, "--to", "peft", "-o", out, "--json")
    assert code == 0, stderr
    report = json.loads(stdout)
    assert report["exact"] and report["dtype"] == "F64"
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64), out)
    merged = model.merge_and_unload().state_dict()
    for key, tensor in expected.items():
        torch.testing.assert_close(merged[key].float(), tensor, rtol=0, atol=3e-7 * max(float(tensor.abs().max()), 1.0))
