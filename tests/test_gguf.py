"""llama.cpp GGUF LoRA adapters: `formats.gguf.write_gguf_adapter` against llama.cpp's rules.

Written from real PEFT adapters (tests/builders.py on the tiny Llama base, and a tiny
Qwen2 base built here), read back with gguf's own GGUFReader. Expectations come from the
raw PEFT files (test_formats.peft_reference: PEFT's pattern rules, rsLoRA) and from
llama.cpp's source, restated here: the runtime update is alpha/r · lora_b · lora_a with
r = lora_b.ne[0] (llama-adapter.h `get_scale`), token_embd's lora_a is stored (vocab, r)
(`build_inp_embd`), and a llama-family base has q/k rows permuted by
conversion/llama.py `LlamaModel.permute`, copied below as `llama_permute`.

`test_matches_llama_cpp_converter` runs llama.cpp's convert_lora_to_gguf.py itself; it is
marked slow: the llama.cpp tree comes from llama-cpp-python's sdist (package registry),
fetched and cached by tests/llama_cpp_tools.py (a failure to fetch it fails the test).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors import safe_open

from builders import PeftCase
from lora_tools.adapter import LoraLayer
from lora_tools.formats import load_adapter
from lora_tools.errors import FormatError
from lora_tools.formats.gguf import gguf_available, read_gguf_adapter, write_gguf_adapter
from lora_tools.io.encode import WriteError
from test_formats import RefLayer, peft_reference, raw_tensors

gguf = pytest.importorskip("gguf")

LLAMA_KINDS = ("llama_plain", "llama_rslora", "llama_patterns", "llama_embedding")
QWEN2_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def qwen2_dirs(fixture_root: Path) -> tuple[Path, Path]:
    """(base, adapter): a tiny Qwen2 (2 layers, 4 heads, 2 kv heads, q/k/v biases) and a
    PEFT adapter on it with an alpha_pattern whose ratio (12/8) is no power of two."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    base, adapter = fixture_root / "gguf-qwen2-base", fixture_root / "gguf-qwen2-adapter"
    if (adapter / "adapter_model.safetensors").exists():
        return base, adapter
    config = Qwen2Config(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    lora = LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, lora_dropout=0.0, r=4, lora_alpha=8,
                      target_modules=QWEN2_TARGETS, alpha_pattern={"lm_head": 12})
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.simplefilter("ignore")
        torch.manual_seed(2718)
        Qwen2ForCausalLM(config).save_pretrained(base)
        get_peft_model(AutoModelForCausalLM.from_pretrained(base), lora).save_pretrained(adapter)
    return base, adapter


@pytest.fixture(scope="session")
def case_dirs(
    peft_case_factory: Callable[[str], PeftCase], qwen2_dirs: tuple[Path, Path]
) -> Callable[[str], tuple[Path, Path]]:
    """kind -> (base folder, adapter folder), for the builders' kinds and "qwen2"."""

    def get(kind: str) -> tuple[Path, Path]:
        if kind == "qwen2":
            return qwen2_dirs
        case = peft_case_factory(kind)
        return case.base_dir, case.adapter_dir

    return get


def base_config(base: Path) -> dict[str, Any]:
    return json.loads((base / "config.json").read_text())


def reference(adapter: Path) -> dict[str, RefLayer]:
    config = json.loads((adapter / "adapter_config.json").read_text())
    return peft_reference(raw_tensors(adapter / "adapter_model.safetensors"), config)[0]


def llama_permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """conversion/llama.py `LlamaModel.permute`, in numpy."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def as_gguf_rows(name: str, m: np.ndarray, config: dict[str, Any]) -> np.ndarray:
    """Rows of an (out, ·) matrix in the order the base's GGUF holds them (LlamaModel.modify_tensors)."""
    if config["architectures"][0] != "LlamaForCausalLM":
        return m
    if name.endswith("q_proj"):
        return llama_permute(m, config["num_attention_heads"], config["num_attention_heads"])
    if name.endswith("k_proj"):
        return llama_permute(m, config["num_attention_heads"], config["num_key_value_heads"])
    return m


def read_gguf(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(KV without the GGUF.* header fields, {tensor name: ReaderTensor})."""
    reader = gguf.GGUFReader(path)
    kv = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return kv, {t.name: t for t in reader.tensors}


def tensor_values(t: Any) -> np.ndarray:
    """A tensor's values in float64, numpy shape (ne reversed)."""
    shape = tuple(int(d) for d in reversed(t.shape))
    if t.tensor_type == gguf.GGMLQuantizationType.BF16:
        bits = np.ascontiguousarray(t.data).view("<u2").reshape(shape)
        return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return np.asarray(t.data, dtype=np.float64).reshape(shape)


def one_unit(values: np.ndarray, dtype: str) -> np.ndarray:
    """The spacing of `dtype` at each of `values` (normal numbers)."""
    if dtype == "F16":
        return np.spacing(np.abs(values).astype(np.float16)).astype(np.float64)
    return np.spacing(np.abs(values).astype(np.float32)).astype(np.float64) * 2.0 ** 16  # bf16: 16 fewer mantissa bits


def write(
    kind: str, case_dirs: Callable[[str], tuple[Path, Path]], tmp_path: Path, dtype: str = "F32"
) -> tuple[Any, Path, dict[str, Any]]:
    base, adapter = case_dirs(kind)
    out = tmp_path / f"{kind}-{dtype}.gguf"
    written = write_gguf_adapter(load_adapter(adapter).layers, out, base_config=base_config(base), dtype=dtype)
    return written, out, base_config(base)


# --------------------------------------------------------------------------- what is written


def test_gguf_available() -> None:
    assert gguf_available()


@pytest.mark.parametrize("kind", [*LLAMA_KINDS, "qwen2"])
def test_kv_names_and_shapes(kind: str, case_dirs: Callable[[str], tuple[Path, Path]], tmp_path: Path) -> None:
    written, out, config = write(kind, case_dirs, tmp_path)
    kv, tensors = read_gguf(out)
    arch = "qwen2" if kind == "qwen2" else "llama"
    assert kv == {"general.architecture": arch, "general.type": "adapter", "adapter.type": "lora",
                  "adapter.lora.alpha": written.alpha, "general.quantization_version": 2}
    assert written.architecture == arch
    ref = reference(case_dirs(kind)[1])
    assert sorted(written.names) == sorted(ref)
    assert sorted(tensors) == sorted(f"{base}.{ab}" for base in written.names.values() for ab in ("lora_a", "lora_b"))
    with safe_open(case_dirs(kind)[0] / "model.safetensors", "np") as f:
        base_ne = {name: list(reversed(f.get_slice(f"{name}.weight").get_shape())) for name in written.names}
    for name, layer in ref.items():
        a, b = tensors[f"{written.names[name]}.lora_a"], tensors[f"{written.names[name]}.lora_b"]
        assert a.tensor_type == b.tensor_type == gguf.GGMLQuantizationType.F32
        ne, a_ne, b_ne = base_ne[name], [int(d) for d in a.shape], [int(d) for d in b.shape]
        if layer.kind == "embedding":  # llama-adapter.cpp's token_embd check: A and B flipped
            assert written.names[name] == "token_embd.weight"
            assert (a_ne, b_ne) == ([layer.rank, ne[1]], [layer.rank, ne[0]])
        else:  # model.ne[0] == a.ne[0], model.ne[1] == b.ne[1], a.ne[1] == b.ne[0]
            assert (a_ne, b_ne) == ([ne[0], layer.rank], [layer.rank, ne[1]])
    if kind == "llama_plain":
        assert written.names["model.layers.1.self_attn.k_proj"] == "blk.1.attn_k.weight"
        assert written.names["model.layers.0.mlp.down_proj"] == "blk.0.ffn_down.weight"
    if kind == "qwen2":
        assert written.names["lm_head"] == "output.weight"


@pytest.mark.parametrize("kind", [*LLAMA_KINDS, "qwen2"])
def test_updates_reproduced_f32(kind: str, case_dirs: Callable[[str], tuple[Path, Path]], tmp_path: Path) -> None:
    """alpha/r · lora_b · lora_a, rows as the base GGUF holds them, is PEFT's s·B·A."""
    written, out, config = write(kind, case_dirs, tmp_path)
    kv, tensors = read_gguf(out)
    alpha = kv["adapter.lora.alpha"]
    for name, layer in reference(case_dirs(kind)[1]).items():
        a = tensor_values(tensors[f"{written.names[name]}.lora_a"])
        b = tensor_values(tensors[f"{written.names[name]}.lora_b"])
        if layer.kind == "embedding":
            a = a.T  # stored (vocab, r)
        got = alpha / b.shape[1] * (b @ a)
        want = as_gguf_rows(name, layer.product(), config)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max(), err_msg=name)


def test_alpha_and_folds(case_dirs: Callable[[str], tuple[Path, Path]], tmp_path: Path) -> None:
    """alpha = the most common s·r; the other layers' ratio folded into B only."""
    plain = write("llama_plain", case_dirs, tmp_path)[0]
    assert (plain.alpha, plain.folded) == (8.0, {})
    rslora = write("llama_rslora", case_dirs, tmp_path)[0]  # r 8, alpha 16: s·r = 16·√8 for every layer
    assert (rslora.alpha, rslora.folded) == (float(np.float32(16 * np.sqrt(8))), {})
    patterns = write("llama_patterns", case_dirs, tmp_path)[0]  # down_proj alpha 32, the rest s·r = 8
    assert (patterns.alpha, patterns.folded) == (8.0, {f"model.layers.{i}.mlp.down_proj": 4.0 for i in (0, 1)})
    qwen2, out, _ = write("qwen2", case_dirs, tmp_path)
    assert (qwen2.alpha, qwen2.folded) == (8.0, {"lm_head": 1.5})
    _, tensors = read_gguf(out)
    ref = reference(case_dirs("qwen2")[1])["lm_head"]
    np.testing.assert_array_equal(tensor_values(tensors["output.weight.lora_a"]), ref.a)  # A untouched
    np.testing.assert_array_equal(tensor_values(tensors["output.weight.lora_b"]), (ref.b * 1.5).astype(np.float32))


@pytest.mark.parametrize("dtype", ["F16", "BF16"])
@pytest.mark.parametrize("kind", ["llama_patterns", "llama_embedding", "qwen2"])
def test_half_dtypes_within_one_unit(kind: str, dtype: str, case_dirs: Callable[[str], tuple[Path, Path]],
                                     tmp_path: Path) -> None:
    written, out, config = write(kind, case_dirs, tmp_path, dtype)
    kv, tensors = read_gguf(out)
    for name, layer in reference(case_dirs(kind)[1]).items():
        ta, tb = tensors[f"{written.names[name]}.lora_a"], tensors[f"{written.names[name]}.lora_b"]
        assert ta.tensor_type == tb.tensor_type == getattr(gguf.GGMLQuantizationType, dtype)
        want_a = layer.a.T if layer.kind == "embedding" else layer.a
        want_b = as_gguf_rows(name, layer.b * written.folded.get(name, 1.0), config)
        for got, want in ((tensor_values(ta), want_a), (tensor_values(tb), want_b)):
            assert got.shape == want.shape, name
            assert np.all(np.abs(got - want) <= one_unit(want, dtype)), name
        a = tensor_values(ta).T if layer.kind == "embedding" else tensor_values(ta)
        got_update = kv["adapter.lora.alpha"] / layer.rank * (tensor_values(tb) @ a)
        want_update = as_gguf_rows(name, layer.product(), config)
        np.testing.assert_allclose(got_update, want_update, atol=2e-2 * np.abs(want_update).max(), err_msg=name)


def test_metadata_strings(case_dirs: Callable[[str], tuple[Path, Path]], tmp_path: Path) -> None:
    base, adapter = case_dirs("llama_plain")
    out = tmp_path / "named.gguf"
    write_gguf_adapter(load_adapter(adapter).layers, out, base_config=base_config(base),
                       metadata={"general.name": "tiny adapter"})
    assert read_gguf(out)[0]["general.name"] == "tiny adapter"


@pytest.mark.parametrize("dtype", ["F32", "BF16"])
@pytest.mark.parametrize("kind", [*LLAMA_KINDS, "qwen2"])
def test_read_back(kind: str, dtype: str, case_dirs: Callable[[str], tuple[Path, Path]], tmp_path: Path) -> None:
    """read_gguf_adapter undoes the layout: unfolded F32 factors come back bit-exact, with
    llama.cpp's scale alpha/r within one float32 rounding of the source's."""
    written, out, config = write(kind, case_dirs, tmp_path, dtype)
    sources = load_adapter(case_dirs(kind)[1]).layers
    modules = [layer.name for layer in sources] + ["model.layers.0.mlp.nothing"]  # the last is not in the file
    back = read_gguf_adapter(out, modules, base_config=config)
    assert sorted(back) == sorted(layer.name for layer in sources)
    for source in sources:
        layer = back[source.name]
        assert (layer.kind, layer.rank, layer.dtype) == (source.kind, source.rank, dtype)
        np.testing.assert_allclose(layer.dense_update(), source.dense_update(), rtol=0,
                                   atol=(1e-6 if dtype == "F32" else 2e-2) * np.abs(source.dense_update()).max())
        if dtype == "F32" and source.name not in written.folded:
            np.testing.assert_array_equal(layer.a, source.a)
            np.testing.assert_array_equal(layer.b, source.b)
            assert abs(layer.scale - source.scale) <= 2.0**-24 * source.scale
    other = "qwen2" if written.architecture == "llama" else "llama"
    other_config = {**config, "architectures": ["Qwen2ForCausalLM" if other == "qwen2" else "LlamaForCausalLM"]}
    with pytest.raises(FormatError, match=f"no llama.cpp LoRA adapter for a {other} base"):
        read_gguf_adapter(out, [], base_config=other_config)


# --------------------------------------------------------------------------- refusals


def assert_refused(layers: list[LoraLayer], config: dict[str, Any], out: Path, match: str, **kwargs: Any) -> None:
    existed = out.exists()
    with pytest.raises(WriteError, match=match):
        write_gguf_adapter(layers, out, base_config=config, **kwargs)
    assert out.exists() == existed
    assert list(out.parent.iterdir()) == ([out] if existed else [])


@pytest.mark.parametrize(("kind", "match"), [
    ("llama_dora", r"layer 'model\.layers\.0\.mlp\.down_proj': DoRA"),
    ("llama_lora_bias", r"layer 'model\.layers\.0\.self_attn\.q_proj': .*no LoRA bias"),
    ("gpt2_conv1d", r"base architecture 'GPT2LMHeadModel' .*supported: LlamaForCausalLM, MistralForCausalLM, Qwen2"),
])
def test_refused_adapters(kind: str, match: str, case_dirs: Callable[[str], tuple[Path, Path]], tmp_path: Path) -> None:
    base, adapter = case_dirs(kind)
    layers = sorted(load_adapter(adapter).layers, key=lambda layer: layer.name)
    assert_refused(layers, base_config(base), tmp_path / "out.gguf", match)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # numpy, on the F16 overflow
def test_refused_layers_leave_no_file(case_dirs: Callable[[str], tuple[Path, Path]], tmp_path: Path) -> None:
    base, adapter = case_dirs("llama_plain")
    layers, config = load_adapter(adapter).layers, base_config(base)
    out = tmp_path / "out.gguf"
    beyond = dataclasses.replace(layers[0], name="model.layers.5.self_attn.q_proj")  # 2 blocks in the base
    assert_refused([*layers, beyond], config, out, r"'model\.layers\.5\.self_attn\.q_proj': no GGUF tensor name")
    unknown = dataclasses.replace(layers[0], name="model.layers.0.self_attn.rotary_proj")
    assert_refused([*layers, unknown], config, out, "rotary_proj': no GGUF tensor name")
    conv = LoraLayer("model.layers.0.mlp.up_proj", np.ones((2, 64, 3, 3)), np.ones((128, 2, 1, 1)), 2.0, kind="conv")
    assert_refused([*layers, conv], config, out, "up_proj': .*no conv layers")
    twice = dataclasses.replace(layers[0])
    assert_refused([*layers, twice], config, out, "updated by another layer")
    huge = dataclasses.replace(layers[-1], b=np.asarray(layers[-1].b) * 1e6)
    assert_refused([*layers[:-1], huge], config, out, "overflow F16", dtype="F16")
    assert_refused(layers, config, out, "F64", dtype="F64")
    assert_refused(layers, config, out, "may not set adapter.lora.alpha", metadata={"adapter.lora.alpha": "1"})
    assert_refused(layers, {**config, "architectures": ["MambaForCausalLM"]}, out, "'MambaForCausalLM'")
    out.write_bytes(b"keep")
    assert_refused(layers, config, out, "already exists")
    assert out.read_bytes() == b"keep"


def test_tied_lm_head_refused(case_dirs: Callable[[str], tuple[Path, Path]], tmp_path: Path) -> None:
    """A tied base's GGUF has no output.weight for llama.cpp to find (llama.cpp#9065)."""
    base, adapter = case_dirs("qwen2")
    config = {**base_config(base), "tie_word_embeddings": True}
    assert_refused(load_adapter(adapter).layers, config, tmp_path / "out.gguf", "'lm_head': lm_head is tied")


# --------------------------------------------------------------------------- llama.cpp itself


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama_plain", "llama_embedding", "qwen2"])
def test_matches_llama_cpp_converter(kind: str, case_dirs: Callable[[str], tuple[Path, Path]], tmp_path: Path) -> None:
    """Same names, shapes, types and bytes as convert_lora_to_gguf.py, except that the
    converter ignores alpha_pattern: where we fold f into B, its B is ours / f."""
    from llama_cpp_tools import llama_cpp_dir

    tree = llama_cpp_dir()
    base, adapter = case_dirs(kind)
    theirs = tmp_path / "theirs.gguf"
    command = [sys.executable, str(tree / "convert_lora_to_gguf.py"), "--base", str(base), "--outfile", str(theirs),
               str(adapter)]
    subprocess.run(command, check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    written, ours, _ = write(kind, case_dirs, tmp_path)
    kv_ours, t_ours = read_gguf(ours)
    kv_theirs, t_theirs = read_gguf(theirs)
    for key in ("general.architecture", "general.type", "adapter.type", "general.quantization_version"):
        assert kv_ours[key] == kv_theirs[key], key
    assert kv_theirs["adapter.lora.alpha"] == written.alpha
    assert sorted(t_ours) == sorted(t_theirs)
    folded = {f"{written.names[name]}.lora_b": f for name, f in written.folded.items()}
    for name, mine in t_ours.items():
        other = t_theirs[name]
        assert (list(mine.shape), mine.tensor_type) == (list(other.shape), other.tensor_type), name
        if name in folded:
            np.testing.assert_array_equal(tensor_values(mine), (tensor_values(other) * folded[name]).astype(np.float32))
        else:
            np.testing.assert_array_equal(np.asarray(mine.data), np.asarray(other.data), err_msg=name)
