"""Every ``from slimc... import name`` in the package names something that exists.

Most of slimc imports lazily, inside functions, so a renamed or removed helper breaks only the
command that reaches that line (a removed private helper once failed four budget tests in CI
and would have failed every ``--budget`` compile). This walks the source, not the running code:
each import-from statement anywhere in a module, at any depth, is resolved against the real
installed module.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Source folder of each installed top-level package name (pyproject's package-dir).
PACKAGE_DIRS = {"slimc": ROOT / "slimc", "slimc.passes": ROOT / "passes",
                "slimc.backends": ROOT / "backends"}


def _modules() -> list[tuple[str, Path]]:
    found: dict[str, Path] = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return sorted(found.items())


def _absolute(module_name: str, path: Path, node: ast.ImportFrom) -> str | None:
    if node.level == 0:
        return node.module
    package = module_name if path.name == "__init__.py" else module_name.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def _slimc_imports() -> list[tuple[str, int, str, str]]:
    imports = []
    for module_name, path in _modules():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom):
                continue
            target = _absolute(module_name, path, node)
            if target is None or not (target == "slimc" or target.startswith("slimc.")):
                continue
            for alias in node.names:
                if alias.name != "*":
                    imports.append((f"{path.relative_to(ROOT)}", node.lineno, target, alias.name))
    return imports


IMPORTS = _slimc_imports()


def test_the_walk_finds_the_lazy_imports():
    assert len(IMPORTS) > 200
    assert any(target == "slimc.passes.analysis.hardware" and name == "hardware_if_known"
               for _, _, target, name in IMPORTS)


def _is_submodule(module, name: str) -> bool:
    if not hasattr(module, "__path__"):
        return False  # a plain module has no submodules
    return importlib.util.find_spec(f"{module.__name__}.{name}") is not None


@pytest.mark.parametrize("target", sorted({t for _, _, t, _ in IMPORTS}))
def test_every_imported_name_exists(target):
    module = importlib.import_module(target)
    missing = [f"{where}:{line} imports {name!r}" for where, line, t, name in IMPORTS
               if t == target and not hasattr(module, name)
               and not _is_submodule(module, name)]
    assert not missing, f"{target} has no such names:\n" + "\n".join(missing)
