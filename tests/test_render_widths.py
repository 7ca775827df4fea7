"""Every command's table in an ordinary terminal (issue #13): at 80, 100 and 120 columns
each data row fits on one line, every name is shown whole (after the prefix said once above
the table) and unique, and no cell is cut with an ellipsis unless a footer says so. Plus one
run in a real pseudo-terminal of 100 columns, and the advice inspect gives.

The outputs at 120 columns are pinned by test_golden.py.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import numpy as np
import pytest
from builders import PeftCase
from click.testing import CliRunner
from rich.cells import cell_len
from safetensors.numpy import save_file
from test_inspect import build_long_adapter

from lora_tools.cli import cli

WIDTHS = (80, 100, 120)
PREFIX = "names below omit the prefix they share: "


def run(width: int, *args: object) -> tuple[int, str]:
    result = CliRunner(env={"COLUMNS": str(width)}).invoke(cli, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.stdout


def check_tables(out: str, width: int, names: set[str]) -> int:
    """Assert the table conventions on `out`; return the number of data rows seen."""
    rows, prefix, seen = 0, "", set()
    shortened = "shortened" in out
    for line in out.splitlines():
        if line.startswith(PREFIX):
            prefix = line[len(PREFIX):]
        elif line.startswith("│"):
            rows += 1
            assert cell_len(line) <= width, (width, line)
            assert line.endswith("│"), line  # one row, one line: nothing folded onto the next
            cells = [cell.strip() for cell in line.split("│")[1:-1]]
            full = prefix + cells[0]
            assert full in names, (full, sorted(names)[:5])
            assert full not in seen, full
            seen.add(full)
            assert shortened or not any(cell.endswith("…") for cell in cells), line
        elif line.startswith("└"):
            prefix, seen = "", set()
    return rows


@pytest.fixture(scope="module")
def merged(llama_plain_case: PeftCase, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("widths") / "merged"
    code, _ = run(120, "merge", llama_plain_case.base_dir, llama_plain_case.adapter_dir, "-o", out, "--device", "cpu", "-q")
    assert code == 0
    return out


@pytest.mark.parametrize("width", WIDTHS)
def test_inspect_fits(llama_plain_case: PeftCase, width: int) -> None:
    _, document = run(width, "inspect", llama_plain_case.adapter_dir, "--json")
    names = {layer["name"] for layer in json.loads(document)["layers"]}
    for extra in ((), ("--base", llama_plain_case.base_dir)):
        code, out = run(width, "inspect", llama_plain_case.adapter_dir, *extra)
        assert code == 0
        assert check_tables(out, width, names) == len(names) == 14
        header = next(line for line in out.splitlines() if line.startswith("┃"))
        assert ("‖ΔW‖/‖W0‖" in header) == bool(extra)  # the relative norm outranks every other figure
    assert f"hidden at {width} columns" in out or width == 120


@pytest.mark.parametrize("width", WIDTHS)
def test_grouped_inspect_fits(fixture_root: Path, width: int) -> None:
    adapter = build_long_adapter(fixture_root)
    _, document = run(width, "inspect", adapter, "--json")
    families = {layer["family"] for layer in json.loads(document)["layers"]}
    code, out = run(width, "inspect", adapter)
    assert code == 0 and check_tables(out, width, families) == len(families)


@pytest.mark.parametrize("width", WIDTHS)
def test_verify_fits(llama_plain_case: PeftCase, merged: Path, width: int) -> None:
    args = ("verify", llama_plain_case.base_dir, llama_plain_case.adapter_dir, merged)
    _, document = run(width, *args, "--json")
    names = {check["name"] for check in json.loads(document)["tensors"]}
    code, out = run(width, *args)
    assert code == 0 and check_tables(out, width, names) == len(names)
    if "│ recipe" in out or " recipe " in out.split("\n┡")[0]:
        assert "recipe: fp32-once = fp32 round-once" in out  # the legend under the table
    assert "round-once (lora-tools" not in "\n".join(line for line in out.splitlines() if line.startswith("│"))


@pytest.mark.parametrize("width", WIDTHS)
def test_blend_fits(llama_plain_case: PeftCase, tmp_path: Path, width: int) -> None:
    a = llama_plain_case.adapter_dir
    code, document = run(width, "blend", a, a, "--weight", "0.5", "-o", tmp_path / "j", "--json")
    names = {layer["name"] for layer in json.loads(document)["layers"]}
    code, out = run(width, "blend", a, a, "--weight", "0.5", "-o", tmp_path / "t")
    assert code == 0 and check_tables(out, width, names) == len(names)


@pytest.mark.parametrize("width", WIDTHS)
def test_resize_fits(llama_plain_case: PeftCase, tmp_path: Path, width: int) -> None:
    a = llama_plain_case.adapter_dir
    code, document = run(width, "resize", a, "--energy", "0.9", "-o", tmp_path / "j", "--json")
    names = {layer["name"] for layer in json.loads(document)["layers"]}
    code, out = run(width, "resize", a, "--energy", "0.9", "-o", tmp_path / "t")
    assert code == 0 and check_tables(out, width, names) == len(names)


def test_narrow_table_says_what_it_hid(llama_plain_case: PeftCase, merged: Path) -> None:
    code, out = run(80, "verify", llama_plain_case.base_dir, llama_plain_case.adapter_dir, merged)
    footer = re.search(r"hidden at 80 columns: ([^(]*) \(--json or a wider terminal shows them\)", " ".join(out.split()))
    assert footer is not None, out
    header = next(line for line in out.splitlines() if line.startswith("┃"))
    for column in footer.group(1).split(", "):
        assert f" {column} " not in header
    assert "recipe: " not in out  # no legend for a hidden column


def _low_rank_adapter(folder: Path) -> Path:
    """Rank 8, but every live update has rank 1; the last layer's B is zero (dead)."""
    rng = np.random.default_rng(0)
    tensors = {}
    for layer in range(5):
        prefix = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
        row = rng.standard_normal(32).astype(np.float32)
        tensors[f"{prefix}.lora_A.weight"] = np.tile(row, (8, 1))
        b = rng.standard_normal((32, 8)).astype(np.float32) * 0.1
        tensors[f"{prefix}.lora_B.weight"] = np.zeros_like(b) if layer == 4 else b
    folder.mkdir()
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def test_inspect_gives_advice(tmp_path: Path) -> None:
    adapter = _low_rank_adapter(tmp_path / "low")
    code, out = run(100, "inspect", adapter)
    assert code == 0
    text = " ".join(out.split())
    assert "rank usage: 99 % of the energy in ≤ 1 of 8 directions in every live layer" in text
    assert ("lora-tools resize --energy 0.99" in text) == ("resize" in cli.commands)
    assert "dead layer model.layers.4.self_attn.q_proj: ‖ΔW‖_F = 0" in text
    assert "--base BASE would add ‖ΔW‖/‖W0‖" in text
    assert "alphas [16]" in text  # numbers, not strings


def test_inspect_in_a_real_terminal(llama_plain_case: PeftCase) -> None:
    """A pty of 100 columns (TIOCSWINSZ, COLUMNS unset): Rich sees a terminal of that width."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 100, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in {"COLUMNS", "LINES"}}
    env["TERM"] = "xterm-256color"
    proc = subprocess.Popen([sys.executable, "-m", "lora_tools", "inspect", str(llama_plain_case.adapter_dir)],
                            stdin=follower, stdout=follower, stderr=subprocess.PIPE, env=env)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert proc.wait(timeout=120) == 0, proc.stderr.read() if proc.stderr else ""
    out = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07", "", b"".join(chunks).decode()).replace("\r\n", "\n")
    _, document = run(100, "inspect", llama_plain_case.adapter_dir, "--json")
    names = {layer["name"] for layer in json.loads(document)["layers"]}
    assert check_tables(out, 100, names) == 14
    assert max(cell_len(line) for line in out.splitlines() if line.startswith("│")) > 80  # the room was used
