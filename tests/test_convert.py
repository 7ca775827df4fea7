"""`lora-tools convert`: round trips between PEFT, kohya and diffusers keep every layer's
update (float64 from the factors, against the input read independently with safetensors
and PEFT's own scale rule), PEFT and diffusers load what it writes, unsupported layers are
refused or dropped, and the read-back proof catches a file that does not hold the input.
Real and offline: adapters made by peft on tiny transformers / diffusers models."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from builders import KohyaCase, PeftCase
from cli_run import run_cli
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy

from lora_tools.convert import convert
from lora_tools.formats import load_adapter

ROUND_TRIP_KINDS = ["llama_plain", "llama_rslora", "llama_patterns", "llama_dora", "llama_bf16"]


def _peft_updates(case: PeftCase) -> dict[str, np.ndarray]:
    """module -> s·B·A in float64, from the safetensors file and the config read here with
    PEFT's own rule (LoraConfig resolves rank_pattern/alpha_pattern and rsLoRA)."""
    from peft import LoraConfig

    from safetensors.torch import load_file

    config = LoraConfig.from_pretrained(case.adapter_dir)
    tensors = {k: v.double() for k, v in load_file(case.adapter_file).items()}
    updates = {}
    for key, a in tensors.items():
        if not key.endswith("lora_A.weight"):
            continue
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        b = tensors[key.replace("lora_A", "lora_B")]
        rank = a.shape[0]
        alpha = next((v for k, v in config.alpha_pattern.items() if module.endswith(k)), config.lora_alpha)
        scale = alpha / (rank**0.5 if config.use_rslora else rank)
        updates[module] = (scale * (b @ a)).numpy()
    return updates


def _updates(path: Path, base: Path | None = None) -> dict[str, np.ndarray]:
    """module -> ΔW (float64) as lora-tools reads `path` (kohya names resolved by `base`)."""
    adapter = load_adapter(path)
    if base is not None:
        from lora_tools.formats.names import resolve_names
        from lora_tools.io.checkpoint import BaseCheckpoint

        with BaseCheckpoint.open(base) as checkpoint:
            adapter = resolve_names(adapter, checkpoint.module_paths(), str(base))
    return {layer.name.split(".", 1)[1] if layer.name.startswith(("unet.", "transformer.")) else layer.name:
            layer.dense_update().reshape(layer.b.shape[0], -1) for layer in adapter.layers}


def _convert(*args: object) -> dict[str, Any]:
    code, stdout, stderr = run_cli("convert", *args, "--json")
    assert code == 0, stderr + stdout[-2000:]
    report = json.loads(stdout)
    assert report["exact"] and all(layer["exact"] for layer in report["layers"])
    return report


def _assert_same_updates(got: dict[str, np.ndarray], expected: dict[str, np.ndarray], rtol: float) -> None:
    assert sorted(got) == sorted(expected)
    for module, update in expected.items():
        np.testing.assert_allclose(got[module], update, rtol=0, atol=rtol * np.abs(update).max(), err_msg=module)


@pytest.mark.parametrize("kind", ROUND_TRIP_KINDS)
def test_peft_to_kohya_to_peft(peft_case_factory: Callable[[str], PeftCase], tmp_path: Path, kind: str) -> None:
    case = peft_case_factory(kind)
    kohya, back = tmp_path / "lora.safetensors", tmp_path / "back"
    report = _convert(case.adapter_dir, "--to", "kohya", "-o", kohya)
    assert {layer["factors"] for layer in report["layers"]} == {"identical"}
    expected = _peft_updates(case)
    # alpha = s·r as a float32 tensor: the scale comes back within float32's rounding
    _assert_same_updates(_updates(kohya, case.base_dir), expected, 2.0**-23)
    _convert(kohya, "--to", "peft", "--base", case.base_dir, "-o", back)
    _assert_same_updates(_updates(back), expected, 2.0**-23)
    written = load_numpy(kohya) if kind != "llama_bf16" else {}
    if kind == "llama_dora":
        assert any(k.endswith(".dora_scale") for k in written)
    source, again = load_adapter(case.adapter_dir), load_adapter(back)
    for layer in source.layers:
        twin = again.layer(layer.name)
        assert np.array_equal(np.asarray(twin.a), np.asarray(layer.a)) and np.array_equal(np.asarray(twin.b), np.asarray(layer.b))
        if layer.magnitude is not None:
            assert np.array_equal(np.asarray(twin.magnitude), np.asarray(layer.magnitude))
    _peft_loads_and_merges(case, back)


def _peft_loads_and_merges(case: PeftCase, adapter_dir: Path) -> None:
    """PEFT loads the adapter with no missing or unexpected keys, and its merge equals the
    merge of the original adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = []
    for path in (case.adapter_dir, adapter_dir):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            base = AutoModelForCausalLM.from_pretrained(case.base_dir, dtype=torch.float64)
            model = PeftModel.from_pretrained(base, path)
        assert not [w for w in caught if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
        merged.append(model.merge_and_unload().state_dict())
    for key, tensor in merged[0].items():
        torch.testing.assert_close(merged[1][key], tensor, rtol=1e-6, atol=1e-9, msg=key)


@pytest.mark.parametrize("kind", ["llama_plain", "llama_rslora", "llama_patterns", "llama_dora"])
def test_peft_to_diffusers_to_peft(peft_case_factory: Callable[[str], PeftCase], tmp_path: Path, kind: str) -> None:
    case = peft_case_factory(kind)
    file, back = tmp_path / "pytorch_lora_weights.safetensors", tmp_path / "back"
    _convert(case.adapter_dir, "--to", "diffusers", "--prefix", "transformer", "-o", file)
    header = json.loads(load_adapter(file).metadata["lora_adapter_metadata"])
    assert header["transformer.use_rslora"] == (kind == "llama_rslora")
    _convert(file, "--to", "peft", "-o", back)
    expected = _peft_updates(case)
    _assert_same_updates(_updates(file), expected, 1e-15)
    _assert_same_updates(_updates(back), expected, 1e-15)
    _peft_loads_and_merges(case, back)


def test_kohya_to_peft_to_kohya(kohya_case: KohyaCase, tmp_path: Path) -> None:
    """LoCon conv layers and both components: one PEFT adapter per component, and back to
    the very same kohya tensors (names, fp16 factors, alphas)."""
    source = load_numpy(kohya_case.lora_file)
    rebuilt: dict[str, np.ndarray] = {}
    for component, prefix in (("unet", "unet"), ("text_encoder", "te")):
        peft, again = tmp_path / f"peft-{component}", tmp_path / f"{component}.safetensors"
        report = _convert(kohya_case.lora_file, "--to", "peft", "--base", kohya_case.base_file, "--component", component,
                          "-o", peft)
        assert report["dropped"] and all(": component" in d for d in report["dropped"])
        _convert(peft, "--to", "kohya", "--prefix", prefix, "-o", again)
        rebuilt.update(load_numpy(again))
    factors = {k: v for k, v in source.items() if not k.endswith(".alpha")}
    assert {k: v for k, v in rebuilt.items() if not k.endswith(".alpha")}.keys() == factors.keys()
    for key, tensor in factors.items():
        assert rebuilt[key].dtype == tensor.dtype and np.array_equal(rebuilt[key], tensor), key
    for stem in {k.rsplit(".", 2)[0] for k in factors}:
        rank = source[f"{stem}.lora_down.weight"].shape[0]
        alpha = float(source[f"{stem}.alpha"]) if f"{stem}.alpha" in source else rank
        assert float(rebuilt[f"{stem}.alpha"]) == alpha, stem
    for module, update in kohya_case.expected_delta.items():
        got = _updates(tmp_path / "peft-unet") | _updates(tmp_path / "peft-text_encoder")
        np.testing.assert_allclose(got[module.removesuffix(".weight")], update.reshape(update.shape[0], -1), rtol=1e-6,
                                   atol=1e-9)


def test_diffusers_case_to_kohya(diffusers_case_factory: Callable[[str], Any], tmp_path: Path) -> None:
    case = diffusers_case_factory("diffusers_current")
    out = tmp_path / "lora.safetensors"
    _convert(case.lora_file, "--to", "kohya", "-o", out)
    got = _updates(out, case.base_file)
    for module, update in case.expected_delta.items():
        np.testing.assert_allclose(got[module], update.reshape(update.shape[0], -1), rtol=1e-6, atol=1e-9, err_msg=module)


def test_dtype_conversion_is_the_input_rounded(llama_plain_case: PeftCase, tmp_path: Path) -> None:
    report = _convert(llama_plain_case.adapter_dir, "--to", "kohya", "--dtype", "bf16", "-o", tmp_path / "l.safetensors")
    assert report["dtype"] == "BF16" and {layer["factors"] for layer in report["layers"]} == {"rounded"}
    assert 0 < report["max_relative_error"] < 2.0**-7


def test_the_proof_catches_a_file_that_differs(llama_plain_case: PeftCase, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from lora_tools.formats import rewrite

    original = rewrite.write_like

    def corrupting(adapter: Any, layers: Any, path: Path, *args: Any, **kwargs: Any) -> None:
        original(adapter, layers, path, *args, **kwargs)
        tensors = load_numpy(path)
        victim = sorted(k for k in tensors if k.endswith("lora_up.weight"))[3]
        tensors[victim] = tensors[victim].copy()
        tensors[victim].flat[0] = np.nextafter(tensors[victim].flat[0], np.float32(np.inf))  # one ulp
        path.unlink()
        save_numpy(tensors, path)

    monkeypatch.setattr(rewrite, "write_like", corrupting)
    code, stdout, stderr = run_cli("convert", llama_plain_case.adapter_dir, "--to", "kohya", "-o", tmp_path / "x.safetensors",
                                   "--json")
    assert code == 1, stderr
    report = json.loads(stdout)
    bad = [layer for layer in report["layers"] if not layer["exact"]]
    assert not report["exact"] and len(bad) == 1 and report["first_difference"] == bad[0]["name"]
    assert bad[0]["factors"] == "differ" and 0 < bad[0]["relative_error"] < 1e-5


@pytest.mark.parametrize(("kind", "args", "message"), [
    ("llama_plain", ["--to", "gguf"], "--to gguf needs --base"),
    ("llama_lora_bias", ["--to", "kohya"], "kohya files hold no LoRA bias"),
    ("llama_modules_to_save", ["--to", "kohya"], "full tensor"),
    ("llama_embedding", ["--to", "kohya"], "no embedding LoRA"),
    ("llama_plain", ["--to", "peft", "--component", "unet"], "no layers of component"),
])
def test_bad_requests_are_one_line_exit_2(peft_case_factory: Callable[[str], PeftCase], tmp_path: Path, kind: str,
                                          args: list[str], message: str) -> None:
    out = tmp_path / "out"
    code, stdout, stderr = run_cli("convert", peft_case_factory(kind).adapter_dir, *args, "-o", out)
    assert code == 2 and message in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert not out.exists() and not list(tmp_path.iterdir())


def test_kohya_names_need_a_base(kohya_case: KohyaCase, tmp_path: Path) -> None:
    code, _, stderr = run_cli("convert", kohya_case.lora_file, "--to", "diffusers", "-o", tmp_path / "o.safetensors")
    assert code == 2 and "needs --base" in stderr and not list(tmp_path.iterdir())


def test_drop_unsupported_lists_what_was_left_out(peft_case_factory: Callable[[str], PeftCase], tmp_path: Path) -> None:
    case = peft_case_factory("llama_modules_to_save")
    report = convert(case.adapter_dir, tmp_path / "o.safetensors", to="kohya", drop_unsupported=True)
    assert report.exact and report.dropped == ["lm_head.weight: a full tensor has no kohya form"]
    case = peft_case_factory("llama_embedding")
    report = convert(case.adapter_dir, tmp_path / "e.safetensors", to="kohya", drop_unsupported=True)
    # the layer, and the copy of the base embedding PEFT saves with it
    assert report.exact and [d.split(":")[0] for d in report.dropped] == ["model.embed_tokens", "model.embed_tokens.weight"]
    assert report.n_layers_out == report.n_layers_in - 1


def test_a_base_that_does_not_fit_is_refused(peft_case_factory: Callable[[str], PeftCase], tmp_path: Path) -> None:
    code, _, stderr = run_cli("convert", peft_case_factory("llama_plain").adapter_dir, "--to", "peft", "--base",
                              peft_case_factory("gpt2_conv1d").base_dir, "-o", tmp_path / "o")
    assert code == 2 and len(stderr.strip().splitlines()) == 1 and not list(tmp_path.iterdir())


@pytest.mark.parametrize("kind", ["llama_plain", "llama_rslora", "llama_patterns", "llama_embedding", "llama_bf16"])
def test_peft_to_gguf_is_proven(peft_case_factory: Callable[[str], PeftCase], tmp_path: Path, kind: str) -> None:
    """Read back by the GGUF reader (q/k rows un-permuted): unfolded layers bit for bit,
    folded ones (alpha patterns under llama.cpp's one alpha) within one ulp of the dtype;
    the layouts themselves are checked against llama.cpp in tests/test_gguf.py."""
    case = peft_case_factory(kind)
    args: list[object] = ["--drop-unsupported"] if kind == "llama_embedding" else []
    report = _convert(case.adapter_dir, "--to", "gguf", "--base", case.base_dir, "-o", tmp_path / "a.gguf", *args)
    assert report["gguf_architecture"] == "llama"
    kinds = {layer["factors"] for layer in report["layers"]}
    assert kinds == ({"identical", "folded"} if kind == "llama_patterns" else {"identical"})
    if kind == "llama_embedding":  # the layer goes (token_embd), PEFT's saved copy of the base embedding cannot
        assert [d.split(":")[0] for d in report["dropped"]] == ["model.embed_tokens.weight"]


def test_gguf_refusals(peft_case_factory: Callable[[str], PeftCase], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plain, dora, gpt2 = (peft_case_factory(k) for k in ("llama_plain", "llama_dora", "gpt2_conv1d"))
    out = tmp_path / "a.gguf"
    for adapter, base, message in ((dora, dora.base_dir, "DoRA has no GGUF form"),
                                   (gpt2, gpt2.base_dir, "fan_in_fan_out"),
                                   (plain, gpt2.base_dir, "")):
        code, _, stderr = run_cli("convert", adapter.adapter_dir, "--to", "gguf", "--base", base, "-o", out)
        assert code == 2 and message in stderr and len(stderr.strip().splitlines()) == 1, stderr
        assert not list(tmp_path.iterdir())
    code, _, stderr = run_cli("convert", gpt2.adapter_dir, "--to", "gguf", "--base", gpt2.base_dir, "--drop-unsupported",
                              "-o", out)
    assert code == 2 and "no layer can be written" in stderr and not list(tmp_path.iterdir())
    import lora_tools.formats.gguf as gguf_format

    monkeypatch.setattr(gguf_format, "gguf_available", lambda: False)
    code, _, stderr = run_cli("convert", plain.adapter_dir, "--to", "gguf", "--base", plain.base_dir, "-o", out)
    assert code == 2 and "pip install 'lora-tools[gguf]'" in stderr and not out.exists()


def test_gguf_base_of_an_unknown_architecture(llama_plain_case: PeftCase, tmp_path: Path) -> None:
    import shutil

    base = tmp_path / "base"
    shutil.copytree(llama_plain_case.base_dir, base)
    config = json.loads((base / "config.json").read_text())
    config["architectures"] = ["GPTNeoXForCausalLM"]
    (base / "config.json").write_text(json.dumps(config))
    out = tmp_path / "a.gguf"
    code, _, stderr = run_cli("convert", llama_plain_case.adapter_dir, "--to", "gguf", "--base", base, "-o", out)
    assert code == 2 and "GPTNeoXForCausalLM" in stderr and "LlamaForCausalLM" in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1 and not out.exists()
