"""Sanity checks of the fixtures themselves (tests/builders.py), independent of lora_tools.

Beyond "the files exist", these pin the facts the rest of the suite relies on: every
adapter changes exactly the weights it targets, and PEFT's own merge agrees with a dense
float64 numpy merge written from FORMATS.md (so the formulas there hold for the
installed peft).
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

import builders
from builders import SD_ATTN, SD_BASE_SHAPES, SD_TE, PeftCase

# --------------------------------------------------------------------------- bases


def _file_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_llama_base_is_a_hf_folder(llama_base_dir: Path) -> None:
    config = json.loads((llama_base_dir / "config.json").read_text())
    assert config["hidden_size"] == 64 and config["num_hidden_layers"] == 2
    assert config["num_key_value_heads"] == 2 and config["tie_word_embeddings"] is False
    tensors = load_file(llama_base_dir / "model.safetensors")
    assert tensors["model.layers.0.self_attn.k_proj.weight"].shape == (32, 64)
    assert tensors["model.layers.0.mlp.down_proj.weight"].shape == (64, 128)
    assert "lm_head.weight" in tensors
    assert all(t.dtype == torch.float32 for t in tensors.values())


def test_bf16_base_is_the_llama_base_rounded(llama_base_dir: Path, llama_bf16_base_dir: Path) -> None:
    fp32 = _file_tensors(llama_base_dir)
    bf16 = _file_tensors(llama_bf16_base_dir)
    assert fp32.keys() == bf16.keys()
    for name, t in bf16.items():
        assert t.dtype == torch.bfloat16
        assert torch.equal(t, fp32[name].to(torch.bfloat16)), name


def test_sharded_base_holds_the_llama_tensors(llama_base_dir: Path, llama_sharded_base_dir: Path) -> None:
    shards = sorted(llama_sharded_base_dir.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 2
    assert not (llama_sharded_base_dir / "model.safetensors").exists()
    index = json.loads((llama_sharded_base_dir / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    sharded = _file_tensors(llama_sharded_base_dir)
    single = _file_tensors(llama_base_dir)
    assert set(index["weight_map"]) == sharded.keys() == single.keys()
    assert all(torch.equal(sharded[k], single[k]) for k in single)
    for extra in ("generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        json.loads((llama_sharded_base_dir / extra).read_text())


def test_gpt2_base_stores_conv1d_transposed(gpt2_base_dir: Path) -> None:
    tensors = load_file(gpt2_base_dir / "model.safetensors")
    assert tensors["transformer.h.0.attn.c_attn.weight"].shape == (64, 192)  # (in, out)
    assert tensors["transformer.h.0.mlp.c_proj.weight"].shape == (256, 64)
    assert "lm_head.weight" not in tensors  # tied to wte


def test_llama_bias_base_has_nonzero_biases(llama_bias_base_dir: Path) -> None:
    tensors = load_file(llama_bias_base_dir / "model.safetensors")
    assert tensors["model.layers.0.self_attn.q_proj.bias"].abs().min() > 0


def test_builders_leave_global_rng_alone(tmp_path: Path) -> None:
    state = torch.get_rng_state()
    builders.build_base("gpt2", tmp_path)
    assert torch.equal(state, torch.get_rng_state())


# --------------------------------------------------------------------------- PEFT

_PROJ7 = r"model\.layers\.\d\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight"
_QVDOWN = r"model\.layers\.\d\.(self_attn\.[qv]_proj|mlp\.down_proj)\.weight"
# Exactly the base tensors each adapter's merge must change (and nothing else).
CHANGED = {
    "llama_plain": (_PROJ7, 14),
    "llama_rslora": (_QVDOWN, 6),
    "llama_dora": (_QVDOWN, 6),
    "llama_patterns": (_QVDOWN, 6),
    "llama_embedding": (r"model\.embed_tokens\.weight|model\.layers\.\d\.self_attn\.q_proj\.weight", 3),
    "llama_modules_to_save": (r"lm_head\.weight|model\.layers\.\d\.self_attn\.[qv]_proj\.weight", 5),
    "llama_lora_bias": (r"model\.layers\.\d\.self_attn\.[qv]_proj\.(weight|bias)", 8),
    "gpt2_conv1d": (r"transformer\.h\.\d\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight", 8),
    "llama_bf16": (_PROJ7, 14),
}

CONFIG_FIELDS = {
    "llama_plain": dict(r=4, lora_alpha=8, use_rslora=False, use_dora=False),
    "llama_rslora": dict(r=8, lora_alpha=16, use_rslora=True),
    "llama_dora": dict(r=4, use_dora=True),
    "llama_patterns": dict(r=4, lora_alpha=8, rank_pattern={"q_proj": 8, "layers.1.self_attn.v_proj": 2},
                           alpha_pattern={"down_proj": 32}),
    "llama_embedding": dict(r=4, lora_alpha=8),
    "llama_modules_to_save": dict(modules_to_save=["lm_head"]),
    "llama_lora_bias": dict(lora_bias=True),
    "gpt2_conv1d": dict(fan_in_fan_out=True),
    "llama_bf16": dict(r=4, lora_alpha=8),
}


def test_every_case_is_checked() -> None:
    assert set(CHANGED) == set(CONFIG_FIELDS) == set(builders.PEFT_CASE_KINDS)


def test_peft_config_fields(peft_case: PeftCase) -> None:
    config = peft_case.adapter_config
    assert config["peft_type"] == "LORA"
    assert config["base_model_name_or_path"] == str(peft_case.base_dir)
    for key, value in CONFIG_FIELDS[peft_case.name].items():
        assert config[key] == value, key
    assert peft_case.adapter_file.exists()


def test_merge_changes_exactly_the_targeted_weights(peft_case: PeftCase) -> None:
    merged = peft_case.peft_merged_state_dict()
    base = peft_case.base_state_dict()
    assert merged.keys() == base.keys()
    pattern, count = CHANGED[peft_case.name]
    expected = {k for k in base if re.fullmatch(pattern, k)}
    assert len(expected) == count
    changed = {k for k in base if not torch.equal(merged[k], base[k])}
    assert changed == expected
    assert all(merged[k].dtype == peft_case.base_dtype for k in expected)


def test_bf16_adapter_is_stored_in_bf16(peft_case_factory) -> None:
    case = peft_case_factory("llama_bf16")
    with safe_open(case.adapter_file, "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}


def test_rank_pattern_hits_only_some_layers(peft_case_factory) -> None:
    tensors = load_file(peft_case_factory("llama_patterns").adapter_file)
    rank = {k: v.shape[0] for k, v in tensors.items() if k.endswith("lora_A.weight")}
    prefix = "base_model.model.model.layers"
    assert rank[f"{prefix}.0.self_attn.q_proj.lora_A.weight"] == 8
    assert rank[f"{prefix}.1.self_attn.q_proj.lora_A.weight"] == 8
    assert rank[f"{prefix}.0.self_attn.v_proj.lora_A.weight"] == 4
    assert rank[f"{prefix}.1.self_attn.v_proj.lora_A.weight"] == 2
    assert rank[f"{prefix}.0.mlp.down_proj.lora_A.weight"] == 4


def _pattern_value(patterns: dict[str, float], module: str, default: float) -> float:
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def reference_merge(case: PeftCase) -> dict[str, np.ndarray]:
    """Dense float64 merge of the adapter file into the base, written from FORMATS.md."""
    config = case.adapter_config
    base = {k: v.to(torch.float64).numpy() for k, v in case.base_state_dict().items()}
    tensors = {k: v.to(torch.float64).numpy() for k, v in load_file(case.adapter_file).items()}
    out: dict[str, np.ndarray] = {}
    prefix = "base_model.model."
    for key, a in tensors.items():
        m = re.fullmatch(r"base_model\.model\.(.+)\.(lora_A\.weight|lora_embedding_A)", key)
        if not m:
            continue
        module, embedding = m.group(1), m.group(2) == "lora_embedding_A"
        b = tensors[f"{prefix}{module}.{'lora_embedding_B' if embedding else 'lora_B.weight'}"]
        rank = a.shape[0]
        alpha = _pattern_value(config["alpha_pattern"], module, config["lora_alpha"])
        scale = alpha / (math.sqrt(rank) if config["use_rslora"] else rank)
        delta = scale * (b @ a)
        if embedding or config["fan_in_fan_out"]:
            delta = delta.T
        weight = base[f"{module}.weight"] + delta
        magnitude = tensors.get(f"{prefix}{module}.lora_magnitude_vector")
        if magnitude is not None:  # DoRA, Linear: norm per output row of W + ΔW
            weight = (magnitude / np.linalg.norm(weight, axis=1))[:, None] * weight
        out[f"{module}.weight"] = weight
        lora_bias = tensors.get(f"{prefix}{module}.lora_B.bias")
        if lora_bias is not None:
            out[f"{module}.bias"] = base[f"{module}.bias"] + scale * lora_bias
    for key, value in tensors.items():  # full tensors (modules_to_save, saved embeddings)
        if re.search(r"\.lora_|lora_magnitude_vector", key):
            continue
        name = key.removeprefix(prefix).replace(".base_layer.", ".")
        if ".base_layer." in key:  # PEFT's copy of the base embedding: unchanged
            assert np.array_equal(value, base[name]), key
        else:
            out[name] = value
    return out


def test_peft_merge_matches_dense_reference(peft_case: PeftCase) -> None:
    merged = peft_case.peft_merged_state_dict()
    reference = reference_merge(peft_case)
    pattern, _ = CHANGED[peft_case.name]
    assert set(reference) == {k for k in merged if re.fullmatch(pattern, k)}
    for name, expected in reference.items():
        got = merged[name].to(torch.float64).numpy()
        if peft_case.base_dtype == torch.bfloat16:
            # PEFT (autocast_adapter_dtype=True) adds the fp32 update into bf16 once;
            # allow one unit in the last place of bf16 (2**-8 relative).
            assert np.all(np.abs(got - expected) <= 2.0**-8 * np.abs(expected) + 1e-30), name
        else:
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6, err_msg=name)


def test_bf16_merge_rounds_once_by_default(peft_case_factory) -> None:
    case = peft_case_factory("llama_bf16")
    once = case.peft_merged_state_dict()  # fp32 factors added into bf16: one rounding
    twice = case.peft_merged_state_dict(autocast_adapter_dtype=False)  # bf16 ΔW, then add
    name = "model.layers.0.self_attn.q_proj.weight"
    assert once[name].dtype == twice[name].dtype == torch.bfloat16
    assert not torch.equal(once[name], twice[name])


def test_peft_model_matches_merged_outputs(llama_plain_case: PeftCase) -> None:
    from transformers import AutoModelForCausalLM

    model = llama_plain_case.peft_model()
    assert not model.training
    merged = AutoModelForCausalLM.from_pretrained(llama_plain_case.base_dir).eval()
    merged.load_state_dict(llama_plain_case.peft_merged_state_dict())
    ids = torch.arange(12).reshape(2, 6)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, merged(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


def test_peft_cases_are_reproducible(tmp_path: Path, llama_plain_case: PeftCase) -> None:
    again = builders.build_peft_case("llama_plain", tmp_path)
    first, second = load_file(llama_plain_case.adapter_file), load_file(again.adapter_file)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


# --------------------------------------------------------------------------- kohya


def test_kohya_file_layout(kohya_case) -> None:
    with safe_open(kohya_case.lora_file, "pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
        dtypes = {k: f.get_slice(k).get_dtype() for k in keys}
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
    assert meta["ss_network_alpha"] == "2.0" and meta["ss_base_model_version"] == "sd_v1"
    proj_in = "lora_unet_down_blocks_0_attentions_0_proj_in"
    to_k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"
    assert dtypes[f"{proj_in}.alpha"] == "F16"
    assert f"{to_k}.alpha" not in keys and f"{to_k}.lora_down.weight" in keys
    assert all(dtypes[k] == "F16" for k in keys if ".lora_" in k)
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj") for k in keys)
    tensors = load_file(kohya_case.lora_file)
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert tensors[f"{conv}.lora_down.weight"].shape == (2, 16, 3, 3)
    assert tensors[f"{conv}.lora_up.weight"].shape == (32, 2, 1, 1)
    assert tensors[f"{proj_in}.alpha"].shape == ()


def test_kohya_expected_deltas(kohya_case) -> None:
    base = load_file(kohya_case.base_file)
    assert set(kohya_case.expected_delta) == {f"{m}.weight" for m in kohya_case.module_map.values()}
    assert len(kohya_case.module_map) == 6
    for key, delta in kohya_case.expected_delta.items():
        assert delta.dtype == np.float64 and delta.shape == tuple(base[key].shape), key
        assert np.abs(delta).max() > 1e-3, key
    assert kohya_case.scale[f"{SD_ATTN}.to_k.weight"] == 1.0  # alpha missing => alpha = r
    assert kohya_case.scale["down_blocks.0.attentions.0.proj_in.weight"] == 0.5
    assert kohya_case.scale["down_blocks.0.resnets.0.conv1.weight"] == 0.25


def test_kohya_deltas_act_like_the_lora_modules(kohya_case) -> None:
    """ΔW applied as one layer equals kohya's forward: up(down(x)) · scale."""
    tensors = {k: v.to(torch.float64) for k, v in load_file(kohya_case.lora_file).items()}
    g = torch.Generator().manual_seed(0)
    for kname, module in kohya_case.module_map.items():
        key = f"{module}.weight"
        down, up = tensors[f"{kname}.lora_down.weight"], tensors[f"{kname}.lora_up.weight"]
        delta = torch.from_numpy(kohya_case.expected_delta[key])
        scale = kohya_case.scale[key]
        if delta.ndim == 4:
            x = torch.randn(1, delta.shape[1], 6, 6, generator=g, dtype=torch.float64)
            pad = delta.shape[-1] // 2
            want = F.conv2d(F.conv2d(x, down, padding=pad), up) * scale
            got = F.conv2d(x, delta, padding=pad)
        else:
            x = torch.randn(3, delta.shape[1], generator=g, dtype=torch.float64)
            want = (x @ down.T @ up.T) * scale
            got = x @ delta.T
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- diffusers


def test_diffusers_current_layout(diffusers_current_case) -> None:
    with safe_open(diffusers_current_case.lora_file, "pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
        dtypes = {f.get_slice(k).get_dtype() for k in keys}
    assert dtypes == {"BF16"}
    packed = json.loads(meta["lora_adapter_metadata"])
    assert packed["unet.r"] == 4 and packed["unet.lora_alpha"] == 8
    assert packed["text_encoder.r"] == 4 and packed["text_encoder.lora_alpha"] == 2
    assert f"unet.{SD_ATTN}.to_q.lora_A.weight" in keys
    assert f"text_encoder.{SD_TE}.q_proj.lora_B.weight" in keys
    assert "unet.down_blocks.0.attentions.0.proj_in.lora_A.weight" in keys
    assert diffusers_current_case.scale[f"{SD_ATTN}.to_q"] == 2.0
    assert diffusers_current_case.scale[f"{SD_TE}.q_proj"] == 0.5


def test_diffusers_legacy_layout(diffusers_legacy_case) -> None:
    keys = set(load_file(diffusers_legacy_case.lora_file))
    assert f"unet.{SD_ATTN}.processor.to_q_lora.down.weight" in keys
    assert f"unet.{SD_ATTN}.processor.to_out_lora.up.weight" in keys
    assert f"text_encoder.{SD_TE}.q_proj.lora_linear_layer.down.weight" in keys
    assert diffusers_legacy_case.module_names[f"unet.{SD_ATTN}.processor.to_out_lora"] == f"{SD_ATTN}.to_out.0"
    assert set(diffusers_legacy_case.scale.values()) == {1.0}


def test_diffusers_expected_deltas(diffusers_case) -> None:
    tensors = load_file(diffusers_case.lora_file)
    current = diffusers_case.name == "diffusers_current"
    a_suffix, b_suffix = ("lora_A.weight", "lora_B.weight") if current else ("down.weight", "up.weight")
    assert set(diffusers_case.expected_delta) == set(diffusers_case.module_names.values())
    for layer, module in diffusers_case.module_names.items():
        a = tensors[f"{layer}.{a_suffix}"].to(torch.float64)
        b = tensors[f"{layer}.{b_suffix}"].to(torch.float64)
        delta = diffusers_case.expected_delta[module]
        assert delta.shape == SD_BASE_SHAPES[f"{module}.weight"]
        want = diffusers_case.scale[module] * (b.flatten(1) @ a.flatten(1))
        np.testing.assert_allclose(delta.reshape(delta.shape[0], -1), want.numpy(), rtol=1e-12)
        assert np.abs(delta).max() > 1e-3


# --------------------------------------------------------------------------- malformed

STRUCTURALLY_BROKEN = (
    "truncated", "header_len_past_eof", "header_len_absurd", "header_not_json", "header_not_utf8",
    "empty", "overlapping_offsets", "shape_offsets_mismatch", "unknown_dtype",
)


def test_malformed_corpus_exists(malformed_files: dict[str, Path], pickle_marker: Path) -> None:
    expected = set(STRUCTURALLY_BROKEN) | {
        "duplicate_keys", "nan_in_lora_a", "no_lora_keys", "adapter_config_invalid_json",
        "adapter_config_missing_r", "pickle_bin",
    }
    assert set(malformed_files) == expected
    assert all(p.exists() for p in malformed_files.values())
    assert (malformed_files["pickle_bin"] / "adapter_model.bin").exists()
    assert not pickle_marker.exists(), "building the corpus must not run the pickle"


@pytest.mark.parametrize("name", STRUCTURALLY_BROKEN)
def test_safetensors_itself_rejects_broken_files(malformed_files: dict[str, Path], name: str) -> None:
    with pytest.raises(Exception):
        load_file(malformed_files[name])


def test_broken_headers_are_what_they_claim(malformed_files: dict[str, Path]) -> None:
    def prefix(name: str) -> int:
        return struct.unpack("<Q", malformed_files[name].read_bytes()[:8])[0]

    assert prefix("header_len_absurd") == 2**63
    assert prefix("header_len_past_eof") > malformed_files["header_len_past_eof"].stat().st_size
    assert malformed_files["empty"].stat().st_size == 0
    raw = malformed_files["duplicate_keys"].read_bytes()
    assert raw.count(b'"a.weight"') == 2
    header = json.loads(raw[8:8 + prefix("duplicate_keys")])  # last one wins, silently
    assert header["a.weight"]["dtype"] == "I32"
    with pytest.raises(UnicodeDecodeError):
        malformed_files["header_not_utf8"].read_bytes()[8:].decode("utf-8")


def test_semantically_broken_files_are_valid_safetensors(malformed_files: dict[str, Path]) -> None:
    nan = load_file(malformed_files["nan_in_lora_a"])
    lora_a = next(v for k, v in nan.items() if k.endswith("lora_A.weight"))
    assert torch.isnan(lora_a).sum() == 1
    assert (malformed_files["nan_in_lora_a"].parent / "adapter_config.json").exists()
    assert set(load_file(malformed_files["no_lora_keys"])) == {"foo.weight"}
    with pytest.raises(json.JSONDecodeError):
        json.loads((malformed_files["adapter_config_invalid_json"] / "adapter_config.json").read_text())
    config = json.loads((malformed_files["adapter_config_missing_r"] / "adapter_config.json").read_text())
    assert "r" not in config and config["peft_type"] == "LORA"


def test_malicious_pickle_is_live_but_blocked_by_weights_only(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = builders.write_malicious_pickle(tmp_path / "adapter_model.bin", marker)
    assert not marker.exists()
    with pytest.raises(Exception):
        torch.load(path, weights_only=True)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # what an unsafe reader would do
    assert marker.exists()


def test_write_safetensors_raw_round_trips(tmp_path: Path) -> None:
    header = {"__metadata__": {"k": "v"}, "x": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}
    data = np.arange(6, dtype="<f4").tobytes()
    path = builders.write_safetensors_raw(tmp_path / "ok.safetensors", header, data)
    assert struct.unpack("<Q", path.read_bytes()[:8])[0] % 8 == 0
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"k": "v"}
        torch.testing.assert_close(f.get_tensor("x"), torch.arange(6, dtype=torch.float32).reshape(2, 3))
