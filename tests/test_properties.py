"""Property-based tests (hypothesis): the parsers and loaders that read user text or files
either succeed or raise :class:`slimc.errors.UsageError` (one paragraph, exit 2), never any
other exception, and well-formed input round-trips. Example counts are in docs/reliability.md.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from slimc.errors import UsageError

EXAMPLES = 300
_names = st.from_regex(r"[a-z][a-z0-9-]{0,12}", fullmatch=True)
_values = st.from_regex(r"[A-Za-z0-9_.]{1,8}", fullmatch=True)
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12)


# -- --pipeline text ---------------------------------------------------------------------

@settings(max_examples=EXAMPLES, deadline=None)
@given(st.text(alphabet="abc-{}=,[] x1", max_size=40))
def test_pipeline_parser_only_raises_usage_errors(text):
    from slimc.pipeline import parse_pipeline_text

    try:
        items = parse_pipeline_text(text)
    except UsageError:
        return
    for name, options in items:
        assert isinstance(name, str) and isinstance(options, dict)


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.lists(st.tuples(_names, st.dictionaries(_names, _values, max_size=3)),
                min_size=1, max_size=4))
def test_pipeline_text_round_trips(pipeline):
    from slimc.pipeline import parse_pipeline_text

    text = ",".join(name + ("{" + ",".join(f"{k}={v}" for k, v in opts.items()) + "}"
                            if opts else "") for name, opts in pipeline)
    assert parse_pipeline_text(text) == [(n, dict(o)) for n, o in pipeline]


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.text(max_size=60))
def test_pipeline_validation_only_raises_usage_errors(text):
    from slimc.pipeline import parse_pipeline_text, validate
    from slimc.plugins import get_registry

    try:
        validate(parse_pipeline_text(text), get_registry().passes)
    except UsageError:
        pass


# -- recipes -------------------------------------------------------------------------------

def _recipe_file(suffix: str, data: bytes) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="slimc-prop-"))
    path = folder / f"recipe{suffix}"
    path.write_bytes(data)
    return path


def _load(path: Path) -> None:
    from slimc.pipeline import load_recipe, recipe_items, validate
    from slimc.plugins import get_registry

    try:
        validate(recipe_items(load_recipe(path), origin=str(path)), get_registry().passes)
    except UsageError:
        pass
    finally:
        shutil.rmtree(path.parent, ignore_errors=True)


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.sampled_from([".yaml", ".toml", ".yml", ".txt"]), st.binary(max_size=200))
def test_recipe_loader_on_arbitrary_bytes(suffix, data):
    _load(_recipe_file(suffix, data))


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.dictionaries(st.sampled_from(["pipeline", "target", "threads", "inputs", "x"]), _json,
                       max_size=3)
       | st.fixed_dictionaries({"pipeline": st.lists(
           _json | st.fixed_dictionaries({"pass": _json, "options": _json}), max_size=3)}))
def test_recipe_loader_on_arbitrary_yaml_structures(data):
    _load(_recipe_file(".yaml", yaml.safe_dump(data).encode()))


# -- --input NAME=SHAPE:DTYPE --------------------------------------------------------------

@settings(max_examples=EXAMPLES, deadline=None)
@given(st.text(alphabet="abx_=:019int64float3.- ", max_size=30))
def test_input_spec_parser_only_raises_usage_errors(text):
    from slimc.loaders.base import InputOverride

    try:
        override = InputOverride.parse(text)
    except UsageError:
        return
    assert override.shape is None or all(d > 0 for d in override.shape)


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True),
       st.lists(st.integers(1, 4096), min_size=1, max_size=4),
       st.sampled_from(["int64", "int32", "float32", "float16", "bool", "uint8"]))
def test_input_spec_round_trips(name, shape, dtype):
    import torch

    from slimc.loaders.base import InputOverride

    # a shape of several GiB is refused on purpose (a typo: test_user_errors.py)
    assume(math.prod(shape) <= 1 << 26)
    parsed = InputOverride.parse(f"{name}={'x'.join(map(str, shape))}:{dtype}")
    assert (parsed.name, parsed.shape, parsed.dtype) == (name, tuple(shape),
                                                         getattr(torch, dtype))


# -- artifact / manifest loader ------------------------------------------------------------

@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    import slimc

    out = tmp_path_factory.mktemp("prop") / "lin.slimc"
    slimc.compile_model("tests.reliability_models:tiny_linear", slimc.CompileOptions(output=out))
    return out


_FIELDS = ["slimc_version", "library", "sha256", "library_bytes", "inputs", "outputs",
           "target", "tokenizer", "files"]


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(_FIELDS), _json | st.sampled_from(
    ["model.so", "../model.so", "/etc/passwd", "", ".", "..", "a/b", "x" * 64]), max_size=4),
       st.sets(st.sampled_from(_FIELDS), max_size=2))
def test_artifact_loader_only_raises_usage_errors(artifact, changes, removed):
    """Any edit of a valid manifest (fields replaced by arbitrary JSON, or removed): loading
    either succeeds (the edit was harmless) or is refused with a UsageError."""
    import slimc

    folder = Path(tempfile.mkdtemp(prefix="slimc-prop-"))
    try:
        copy = folder / "a"
        shutil.copytree(artifact, copy)
        manifest = json.loads((copy / "manifest.json").read_text())
        manifest.update(changes)
        for key in removed:
            manifest.pop(key, None)
        (copy / "manifest.json").write_text(json.dumps(manifest))
        try:
            model = slimc.load(copy)
        except UsageError:
            return
        assert model.library.resolve().parent == copy.resolve()
        model(**model.example_inputs())
    except UsageError:
        pass
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.binary(max_size=300))
def test_manifest_reader_on_arbitrary_bytes(data):
    from slimc.artifact import read_manifest

    folder = Path(tempfile.mkdtemp(prefix="slimc-prop-"))
    try:
        (folder / "manifest.json").write_bytes(data)
        try:
            read_manifest(folder)
        except UsageError:
            pass
    finally:
        shutil.rmtree(folder, ignore_errors=True)
