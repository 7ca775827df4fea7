"""`lora-tools inspect` on the command line (issue #3): table, --json, --plot, grouping,
errors, and real runs of the installed entry point.

Most runs go through click's CliRunner (stdout and stderr apart); a few are real
processes, where the process itself is the point: the console script, `python -m`, and
what a run imports.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from builders import KohyaCase, PeftCase
from lora_tools.cli import cli
from test_formats import raw_tensors, reference_layers
from test_inspect import LONG_LAYERS, LONG_MODULES, build_long_adapter, energy_rank, reshaped_base

ADAPTER_KEYS = {"path", "format", "n_layers", "n_params"}
LAYER_KEYS = {
    "name", "shape", "rank", "alpha", "scale", "fro_norm", "spectral_norm", "singular_values",
    "energy_rank_90", "energy_rank_99", "effective_rank",
}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run(*args: str | os.PathLike[str]):
    return CliRunner().invoke(cli, [os.fspath(a) for a in args], catch_exceptions=False)


def assert_input_error(result, *fragments: str) -> str:
    """Exit 2, nothing on stdout, one stderr line with every fragment, no traceback."""
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture(scope="session")
def long_adapter(fixture_root: Path) -> Path:
    return build_long_adapter(fixture_root)


# --------------------------------------------------------------------------- table


def test_table_lists_every_layer(llama_plain_case: PeftCase) -> None:
    result = run("inspect", llama_plain_case.adapter_dir)
    assert result.exit_code == 0 and result.stderr == ""
    out = result.stdout
    assert str(llama_plain_case.adapter_dir) in out and "peft" in out and "14 layers" in out
    # Names whole, without the prefix every row shares (said once above the table: issue #13).
    assert "names below omit the prefix they share: model.layers." in out
    for name in reference_layers(llama_plain_case):
        assert name.removeprefix("model.layers.") in out, name
    assert "0.self_attn.k_proj" in out and "32×64" in out  # k_proj is (32, 64)


def test_table_shows_kohya_metadata_and_conv(kohya_case: KohyaCase) -> None:
    result = run("inspect", kohya_case.lora_file)
    assert result.exit_code == 0 and result.stderr == ""
    assert "kohya" in result.stdout
    assert "ss_network_module = networks.lora" in result.stdout
    assert "ss_base_model_version = sd_v1" in result.stdout
    assert "32×16×3×3" in result.stdout  # the LoCon layer


def test_table_with_base_uses_module_paths(kohya_case: KohyaCase) -> None:
    result = run("inspect", kohya_case.lora_file, "--base", kohya_case.base_file)
    assert result.exit_code == 0 and result.stderr == ""
    for module in kohya_case.module_map.values():
        assert module in result.stdout
    assert "‖ΔW‖/‖W0‖" in result.stdout


def test_markup_in_names_and_metadata_is_text(tmp_path: Path, kohya_case: KohyaCase) -> None:
    """Brackets in a path or in ss_* metadata are not Rich markup."""
    folder = tmp_path / "lora[v2]"
    folder.mkdir()
    path = folder / "[bold]x.safetensors"
    save_file(load_file(kohya_case.lora_file), path, metadata={"ss_output_name": "a[/]b [red]c"})
    result = run("inspect", path)
    assert result.exit_code == 0, result.stderr
    assert str(path) in result.stdout and "ss_output_name = a[/]b [red]c" in result.stdout


def test_long_adapter_is_grouped(long_adapter: Path) -> None:
    names = [f"model.layers.{i}.{'mlp' if m.endswith(('gate_proj', 'up_proj', 'down_proj')) else 'self_attn'}.{m}"
             for i in range(LONG_LAYERS) for m in LONG_MODULES]
    grouped = run("inspect", long_adapter)
    assert grouped.exit_code == 0 and grouped.stderr == ""
    assert f"{len(names)} layers" in grouped.stdout and "--all" in grouped.stdout
    assert "names below omit the prefix they share: model.layers.*." in grouped.stdout  # issue #13
    assert "│ self_attn.q_proj " in grouped.stdout and "│ mlp.down_proj " in grouped.stdout
    assert not any(name in grouped.stdout for name in names)
    assert len(grouped.stdout.splitlines()) < 40

    every = run("inspect", long_adapter, "--all")
    assert every.exit_code == 0 and every.stderr == ""
    for name in names:
        assert name.removeprefix("model.layers.") in every.stdout, name


# --------------------------------------------------------------------------- --json


def parse_json(result) -> dict:
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    document = json.loads(result.stdout)  # the whole of stdout is one document
    assert set(document) == {"adapter", "layers"}
    assert ADAPTER_KEYS <= set(document["adapter"])
    for layer in document["layers"]:
        assert LAYER_KEYS <= set(layer), set(layer) ^ LAYER_KEYS
    return document


def test_json_document(llama_plain_case: PeftCase) -> None:
    document = parse_json(run("inspect", llama_plain_case.adapter_dir, "--json"))
    adapter = document["adapter"]
    assert adapter["path"] == str(llama_plain_case.adapter_dir) and adapter["format"] == "peft"
    assert adapter["n_layers"] == 14 == len(document["layers"])
    assert adapter["n_params"] == sum(t.size for t in raw_tensors(llama_plain_case.adapter_file).values())
    refs = reference_layers(llama_plain_case)
    for layer in document["layers"]:
        ref = refs[layer["name"]]
        sv = np.linalg.svd(ref.product(), compute_uv=False)[: ref.rank]
        assert layer["shape"] == [ref.b.shape[0], ref.a.shape[1]]  # (out, in)
        assert layer["weight_shape"] == list(ref.dense().shape)
        assert (layer["rank"], layer["alpha"], layer["scale"]) == (4, 8, 2.0)
        assert isinstance(layer["rank"], int) and isinstance(layer["energy_rank_90"], int)
        np.testing.assert_allclose(layer["singular_values"], sv, rtol=1e-9)
        assert layer["fro_norm"] == pytest.approx(np.linalg.norm(sv), rel=1e-10)
        assert layer["spectral_norm"] == pytest.approx(sv[0], rel=1e-10)
        assert layer["energy_rank_90"] == energy_rank(sv, 0.9) and layer["energy_rank_99"] == energy_rank(sv, 0.99)
        assert isinstance(layer["effective_rank"], float) and 1 <= layer["effective_rank"] <= 4


def test_json_with_base_and_alpha(llama_plain_case: PeftCase) -> None:
    document = parse_json(run("inspect", llama_plain_case.adapter_dir, "--base", llama_plain_case.base_dir,
                              "--json", "--alpha", "2"))
    assert document["adapter"]["base"] == str(llama_plain_case.base_dir)
    for layer in document["layers"]:
        assert layer["alpha"] == 2 and layer["scale"] == 0.5
        assert layer["relative_norm"] > 0 and layer["base_fro_norm"] > 0


def test_json_of_a_bare_file_with_and_without_alpha(llama_plain_case: PeftCase, tmp_path: Path) -> None:
    lone = tmp_path / "lora.safetensors"
    shutil.copy(llama_plain_case.adapter_file, lone)
    plain = parse_json(run("inspect", lone, "--json"))
    assert plain["adapter"]["path"] == str(lone) and plain["adapter"]["format"] == "peft"
    assert all(layer["alpha"] == 4 and layer["scale"] == 1 for layer in plain["layers"])  # alpha = r
    scaled = parse_json(run("inspect", lone, "--json", "--alpha", "16"))
    assert all(layer["alpha"] == 16 and layer["scale"] == 4 for layer in scaled["layers"])
    for a, b in zip(plain["layers"], scaled["layers"]):
        np.testing.assert_allclose(b["singular_values"], np.multiply(a["singular_values"], 4), rtol=1e-12)


def test_json_of_kohya_and_diffusers(kohya_case: KohyaCase, diffusers_current_case) -> None:
    kohya = parse_json(run("inspect", kohya_case.lora_file, "--json"))
    assert kohya["adapter"]["format"] == "kohya" and kohya["adapter"]["n_layers"] == 6
    conv = next(layer for layer in kohya["layers"] if layer["name"].endswith("resnets_0_conv1"))
    assert conv["shape"] == [32, 16, 3, 3] and conv["rank"] == 2 and len(conv["singular_values"]) == 2
    diffusers = parse_json(run("inspect", diffusers_current_case.lora_file, "--json"))
    assert diffusers["adapter"]["format"] == "diffusers" and diffusers["adapter"]["n_layers"] == 5


def test_plot_writes_a_png(llama_plain_case: PeftCase, tmp_path: Path) -> None:
    png = tmp_path / "report.png"
    document = parse_json(run("inspect", llama_plain_case.adapter_dir, "--json", "--plot", png))
    assert document["adapter"]["n_layers"] == 14
    assert png.read_bytes()[:8] == PNG_MAGIC
    table = run("inspect", llama_plain_case.adapter_dir, "--plot", tmp_path / "table.png")
    assert table.exit_code == 0 and "0.self_attn.q_proj" in table.stdout  # without "model.layers." (issue #13)
    assert (tmp_path / "table.png").read_bytes()[:8] == PNG_MAGIC


# --------------------------------------------------------------------------- errors


def test_adapter_for_another_base(llama_plain_case: PeftCase, gpt2_base_dir: Path) -> None:
    result = run("inspect", llama_plain_case.adapter_dir, "--base", gpt2_base_dir)
    assert_input_error(result, str(llama_plain_case.adapter_dir), "model.layers.0.mlp.down_proj")


def test_shape_mismatch_with_base(llama_plain_case: PeftCase, tmp_path: Path) -> None:
    base = reshaped_base(llama_plain_case.base_dir, tmp_path / "base", {
        "model.layers.0.self_attn.o_proj.weight": (64, 48),
        "model.layers.1.self_attn.q_proj.weight": (32, 64),
    })
    line = assert_input_error(run("inspect", llama_plain_case.adapter_dir, "--base", base, "--json"),
                              str(llama_plain_case.adapter_dir), "'model.layers.0.self_attn.o_proj'")
    assert "layers.1" not in line


def test_nan_in_base_weight(llama_plain_case: PeftCase, tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    shutil.copy(llama_plain_case.base_dir / "config.json", base)
    tensors = load_file(llama_plain_case.base_dir / "model.safetensors")
    tensors["model.layers.1.mlp.gate_proj.weight"][3, 5] = float("nan")
    save_file(tensors, base / "model.safetensors")
    assert_input_error(run("inspect", llama_plain_case.adapter_dir, "--base", base, "--json"),
                       str(base), "'model.layers.1.mlp.gate_proj.weight'", "NaN")


def test_missing_base(llama_plain_case: PeftCase, tmp_path: Path) -> None:
    assert_input_error(run("inspect", llama_plain_case.adapter_dir, "--base", tmp_path / "nope"), str(tmp_path / "nope"))


@pytest.mark.parametrize("alpha", ["0", "-1", "inf", "nan", "1e300"])
def test_bad_alpha(llama_plain_case: PeftCase, alpha: str) -> None:
    assert_input_error(run("inspect", llama_plain_case.adapter_dir, "--alpha", alpha, "--json"),
                       str(llama_plain_case.adapter_dir))


# --------------------------------------------------------------------------- real processes

BIN = Path(sys.executable).parent


def entry_point() -> str:
    script = shutil.which("lora-tools", path=str(BIN))
    assert script is not None, f"lora-tools is not installed next to {sys.executable}"
    return script


def imported_modules(*args: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run the installed console script under `-X importtime`: every module it imported."""
    proc = subprocess.run([sys.executable, "-X", "importtime", entry_point(), *args],
                          capture_output=True, text=True, timeout=120)
    modules = set()
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            modules.add(line.rsplit("|", 1)[1].strip())
    assert modules, proc.stderr[-2000:]
    return proc, modules


def test_entry_point_inspect_json(llama_plain_case: PeftCase) -> None:
    proc = subprocess.run([entry_point(), "inspect", str(llama_plain_case.adapter_dir), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    document = json.loads(proc.stdout)
    assert document["adapter"]["n_layers"] == 14 and len(document["layers"]) == 14


def test_python_dash_m_help() -> None:
    proc = subprocess.run([sys.executable, "-m", "lora_tools", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stderr == ""
    for command in ("inspect", "merge", "verify"):
        assert command in proc.stdout


def test_help_imports_no_heavy_modules() -> None:
    proc, modules = imported_modules("--help")
    assert proc.returncode == 0 and "inspect" in proc.stdout
    heavy = {m for m in modules if m.split(".")[0] in {"torch", "numpy", "matplotlib", "peft", "transformers"}}
    assert not heavy, sorted(heavy)[:10]


def test_inspect_json_of_safetensors_imports_no_torch(llama_plain_case: PeftCase, kohya_case: KohyaCase) -> None:
    for adapter in (llama_plain_case.adapter_dir, kohya_case.lora_file):
        proc, modules = imported_modules("inspect", str(adapter), "--json")
        assert proc.returncode == 0, proc.stderr[-2000:]
        json.loads(proc.stdout)
        assert "numpy" in modules  # the run really did the work
        assert not {m for m in modules if m.split(".")[0] in {"torch", "matplotlib", "peft", "transformers"}}
