"""The documentation is tested: every command and option is documented, and the
quickstart and README examples run as written (in a temporary folder, offline)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest

from lora_tools.cli import cli

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def bash_blocks(markdown: Path) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", markdown.read_text(encoding="utf-8"), flags=re.S)


def test_every_command_and_option_is_documented() -> None:
    reference = (DOCS / "commands.md").read_text(encoding="utf-8")
    assert isinstance(cli, click.Group)
    missing = []
    for name, command in cli.commands.items():
        if f"`lora-tools {name}" not in reference:
            missing.append(f"command {name}")
        for param in command.params:
            if isinstance(param, click.Option):
                for flag in param.opts + param.secondary_opts:
                    if flag.startswith("--") and not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", reference):
                        missing.append(f"{name} {flag}")
    assert not missing, f"undocumented in docs/commands.md: {missing}"


def test_docs_index_links_every_page() -> None:
    index = (DOCS / "index.md").read_text(encoding="utf-8")
    for page in DOCS.glob("*.md"):
        if page.name != "index.md":
            assert f"({page.name})" in index, page.name
    assert "docs/" in (ROOT / "README.md").read_text(encoding="utf-8")


def _run_blocks(blocks: list[str], cwd: Path) -> None:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    env.setdefault("HF_HUB_OFFLINE", "1")
    for block in blocks:
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"block failed:\n{block}\nstdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-2000:]}"


def test_quickstart_runs_as_written(tmp_path: Path) -> None:
    blocks = bash_blocks(DOCS / "quickstart.md")
    assert len(blocks) >= 5
    _run_blocks(blocks, tmp_path)
    assert (tmp_path / "style.png").stat().st_size > 10_000
    assert (tmp_path / "merged" / "model.safetensors").exists()
    assert (tmp_path / "both-r8" / "adapter_config.json").exists()


def test_readme_examples_run_as_written(tmp_path: Path) -> None:
    blocks = bash_blocks(ROOT / "README.md")
    setup = blocks[0]
    assert "pip install torch==2.13.0" in setup and "pytest" in setup  # the two opening commands
    _run_blocks(blocks[1:], tmp_path)


@pytest.mark.parametrize("page", sorted(p.name for p in DOCS.glob("*.md")))
def test_relative_links_resolve(page: str) -> None:
    text = (DOCS / page).read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
        assert (DOCS / target).exists(), f"{page} links to missing {target}"
