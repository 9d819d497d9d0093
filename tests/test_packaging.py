"""The folder-to-package mapping in pyproject.toml covers every package, and nothing is
installed as a top-level ``passes`` or ``backends``."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_folder_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = config["package-dir"]
    listed = set(config["packages"])
    assert set(mapping) == {"slimc", "slimc.passes", "slimc.backends"}
    found = set()
    for package, folder in mapping.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((package, *relative)))
    assert found - listed == set(), "add these to [tool.setuptools] packages"
    assert not any(name.split(".")[0] in ("passes", "backends") for name in listed)
