"""Fuzzing the readers (issue #6): a mutated file is refused cleanly or read correctly.

Structural mutations, not byte noise (test_malformed.py flips bytes): the JSON header of
a valid safetensors file is parsed, its entries mutated (dtypes, shapes, offsets, keys,
extra and missing fields, nested junk, __metadata__), and written back with a correct or
a wrong length prefix; adapter_config.json gets wrong values and types in every field the
math reads. The property, for every example:

- either a LoraToolsError whose message is one line starting with a file's path,
- or a correct result: for an adapter, inspect's figures are finite (strict JSON) and
  equal dense float64 numpy of the factors, which equal what the official safetensors
  reader reads, and each layer's scale is PEFT's rule (get_pattern_key) applied to the
  config; for a base, the merge succeeds and `verify` finds it equivalent.

A few hundred examples run in the default suite; the `slow` twins run thousands
(`pytest -m slow tests/test_fuzz.py`).
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as save_torch_bytes

from lora_tools.errors import LoraToolsError
from lora_tools.formats import load_adapter
from lora_tools.inspect import inspect_adapter
from lora_tools.merge import merge
from lora_tools.render.tables import to_json_text
from lora_tools.io.safetensors_file import SafetensorsFile
from lora_tools.verify.operation import verify

FAST = settings(deadline=None, max_examples=250, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(deadline=None, max_examples=3000, suppress_health_check=[HealthCheck.too_slow])
FAST_MERGE = settings(deadline=None, max_examples=80, suppress_health_check=[HealthCheck.too_slow])
SLOW_MERGE = settings(deadline=None, max_examples=1500, suppress_health_check=[HealthCheck.too_slow])

P = "base_model.model.model.layers"


def _seed_adapter() -> bytes:
    """Three PEFT layers in F32, F16 and BF16 (r 2, 2, 3), as safetensors writes them."""
    g = torch.Generator().manual_seed(3)
    tensors = {
        f"{P}.0.self_attn.q_proj.lora_A.weight": torch.randn(2, 8, generator=g),
        f"{P}.0.self_attn.q_proj.lora_B.weight": torch.randn(8, 2, generator=g),
        f"{P}.0.mlp.down_proj.lora_A.weight": torch.randn(2, 16, generator=g).half(),
        f"{P}.0.mlp.down_proj.lora_B.weight": torch.randn(8, 2, generator=g).half(),
        f"{P}.1.self_attn.v_proj.lora_A.weight": torch.randn(3, 8, generator=g).bfloat16(),
        f"{P}.1.self_attn.v_proj.lora_B.weight": torch.randn(4, 3, generator=g).bfloat16(),
    }
    return save_torch_bytes(tensors, metadata={"format": "pt"})


def _seed_base() -> tuple[bytes, bytes]:
    """A tiny base file (float and integer tensors, three float dtypes) and a PEFT adapter for it."""
    g = torch.Generator().manual_seed(4)
    base = {
        "layers.0.proj.weight": torch.randn(8, 8, generator=g),
        "layers.0.proj.bias": torch.randn(8, generator=g),
        "layers.1.proj.weight": torch.randn(6, 8, generator=g).bfloat16(),
        "embed.weight": torch.randn(16, 8, generator=g),
        "norm.weight": torch.randn(8, generator=g).half(),
        "position_ids": torch.arange(4),
    }
    adapter = {
        "base_model.model.layers.0.proj.lora_A.weight": torch.randn(2, 8, generator=g),
        "base_model.model.layers.0.proj.lora_B.weight": torch.randn(8, 2, generator=g) * 0.1,
        "base_model.model.layers.1.proj.lora_A.weight": torch.randn(2, 8, generator=g),
        "base_model.model.layers.1.proj.lora_B.weight": torch.randn(6, 2, generator=g) * 0.1,
    }
    return save_torch_bytes(base, metadata={"format": "pt"}), save_torch_bytes(adapter)


def _seed_kohya() -> bytes:
    """kohya: a linear layer (fp16, alpha tensor) and a 3×3 conv (alpha 0-d fp16)."""
    g = torch.Generator().manual_seed(5)
    return save_torch_bytes({
        "lora_unet_mid_block_attn_to_q.lora_down.weight": torch.randn(2, 8, generator=g).half(),
        "lora_unet_mid_block_attn_to_q.lora_up.weight": torch.randn(8, 2, generator=g).half(),
        "lora_unet_mid_block_attn_to_q.alpha": torch.tensor(1.0),
        "lora_unet_conv_in.lora_down.weight": torch.randn(2, 4, 3, 3, generator=g),
        "lora_unet_conv_in.lora_up.weight": torch.randn(8, 2, 1, 1, generator=g),
        "lora_unet_conv_in.alpha": torch.tensor(0.5).half(),
    }, metadata={"ss_network_dim": "2", "ss_network_alpha": "1.0"})


def _seed_diffusers() -> bytes:
    """diffusers: component-prefixed PEFT keys in bf16, alpha from lora_adapter_metadata."""
    g = torch.Generator().manual_seed(6)
    config = {"unet.r": 2, "unet.lora_alpha": 4, "unet.use_rslora": False, "text_encoder.lora_alpha": 1}
    return save_torch_bytes({
        "unet.mid.attn.to_q.lora_A.weight": torch.randn(2, 8, generator=g).bfloat16(),
        "unet.mid.attn.to_q.lora_B.weight": torch.randn(8, 2, generator=g).bfloat16(),
        "text_encoder.layers.0.q_proj.lora_A.weight": torch.randn(2, 8, generator=g).bfloat16(),
        "text_encoder.layers.0.q_proj.lora_B.weight": torch.randn(8, 2, generator=g).bfloat16(),
    }, metadata={"format": "pt", "lora_adapter_metadata": json.dumps(config)})


SEED_ADAPTER = _seed_adapter()
SEED_ADAPTERS = {"peft": SEED_ADAPTER, "kohya": _seed_kohya(), "diffusers": _seed_diffusers()}
SEED_BASE, BASE_ADAPTER = _seed_base()


def _split(data: bytes) -> tuple[dict[str, Any], bytes]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


# --------------------------------------------------------------------------- header mutations

DTYPE_CODES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8", "BOOL",
               "F8_E4M3", "F8_E5M2", "C64", "F4", "f32", "", "F32 ", "float32"]
HUGE = [2**31, 2**32 + 1, 2**53 + 1, 2**62, 2**63 - 1, 2**63, 2**64, 10**30, -(2**63)]
junk = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)
dims = st.integers(-3, 24) | st.sampled_from(HUGE)
offsets = st.integers(-4, 600) | st.sampled_from(HUGE)
LORA_NAMES = [f"{P}.0.self_attn.q_proj.lora_A.weight", f"{P}.0.self_attn.q_proj.lora_B.weight",
              f"{P}.0.self_attn.k_proj.lora_A.weight", f"{P}.0.self_attn.q_proj.lora_magnitude_vector",
              f"{P}.0.self_attn.q_proj.lora_B.bias", f"{P}.2.embed.lora_embedding_A", f"{P}.2.embed.lora_embedding_B",
              "lora_unet_x_y.lora_down.weight", "lora_unet_x_y.lora_up.weight", "lora_unet_x_y.alpha",
              "unet.a.lora.down.weight", "layers.0.proj.weight", "embed.weight", "__metadata__", "", "x" * 300]
SAME_SIZE = {"F32": ["I32", "U32"], "I32": ["F32"], "F16": ["BF16", "I16", "U16"], "BF16": ["F16", "I16"],
             "I64": ["F64", "U64"], "F64": ["I64"]}


# Ops that may leave a valid file come more often, so that both outcomes are explored.
OPS = ["dtype", "shape", "offsets", "shift", "drop_field", "junk_field", "junk_entry", "add_entry", "swap"] + \
      ["reshape", "retype", "rename", "extra_field", "metadata", "drop_entry", "adapter_metadata"] * 3 + \
      ["move_module", "reorder"] * 6
MODULE_PATHS = ["model.layers.0.self_attn.k_proj", "model.layers.7.mlp.up_proj", "model.embed_tokens", "x", "a.b.c.d.e"]


@st.composite
def mutated_header(draw: st.DrawFn, seed: bytes) -> bytes:
    """`seed` with its header mutated structurally and re-serialized (length right or wrong)."""
    header, body = _split(seed)
    tensors = [k for k in header if k != "__metadata__"]
    for _ in range(draw(st.integers(1, 3))):
        names = [k for k in header if k != "__metadata__"] or [""]
        name = draw(st.sampled_from(names))
        entry = header.get(name) if isinstance(header.get(name), dict) else {}  # junk entries stay junk
        op = draw(st.sampled_from(OPS))
        if op == "dtype":
            entry["dtype"] = draw(st.sampled_from(DTYPE_CODES))
        elif op == "shape":
            entry["shape"] = draw(st.lists(dims, max_size=5))
        elif op == "offsets":
            entry["data_offsets"] = draw(st.lists(offsets, max_size=3))
        elif op == "shift" and isinstance(entry.get("data_offsets"), list):
            delta = draw(st.integers(-16, 16) | st.sampled_from([len(body), -len(body)]))
            entry["data_offsets"] = [o + delta if isinstance(o, int) else o for o in entry["data_offsets"]]
        elif op == "reshape" and isinstance(entry.get("shape"), list) and entry["shape"] and \
                0 < (numel := math.prod(d if isinstance(d, int) else 1 for d in entry["shape"])) <= 4096:
            factors = [d for d in range(1, numel + 1) if numel % d == 0]
            first = draw(st.sampled_from(factors))
            entry["shape"] = draw(st.sampled_from([[first, numel // first], [numel // first, first],
                                                   [first, numel // first, 1, 1], [numel], [1, numel], [numel, 0]]))
        elif op == "retype" and isinstance(entry.get("dtype"), str) and entry["dtype"] in SAME_SIZE:
            entry["dtype"] = draw(st.sampled_from(SAME_SIZE[entry["dtype"]]))
        elif op == "drop_field" and entry:
            entry.pop(draw(st.sampled_from(sorted(entry))))
        elif op == "extra_field":
            entry[draw(st.text(max_size=6))] = draw(junk)
        elif op == "junk_field" and entry:
            entry[draw(st.sampled_from(sorted(entry)))] = draw(junk)
        elif op == "junk_entry":
            header[name] = draw(junk)
        elif op == "add_entry":
            start = draw(offsets)
            header[draw(st.sampled_from(LORA_NAMES) | st.text(max_size=8))] = {
                "dtype": draw(st.sampled_from(DTYPE_CODES[:6])), "shape": draw(st.lists(dims, max_size=3)),
                "data_offsets": [start, start + draw(st.integers(0, 64))]}
        elif op == "drop_entry" and name in header:
            header.pop(name)
        elif op == "rename" and name in header:
            header[draw(st.sampled_from(LORA_NAMES + tensors) | st.text(max_size=8))] = header.pop(name)
        elif op == "swap" and len(names) > 1:
            other = draw(st.sampled_from(names))
            if isinstance(header.get(other), dict) and entry and "data_offsets" in entry:
                entry["data_offsets"], header[other]["data_offsets"] = header[other].get("data_offsets"), entry["data_offsets"]
        elif op == "move_module" and ".lora_" in name:  # A and B (and the rest) of one module, renamed together
            module = name.split(".lora_")[0]
            target = "base_model.model." + draw(st.sampled_from(MODULE_PATHS))
            for key in [k for k in header if k.startswith(module + ".lora_")]:
                header[target + key[len(module):]] = header.pop(key)
        elif op == "reorder":
            keys = draw(st.permutations(list(header)))
            header = {k: header[k] for k in keys}
        elif op == "metadata":
            header["__metadata__"] = draw(junk | st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=3))
        elif op == "adapter_metadata":  # diffusers' LoraConfig in the header, with wrong values
            fields = draw(st.dictionaries(st.sampled_from(["unet.lora_alpha", "unet.r", "unet.use_rslora", "lora_alpha",
                                                           "unet.alpha_pattern", "text_encoder", "unet"]),
                                          st.integers(-2, 9) | st.floats() | junk, max_size=3))
            text = draw(st.sampled_from([json.dumps(fields), "{", "[" * 5000, "[]"]))
            metadata = header.get("__metadata__") if isinstance(header.get("__metadata__"), dict) else {}
            header["__metadata__"] = {**metadata, "lora_adapter_metadata": text}
    if draw(st.booleans()) and draw(st.integers(0, 9)) == 0:  # the whole header replaced
        raw = json.dumps(draw(junk)).encode()
    else:
        raw = json.dumps(header).encode()  # NaN / Infinity tokens may appear, as a forger could write them
    raw += b" " * draw(st.integers(0, 7))
    length = len(raw)
    if draw(st.integers(0, 3)) == 0:  # a wrong length prefix
        length += draw(st.sampled_from([-1, 1, -8, 8]) | st.integers(-len(raw), 64) | st.sampled_from(HUGE[4:7]))
    data = struct.pack("<Q", length % 2**64) + raw + body
    if draw(st.integers(0, 6)) == 0:  # truncated, or trailing bytes
        data = data[: draw(st.integers(0, len(data)))] + b"\0" * draw(st.integers(0, 3))
    return data


def assert_clean(error: LoraToolsError, *paths: Path) -> None:
    message = str(error)
    assert "\n" not in message and any(message.startswith(f"{p}: ") for p in paths), message


def official_tensors(path: Path) -> dict[str, np.ndarray] | None:
    """What the official safetensors reader reads (float64), or None when it refuses the file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return {k: handle.get_tensor(k).to(torch.float64).numpy() for k in handle.keys()
                    if handle.get_slice(k).get_dtype() in ("F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL")}
    except Exception:  # noqa: BLE001 - any refusal: only agreement where both accept is checked
        return None


# --------------------------------------------------------------------------- adapters

@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def test_seeds_are_valid(fuzz_dir: Path) -> None:
    for kind, data in SEED_ADAPTERS.items():
        path = fuzz_dir / f"seed-{kind}.safetensors"
        path.write_bytes(data)
        report = inspect_adapter(path)
        assert report.adapter.format == kind and len(report.layers) == (3 if kind == "peft" else 2)
    base, adapter = fuzz_dir / "base.safetensors", fuzz_dir / "base-adapter.safetensors"
    base.write_bytes(SEED_BASE)
    adapter.write_bytes(BASE_ADAPTER)
    merge(base, [adapter], fuzz_dir / "merged.safetensors", device="cpu")
    assert verify(base, [adapter], fuzz_dir / "merged.safetensors").equivalent


def representable(sv: np.ndarray) -> bool:
    """Whether Σσ² is a normal float64, which inspect's energy figures need.

    Beyond that (σ ≳ 1e154 or ≲ 1e-154, from absurd alphas such as 1e-161) inspect's
    ‖ΔW‖_F and energy ranks lose accuracy: a known limit, see the report of issue #6.
    """
    if sv.size and not 1e-150 < float(np.max(sv)) < 1e150:
        event("figures not checked: σ outside [1e-150, 1e150]")
        return False
    return True


def product(layer: Any) -> np.ndarray:
    """B·A in float64, dense (out, in·k): the reference every figure is checked against."""
    return layer.b_matrix.astype(np.float64) @ layer.a_matrix.astype(np.float64)


def check_adapter_file(path: Path, data: bytes) -> None:
    """Refused cleanly, or inspect's numbers are finite and right (see the module docstring)."""
    path.write_bytes(data)
    try:
        report = inspect_adapter(path)
    except LoraToolsError as error:
        assert_clean(error, path)
        event(f"refused: {type(error).__name__}")
        return
    event("read")
    to_json_text(report.to_json())  # strict JSON: every figure finite
    ours = SafetensorsFile(path)
    official = official_tensors(path)
    if official is not None:  # both readers accept: they read the same numbers
        for name in official:
            if ours.info(name).dtype in ("F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL"):
                np.testing.assert_array_equal(ours.numpy(name).astype(np.float64), official[name])
    ours.close()
    adapter = load_adapter(path)
    for layer, figures in zip(adapter.layers, report.layers):
        # |s|·σ(BA): scaling after the SVD keeps the reference exact for any finite s
        sv = abs(layer.scale) * np.linalg.svd(product(layer), compute_uv=False)[: layer.rank]
        if not representable(sv):
            continue
        assert math.isclose(figures.fro_norm, math.hypot(*sv), rel_tol=1e-9)
        np.testing.assert_allclose(figures.singular_values[: sv.size], sv, rtol=1e-7, atol=1e-12 * (sv[0] if sv.size else 0))


ADAPTER_FILES = st.sampled_from(sorted(SEED_ADAPTERS)).flatmap(
    lambda kind: st.tuples(st.just(kind), mutated_header(SEED_ADAPTERS[kind])))


@FAST
@given(case=ADAPTER_FILES)
def test_fuzz_adapter_header(fuzz_dir: Path, case: tuple[str, bytes]) -> None:
    event(f"seed: {case[0]}")
    check_adapter_file(fuzz_dir / "adapter.safetensors", case[1])


@pytest.mark.slow
@SLOW
@given(case=ADAPTER_FILES)
def test_fuzz_adapter_header_long(fuzz_dir: Path, case: tuple[str, bytes]) -> None:
    event(f"seed: {case[0]}")
    check_adapter_file(fuzz_dir / "adapter-long.safetensors", case[1])


# --------------------------------------------------------------------------- bases: merge, verify, inspect --base

def check_base_file(folder: Path, data: bytes) -> None:
    """A mutated base: merge refuses it cleanly (nothing written) or verify proves the merge."""
    base, adapter, out = folder / "base.safetensors", folder / "adapter.safetensors", folder / "merged.safetensors"
    base.write_bytes(data)
    if not adapter.exists():
        adapter.write_bytes(BASE_ADAPTER)
    out.unlink(missing_ok=True)  # a failed example's
    try:
        inspect_adapter(adapter, base_path=base)
    except LoraToolsError as error:
        assert_clean(error, base, adapter)
    try:
        merge(base, [adapter], out, device="cpu")
    except LoraToolsError as error:
        assert_clean(error, base, adapter, out)
        assert [p.name for p in folder.iterdir() if ".lora-tools-" in p.name] == [] and not out.exists()
        event(f"merge refused: {type(error).__name__}")
        return
    event("merged")
    report = verify(base, [adapter], out)
    assert report.equivalent, [(t.name, t.verdict, t.detail) for t in report.tensors]
    assert set(SafetensorsFile(out).keys()) == set(SafetensorsFile(base).keys())
    out.unlink()


@FAST_MERGE
@given(data=mutated_header(SEED_BASE))
def test_fuzz_base_header(fuzz_dir: Path, data: bytes) -> None:
    folder = fuzz_dir / "base"
    folder.mkdir(exist_ok=True)
    check_base_file(folder, data)


@pytest.mark.slow
@SLOW_MERGE
@given(data=mutated_header(SEED_BASE))
def test_fuzz_base_header_long(fuzz_dir: Path, data: bytes) -> None:
    folder = fuzz_dir / "base-long"
    folder.mkdir(exist_ok=True)
    check_base_file(folder, data)


# --------------------------------------------------------------------------- adapter_config.json

CONFIG: dict[str, Any] = {
    "peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"],
    "task_type": "CAUSAL_LM", "bias": "none", "use_rslora": False, "use_dora": False, "fan_in_fan_out": False,
    "rank_pattern": {"v_proj": 2, "down_proj": 3}, "alpha_pattern": {}, "modules_to_save": None, "lora_bias": False,
    "base_model_name_or_path": None, "layers_to_transform": None,
}
MODULES = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.1.mlp.down_proj"]
# (rank_pattern says what the factors hold, ranks 4, 2 and 3: PEFT refuses an adapter whose
# config disagrees with its factors, and so does lora-tools.)
# Pattern keys: plain names, dotted paths, regexes, invalid regexes; no nested quantifiers
# (those backtrack for minutes, in PEFT as here: see the report on ReDoS).
PATTERN_KEYS = st.sampled_from(["q_proj", "v_proj", "down_proj", "proj", "layers.0.self_attn.q_proj", r"layers\.1\..*",
                                "q_proj|v_proj", ".*", "(", "[", "model.layers.0.self_attn.q_proj", "mlp", ""]) \
    | st.text(alphabet="abdjopqrsv_.|()[]0123", max_size=10)
NUMBERS = st.integers(-3, 64) | st.floats(-1e3, 1e3) | st.sampled_from([0, 1e-300, 1e300, 2**53, 10**30, True, False])
FIELD_VALUES = {
    "peft_type": st.sampled_from(["LORA", "lora", "IA3", "LOHA", "ADALORA", "", "LORA "]) | junk,
    "r": NUMBERS | junk,
    "lora_alpha": NUMBERS | junk,
    "use_rslora": st.booleans() | junk,
    "use_dora": st.booleans() | junk,
    "fan_in_fan_out": st.booleans() | junk,
    "lora_bias": st.booleans() | junk,
    "bias": st.sampled_from(["none", "all", "lora_only"]) | junk,
    "rank_pattern": st.dictionaries(PATTERN_KEYS, NUMBERS, max_size=4) | junk,
    "alpha_pattern": st.dictionaries(PATTERN_KEYS, NUMBERS | junk, max_size=4) | junk,
    "modules_to_save": st.lists(st.sampled_from(["lm_head", "q_proj", "embed_tokens"]), max_size=2) | junk,
    "target_modules": st.lists(st.sampled_from(["q_proj", "v_proj", "down_proj"]), max_size=3) | st.text(max_size=8) | junk,
}
RAW_TEXTS = ['{"r": 4, "lora_alpha": NaN}', '{"r": 4, "lora_alpha": Infinity}', '{"r": 1e999, "lora_alpha": 8}',
             '{"r": 4, "lora_alpha": ' + "7" * 5000 + "}", "[" * 50_000, "", "null", '{"r": 4,}', "\ufeff{}",
             '{"r": 4, "lora_alpha": 8, "r": "4"}']


@st.composite
def mutated_config(draw: st.DrawFn) -> bytes:
    if draw(st.integers(0, 19)) == 0:
        return draw(st.sampled_from(RAW_TEXTS)).encode() if draw(st.booleans()) else b'{"r": 4, "lora_alpha": "\xff"}'
    config = json.loads(json.dumps(CONFIG))
    for _ in range(draw(st.integers(1, 4))):
        field = draw(st.sampled_from(sorted(FIELD_VALUES)))
        action = draw(st.sampled_from(["set", "set", "set", "drop", "extra"]))
        if action == "set":
            config[field] = draw(FIELD_VALUES[field])
        elif action == "drop":
            config.pop(field, None)
        else:
            config[draw(st.text(max_size=8))] = draw(junk)
    return json.dumps(config).encode()


def expected_scale(config: dict[str, Any], module: str, rank: int) -> float:
    """PEFT's rule, with PEFT's own pattern lookup (peft.utils.other.get_pattern_key)."""
    import re

    from peft.utils.other import get_pattern_key

    patterns = {}
    for key, value in (config.get("alpha_pattern") or {}).items():
        try:
            re.compile(rf"(.*\.)?({key})$")
        except re.error:  # PEFT would raise on it; lora-tools skips it
            continue
        patterns[key] = value
    alpha = patterns.get(get_pattern_key(list(patterns), module), config["lora_alpha"])
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


@pytest.fixture(scope="module")
def config_adapter(fuzz_dir: Path) -> Path:
    """An adapter folder whose adapter_config.json each example overwrites."""
    folder = fuzz_dir / "config-adapter"
    folder.mkdir()
    g = torch.Generator().manual_seed(8)
    shapes = {MODULES[0]: (8, 8), MODULES[1]: (4, 8), MODULES[2]: (8, 16)}
    tensors = {}
    for (module, (out, inp)), r in zip(shapes.items(), (4, 2, 3)):
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(r, inp, generator=g)
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out, r, generator=g)
    (folder / "adapter_model.safetensors").write_bytes(save_torch_bytes(tensors))
    return folder


def check_config(folder: Path, text: bytes) -> None:
    config_path = folder / "adapter_config.json"
    config_path.write_bytes(text)
    try:
        report = inspect_adapter(folder)
    except LoraToolsError as error:
        assert_clean(error, config_path, folder / "adapter_model.safetensors", folder)
        event("refused")
        return
    event("read")
    to_json_text(report.to_json())
    config = json.loads(text)
    assert isinstance(config, dict) and str(config.get("peft_type", "LORA")).upper() == "LORA"
    assert all(isinstance(config[k], (int, float)) and not isinstance(config[k], bool) and config[k] > 0
               for k in ("r", "lora_alpha"))
    adapter = load_adapter(folder)
    for layer, figures in zip(adapter.layers, report.layers):
        scale = expected_scale(config, layer.name, layer.rank)
        assert math.isclose(figures.scale, scale, rel_tol=1e-12), (layer.name, figures.scale, scale)
        sv = abs(scale) * np.linalg.svd(product(layer), compute_uv=False)
        if representable(sv):
            assert math.isclose(figures.fro_norm, math.hypot(*sv), rel_tol=1e-9)


@FAST
@given(text=mutated_config())
def test_fuzz_adapter_config(config_adapter: Path, text: bytes) -> None:
    check_config(config_adapter, text)


@pytest.mark.slow
@SLOW
@given(text=mutated_config())
def test_fuzz_adapter_config_long(config_adapter: Path, text: bytes) -> None:
    check_config(config_adapter, text)


def test_scale_oracle_matches_on_a_known_config(config_adapter: Path) -> None:
    """The oracle itself: alpha_pattern "v_proj" gives v_proj α 3, rsLoRA divides by √r;
    an invalid regex key is skipped (PEFT would raise on it)."""
    config = {**CONFIG, "alpha_pattern": {"(": 1, "v_proj": 3}, "use_rslora": True}
    (config_adapter / "adapter_config.json").write_text(json.dumps(config))
    layers = {layer.name: layer for layer in inspect_adapter(config_adapter).layers}
    assert layers[MODULES[1]].scale == pytest.approx(3 / math.sqrt(2)) == expected_scale(config, MODULES[1], 2)
    assert layers[MODULES[0]].scale == pytest.approx(8 / 2) == expected_scale(config, MODULES[0], 4)
