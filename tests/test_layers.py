"""The package's layers, under test: every module imports only downward (docs/architecture.md).

Each module's imports are read from its source (top-level and inside functions, since
the CLI and the lazy re-exports import late), so a rule cannot be broken by an import
that only runs on some path.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lora_tools"

# A module's layer: its first path component under lora_tools/ (the folder, or the
# module itself for the single-module layers and operations).
LAYER_OF = {
    "errors": "errors",
    "io": "io",
    "adapter": "adapter",
    "formats": "formats",
    "linalg": "linalg",
    "engine": "engine",
    "inspect": "operation",
    "merge": "operation",
    "blend": "operation",
    "verify": "operation",
    "resize": "operation",
    "convert": "operation",
    "extract": "operation",
    "render": "render",
    "cli": "cli",
    "__main__": "cli",
    "__init__": "api",
}

# What each layer may import of lora_tools (besides itself).
ALLOWED = {
    "errors": set(),
    "io": {"errors"},
    "adapter": {"errors", "io"},
    "formats": {"errors", "io", "adapter"},
    "linalg": {"errors", "adapter"},
    "engine": {"errors", "io", "adapter", "formats", "linalg"},
    "operation": {"errors", "io", "adapter", "formats", "linalg", "engine"},
    "render": {"errors", "io", "adapter", "formats", "linalg", "engine", "operation"},
    "cli": {"errors", "io", "adapter", "formats", "linalg", "engine", "operation", "render"},
    "api": {"errors", "io", "adapter", "formats", "linalg", "engine", "operation"},
}


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _name_of(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _component(module: str) -> str:
    """'lora_tools.io.checkpoint' -> 'io'; the package itself -> '__init__'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path, root: Path = PACKAGE) -> set[str]:
    """Every lora_tools module `path` (a file under `root`) imports, absolute or relative,
    anywhere in the file."""
    found = set()
    own = _name_of(path, root)
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "lora_tools"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            if module.split(".")[0] != "lora_tools":
                continue
            if module == "lora_tools":  # from lora_tools import x: x is a module or an API name
                found |= {f"lora_tools.{alias.name}" for alias in node.names}
            else:
                found.add(module)
    return found


def _layer(module: str) -> str:
    component = _component(module)
    assert component in LAYER_OF, f"{module}: lora_tools/{component} is in no layer; add it to LAYER_OF and docs/architecture.md"
    return LAYER_OF[component]


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_module_imports_only_downward(path: Path) -> None:
    module = _name_of(path)
    layer = _layer(module)
    for imported in sorted(_imports(path)):
        if _component(imported) == "__init__":
            assert layer in ("cli", "api"), f"{module} imports the package's re-exports; import the defining module"
            continue
        target = _layer(imported)
        same_component = _component(imported) == _component(module)
        assert same_component or target == layer or target in ALLOWED[layer], f"{module} ({layer}) imports {imported} ({target})"


def test_operations_do_not_import_each_other() -> None:
    """Each verb stands alone on the layers below; what two verbs share belongs down there."""
    for path in _modules():
        module = _name_of(path)
        if _layer(module) != "operation":
            continue
        for imported in _imports(path):
            if _component(imported) in LAYER_OF and _layer(imported) == "operation":
                assert _component(imported) == _component(module), f"{module} imports the operation {imported}"


def test_the_rules_see_imports_inside_functions(tmp_path: Path) -> None:
    """The parser finds a late import, so the rules cannot be dodged by one."""
    sample = tmp_path / "lora_tools" / "io" / "sample.py"
    sample.parent.mkdir(parents=True)
    sample.write_text("def f():\n    from lora_tools.render.tables import x\n    from . import atomic\n")
    assert _imports(sample, tmp_path / "lora_tools") == {"lora_tools.render.tables", "lora_tools.io"}
