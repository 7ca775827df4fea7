"""Hostile adapter configs (issue #12, items 8, 12, 15, 16, 17).

- pattern keys that backtrack for minutes (`(a+)+$`) are refused at once, naming the key;
- config lies PEFT cannot load (or loads as something else) are refused by every command;
- a LoRA on lm_head of a tied base says tie_word_embeddings;
- the pickle refusal names the refused global and gives no advice to turn safety off;
- modules_to_save tensors are NaN-checked block by block in their stored dtype.

Every refusal: exit 2, one stderr line naming the file, inputs unchanged.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import time
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file as save_torch

from builders import PeftCase, write_malicious_pickle
from cli_run import run_cli
from lora_tools.formats import load_adapter
from lora_tools.formats.patterns import MAX_PATH_CHARS, pattern_problem
from lora_tools.formats.source import SafetensorsSource, _pickle_problem, finite_factor, stored_factor

Q_PROJ = "model.layers.0.self_attn.q_proj"
EVIL_KEYS = ["(.*)*(.*)*z", "(a+)+$", "(a|a)*b", "(x+x+)+y", "(.*a){12}", r"(\w+)\1"]


def digest(*paths: Path) -> dict[str, str]:
    files = [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*"))) if f.is_file()]
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def refused(*args: object, says: tuple[str, ...], inputs: tuple[Path, ...], out: Path | None = None) -> str:
    before = digest(*inputs)
    code, stdout, stderr = run_cli(*args)
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("Error: "), (code, stderr)
    assert "Traceback" not in stderr and stdout == ""
    for word in says:
        assert word in lines[0], (word, lines[0])
    assert digest(*inputs) == before
    if out is not None:
        assert not out.exists() and not [p for p in out.parent.iterdir() if ".lora-tools-" in p.name]
    return lines[0]


def edited(case: PeftCase, tmp_path: Path, name: str = "adapter", **fields: object) -> Path:
    folder = shutil.copytree(case.adapter_dir, tmp_path / name)
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(fields)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def every_command(base: Path, adapter: Path, other: Path, tmp_path: Path) -> list[tuple[list[object], Path | None]]:
    merged = tmp_path / "merged-for-verify"
    if not merged.exists():
        assert run_cli("merge", base, other, "-o", merged, "-q")[0] == 0
    return [
        (["inspect", adapter], None),
        (["inspect", adapter, "--base", base], None),
        (["merge", base, adapter, "-o", tmp_path / "out-merge", "-q"], tmp_path / "out-merge"),
        (["verify", base, adapter, merged], None),
        (["blend", adapter, other, "--weight", "0.5", "--weight", "0.5", "-o", tmp_path / "out-blend"],
         tmp_path / "out-blend"),
    ]


# --------------------------------------------------------------------------- 8: regex denial of service

@pytest.mark.parametrize("field", ["alpha_pattern", "rank_pattern"])
@pytest.mark.parametrize("key", EVIL_KEYS)
def test_backtracking_pattern_keys_are_refused_at_once(llama_plain_case: PeftCase, tmp_path: Path,
                                                       field: str, key: str) -> None:
    folder = edited(llama_plain_case, tmp_path, **{field: {key: 8}})
    for args, out in every_command(llama_plain_case.base_dir, folder, llama_plain_case.adapter_dir, tmp_path):
        started = time.perf_counter()
        line = refused(*args, says=(str(folder / "adapter_config.json"), field, repr(key)),
                       inputs=(folder, llama_plain_case.base_dir), out=out)
        assert time.perf_counter() - started < 10, (args, line)


def test_regex_key_against_an_overlong_module_path_is_refused(tmp_path: Path) -> None:
    module = "model." + "a." * (MAX_PATH_CHARS // 2) + "q_proj"
    folder = tmp_path / "long"
    folder.mkdir()
    save_numpy({f"base_model.model.{module}.lora_A.weight": np.ones((4, 8), np.float32),
                f"base_model.model.{module}.lora_B.weight": np.ones((8, 4), np.float32)},
               str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "alpha_pattern": {"(a.)*q_proj": 2}}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    refused("inspect", folder, says=("'(a.)*q_proj'", "characters"), inputs=(folder,))
    config["alpha_pattern"] = {"q_proj": 2}  # a plain key: exact / suffix match, any length
    (folder / "adapter_config.json").write_text(json.dumps(config))
    assert load_adapter(folder).layers[0].alpha == 2


@pytest.mark.parametrize("key", ["q_proj", Q_PROJ, r"layers\.\d+\.mlp\..*", "q_proj|v_proj", ".*q_proj",
                                 "model.layers.(0|1).self_attn.q_proj", "[qk]_proj", r"layers\.1\..*_proj", "("])
def test_real_pattern_keys_are_accepted(key: str) -> None:
    assert pattern_problem(key) is None


def test_pattern_values_follow_peft_first_match(llama_plain_case: PeftCase, tmp_path: Path) -> None:
    """Safe regex keys, plain keys and a dotted path: each module's alpha is PEFT's."""
    from peft.utils.other import get_pattern_key

    patterns = {r"layers\.1\..*_proj": 2, "q_proj": 3, ".*mlp.down_proj": 5, "layers.0.self_attn.v_proj": 7}
    folder = edited(llama_plain_case, tmp_path, alpha_pattern=patterns)
    for layer in load_adapter(folder).layers:
        assert layer.alpha == patterns.get(get_pattern_key(list(patterns), layer.name), 8), layer.name


def test_diffusers_metadata_pattern_is_bounded_too(tmp_path: Path) -> None:
    path = tmp_path / "pytorch_lora_weights.safetensors"
    meta = {"unet.r": 4, "unet.lora_alpha": 4, "unet.alpha_pattern": {"(a+)+$": 2}}
    save_numpy({"unet.mid.attn.to_q.lora_A.weight": np.ones((4, 8), np.float32),
                "unet.mid.attn.to_q.lora_B.weight": np.ones((8, 4), np.float32)},
               str(path), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta)})
    refused("inspect", path, says=("lora_adapter_metadata", "'(a+)+$'"), inputs=(path,))


# --------------------------------------------------------------------------- 15: config lies

LIES = {  # name -> (config fields, words of the refusal)
    "alpha_pattern_zero": ({"alpha_pattern": {"q_proj": 0}}, ("'alpha_pattern'", "'q_proj'")),
    "alpha_pattern_negative": ({"alpha_pattern": {"q_proj": -8}}, ("'alpha_pattern'", "--weight -1")),
    "r_disagrees": ({"r": 16}, ("rank 4", "r = 16")),
    "rank_pattern_disagrees": ({"rank_pattern": {"q_proj": 16}}, ("rank 4", "rank_pattern = 16")),
    "rank_pattern_negative": ({"rank_pattern": {"q_proj": -2}}, ("'rank_pattern'", "-2")),
    "rank_pattern_fraction": ({"rank_pattern": {"q_proj": 2.5}}, ("'rank_pattern'", "2.5")),
    "dora_without_magnitudes": ({"use_dora": True}, ("use_dora", "lora_magnitude_vector")),
}


@pytest.mark.parametrize("lie", LIES)
def test_config_lies_are_refused_by_every_command(llama_plain_case: PeftCase, tmp_path: Path, lie: str) -> None:
    fields, says = LIES[lie]
    folder = edited(llama_plain_case, tmp_path, **fields)
    for args, out in every_command(llama_plain_case.base_dir, folder, llama_plain_case.adapter_dir, tmp_path):
        refused(*args, says=(str(folder / "adapter_config.json"), *says), inputs=(folder, llama_plain_case.base_dir),
                out=out)


@pytest.mark.parametrize("lie,peft_loads", [("alpha_pattern_zero", True), ("alpha_pattern_negative", True),
                                             ("r_disagrees", False), ("rank_pattern_disagrees", False),
                                             ("rank_pattern_negative", False), ("dora_without_magnitudes", True)])
def test_what_peft_does_with_each_lie(llama_plain_case: PeftCase, tmp_path: Path, lie: str, peft_loads: bool) -> None:
    """The reference for docs/formats.md: PEFT fails on rank lies; it loads the alpha lies
    (a zero or negated update) and use_dora without magnitudes (with a missing-keys warning)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    folder = edited(llama_plain_case, tmp_path, **LIES[lie][0])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_plain_case.base_dir), folder)
            loaded = True
        except (RuntimeError, ValueError):
            loaded = False
    assert loaded == peft_loads
    if lie == "dora_without_magnitudes":
        assert any("lora_magnitude_vector" in str(w.message) for w in caught)


def test_consistent_patterns_still_load(peft_case_factory) -> None:
    case = peft_case_factory("llama_patterns")
    ranks = {layer.name: layer.rank for layer in load_adapter(case.adapter_dir).layers}
    assert ranks["model.layers.0.self_attn.q_proj"] == 8 and ranks["model.layers.1.self_attn.v_proj"] == 2
    assert load_adapter(peft_case_factory("llama_dora").adapter_dir).layers[0].magnitude is not None


# --------------------------------------------------------------------------- 16: lm_head of a tied base

@pytest.fixture()
def tied_base(llama_base_dir: Path, tmp_path: Path) -> Path:
    base = shutil.copytree(llama_base_dir, tmp_path / "tied-base")
    tensors = load_numpy(base / "model.safetensors")
    del tensors["lm_head.weight"]
    save_numpy(tensors, str(base / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((base / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (base / "config.json").write_text(json.dumps(config))
    return base


@pytest.mark.parametrize("how", ["lora", "modules_to_save"])
def test_lm_head_on_a_tied_base_says_tie_word_embeddings(tied_base: Path, tmp_path: Path, how: str) -> None:
    folder = tmp_path / "lm-head"
    folder.mkdir()
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    tensors = {f"base_model.model.{Q_PROJ}.lora_A.weight": np.ones((4, 64), np.float32),
               f"base_model.model.{Q_PROJ}.lora_B.weight": np.ones((64, 4), np.float32)}
    if how == "lora":
        config["target_modules"] = ["q_proj", "lm_head"]
        tensors["base_model.model.lm_head.lora_A.weight"] = np.ones((4, 64), np.float32)
        tensors["base_model.model.lm_head.lora_B.weight"] = np.ones((96, 4), np.float32)
    else:
        config["modules_to_save"] = ["lm_head"]
        tensors["base_model.model.lm_head.modules_to_save.default.weight"] = np.ones((96, 64), np.float32)
    save_numpy(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    refused("merge", tied_base, folder, "-o", out, "-q", says=("lm_head", "tie_word_embeddings: true"),
            inputs=(folder, tied_base), out=out)


# --------------------------------------------------------------------------- 12: pickle refusal

def test_pickle_refusal_names_the_global_and_gives_no_unsafe_advice(tmp_path: Path) -> None:
    marker = tmp_path / "CODE_RAN"
    path = write_malicious_pickle(tmp_path / "adapter" / "adapter_model.bin", marker)
    line = refused("inspect", path, says=(str(path), "Unsupported global: GLOBAL", "system"), inputs=(path,))
    assert "weights_only=False" not in line and "`False`" not in line and "allowlist" not in line
    assert not marker.exists()


def test_pickle_problem_of_older_torch_messages() -> None:
    """torch 2.4-2.5 put the advice on its own line before the refused global."""
    text = ("Weights only load failed. This file can still be loaded, to do so you have two options\n"
            "\t(1) Re-running `torch.load` with `weights_only` set to `False` will likely succeed\n"
            "\t(2) Alternatively, to load with `weights_only=True` please check the recommended steps\n"
            "\tWeightsUnpickler error: Unsupported global: GLOBAL builtins.exec was not an allowed global by "
            "default. Please use `torch.serialization.add_safe_globals([exec])` to allowlist this global")
    assert _pickle_problem(pickle.UnpicklingError(text)) == "Unsupported global: GLOBAL builtins.exec"
    assert _pickle_problem(pickle.UnpicklingError(
        "Weights only load failed. Re-running with weights_only=False...\nUnsupported operand 82")) == "Unsupported operand 82"


# --------------------------------------------------------------------------- 17: modules_to_save in blocks

@pytest.fixture()
def mixed_file(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    tensors = {"bf16": torch.randn(301, 37, generator=g).bfloat16(), "f32": torch.randn(97, 13, generator=g),
               "f16": torch.randn(55, generator=g).half(), "f64": torch.randn(3, 7, generator=g).double(),
               "empty": torch.zeros(0, 4)}
    path = tmp_path / "mixed.safetensors"
    save_torch(tensors, str(path))
    return path, tensors


def test_factor_read_gives_the_stored_values(mixed_file) -> None:
    """bf16 is widened inside its result array (read into the upper half, shifted front to
    back): every dtype must come back exactly as torch stored it."""
    path, tensors = mixed_file
    source = SafetensorsSource(path)
    for key, tensor in tensors.items():
        ours = finite_factor(source, key)
        expected = (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()
        assert ours.dtype == expected.dtype and ours.shape == expected.shape and np.array_equal(ours, expected), key
    source.close()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", [0, 1000, 70000, -1])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16, torch.float64])
def test_factor_read_finds_a_non_finite_anywhere(tmp_path: Path, bad: float, where: int, dtype: torch.dtype) -> None:
    tensor = torch.randn(300, 301, dtype=torch.float64).to(dtype)  # past one 65536-element widening chunk
    tensor.view(-1)[where] = bad
    save_torch({"t": tensor}, str(tmp_path / "t.safetensors"))
    source = SafetensorsSource(tmp_path / "t.safetensors")
    with pytest.raises(Exception, match="contains NaN or Inf"):
        finite_factor(source, "t")
    with pytest.raises(Exception, match="contains NaN or Inf"):  # bf16 read as its bits (resize)
        stored_factor(source, "t")
    source.close()


def test_stored_factor_keeps_bf16_bits_and_widens_the_rest(tmp_path: Path) -> None:
    from lora_tools.io.encode import Encoded

    tensors = {"b": torch.randn(70, 9, dtype=torch.float64).to(torch.bfloat16), "f": torch.randn(5, 3)}
    save_torch(tensors, str(tmp_path / "t.safetensors"))
    source = SafetensorsSource(tmp_path / "t.safetensors")
    bits = stored_factor(source, "b")
    assert isinstance(bits, Encoded) and bits.bits.dtype == np.uint16 and bits.shape == (70, 9)
    assert np.array_equal(np.asarray(bits), tensors["b"].float().numpy())
    assert np.array_equal(stored_factor(source, "f"), tensors["f"].numpy())
    source.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_factor_read_keeps_finite_values_whose_sum_overflows(tmp_path: Path, dtype: torch.dtype) -> None:
    """The quick check is a sum; finite values that overflow it must still be read, and
    without numpy's overflow warning on stderr (nor its inf − inf one for a bad tensor)."""
    big = torch.full((64,), torch.finfo(dtype).max, dtype=dtype)
    bad = big.clone()
    bad[0], bad[1] = float("inf"), -float("inf")
    save_torch({"t": big, "bad": bad}, str(tmp_path / "t.safetensors"))
    source = SafetensorsSource(tmp_path / "t.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.array_equal(finite_factor(source, "t"), big.numpy())
        with pytest.raises(Exception, match="contains NaN or Inf"):
            finite_factor(source, "bad")
    source.close()


def test_modules_to_save_nan_is_refused_and_values_kept(peft_case_factory, tmp_path: Path) -> None:
    case = peft_case_factory("llama_modules_to_save")
    adapter = load_adapter(case.adapter_dir)
    source = SafetensorsSource(case.adapter_file)
    for key in source.keys():
        if "lm_head" in key and "lora_" not in key:
            full = adapter.full_tensors["lm_head.weight"]
            assert np.array_equal(full, source.numpy(key))
            break
    else:
        pytest.fail("no modules_to_save tensor")  # pragma: no cover
    source.close()
    folder = shutil.copytree(case.adapter_dir, tmp_path / "nan")
    tensors = load_numpy(folder / "adapter_model.safetensors")
    tensors[key] = tensors[key].copy()
    tensors[key][-1, -1] = np.nan
    save_numpy(tensors, str(folder / "adapter_model.safetensors"))
    out = tmp_path / "out"
    refused("merge", case.base_dir, folder, "-o", out, "-q", says=(key, "NaN or Inf"), inputs=(folder,), out=out)


def test_factor_read_peak_memory(tmp_path: Path) -> None:
    """A 64 MB bf16 modules_to_save tensor: reading it once held raw bytes, a uint32 copy and
    a mask beside the float32 result (~3.6x the stored size); now only the result (2x)."""
    tensor = torch.randn(4096, 8192).bfloat16()
    save_torch({"lm_head.weight": tensor}, str(tmp_path / "big.safetensors"))
    del tensor
    source = SafetensorsSource(tmp_path / "big.safetensors")
    stored = 4096 * 8192 * 2
    tracemalloc.start()
    array = finite_factor(source, "lm_head.weight")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    del array
    source.close()
    assert peak < 2.1 * stored


@pytest.mark.parametrize("mode", ["threads", "span"])
def test_read_ahead_gives_each_key_its_own_value_or_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          mode: str) -> None:
    """Tensors read by two threads in batches, or small ones all in one read of their span:
    values as a direct read gives them, asked in order, out of turn, twice, or (span) not
    announced at all, and a NaN tensor's error raised for that key alone, not for the good
    keys read with it."""
    from lora_tools.formats import source as source_module

    if mode == "threads":
        monkeypatch.setattr(source_module, "_MIN_MEAN_BYTES", 0)
        monkeypatch.setattr(source_module, "_BATCH_BYTES", 3000)  # a few tensors per batch
    g = torch.Generator().manual_seed(5)
    tensors = {f"t{i:02d}": torch.randn(17, 23, generator=g).to([torch.bfloat16, torch.float32][i % 2])
               for i in range(24)}
    tensors["t07"].view(-1)[5] = float("nan")
    save_torch(tensors, str(tmp_path / "many.safetensors"))
    source = SafetensorsSource(tmp_path / "many.safetensors")
    keys = sorted(tensors)
    announced = keys if mode == "threads" else keys[:-2]  # the last two come from outside the span
    with source_module.ReadAhead(source, announced) as reader:
        assert (reader._pool is not None) if mode == "threads" else (reader._span is not None)
        order = keys[:5] + ["t20", "t03"] + keys[5:]  # one out of turn, one twice
        for key in order:
            if key == "t07":
                with pytest.raises(Exception, match="'t07' contains NaN or Inf"):
                    reader.get(key)
                continue
            expected = tensors[key].float().numpy() if tensors[key].dtype == torch.bfloat16 else tensors[key].numpy()
            assert np.array_equal(reader.get(key), expected), key
    source.close()
