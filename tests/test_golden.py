"""Exact output of every command on one tiny fixed adapter: the bytes a user sees.

Pinned before the package was reshaped (issue #11) and held unchanged after it: a
refactor changes no character on stdout or stderr, no byte of a written file. The base
and the adapters are made here from numpy's PCG64 stream (stable across numpy
versions) and written with safetensors, so nothing depends on a model library's
initialisation. Only wall-clock figures are masked.

Run with LORA_TOOLS_UPDATE_GOLDEN=1 to rewrite tests/golden/ after an intended change.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import save_file

from lora_tools.cli import cli

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("LORA_TOOLS_UPDATE_GOLDEN") == "1"
HIDDEN, LAYERS = 16, 2
MODULES = {"q_proj": (HIDDEN, HIDDEN), "v_proj": (8, HIDDEN), "down_proj": (HIDDEN, 24)}


def _bf16(values: np.ndarray) -> np.ndarray:
    """float32 values rounded to bf16 and widened back, so the stored bytes are exact."""
    bits = values.astype(np.float32).view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return rounded.astype(np.uint32).view(np.float32)


def _write_base(folder: Path, rng: np.random.Generator) -> None:
    folder.mkdir()
    tensors: dict[str, np.ndarray] = {}
    for layer in range(LAYERS):
        for module, shape in MODULES.items():
            family = "mlp" if module == "down_proj" else "self_attn"
            tensors[f"model.layers.{layer}.{family}.{module}.weight"] = rng.standard_normal(shape).astype(np.float32) * 0.1
        tensors[f"model.layers.{layer}.input_layernorm.weight"] = np.ones(HIDDEN, np.float32)
    tensors["model.norm.weight"] = rng.standard_normal(HIDDEN).astype(np.float32)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": "float32"}) + "\n")


def _write_adapter(folder: Path, rng: np.random.Generator, rank: int, alpha: float, rslora: bool) -> None:
    folder.mkdir()
    tensors: dict[str, np.ndarray] = {}
    for layer in range(LAYERS):
        for module, (out_dim, in_dim) in MODULES.items():
            family = "mlp" if module == "down_proj" else "self_attn"
            prefix = f"base_model.model.model.layers.{layer}.{family}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = _bf16(rng.standard_normal((rank, in_dim)) * 0.2)
            tensors[f"{prefix}.lora_B.weight"] = _bf16(rng.standard_normal((out_dim, rank)) * 0.05)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "r": rank, "lora_alpha": alpha, "use_rslora": rslora,
        "target_modules": sorted(MODULES), "base_model_name_or_path": "golden-base", "task_type": "CAUSAL_LM",
        "fan_in_fan_out": False, "bias": "none",
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")


@pytest.fixture(scope="module")
def golden_inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("golden")
    rng = np.random.Generator(np.random.PCG64(20261203))
    _write_base(root / "base", rng)
    _write_adapter(root / "a", rng, rank=4, alpha=8.0, rslora=False)
    _write_adapter(root / "b", rng, rank=2, alpha=4.0, rslora=True)
    return root


def _masked(text: str, root: Path) -> str:
    """Paths under ROOT, wall-clock figures masked; JSON floats to 9 significant digits
    (their last bits depend on BLAS blocking, not on lora-tools)."""
    text = text.replace(str(root), "ROOT")
    text = re.sub(r"^ +(\S.*ROOT.*?) *$", r"\1", text, flags=re.M)  # a title centred on a path's length
    text = re.sub(r"in \d+\.\d+ s", "in X s", text)  # merge's wall-clock summary
    text = re.sub(r"; \d+\.\d+ s$", "; X s", text, flags=re.M)  # blend's
    text = re.sub(r'"seconds": [0-9.e+-]+', '"seconds": X', text)
    return re.sub(r"(?<=[:\[ ])(-?\d+\.\d{9,}(?:e[+-]?\d+)?)", lambda m: f"{float(m.group(1)):.9g}", text)


def _digest(path: Path) -> str:
    """sha256 of every file under `path` (or of the file), by relative name."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    lines = [f"{p.relative_to(path) if path.is_dir() else p.name} {hashlib.sha256(p.read_bytes()).hexdigest()}" for p in files]
    return "\n".join(lines) + "\n"


def _check(name: str, actual: str) -> None:
    path = GOLDEN / name
    if UPDATE:
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(actual, encoding="utf-8")
    assert path.is_file(), f"{path} missing: run with LORA_TOOLS_UPDATE_GOLDEN=1 once"
    assert actual == path.read_text(encoding="utf-8")


def _run(root: Path, *args: object) -> str:
    """Rendered at 120 columns (stdout is not a terminal: the width is COLUMNS)."""
    result = CliRunner(env={"COLUMNS": "120"}).invoke(cli, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    code, out, err = result.exit_code, result.stdout, result.stderr
    return _masked(f"exit {code}\n--- stdout\n{out}--- stderr\n{err}", root)


def test_inspect_golden(golden_inputs: Path) -> None:
    r = golden_inputs
    _check("inspect.txt", _run(r, "inspect", r / "a", "--base", r / "base"))
    _check("inspect_json.txt", _run(r, "inspect", r / "b", "--json"))


def test_merge_and_verify_golden(golden_inputs: Path, tmp_path: Path) -> None:
    r = golden_inputs
    merged = tmp_path / "merged"
    text = _run(r, "merge", r / "base", r / "a", r / "b", "--weight", "0.75", "--weight", "-0.5", "-o", merged, "--device", "cpu")
    _check("merge.txt", _masked(text, tmp_path) + _digest(merged))
    bf16 = tmp_path / "merged16"
    text = _run(r, "merge", r / "base", r / "a", "-o", bf16, "--dtype", "bf16", "--device", "cpu", "-q")
    _check("merge_bf16.txt", _masked(text, tmp_path) + _digest(bf16))
    verify_args = ("verify", r / "base", r / "a", r / "b", merged, "--weight", "0.75", "--weight", "-0.5")
    _check("verify.txt", _masked(_run(r, *verify_args, "--all"), tmp_path))
    _check("verify_json.txt", _masked(_run(r, *verify_args, "--json"), tmp_path))
    wrong = _run(r, "verify", r / "base", r / "a", merged)  # strength and layers disagree: exit 1
    _check("verify_fail.txt", _masked(wrong, tmp_path))


def test_blend_golden(golden_inputs: Path, tmp_path: Path) -> None:
    r = golden_inputs
    for method in ("svd", "cat", "linear", "ties"):
        out = tmp_path / method
        extra = ("--density", "0.5", "--device", "cpu") if method == "ties" else ()
        second = r / "a" if method == "linear" else r / "b"  # PEFT's linear needs equal ranks
        text = _run(r, "blend", r / "a", second, "--weight", "0.3", "--method", method, "-o", out, *extra)
        _check(f"blend_{method}.txt", _masked(text, tmp_path) + _digest(out))
    out = tmp_path / "energy"
    text = _run(r, "blend", r / "a", r / "b", "--weight", "1", "--weight", "2", "--energy", "0.9", "--dtype", "bf16", "-o", out, "--json")
    _check("blend_energy_json.txt", _masked(text, tmp_path) + _digest(out))


def test_errors_golden(golden_inputs: Path, tmp_path: Path) -> None:
    r = golden_inputs
    lines = [
        _run(r, "inspect", r / "missing.safetensors"),
        _run(r, "merge", r / "base", r / "a", "-o", r / "base"),
        _run(r, "merge", r / "base", r / "a", "-o", tmp_path / "x", "--device", "tpu"),
        _run(r, "blend", r / "a", r / "b", "-o", tmp_path / "y"),
        _run(r, "verify", r / "base", r / "a"),
    ]
    _check("errors.txt", _masked("\n".join(lines), tmp_path))
