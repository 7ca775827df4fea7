"""Adapter readers (issue #3): every fixture format read into the right layers.

Expectations are computed here from the raw files (safetensors.torch, torch.load) and
the formats' own rules (PEFT's get_pattern_key, kohya's alpha/r), never via lora_tools.
`reference_layers` is shared with test_inspect.py, which checks the spectra against it.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from builders import DiffusersCase, KohyaCase, PeftCase
from lora_tools.adapter import Adapter, LoraLayer
from lora_tools.formats import load_adapter
from lora_tools.formats.diffusers import DIFFUSERS_WEIGHTS, write_diffusers
from lora_tools.formats.kohya import write_kohya
from lora_tools.formats.names import format_key, resolve_names
from lora_tools.inspect import inspect_adapter
from lora_tools.io.checkpoint import BaseCheckpoint
from lora_tools.io.encode import WriteError

PEFT_PREFIX = "base_model.model."

# PEFT key suffix -> role, as peft 0.21 `get_peft_model_state_dict` writes them.
_PEFT_ROLES = {
    ".lora_A.weight": "a",
    ".lora_B.weight": "b",
    ".lora_B.bias": "bias",
    ".lora_embedding_A": "emb_a",
    ".lora_embedding_B": "emb_b",
    ".lora_magnitude_vector": "magnitude",
}


# --------------------------------------------------------------------------- raw reading


def raw_tensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a .safetensors or torch .bin file, floats widened to float64."""
    if path.suffix == ".bin":
        state = torch.load(path, map_location="cpu", weights_only=True)
    else:
        state = load_file(path)
    return {k: (v.to(torch.float64) if v.is_floating_point() else v).numpy() for k, v in state.items()}


@dataclass
class RefLayer:
    """One adapted module as the format's own rules describe it (float64)."""

    name: str
    kind: str  # "linear" | "conv" | "embedding"
    a: np.ndarray
    b: np.ndarray
    alpha: float
    scale: float
    fan_in_fan_out: bool = False
    magnitude: np.ndarray | None = None
    bias: np.ndarray | None = None

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def product(self) -> np.ndarray:
        """s·B·A as a 2-D matrix: (out, in) for linear, (out, in·kh·kw) for conv and
        (embedding_dim, num_embeddings) for an embedding (its ΔW is the transpose)."""
        r = self.rank
        return self.scale * (self.b.reshape(self.b.shape[0], r) @ self.a.reshape(r, -1))

    def dense(self) -> np.ndarray:
        """ΔW shaped and oriented like the base weight."""
        m = self.product()
        if self.kind == "embedding" or self.fan_in_fan_out:
            return m.T
        if self.kind == "conv":
            return m.reshape(self.b.shape[0], *self.a.shape[1:])
        return m


def peft_pattern_value(pattern: dict[str, float], module: str, default: float) -> float:
    """PEFT's own rule: peft.utils.other.get_pattern_key picks the key, then .get()."""
    from peft.utils.other import get_pattern_key

    return pattern.get(get_pattern_key(pattern.keys(), module), default)


def peft_reference(
    tensors: dict[str, np.ndarray], config: dict[str, Any] | None
) -> tuple[dict[str, RefLayer], dict[str, np.ndarray]]:
    """PEFT layers (module path -> RefLayer) and full tensors (key without prefix -> array).

    config None: a bare file, alpha = r per module."""
    roles: dict[str, dict[str, np.ndarray]] = {}
    full: dict[str, np.ndarray] = {}
    for key, value in tensors.items():
        bare = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        for suffix, role in _PEFT_ROLES.items():
            if bare.endswith(suffix):
                roles.setdefault(bare[: -len(suffix)], {})[role] = value
                break
        else:
            full[bare.replace(".base_layer.", ".")] = value
    layers = {}
    for module, parts in roles.items():
        embedding = "emb_a" in parts
        a, b = (parts["emb_a"], parts["emb_b"]) if embedding else (parts["a"], parts["b"])
        r = a.shape[0]
        if config is None:
            alpha, rslora, ffio = float(r), False, False
        else:
            alpha = float(peft_pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"]))
            rslora, ffio = bool(config.get("use_rslora")), bool(config.get("fan_in_fan_out"))
        kind = "embedding" if embedding else ("conv" if a.ndim == 4 else "linear")
        layers[module] = RefLayer(
            module, kind, a, b, alpha, alpha / (math.sqrt(r) if rslora else r),
            fan_in_fan_out=ffio and kind == "linear", magnitude=parts.get("magnitude"), bias=parts.get("bias"),
        )
    return layers, full


def kohya_reference(case: KohyaCase) -> dict[str, RefLayer]:
    """kohya name -> RefLayer; alpha from the `.alpha` tensor, or r when it is missing."""
    tensors = raw_tensors(case.lora_file)
    layers = {}
    for name in case.module_map:
        down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
        r = down.shape[0]
        alpha = float(tensors[f"{name}.alpha"]) if f"{name}.alpha" in tensors else float(r)
        layers[name] = RefLayer(name, "conv" if down.ndim == 4 else "linear", down, up, alpha, alpha / r)
    return layers


def diffusers_reference(case: DiffusersCase) -> dict[str, RefLayer]:
    """`<component>.<module path>` -> RefLayer, scale as the fixture says (alpha = scale·r)."""
    tensors = raw_tensors(case.lora_file)
    layers = {}
    for file_name, module in case.module_names.items():
        if f"{file_name}.lora_A.weight" in tensors:
            a, b = tensors[f"{file_name}.lora_A.weight"], tensors[f"{file_name}.lora_B.weight"]
        else:
            a, b = tensors[f"{file_name}.down.weight"], tensors[f"{file_name}.up.weight"]
        name = f"{file_name.split('.', 1)[0]}.{module}"
        scale = case.scale[module]
        layers[name] = RefLayer(name, "conv" if a.ndim == 4 else "linear", a, b, scale * a.shape[0], scale)
    return layers


def reference_layers(case: PeftCase | KohyaCase | DiffusersCase) -> dict[str, RefLayer]:
    """Reference layers keyed by the name `inspect` reports without --base."""
    if isinstance(case, PeftCase):
        return peft_reference(raw_tensors(case.adapter_file), case.adapter_config)[0]
    if isinstance(case, KohyaCase):
        return kohya_reference(case)
    return diffusers_reference(case)


def resolved_name(case: PeftCase | KohyaCase | DiffusersCase, name: str) -> str:
    """The base module path a reference layer name resolves to with --base."""
    if isinstance(case, KohyaCase):
        return case.module_map[name]
    if isinstance(case, DiffusersCase):
        return name.split(".", 1)[1]
    return name


def assert_layers_match(adapter: Adapter, expected: dict[str, RefLayer], *, check_alpha: bool = True) -> None:
    assert sorted(layer.name for layer in adapter.layers) == sorted(expected)
    for layer in adapter.layers:
        ref = expected[layer.name]
        assert layer.kind == ref.kind, layer.name
        assert layer.rank == ref.rank, layer.name
        if check_alpha:
            assert layer.alpha == pytest.approx(ref.alpha, rel=1e-12), layer.name
            assert layer.scale == pytest.approx(ref.scale, rel=1e-12), layer.name
        assert layer.fan_in_fan_out == ref.fan_in_fan_out, layer.name
        np.testing.assert_array_equal(np.asarray(layer.a, np.float64), ref.a, err_msg=layer.name)
        np.testing.assert_array_equal(np.asarray(layer.b, np.float64), ref.b, err_msg=layer.name)
        for got, want in ((layer.magnitude, ref.magnitude), (layer.bias, ref.bias)):
            assert (got is None) == (want is None), layer.name
            if want is not None:
                np.testing.assert_array_equal(np.asarray(got, np.float64).ravel(), want.ravel(), err_msg=layer.name)


def assert_same_adapter(got: Adapter, want: Adapter) -> None:
    """Two reads of the same adapter in different packaging agree on everything."""
    assert sorted(layer.name for layer in got.layers) == sorted(layer.name for layer in want.layers)
    by_name = {layer.name: layer for layer in want.layers}
    for layer in got.layers:
        other = by_name[layer.name]
        assert (layer.kind, layer.rank, layer.alpha, layer.scale, layer.use_rslora, layer.fan_in_fan_out, layer.dtype) == (
            other.kind, other.rank, other.alpha, other.scale, other.use_rslora, other.fan_in_fan_out, other.dtype
        ), layer.name
        np.testing.assert_array_equal(layer.a, other.a)
        np.testing.assert_array_equal(layer.b, other.b)
        for x, y in ((layer.magnitude, other.magnitude), (layer.bias, other.bias)):
            assert (x is None) == (y is None)
            if x is not None:
                np.testing.assert_array_equal(x, y)
    assert sorted(got.full_tensors) == sorted(want.full_tensors)
    for key, tensor in got.full_tensors.items():
        np.testing.assert_array_equal(tensor, want.full_tensors[key])
    assert got.unrecognized_keys == [] and want.unrecognized_keys == []


# --------------------------------------------------------------------------- PEFT

# Facts each fixture was built with (tests/builders.py _PEFT_SPECS), stated independently
# of the reference reader: layer count, kinds, and (module suffix -> (rank, alpha, scale)).
_ATTN = "model.layers.{}.self_attn.{}"
PEFT_FACTS: dict[str, dict[str, Any]] = {
    "llama_plain": dict(n=14, scales={"q_proj": (4, 8, 2.0), "down_proj": (4, 8, 2.0), "k_proj": (4, 8, 2.0)}),
    "llama_rslora": dict(n=6, scales={"q_proj": (8, 16, 16 / math.sqrt(8)), "down_proj": (8, 16, 16 / math.sqrt(8))}),
    "llama_dora": dict(n=6, scales={"v_proj": (4, 8, 2.0)}, dora=True),
    "llama_patterns": dict(n=6, scales={
        "layers.0.self_attn.q_proj": (8, 8, 1.0),  # rank_pattern "q_proj" hits both layers
        "layers.1.self_attn.q_proj": (8, 8, 1.0),
        "layers.0.self_attn.v_proj": (4, 8, 2.0),  # "layers.1.self_attn.v_proj" only layer 1
        "layers.1.self_attn.v_proj": (2, 8, 4.0),
        "layers.0.mlp.down_proj": (4, 32, 8.0),  # alpha_pattern "down_proj": 32
        "layers.1.mlp.down_proj": (4, 32, 8.0),
    }),
    "llama_embedding": dict(n=3, scales={"embed_tokens": (4, 8, 2.0)}, full={"model.embed_tokens.weight"}),
    "llama_modules_to_save": dict(n=4, scales={"v_proj": (4, 8, 2.0)}, full={"lm_head.weight"}),
    "llama_lora_bias": dict(n=4, scales={"q_proj": (4, 8, 2.0)}, bias=True),
    "gpt2_conv1d": dict(n=8, scales={"c_attn": (4, 8, 2.0), "c_fc": (4, 8, 2.0)}, ffio=True),
    "llama_bf16": dict(n=14, scales={"up_proj": (4, 8, 2.0)}, dtype="BF16"),
}


def test_every_peft_case_has_facts(peft_case_factory) -> None:
    from builders import PEFT_CASE_KINDS

    assert set(PEFT_FACTS) == set(PEFT_CASE_KINDS)


def test_peft_case_loads(peft_case: PeftCase) -> None:
    facts = PEFT_FACTS[peft_case.name]
    adapter = load_adapter(peft_case.adapter_dir)
    assert adapter.format == "peft" and adapter.path == str(peft_case.adapter_dir)
    assert len(adapter.layers) == facts["n"]
    names = [layer.name for layer in adapter.layers]
    assert not any(n.startswith(PEFT_PREFIX) or "lora_" in n or n.endswith(".weight") for n in names)
    root = "transformer.h." if peft_case.name.startswith("gpt2") else "model."
    assert all(n.startswith(root) for n in names)

    # Against the reference reader (raw tensors + config + PEFT's pattern rule).
    expected, full = peft_reference(raw_tensors(peft_case.adapter_file), peft_case.adapter_config)
    assert_layers_match(adapter, expected)
    assert sorted(adapter.full_tensors) == sorted(full)
    for key, tensor in full.items():
        np.testing.assert_array_equal(np.asarray(adapter.full_tensors[key], np.float64), tensor)
    assert adapter.unrecognized_keys == []

    # Against the facts the fixture was built with.
    for suffix, (rank, alpha, scale) in facts["scales"].items():
        hits = [layer for layer in adapter.layers if layer.name.endswith(suffix)]
        assert hits, suffix
        for layer in hits:
            assert (layer.rank, layer.alpha) == (rank, alpha), layer.name
            assert layer.scale == pytest.approx(scale, rel=1e-12), layer.name
    kinds = {layer.name: layer.kind for layer in adapter.layers}
    if peft_case.name == "llama_embedding":
        assert kinds.pop("model.embed_tokens") == "embedding"
    assert set(kinds.values()) == {"linear"}
    assert all((layer.magnitude is not None) == facts.get("dora", False) for layer in adapter.layers)
    assert all((layer.bias is not None) == facts.get("bias", False) for layer in adapter.layers)
    assert all(layer.fan_in_fan_out == facts.get("ffio", False) for layer in adapter.layers)
    assert all(layer.use_rslora == (peft_case.name == "llama_rslora") for layer in adapter.layers)
    assert set(adapter.full_tensors) == facts.get("full", set())
    assert adapter.dtypes == [facts.get("dtype", "F32")]


def test_embedding_base_layer_copy_is_a_full_tensor(peft_case_factory) -> None:
    """save_embedding_layers stores `embed_tokens.base_layer.weight`: the whole base weight."""
    case = peft_case_factory("llama_embedding")
    tensors = load_file(case.adapter_file)
    assert "base_model.model.model.embed_tokens.base_layer.weight" in tensors
    adapter = load_adapter(case.adapter_dir)
    stored = tensors["base_model.model.model.embed_tokens.base_layer.weight"].to(torch.float64).numpy()
    np.testing.assert_array_equal(np.asarray(adapter.full_tensors["model.embed_tokens.weight"], np.float64), stored)
    layer = adapter.layer("model.embed_tokens")
    assert layer.a.shape == (4, 96) and layer.b.shape == (64, 4)  # (r, vocab), (dim, r)
    lora_params = sum(layer.n_params for layer in adapter.layers)
    assert adapter.n_params == lora_params + stored.size


def test_modules_to_save_copy_is_a_full_tensor(peft_case_factory) -> None:
    case = peft_case_factory("llama_modules_to_save")
    adapter = load_adapter(case.adapter_dir)
    stored = load_file(case.adapter_file)["base_model.model.lm_head.weight"].to(torch.float64).numpy()
    assert list(adapter.full_tensors) == ["lm_head.weight"]
    np.testing.assert_array_equal(np.asarray(adapter.full_tensors["lm_head.weight"], np.float64), stored)


@pytest.mark.parametrize("kind", ["llama_patterns", "llama_rslora", "gpt2_conv1d"])
def test_peft_scales_agree_with_peft_itself(peft_case_factory, kind: str) -> None:
    """The scale PEFT computes when it loads the adapter (`scaling["default"]`)."""
    from peft.tuners.lora import LoraLayer as PeftLoraLayer

    case = peft_case_factory(kind)
    model = case.peft_model()
    want = {}
    for name, module in model.named_modules():
        if isinstance(module, PeftLoraLayer):
            want[name.removeprefix(PEFT_PREFIX)] = (module.r["default"], module.scaling["default"])
    adapter = load_adapter(case.adapter_dir)
    assert {layer.name for layer in adapter.layers} == set(want)
    for layer in adapter.layers:
        rank, scale = want[layer.name]
        assert layer.rank == rank and layer.scale == pytest.approx(scale, rel=1e-12), layer.name


def _rewrite_keys(src: Path, dst: Path, rename) -> None:
    tensors = load_file(src)
    save_file({rename(k): v for k, v in tensors.items()}, dst)


def _without_prefix(key: str) -> str:
    return key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key


_DEFAULT_NAME = [
    (re.compile(r"\.lora_(A|B)\.(weight|bias)$"), r".lora_\1.default.\2"),
    (re.compile(r"\.lora_embedding_(A|B)$"), r".lora_embedding_\1.default"),
    (re.compile(r"\.lora_magnitude_vector$"), r".lora_magnitude_vector.default.weight"),
]


def _with_default_name(key: str) -> str:
    for pattern, replacement in _DEFAULT_NAME:
        key, n = pattern.subn(replacement, key)
        if n:
            return key
    return key


@pytest.mark.parametrize("variant", ["no_prefix", "default_name", "both"])
def test_peft_key_variants_load_the_same(peft_case: PeftCase, variant: str, tmp_path: Path) -> None:
    """Keys without `base_model.model.` and/or with `.default.` left in, in a folder and
    as a single file next to its adapter_config.json."""
    rename = {
        "no_prefix": _without_prefix,
        "default_name": _with_default_name,
        "both": lambda k: _with_default_name(_without_prefix(k)),
    }[variant]
    folder = tmp_path / "adapter"
    folder.mkdir()
    shutil.copy(peft_case.adapter_dir / "adapter_config.json", folder)
    _rewrite_keys(peft_case.adapter_file, folder / "adapter_model.safetensors", rename)
    keys = load_file(folder / "adapter_model.safetensors").keys()
    assert keys != load_file(peft_case.adapter_file).keys()  # the rewrite did something
    want = load_adapter(peft_case.adapter_dir)
    assert_same_adapter(load_adapter(folder), want)
    single = load_adapter(folder / "adapter_model.safetensors")
    assert single.format == "peft"
    assert_same_adapter(single, want)


def test_single_file_with_sibling_config(peft_case_factory) -> None:
    case = peft_case_factory("llama_patterns")
    single = load_adapter(case.adapter_file)
    assert single.format == "peft"
    assert_same_adapter(single, load_adapter(case.adapter_dir))


def test_single_file_without_config_has_alpha_r(peft_case_factory, tmp_path: Path) -> None:
    """No adapter_config.json: nothing says alpha, so alpha = r (s = 1) per module."""
    case = peft_case_factory("llama_patterns")
    lone = tmp_path / "lone.safetensors"
    shutil.copy(case.adapter_file, lone)
    expected, _ = peft_reference(raw_tensors(lone), None)
    adapter = load_adapter(lone)
    assert adapter.format == "peft"
    assert_layers_match(adapter, expected)
    assert {layer.rank for layer in adapter.layers} == {2, 4, 8}
    assert all(layer.alpha == layer.rank and layer.scale == 1.0 for layer in adapter.layers)

    overridden = load_adapter(lone, alpha=16.0)
    assert all(layer.alpha == 16.0 for layer in overridden.layers)
    assert all(layer.scale == pytest.approx(16.0 / layer.rank) for layer in overridden.layers)


def test_alpha_override_beats_the_config(peft_case_factory) -> None:
    case = peft_case_factory("llama_rslora")
    adapter = load_adapter(case.adapter_dir, alpha=4.0)
    assert all(layer.alpha == 4.0 and layer.scale == pytest.approx(4.0 / math.sqrt(8)) for layer in adapter.layers)


def test_legacy_bin_loads_like_safetensors(peft_case: PeftCase, tmp_path: Path) -> None:
    folder = tmp_path / "legacy"
    folder.mkdir()
    shutil.copy(peft_case.adapter_dir / "adapter_config.json", folder)
    torch.save(load_file(peft_case.adapter_file), folder / "adapter_model.bin")
    got = load_adapter(folder)
    assert got.format == "peft"
    assert_same_adapter(got, load_adapter(peft_case.adapter_dir))


# --------------------------------------------------------------------------- kohya


def test_kohya_names_ranks_alphas(kohya_case: KohyaCase) -> None:
    adapter = load_adapter(kohya_case.lora_file)
    assert adapter.format == "kohya" and not adapter.names_resolved
    expected = kohya_reference(kohya_case)
    assert_layers_match(adapter, expected)
    by_name = {layer.name: layer for layer in adapter.layers}
    for name, module in kohya_case.module_map.items():
        assert by_name[name].scale == pytest.approx(kohya_case.scale[f"{module}.weight"], rel=1e-12)

    proj_in = by_name["lora_unet_down_blocks_0_attentions_0_proj_in"]  # fp16 alpha 2.0
    assert proj_in.alpha == 2.0 and proj_in.scale == 0.5 and proj_in.kind == "conv"
    to_k = by_name["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"]  # no alpha
    assert to_k.alpha == to_k.rank == 4 and to_k.scale == 1.0
    conv = by_name["lora_unet_down_blocks_0_resnets_0_conv1"]  # LoCon 3×3
    assert conv.kind == "conv" and conv.kernel_size == (3, 3) and conv.rank == 2
    assert conv.alpha == 0.5 and conv.scale == 0.25
    assert conv.weight_shape == (32, 16, 3, 3)
    te = by_name["lora_te_text_model_encoder_layers_0_self_attn_q_proj"]
    assert te.kind == "linear" and te.scale == 0.5
    assert adapter.unrecognized_keys == []


def test_kohya_metadata_is_in_the_summary(kohya_case: KohyaCase) -> None:
    with safe_open(kohya_case.lora_file, "np") as f:
        metadata = f.metadata()
    report = inspect_adapter(kohya_case.lora_file)
    assert report.adapter.format == "kohya"
    ss = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    assert len(ss) >= 6
    for key, value in ss.items():
        assert report.adapter.training_metadata[key] == value
    assert report.adapter.training_metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"


def test_kohya_names_resolve_against_the_base(kohya_case: KohyaCase) -> None:
    report = inspect_adapter(kohya_case.lora_file, base_path=kohya_case.base_file)
    assert sorted(layer.name for layer in report.layers) == sorted(kohya_case.module_map.values())
    by_module = {layer.name: layer for layer in report.layers}
    for name, module in kohya_case.module_map.items():
        assert by_module[module].scale == pytest.approx(kohya_case.scale[f"{module}.weight"])


def test_kohya_integer_alpha(tmp_path: Path) -> None:
    """diffusers' convert_state_dict_to_kohya writes `torch.tensor(rank)`: an int64 alpha."""
    g = torch.Generator().manual_seed(3)
    path = tmp_path / "int_alpha.safetensors"
    save_file({
        "lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.randn(4, 8, generator=g),
        "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": torch.randn(8, 4, generator=g),
        "lora_unet_mid_block_attentions_0_proj_in.alpha": torch.tensor(4),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.randn(2, 8, generator=g),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.randn(8, 2, generator=g),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(1, dtype=torch.int32),
    }, path)
    adapter = load_adapter(path)
    alphas = {layer.name: (layer.alpha, layer.scale) for layer in adapter.layers}
    assert alphas == {
        "lora_unet_mid_block_attentions_0_proj_in": (4.0, 1.0),
        "lora_te_text_model_encoder_layers_0_mlp_fc1": (1.0, 0.5),
    }


# --------------------------------------------------------------------------- diffusers


def test_diffusers_current(diffusers_current_case: DiffusersCase) -> None:
    case = diffusers_current_case
    adapter = load_adapter(case.lora_file)
    assert adapter.format == "diffusers"
    assert_layers_match(adapter, diffusers_reference(case))
    by_name = {layer.name: layer for layer in adapter.layers}
    # alphas from lora_adapter_metadata: unet r=4 α=8, text_encoder r=4 α=2
    for name, layer in by_name.items():
        assert layer.alpha == (8.0 if name.startswith("unet.") else 2.0), name
    assert by_name["unet.down_blocks.0.attentions.0.proj_in"].kind == "conv"  # 1×1 conv
    assert adapter.dtypes == ["BF16"]
    # Reading the folder finds pytorch_lora_weights.safetensors.
    assert sorted(layer.name for layer in load_adapter(case.lora_file.parent).layers) == sorted(by_name)


def test_diffusers_legacy(diffusers_legacy_case: DiffusersCase) -> None:
    case = diffusers_legacy_case
    adapter = load_adapter(case.lora_file)
    assert adapter.format == "diffusers"
    assert_layers_match(adapter, diffusers_reference(case))
    names = {layer.name for layer in adapter.layers}
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0" in names  # to_out_lora
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj" in names  # lora_linear_layer
    assert not any("processor" in n or "lora" in n for n in names)
    assert all(layer.alpha == layer.rank and layer.scale == 1.0 for layer in adapter.layers)


def test_diffusers_names_resolve_against_the_base(diffusers_case: DiffusersCase) -> None:
    report = inspect_adapter(diffusers_case.lora_file, base_path=diffusers_case.base_file)
    assert sorted(layer.name for layer in report.layers) == sorted(diffusers_case.module_names.values())
    for layer in report.layers:
        assert layer.scale == pytest.approx(diffusers_case.scale[layer.name], rel=1e-12)


def test_diffusers_rslora_from_component_metadata(diffusers_current_case: DiffusersCase, tmp_path: Path) -> None:
    """diffusers packs LoraConfig fields per component: "unet.use_rslora" is rsLoRA for
    the UNet only (s = α/√r), the text encoder keeps α/r."""
    case = diffusers_current_case
    with safe_open(case.lora_file, "pt") as f:
        metadata = f.metadata()
    packed = json.loads(metadata["lora_adapter_metadata"])
    packed["unet.use_rslora"] = True
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(load_file(case.lora_file), path, metadata={**metadata, "lora_adapter_metadata": json.dumps(packed)})
    for layer in load_adapter(path).layers:
        want = 8 / math.sqrt(4) if layer.name.startswith("unet.") else 2 / 4
        assert layer.scale == pytest.approx(want, rel=1e-12), layer.name


def test_unprefixed_gpt2_file_with_config_is_peft(peft_case_factory, tmp_path: Path) -> None:
    """GPT-2 keys without `base_model.model.` start with `transformer.` like a diffusers
    component; the sibling adapter_config.json (fan_in_fan_out, alpha 8) decides."""
    case = peft_case_factory("gpt2_conv1d")
    shutil.copy(case.adapter_dir / "adapter_config.json", tmp_path)
    _rewrite_keys(case.adapter_file, tmp_path / "adapter_model.safetensors", _without_prefix)
    adapter = load_adapter(tmp_path / "adapter_model.safetensors")
    assert adapter.format == "peft"
    assert all(layer.fan_in_fan_out and layer.alpha == 8.0 and layer.scale == 2.0 for layer in adapter.layers)


def test_reading_leaves_no_file_open(peft_case_factory, kohya_case: KohyaCase, diffusers_legacy_case) -> None:
    """Readers copy what they keep, so no handle outlives load_adapter (ResourceWarning)."""
    import gc
    import warnings

    paths = [peft_case_factory("llama_plain").adapter_dir, peft_case_factory("llama_plain").adapter_file,
             kohya_case.lora_file, diffusers_legacy_case.lora_file]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adapters = [load_adapter(path) for path in paths]
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]
    assert all(adapter.layers for adapter in adapters)


# --------------------------------------------------------------------------- names both ways


def _dummy_layer(name: str) -> LoraLayer:
    return LoraLayer(name, np.zeros((1, 2), np.float32), np.zeros((2, 1), np.float32), 1.0)


def _base_modules(base: Path) -> set[str]:
    with BaseCheckpoint.open(base) as checkpoint:
        return checkpoint.module_paths()


@pytest.mark.parametrize("fmt", ["peft", "kohya", "diffusers"])
@pytest.mark.parametrize("base", ["llama", "gpt2", "sd"])
def test_format_key_round_trips_through_resolve_names(fmt: str, base: str, base_dir_factory, sd_base_file: Path) -> None:
    """Every module of each tiny base: module path -> format_key -> resolve_names -> the same path."""
    path = sd_base_file if base == "sd" else base_dir_factory(base)
    modules = _base_modules(path)
    component = {"peft": None, "kohya": "unet", "diffusers": "unet"}[fmt]
    stems = {format_key(module, fmt, component): module for module in sorted(modules)}
    assert len(stems) == len(modules)
    adapter = Adapter(path="stems", format=fmt, layers=[_dummy_layer(stem) for stem in stems],
                      names_resolved=fmt != "kohya")
    resolved = resolve_names(adapter, modules, path)
    assert [layer.name for layer in resolved.layers] == list(stems.values())


def test_format_key_spells_each_format_as_its_files_do(kohya_case: KohyaCase, diffusers_current_case: DiffusersCase) -> None:
    assert format_key("model.layers.0.self_attn.q_proj", "peft") == "base_model.model.model.layers.0.self_attn.q_proj"
    for name, module in kohya_case.module_map.items():  # sd-scripts' own names in the fixture
        component = "te" if name.startswith("lora_te_") else "unet"
        assert format_key(module, "kohya", component) == name
    for name, module in diffusers_current_case.module_names.items():
        assert format_key(module, "diffusers", name.split(".", 1)[0]) == name
    assert format_key("text_model.encoder.layers.0.mlp.fc1", "kohya", "te2") == "lora_te2_text_model_encoder_layers_0_mlp_fc1"
    for fmt, component in (("peft", "unet"), ("kohya", None), ("kohya", "text_encoder"), ("diffusers", "te"), ("gguf", None)):
        with pytest.raises(ValueError):
            format_key("a.b", fmt, component)


def test_kohya_writer_names_module_paths_with_format_key(kohya_case: KohyaCase, tmp_path: Path) -> None:
    """Layers named by module path (a resolved read) go back to sd-scripts' names."""
    resolved = resolve_names(load_adapter(kohya_case.lora_file), _base_modules(kohya_case.base_file), kohya_case.base_file)
    unet = [layer for layer in resolved.layers if not layer.name.startswith("text_model.")]
    te = [layer for layer in resolved.layers if layer.name.startswith("text_model.")]
    write_kohya(unet, tmp_path / "unet.safetensors", dtype="F32", component="unet")
    write_kohya(te, tmp_path / "te.safetensors", dtype="F32", component="te")
    back = load_adapter(tmp_path / "unet.safetensors").layers + load_adapter(tmp_path / "te.safetensors").layers
    assert sorted(layer.name for layer in back) == sorted(kohya_case.module_map)
    by_module = {layer.name: layer for layer in resolved.layers}
    for layer in back:
        want = by_module[kohya_case.module_map[layer.name]]
        np.testing.assert_array_equal(layer.dense_update(), want.dense_update(), err_msg=layer.name)
    with pytest.raises(WriteError, match="kohya component"):
        write_kohya(unet, tmp_path / "bad.safetensors", component="text_encoder")
    with pytest.raises(WriteError, match="has no kohya name"):
        write_kohya(unet, tmp_path / "bad.safetensors")


# --------------------------------------------------------------------------- diffusers writer

_UNET_CONV = "down_blocks.0.resnets.0.conv1"
_UNET_PROJ_IN = "down_blocks.0.attentions.0.proj_in"
_TE_EMBED = "text_model.embeddings.token_embedding"


def _diffusers_layers() -> list[LoraLayer]:
    """Layers over the SD-style base: the UNet under rsLoRA with mixed ranks and alphas
    (a 3×3 and a 1×1 conv among them), the text encoder plain with an embedding."""
    from builders import SD_ATTN, SD_BASE_SHAPES, SD_TE

    rng = np.random.default_rng(11)
    # module -> (component, rank, alpha, rslora)
    spec = {
        f"{SD_ATTN}.to_q": ("unet", 4, 8.0, True),
        f"{SD_ATTN}.to_k": ("unet", 4, 8.0, True),
        f"{SD_ATTN}.to_v": ("unet", 2, 3.0, True),
        f"{SD_ATTN}.to_out.0": ("unet", 4, 1.5, True),
        _UNET_PROJ_IN: ("unet", 4, 8.0, True),
        _UNET_CONV: ("unet", 2, 8.0, True),
        f"{SD_TE}.q_proj": ("text_encoder", 4, 2.0, False),
        f"{SD_TE}.k_proj": ("text_encoder", 8, 2.0, False),
        _TE_EMBED: ("text_encoder", 4, 6.0, False),
    }
    layers = []
    for module, (component, rank, alpha, rslora) in spec.items():
        shape = SD_BASE_SHAPES[f"{module}.weight"]
        if module == _TE_EMBED:  # a (r, num_embeddings), b (dim, r)
            kind, a_shape, b_shape = "embedding", (rank, shape[0]), (shape[1], rank)
        elif len(shape) == 4:
            kind, a_shape, b_shape = "conv", (rank, shape[1], *shape[2:]), (shape[0], rank, 1, 1)
        else:
            kind, a_shape, b_shape = "linear", (rank, shape[1]), (shape[0], rank)
        a = (0.2 * rng.standard_normal(a_shape)).astype(np.float32)
        b = (0.2 * rng.standard_normal(b_shape)).astype(np.float32)
        layers.append(LoraLayer(f"{component}.{module}", a, b, alpha, kind=kind, use_rslora=rslora))
    return layers


def test_diffusers_writer_round_trip(sd_base_file: Path, tmp_path: Path) -> None:
    """Written, read back (lora_tools.formats.load_adapter): every layer's update is the same."""
    from builders import SD_ATTN

    layers = _diffusers_layers()
    folder = tmp_path / "lora"
    folder.mkdir()
    packed = write_diffusers(layers, folder / DIFFUSERS_WEIGHTS)
    with safe_open(folder / DIFFUSERS_WEIGHTS, "np") as f:
        keys, header = set(f.keys()), f.metadata()
    assert f"unet.{_UNET_CONV}.lora_A.weight" in keys and f"text_encoder.{_TE_EMBED}.lora_embedding_B" in keys
    assert not any(k.startswith("base_model.") for k in keys)
    assert header["format"] == "pt" and json.loads(header["lora_adapter_metadata"]) == packed
    assert packed["unet.use_rslora"] is True and packed["text_encoder.use_rslora"] is False
    assert packed["unet.r"] == 4 and packed["unet.rank_pattern"] == {f"{SD_ATTN}.to_v": 2, _UNET_CONV: 2}

    back = load_adapter(folder)  # the folder, as diffusers names the file in it
    assert back.format == "diffusers"
    assert sorted(layer.name for layer in back.layers) == sorted(layer.name for layer in layers)
    by_name = {layer.name: layer for layer in back.layers}
    for want in layers:
        got = by_name[want.name]
        assert (got.kind, got.rank, got.alpha, got.use_rslora, got.scale) == (
            want.kind, want.rank, want.alpha, want.use_rslora, want.scale), want.name
        np.testing.assert_array_equal(got.dense_update(), want.dense_update(), err_msg=want.name)
    resolved = resolve_names(back, _base_modules(sd_base_file), sd_base_file)
    assert sorted(layer.name for layer in resolved.layers) == sorted(layer.name.split(".", 1)[1] for layer in layers)


def test_diffusers_writer_component_argument(tmp_path: Path) -> None:
    unet = [layer for layer in _diffusers_layers() if layer.name.startswith("unet.")]
    bare = [LoraLayer(layer.name.split(".", 1)[1], layer.a, layer.b, layer.alpha, kind=layer.kind,
                      use_rslora=layer.use_rslora) for layer in unet]
    write_diffusers(bare, tmp_path / "given.safetensors", component="unet")
    write_diffusers(unet, tmp_path / "named.safetensors")
    assert (tmp_path / "given.safetensors").read_bytes() == (tmp_path / "named.safetensors").read_bytes()
    with pytest.raises(WriteError, match="no diffusers component"):
        write_diffusers(bare, tmp_path / "bad.safetensors")
    with pytest.raises(WriteError, match="diffusers component must be"):
        write_diffusers(bare, tmp_path / "bad.safetensors", component="te")
    with pytest.raises(WriteError, match="mix rsLoRA"):
        write_diffusers(bare[:1] + [LoraLayer("x", bare[1].a, bare[1].b, 1.0)], tmp_path / "bad.safetensors",
                        component="unet")


def _module_tree(modules: dict[str, tuple[int, ...]]) -> torch.nn.Module:
    """A bare torch module with a Linear / Conv2d / Embedding at each path (shape = weight's)."""
    root = torch.nn.Module()
    for path, shape in modules.items():
        *parents, leaf = path.split(".")
        node = root
        for part in parents:
            if not hasattr(node, part):
                node.add_module(part, torch.nn.Module())
            node = getattr(node, part)
        if leaf.endswith("embedding"):
            layer: torch.nn.Module = torch.nn.Embedding(*shape)
        elif len(shape) == 4:
            layer = torch.nn.Conv2d(shape[1], shape[0], shape[2:], bias=False)
        else:
            layer = torch.nn.Linear(shape[1], shape[0], bias=False)
        node.add_module(leaf, layer)
    return root


def test_diffusers_writer_loads_the_way_diffusers_loads_it(tmp_path: Path) -> None:
    """What load_lora_weights does per component, with peft itself: strip `<component>.`
    from keys and metadata fields, LoraConfig(**fields), inject_adapter_in_model,
    set_peft_model_state_dict. Every key lands (ranks from rank_pattern fit the tensors)
    and PEFT's own delta weight (its scaling from alpha_pattern / use_rslora) is ours."""
    from builders import SD_BASE_SHAPES
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from peft.tuners.lora import LoraLayer as PeftLoraLayer

    layers = _diffusers_layers()
    path = tmp_path / DIFFUSERS_WEIGHTS
    write_diffusers(layers, path)
    state = load_file(path)
    with safe_open(path, "pt") as f:
        packed = json.loads(f.metadata()["lora_adapter_metadata"])
    for component in ("unet", "text_encoder"):
        prefix = f"{component}."
        fields = {k.removeprefix(prefix): v for k, v in packed.items() if k.startswith(prefix)}
        sub_state = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        owned = {layer.name.removeprefix(prefix): layer for layer in layers if layer.name.startswith(prefix)}
        model = _module_tree({m: SD_BASE_SHAPES[f"{m}.weight"] for m in owned})
        model = inject_adapter_in_model(LoraConfig(**fields), model)
        result = set_peft_model_state_dict(model, sub_state)
        assert not result.unexpected_keys, result.unexpected_keys
        seen = set()
        for name, module in model.named_modules():
            if isinstance(module, PeftLoraLayer):
                want = owned[name]
                assert module.r["default"] == want.rank and module.scaling["default"] == pytest.approx(want.scale, rel=1e-12)
                delta = module.get_delta_weight("default").to(torch.float64).numpy()
                np.testing.assert_allclose(delta, want.dense_update(), rtol=1e-5, atol=1e-7, err_msg=name)
                seen.add(name)
        assert seen == set(owned)


def test_diffusers_itself_reads_the_written_file(tmp_path: Path) -> None:
    """diffusers' own state-dict loader and metadata parser accept the file (0.34 added
    lora_adapter_metadata and `return_lora_metadata`)."""
    pytest.importorskip("diffusers", minversion="0.34")
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
    from diffusers.utils.state_dict_utils import _load_sft_state_dict_metadata

    assert LORA_ADAPTER_METADATA_KEY == "lora_adapter_metadata"
    layers = _diffusers_layers()
    path = tmp_path / DIFFUSERS_WEIGHTS
    packed = write_diffusers(layers, path)
    assert _load_sft_state_dict_metadata(str(path)) == packed
    from diffusers import StableDiffusionPipeline

    state_dict, network_alphas, metadata = StableDiffusionPipeline.lora_state_dict(
        str(tmp_path), weight_name=DIFFUSERS_WEIGHTS, return_lora_metadata=True
    )
    assert network_alphas is None and metadata == packed
    assert sorted(state_dict) == sorted(load_file(path))


def test_diffusers_save_lora_adapter_keeps_its_flat_patterns(tmp_path: Path) -> None:
    """diffusers' own `save_lora_adapter` writes alpha_pattern / rank_pattern flat in the
    lora_adapter_metadata header; every layer's scale must be PEFT's own."""
    pytest.importorskip("diffusers")
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer as PeftLoraLayer
    from sd_pipeline import tiny_unet

    unet = tiny_unet()
    unet.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                rank_pattern={"attn2.to_q": 2}, alpha_pattern={"attn1.to_k": 3, "attn2.to_q": 0.75}))
    unet.save_lora_adapter(tmp_path)
    adapter = load_adapter(tmp_path / DIFFUSERS_WEIGHTS)
    scales = {name: module.scaling["default"] for name, module in unet.named_modules() if isinstance(module, PeftLoraLayer)}
    assert sorted(layer.name for layer in adapter.layers) == sorted(scales)
    assert {layer.name: layer.scale for layer in adapter.layers} == scales
    assert len(set(scales.values())) == 3  # 8/4, 3/4 and 0.75/2: the patterns are in play
