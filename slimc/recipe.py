"""Recipe files: a pipeline plus the compile settings that go with it.

A recipe (``.yaml``/``.yml``/``.toml``) has a ``pipeline`` list and may set ``target``,
``threads`` and ``inputs``. Precedence, everywhere: a command-line flag (or an explicit
:class:`~slimc.api.CompileOptions` field) > the recipe > slimc's default. ``--recipe`` together
with ``--pipeline`` is refused: a recipe *is* a pipeline, and two pipelines have no single
obvious meaning (put the extra passes into the recipe instead).

This module is light (no torch): the compile cache reads recipes before deciding to build.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import yaml

from slimc.errors import UsageError

#: Keys a recipe may have; every one is honoured (see the module docstring for precedence).
RECIPE_KEYS = ("pipeline", "target", "threads", "inputs", "description")


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Read a recipe file (``.yaml``/``.yml``/``.toml``) into a dict with a ``pipeline`` list."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"Cannot read recipe {path}: {exc.strerror}.") from None
    except UnicodeDecodeError:
        raise UsageError(f"Recipe {path} is not a text file (it is not UTF-8).",
                         hint="A recipe is a small YAML or TOML file with a pipeline list.") \
            from None
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        else:
            raise UsageError(f"Recipe {path} must end in .yaml, .yml or .toml.")
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise UsageError(f"Recipe {path} is not valid {path.suffix[1:].upper()}: "
                         f"{_parse_problem(exc)}.") from None
    if not isinstance(data, dict) or "pipeline" not in data:
        raise UsageError(f"Recipe {path} must have a top-level 'pipeline' list.")
    unknown = set(data) - set(RECIPE_KEYS)
    if unknown:
        raise UsageError(f"Recipe {path}: unknown key(s) {', '.join(sorted(unknown))}.",
                         hint=f"Valid keys: {', '.join(RECIPE_KEYS)}.")
    _check_settings(data, path)
    return data



def _check_settings(data: dict[str, Any], path: Path) -> None:
    if "target" in data and not isinstance(data["target"], str):
        raise UsageError(f"Recipe {path}: 'target' must be a target name such as arm or x86.")
    threads = data.get("threads")
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool)
                                or threads < 1):
        raise UsageError(f"Recipe {path}: 'threads' must be a positive integer, not "
                         f"{threads!r}.")
    if "inputs" in data:
        recipe_inputs(data, path)


def recipe_inputs(data: dict[str, Any], path: str | Path) -> list[str]:
    """The recipe's ``inputs`` as ``NAME=SHAPE:DTYPE`` strings (list, or a name -> spec map)."""
    inputs = data.get("inputs") or []
    if isinstance(inputs, dict):
        inputs = [f"{name}={spec}" for name, spec in inputs.items()]
    if not isinstance(inputs, list) or not all(isinstance(i, str) and "=" in i for i in inputs):
        raise UsageError(f"Recipe {path}: 'inputs' must be a list of NAME=SHAPE:DTYPE strings "
                         "or a map of NAME: SHAPE:DTYPE (e.g. input_ids: 1x128:int64).")
    return inputs


def apply_recipe_settings(options: Any) -> Any:
    """``options`` with the recipe's target/threads/inputs filled in where the caller left
    them unset (CLI flag > recipe > default); refuses ``recipe`` together with ``pipeline``."""
    from dataclasses import replace

    if options.recipe and options.pipeline:
        raise UsageError("--recipe and --pipeline were both given.",
                         hint="A recipe is a pipeline: add the extra passes to the recipe's "
                         "pipeline list, or use --pipeline alone.")
    if not options.recipe:
        return replace(options, target=options.target or "llvm")
    data = load_recipe(options.recipe)
    return replace(
        options,
        target=options.target or data.get("target") or "llvm",
        threads=options.threads if options.threads is not None else data.get("threads"),
        inputs=_merge_inputs(recipe_inputs(data, options.recipe), list(options.inputs)))


def _merge_inputs(recipe: list[str], given: list[str]) -> tuple[str, ...]:
    """Per input name, the caller's spec wins over the recipe's."""
    merged = {item.partition("=")[0].strip(): item for item in recipe}
    merged.update({item.partition("=")[0].strip(): item for item in given})
    return tuple(merged.values())


def _parse_problem(exc: Exception) -> str:
    """A YAML/TOML parse error in one line: PyYAML's message quotes the offending source
    with a caret under it over several lines, which broke the one-paragraph error."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    if problem and mark is not None:
        context = getattr(exc, "context", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}"
        return f"{context + ', ' if context else ''}{problem} at {where}"
    return " ".join(str(exc).split())
