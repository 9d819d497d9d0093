"""Two spellings of one pipeline: ``--pipeline`` text and ``--recipe`` YAML/TOML files.

Text: ``pass-a{opt=1,other=x},pass-b``. Recipe::

    # recipe.yaml                       # recipe.toml
    pipeline:                           [[pipeline]]
      - eliminate-dead-code             pass = "eliminate-dead-code"
      - pass: fold-batchnorm            [[pipeline]]
        options: {eps_override: 1e-5}   pass = "fold-batchnorm"

Both produce a list of :class:`~slimc.passmanager.PassInvocation` whose options were validated
by the pass's pydantic model; every mistake is a :class:`~slimc.errors.UsageError` listing what
is valid.
"""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import ValidationError

from slimc.errors import UsageError
from slimc.passmanager import Pass, PassInvocation
from slimc.recipe import load_recipe  # noqa: F401 (re-exported)


def split_top_level(text: str, sep: str = ",") -> list[str]:
    """Split on ``sep`` outside braces/brackets."""
    parts, depth, current = [], 0, []
    for ch in text:
        if ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth < 0:
                raise UsageError(f"--pipeline {text!r}: unbalanced '}}'.")
        if ch == sep and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    if depth != 0:
        raise UsageError(f"--pipeline {text!r}: a '{{' is never closed.")
    parts.append("".join(current))
    return [p.strip() for p in parts]


def no_pass_message(text: str) -> str:
    """The refusal of a ``--pipeline`` that names no pass (``""``, ``" "``, ``",,"``)."""
    return (f"--pipeline {text!r} names no pass. Give one or more passes as NAME or "
            "NAME{KEY=VALUE,...} separated by commas (`slimc passes` lists them), or leave "
            "--pipeline out and choose -O0..-O3 (-O0: no passes).")


def _no_empty_elements(text: str, parts: list[str], what: str) -> list[str]:
    """Refuse ``",,"``, ``"a,,b"``, ``"a,"`` and ``"q{x=1,}"``: an empty element is a typo
    (a pass or option dropped while editing), and skipping it silently would build something
    other than what was asked for -- ``",,"`` used to compile as if no ``--pipeline`` had been
    given."""
    if any(not p for p in parts):
        if not any(parts):
            raise UsageError(no_pass_message(text))
        raise UsageError(f"--pipeline {text!r} has an empty {what} (two commas in a row, or "
                         "a comma at the start or end). Remove the extra comma, or put back "
                         "what was meant to stand there.")
    return parts


def parse_pipeline_text(text: str) -> list[tuple[str, dict[str, Any]]]:
    """``"a{x=1,y=z},b"`` -> ``[("a", {"x": "1", "y": "z"}), ("b", {})]`` (values unparsed)."""
    items: list[tuple[str, dict[str, Any]]] = []
    if not text.strip():
        return items  # no passes (-O0's pipeline); a user's blank --pipeline is refused earlier
    for part in _no_empty_elements(text, split_top_level(text), "pass"):
        if "{" in part:
            name, _, rest = part.partition("{")
            if not rest.endswith("}"):
                raise UsageError(f"--pipeline element {part!r}: options must end with '}}'.")
            options: dict[str, Any] = {}
            opts = split_top_level(rest[:-1])
            if opts == [""]:
                opts = []  # NAME{}: no options
            for opt in _no_empty_elements(text, opts, f"option in {name.strip()!r}"):
                key, eq, value = opt.partition("=")
                if not eq or not key.strip():
                    raise UsageError(f"--pipeline element {part!r}: option {opt!r} is not "
                                     "KEY=VALUE.")
                options[key.strip()] = value.strip()
            items.append((name.strip(), options))
        else:
            items.append((part, {}))
    return items


def recipe_items(recipe: dict[str, Any], origin: str = "recipe") -> list[tuple[str, dict]]:
    pipeline = recipe["pipeline"]
    if isinstance(pipeline, str):
        return parse_pipeline_text(pipeline)
    if not isinstance(pipeline, list):
        raise UsageError(f"{origin}: 'pipeline' must be a list or a pipeline string.")
    items = []
    for i, entry in enumerate(pipeline):
        if isinstance(entry, str):
            items.append((entry, {}))
        elif isinstance(entry, dict) and "pass" in entry:
            extra = set(entry) - {"pass", "options"}
            if extra:
                raise UsageError(f"{origin}: pipeline[{i}] has unknown key(s) "
                                 f"{', '.join(sorted(str(k) for k in extra))}; use 'pass' and "
                                 "'options'.")
            items.append((_pass_name(entry["pass"], origin, i),
                          _options_table(entry.get("options"), origin, i)))
        elif isinstance(entry, dict) and len(entry) == 1:
            name, opts = next(iter(entry.items()))
            items.append((_pass_name(name, origin, i), _options_table(opts, origin, i)))
        else:
            raise UsageError(f"{origin}: pipeline[{i}] must be a pass name or "
                             "{pass: NAME, options: {...}}.")
    return items


def _pass_name(name: Any, origin: str, i: int) -> str:
    if not isinstance(name, str) or not name.strip():
        raise UsageError(f"{origin}: pipeline[{i}]: the pass name must be a string, not "
                         f"{name!r}.")
    return name.strip()


def _options_table(options: Any, origin: str, i: int) -> dict[str, Any]:
    if options is None:
        return {}
    if not isinstance(options, dict) or not all(isinstance(k, str) for k in options):
        raise UsageError(f"{origin}: pipeline[{i}]: 'options' must be a table of NAME: VALUE, "
                         f"not {type(options).__name__} {options!r:.80}.",
                         hint="Example: {pass: quantize, options: {weights: int8}}.")
    return dict(options)


def describe_options(cls: type[Pass]) -> list[dict[str, Any]]:
    """Options of a pass as plain data: name, type, default, constraints, help."""
    out = []
    for name, f in cls.Options.model_fields.items():
        constraints = {}
        for meta in f.metadata:
            for attr in ("ge", "gt", "le", "lt"):
                if getattr(meta, attr, None) is not None:
                    constraints[attr] = getattr(meta, attr)
        annotation = f.annotation
        type_name = getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
        out.append({"name": name, "type": type_name,
                    "default": (None if f.is_required()
                                else f.get_default(call_default_factory=True)),
                    "required": f.is_required(), "constraints": constraints,
                    "help": f.description or ""})
    return out


def _options_text(cls: type[Pass]) -> str:
    opts = describe_options(cls)
    if not opts:
        return f"{cls.name} takes no options"
    parts = []
    for o in opts:
        bounds = "".join(f", {k} {v}" for k, v in o["constraints"].items())
        parts.append(f"{o['name']} ({o['type']}, default {o['default']}{bounds})")
    return f"valid options of {cls.name}: " + "; ".join(parts)


def validate(items: list[tuple[str, dict[str, Any]]],
             passes: dict[str, type[Pass]]) -> list[PassInvocation]:
    """Resolve names and validate options; the first mistake raises a UsageError."""
    result = []
    for name, raw in items:
        cls = passes.get(name)
        if cls is None:
            close = difflib.get_close_matches(name, list(passes), n=3)
            did_you_mean = f" Did you mean {' or '.join(close)}?" if close else ""
            raise UsageError(f"Unknown pass {name!r}.{did_you_mean}",
                             hint=f"Registered passes: {', '.join(sorted(passes))} "
                             "(see `slimc passes`).")
        try:
            options = cls.Options(**raw)
        except ValidationError as exc:
            problems = []
            for err in exc.errors():
                key = ".".join(str(p) for p in err["loc"]) or "(options)"
                if err["type"] == "extra_forbidden":
                    problems.append(f"unknown option {key!r}")
                else:
                    problems.append(f"option {key}={err.get('input')!r}: {err['msg']}")
            raise UsageError(f"Pass {name}: {'; '.join(problems)}.",
                             hint=_options_text(cls) + ".") from None
        result.append(PassInvocation(name, options))
    return result
