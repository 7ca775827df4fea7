"""Packaging promises (issue #3): lower-bounded runtime dependencies, peft and
transformers only as test oracles, and a CLI that works without them."""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import lora_tools

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(lora_tools.__file__).resolve().parent
RUNTIME = {"torch", "safetensors", "click", "numpy", "rich", "matplotlib"}
ORACLES = ("peft", "transformers", "diffusers")

# A child python in which importing peft, transformers or diffusers fails, as on a
# machine where they are not installed; then the CLI runs with the given arguments.
_BLOCKED_RUN = """
import sys
from importlib.abc import MetaPathFinder

class Block(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by test)", name=name)
        return None

sys.meta_path.insert(0, Block())
for name in list(sys.modules):
    assert name.split(".")[0] not in {blocked!r}, name
sys.argv = ["lora-tools", *{args!r}]
from lora_tools.cli import main
try:
    main()
finally:
    assert not any(name.split(".")[0] in {blocked!r} for name in sys.modules)
"""


def run_without_oracles(*args: str) -> subprocess.CompletedProcess[str]:
    code = _BLOCKED_RUN.format(blocked=set(ORACLES), args=list(args))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_blocker_really_blocks() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _BLOCKED_RUN.format(blocked=set(ORACLES), args=[]).split("sys.argv")[0] + "import peft\n"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode != 0 and "blocked by test" in proc.stderr


def test_cli_works_without_peft_and_transformers(llama_plain_case, kohya_case, tmp_path: Path) -> None:
    proc = run_without_oracles("--help")
    assert proc.returncode == 0, proc.stderr
    assert "inspect" in proc.stdout

    adapter = tmp_path / "adapter"
    shutil.copytree(llama_plain_case.adapter_dir, adapter)
    proc = run_without_oracles("inspect", str(adapter), "--json")
    assert proc.returncode == 0, proc.stderr
    document = json.loads(proc.stdout)
    assert document["adapter"]["format"] == "peft" and document["adapter"]["n_layers"] == 14

    lora = tmp_path / "kohya.safetensors"
    shutil.copy(kohya_case.lora_file, lora)
    proc = run_without_oracles("inspect", str(lora), "--base", str(kohya_case.base_file))
    assert proc.returncode == 0, proc.stderr
    assert "down_blocks.0.resnets.0.conv1" in proc.stdout


def _requirement_name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower()


def test_runtime_dependencies_are_lower_bounded() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"]
    assert {_requirement_name(d) for d in deps} == RUNTIME
    assert len(deps) == len(RUNTIME)
    for dep in deps:
        assert "==" not in dep and "<" not in dep and "~=" not in dep, dep
        assert re.fullmatch(r"[A-Za-z0-9_.-]+\s*>=\s*[0-9][0-9A-Za-z.]*", dep), dep
    extras = {_requirement_name(d) for group in project.get("optional-dependencies", {}).values() for d in group}
    assert {"peft", "transformers"} <= extras
    assert not ({"peft", "transformers"} & {_requirement_name(d) for d in deps})
    assert project["scripts"]["lora-tools"] == "lora_tools.cli:run"


def test_package_is_typed() -> None:
    assert (PACKAGE / "py.typed").is_file()


def _imported_names(tree: ast.AST) -> set[str]:
    """Top-level module names imported by `import`, `from … import` or import_module("…")."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in {"import_module", "__import__", "find_spec"} and isinstance(node.args[0].value, str):
                names.add(node.args[0].value.split(".")[0])
    return names


def test_library_never_imports_peft_or_transformers() -> None:
    sources = sorted(PACKAGE.rglob("*.py"))
    assert len(sources) > 10
    for source in sources:
        names = _imported_names(ast.parse(source.read_text(encoding="utf-8"), filename=str(source)))
        assert not names & set(ORACLES), (source, names & set(ORACLES))


def test_commands_leave_the_callers_garbage_collector_as_it_was(llama_plain_case, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The verbs pause the collector while they import their library; only a run of
    `main` (the process is the command's) freezes what the imports made, and `main`
    unfreezes it: a program invoking the click group, or `main`, in its own process gets
    its collector back enabled and unfrozen."""
    import gc

    from click.testing import CliRunner

    from lora_tools.cli import cli
    from lora_tools.cli import main as cli_main

    assert gc.isenabled() and gc.get_freeze_count() == 0
    result = CliRunner().invoke(cli, ["resize", str(llama_plain_case.adapter_dir), "--rank", "2", "-o", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    assert gc.isenabled() and gc.get_freeze_count() == 0
    monkeypatch.setattr(sys, "argv", ["lora-tools", "resize", str(llama_plain_case.adapter_dir), "--rank", "2", "-o",
                                      str(tmp_path / "b"), "--json"])
    with pytest.raises(SystemExit) as done:
        cli_main()
    assert done.value.code == 0 and gc.isenabled() and gc.get_freeze_count() == 0
