"""Broken input (issue #3): every malformed file is one clear stderr line and exit 2.

The shared corpus (builders.malformed_files), more broken files built here, a missing
path and a malicious pickle, through CliRunner and a few real processes; and a
hypothesis property: a corrupted adapter file is read or refused with LoraToolsError,
never another exception.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import save as save_numpy_bytes
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file

from builders import write_safetensors_raw
from lora_tools.adapter import Adapter
from lora_tools.cli import cli
from lora_tools.errors import LoraToolsError
from lora_tools.formats import load_adapter
from lora_tools.inspect import flag_layers, layer_report

CORPUS = (
    "truncated", "header_len_past_eof", "header_len_absurd", "header_not_json", "header_not_utf8", "empty",
    "duplicate_keys", "overlapping_offsets", "shape_offsets_mismatch", "unknown_dtype", "nan_in_lora_a",
    "no_lora_keys", "adapter_config_invalid_json", "adapter_config_missing_r", "pickle_bin",
)
A_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
CONFIG = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}


def assert_one_line_error(exit_code: int, stdout: str, stderr: str, path: Path | str) -> str:
    assert exit_code == 2, (exit_code, stdout, stderr)
    assert stdout == ""
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert str(path) in lines[0], (str(path), lines[0])
    return lines[0]


def cli_error(path: Path | str, *extra: str) -> str:
    result = CliRunner().invoke(cli, ["inspect", os.fspath(path), *extra], catch_exceptions=False)
    return assert_one_line_error(result.exit_code, result.stdout, result.stderr, path)


def test_corpus_is_covered(malformed_files: dict[str, Path]) -> None:
    assert set(malformed_files) == set(CORPUS)


@pytest.mark.parametrize("name", CORPUS)
def test_corpus_file_is_one_line_error(malformed_files: dict[str, Path], pickle_marker: Path, name: str) -> None:
    assert not pickle_marker.exists()
    cli_error(malformed_files[name])
    cli_error(malformed_files[name], "--json")
    assert not pickle_marker.exists()


def test_missing_path(tmp_path: Path) -> None:
    line = cli_error(tmp_path / "no-such-adapter")
    assert "no such file" in line


def test_malicious_pickle_is_refused_without_running(malformed_files: dict[str, Path], pickle_marker: Path) -> None:
    line = cli_error(malformed_files["pickle_bin"])
    assert "pickle" in line and "system" in line  # says what it refused: os.system
    assert "weights_only` set to `False" not in line  # never pass on torch's advice to unpickle it
    assert not pickle_marker.exists()


@pytest.mark.parametrize("name", ["truncated", "header_len_absurd", "pickle_bin", "adapter_config_missing_r", None])
def test_real_process_errors(malformed_files: dict[str, Path], pickle_marker: Path, tmp_path: Path, name) -> None:
    path = malformed_files[name] if name else tmp_path / "missing.safetensors"
    script = Path(sys.executable).parent / "lora-tools"
    proc = subprocess.run([str(script), "inspect", str(path)], capture_output=True, text=True, timeout=120)
    assert_one_line_error(proc.returncode, proc.stdout, proc.stderr, path)
    assert proc.stderr.startswith("Error: ")
    assert not pickle_marker.exists()


def test_real_process_torch_warnings_stay_off_stderr(more_malformed: dict[str, Path]) -> None:
    """torch warns about the pickle protocol of a non-zip .bin; only our one line may show."""
    path = more_malformed["bin_garbage"]
    proc = subprocess.run([str(Path(sys.executable).parent / "lora-tools"), "inspect", str(path.parent)],
                          capture_output=True, text=True, timeout=120)
    assert_one_line_error(proc.returncode, proc.stdout, proc.stderr, path)


# --------------------------------------------------------------------------- more broken files


def _small_peft(a: np.ndarray | None = None, b: np.ndarray | None = None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {A_KEY: rng.standard_normal((4, 8)).astype(np.float32) if a is None else a,
            B_KEY: rng.standard_normal((8, 4)).astype(np.float32) if b is None else b}


def _folder(root: Path, name: str, config: str | dict | None, tensors: dict | None = None) -> Path:
    folder = root / name
    folder.mkdir()
    if config is not None:
        text = config if isinstance(config, str) else json.dumps(config)
        (folder / "adapter_config.json").write_text(text)
    if tensors is not None:
        save_numpy(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def _build_more(root: Path) -> dict[str, Path]:
    files: dict[str, Path] = {}
    one = {"a.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    files["header_deeply_nested"] = write_safetensors_raw(root / "deep.safetensors", b"[" * 200_000, b"")
    files["header_is_a_list"] = write_safetensors_raw(root / "list.safetensors", b"[]", b"")
    files["dtype_not_a_string"] = write_safetensors_raw(
        root / "dtype_list.safetensors", {"a.weight": {**one["a.weight"], "dtype": ["F32"]}}, b"\0" * 4)
    files["shape_not_ints"] = write_safetensors_raw(
        root / "shape.safetensors", {"a.weight": {**one["a.weight"], "shape": [1.0]}}, b"\0" * 4)
    files["offsets_negative"] = write_safetensors_raw(
        root / "neg.safetensors", {"a.weight": {**one["a.weight"], "data_offsets": [-4, 0]}}, b"\0" * 4)
    files["metadata_not_strings"] = write_safetensors_raw(
        root / "meta.safetensors", {"__metadata__": {"ss_network_dim": 4}, **one}, b"\0" * 4)
    files["huge_int_in_header"] = write_safetensors_raw(
        root / "bigint.safetensors", b'{"a.weight":{"dtype":"F32","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,4]}}',
        b"\0" * 4)

    def single(name: str, tensors: dict, metadata: dict | None = None) -> None:
        files[name] = root / f"{name}.safetensors"
        save_numpy(tensors, str(files[name]), metadata=metadata)

    rng = np.random.default_rng(1)
    single("rank_zero", _small_peft(np.zeros((0, 8), np.float32), np.zeros((8, 0), np.float32)))
    single("factor_1d", _small_peft(np.ones(8, np.float32)))
    single("ranks_disagree", _small_peft(b=np.ones((8, 3), np.float32)))
    single("inf_in_lora_b", _small_peft(b=np.full((8, 4), np.inf, np.float32)))
    single("factors_overflow_float64", _small_peft(np.full((4, 8), 1e200), np.full((8, 4), 1e200)))
    single("integer_factor", _small_peft(np.ones((4, 8), np.int32)))
    single("only_lora_b", {B_KEY: np.ones((8, 4), np.float32)})
    single("magnitude_wrong_size", {**_small_peft(), A_KEY.replace("lora_A.weight", "lora_magnitude_vector"): np.ones(3, np.float32)})
    single("embedding_factor_3d", {"base_model.model.model.embed_tokens.lora_embedding_A": np.ones((4, 8, 1), np.float32),
                                   "base_model.model.model.embed_tokens.lora_embedding_B": np.ones((8, 4), np.float32)})
    kohya = {"lora_unet_mid_block_proj_in.lora_down.weight": rng.standard_normal((4, 8)).astype(np.float32),
             "lora_unet_mid_block_proj_in.lora_up.weight": rng.standard_normal((8, 4)).astype(np.float32)}
    single("kohya_alpha_nan", {**kohya, "lora_unet_mid_block_proj_in.alpha": np.array(np.nan, np.float32)})
    single("kohya_alpha_vector", {**kohya, "lora_unet_mid_block_proj_in.alpha": np.ones(2, np.float32)})
    single("kohya_alpha_bool", {**kohya, "lora_unet_mid_block_proj_in.alpha": np.array(True)})
    diffusers = {"unet.mid_block.attentions.0.proj_in.lora_A.weight": np.ones((4, 8), np.float32),
                 "unet.mid_block.attentions.0.proj_in.lora_B.weight": np.ones((8, 4), np.float32)}
    single("diffusers_alpha_vector", {**diffusers, "unet.mid_block.attentions.0.proj_in.alpha": np.ones(3, np.float32)})
    single("diffusers_metadata_alpha_null", diffusers, {"lora_adapter_metadata": json.dumps({"unet.lora_alpha": None})})
    single("diffusers_metadata_alpha_string", diffusers, {"lora_adapter_metadata": json.dumps({"unet.lora_alpha": "x"})})
    single("diffusers_metadata_pattern_list", diffusers, {"lora_adapter_metadata": json.dumps({"unet.alpha_pattern": [1]})})
    single("diffusers_metadata_not_json", diffusers, {"lora_adapter_metadata": "{'r': 4"})
    single("diffusers_metadata_deep", diffusers, {"lora_adapter_metadata": "[" * 100_000})
    f8 = root / "float8.safetensors"
    save_file({A_KEY: torch.ones(4, 8).to(torch.float8_e4m3fn), B_KEY: torch.ones(8, 4)}, str(f8))
    files["float8_factor"] = f8

    tensors = _small_peft()
    files["config_alpha_nan"] = _folder(root, "config_alpha_nan", json.dumps({**CONFIG, "lora_alpha": math.nan}), tensors)
    files["config_alpha_infinite"] = _folder(root, "config_alpha_inf", '{"peft_type": "LORA", "r": 4, "lora_alpha": 1e999}', tensors)
    files["config_alpha_400_digits"] = _folder(root, "config_alpha_big", {**CONFIG, "lora_alpha": 10**400}, tensors)
    files["config_alpha_string"] = _folder(root, "config_alpha_str", {**CONFIG, "lora_alpha": "8"}, tensors)
    files["config_alpha_pattern_nan"] = _folder(
        root, "config_pattern_nan", json.dumps({**CONFIG, "alpha_pattern": {"q_proj": math.nan}}), tensors)
    files["config_rank_pattern_list"] = _folder(root, "config_rank_list", {**CONFIG, "rank_pattern": [4]}, tensors)
    files["config_modules_to_save_int"] = _folder(root, "config_mts_int", {**CONFIG, "modules_to_save": 5}, tensors)
    files["config_target_modules_dict"] = _folder(root, "config_tm_dict", {**CONFIG, "target_modules": {"q": 1}}, tensors)
    files["config_bias_list"] = _folder(root, "config_bias_list", {**CONFIG, "bias": ["all"]}, tensors)
    files["config_flag_string"] = _folder(root, "config_flag_str", {**CONFIG, "use_rslora": "yes"}, tensors)
    files["config_not_an_object"] = _folder(root, "config_list", "[1, 2]", tensors)
    files["config_deeply_nested"] = _folder(root, "config_deep", "[" * 100_000, tensors)
    files["config_not_utf8"] = _folder(root, "config_latin1", None, tensors)
    (files["config_not_utf8"] / "adapter_config.json").write_bytes(b'{"r": 4, "lora_alpha": "\xe9"}')
    files["config_other_peft_type"] = _folder(root, "config_ia3", {**CONFIG, "peft_type": "IA3"}, tensors)
    files["config_without_weights"] = _folder(root, "config_only", CONFIG)
    files["empty_folder"] = _folder(root, "empty_folder", None)

    def pickle(name: str, obj) -> None:
        files[name] = root / name / "adapter_model.bin"
        files[name].parent.mkdir()
        (files[name].parent / "adapter_config.json").write_text(json.dumps(CONFIG))
        if isinstance(obj, bytes):
            files[name].write_bytes(obj)
        else:
            torch.save(obj, files[name])

    pickle("bin_empty", b"")
    pickle("bin_garbage", b"\x80\x04garbage")  # also makes torch warn about the protocol
    pickle("bin_not_a_dict", [torch.ones(2)])
    pickle("bin_nested_dict", {A_KEY: torch.ones(4, 8), "x": {"y": torch.ones(1)}})
    pickle("bin_float8", {A_KEY: torch.ones(4, 8).to(torch.float8_e4m3fn), B_KEY: torch.ones(8, 4)})
    pickle("bin_sparse", {A_KEY: torch.ones(4, 8).to_sparse(), B_KEY: torch.ones(8, 4)})
    pickle("bin_complex", {A_KEY: torch.ones(4, 8, dtype=torch.complex64), B_KEY: torch.ones(8, 4)})
    return files


MORE = (
    "header_deeply_nested", "header_is_a_list", "dtype_not_a_string", "shape_not_ints", "offsets_negative",
    "metadata_not_strings", "huge_int_in_header", "rank_zero", "factor_1d", "ranks_disagree", "inf_in_lora_b",
    "factors_overflow_float64",
    "integer_factor", "only_lora_b", "magnitude_wrong_size", "embedding_factor_3d", "kohya_alpha_nan",
    "kohya_alpha_vector", "kohya_alpha_bool", "diffusers_alpha_vector", "diffusers_metadata_alpha_null",
    "diffusers_metadata_alpha_string", "diffusers_metadata_pattern_list", "diffusers_metadata_not_json",
    "diffusers_metadata_deep", "float8_factor", "config_alpha_nan", "config_alpha_infinite",
    "config_alpha_400_digits", "config_alpha_string", "config_alpha_pattern_nan", "config_rank_pattern_list",
    "config_modules_to_save_int", "config_target_modules_dict", "config_bias_list", "config_flag_string",
    "config_not_an_object", "config_deeply_nested", "config_not_utf8", "config_other_peft_type",
    "config_without_weights", "empty_folder", "bin_empty", "bin_garbage", "bin_not_a_dict", "bin_nested_dict",
    "bin_float8", "bin_sparse", "bin_complex",
)


@pytest.fixture(scope="module")
def more_malformed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    files = _build_more(tmp_path_factory.mktemp("more_malformed"))
    assert set(files) == set(MORE)
    return files


@pytest.mark.parametrize("name", MORE)
def test_more_broken_input_is_one_line_error(more_malformed: dict[str, Path], name: str) -> None:
    cli_error(more_malformed[name], "--json")


def test_stray_alpha_key_is_reported_not_fatal(tmp_path: Path) -> None:
    """A diffusers file with a bare ".alpha" key: the key names no module, so it is listed
    as not understood and the rest of the file still reads."""
    path = tmp_path / "stray.safetensors"
    save_numpy({"unet.mid_block.proj_in.lora_A.weight": np.ones((2, 4), np.float32),
                "unet.mid_block.proj_in.lora_B.weight": np.ones((4, 2), np.float32),
                ".alpha": np.array(1.0, np.float32)}, str(path))
    adapter = load_adapter(path)
    assert [layer.name for layer in adapter.layers] == ["unet.mid_block.proj_in"]
    assert adapter.unrecognized_keys == [".alpha"]


# --------------------------------------------------------------------------- fuzzing


def _valid_small_adapter() -> bytes:
    """A small PEFT adapter (two layers, fp32 and fp16, and a stray full tensor) as bytes."""
    rng = np.random.default_rng(42)
    tensors = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": rng.standard_normal((2, 8)).astype(np.float32),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": rng.standard_normal((8, 2)).astype(np.float32),
        "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight": rng.standard_normal((2, 16)).astype(np.float16),
        "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight": rng.standard_normal((8, 2)).astype(np.float16),
        "base_model.model.lm_head.weight": rng.standard_normal((4, 8)).astype(np.float32),
    }
    return save_numpy_bytes(tensors, metadata={"format": "pt"})


VALID = _valid_small_adapter()
HEADER_END = 8 + int.from_bytes(VALID[:8], "little")
# Bytes that make JSON structurally interesting when they land in the header.
JSON_BYTES = b'{}[]",:0123456789-.eE+ \\ntfu'


@st.composite
def corruptions(draw) -> bytes:
    data = bytearray(VALID)
    for _ in range(draw(st.integers(1, 4))):
        how = draw(st.sampled_from(["flip", "json", "byte", "data", "truncate"]))
        if not data:
            break
        if how == "flip":
            data[draw(st.integers(0, min(HEADER_END, len(data)) - 1))] ^= 1 << draw(st.integers(0, 7))
        elif how == "json" and min(HEADER_END, len(data)) > 8:
            data[draw(st.integers(8, min(HEADER_END, len(data)) - 1))] = draw(st.sampled_from(JSON_BYTES))
        elif how == "byte":
            data[draw(st.integers(0, min(HEADER_END, len(data)) - 1))] = draw(st.integers(0, 255))
        elif how == "data" and len(data) > HEADER_END:
            data[draw(st.integers(HEADER_END, len(data) - 1))] = draw(st.integers(0, 255))
        elif how == "truncate":
            del data[draw(st.integers(0, len(data) - 1)):]
    return bytes(data)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def test_valid_small_adapter_reads(fuzz_dir: Path) -> None:
    path = fuzz_dir / "valid.safetensors"
    path.write_bytes(VALID)
    adapter = load_adapter(path)
    assert len(adapter.layers) == 2 and list(adapter.full_tensors) == [] and len(adapter.unrecognized_keys) == 1


@settings(max_examples=200, deadline=None)
@given(data=corruptions())
def test_corrupted_adapter_is_read_or_refused(fuzz_dir: Path, data: bytes) -> None:
    path = fuzz_dir / "adapter.safetensors"
    path.write_bytes(data)
    try:
        adapter = load_adapter(path)
    except LoraToolsError as error:
        message = str(error)
        assert message.startswith(f"{path}: ") and "\n" not in message, message
        return
    assert isinstance(adapter, Adapter)
    reports = [layer_report(layer) for layer in adapter.layers]  # what inspect would print
    flag_layers(reports)
    json.dumps([report.singular_values for report in reports], allow_nan=False)
