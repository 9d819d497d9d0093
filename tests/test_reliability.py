"""The bad-input inventory of docs/reliability.md: every case is one paragraph on stderr, exit
code 2, no traceback. Cases are tiny models or fail before any build, so the file is fast."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
LINEAR = "tests.reliability_models:tiny_linear"


@dataclass
class Case:
    """One inventory row: ``setup(tmp_path, hf_dir) -> argv``; fragments expected on stderr."""

    name: str
    setup: Callable[..., list]
    fragments: tuple[str, ...]
    env: dict[str, str] | None = None


def _file_as_output(tmp, hf):
    (tmp / "taken").write_text("a file")
    return ["compile", LINEAR, "-o", tmp / "taken"]


def _output_under_a_file(tmp, hf):
    (tmp / "taken").write_text("a file")
    return ["compile", LINEAR, "-o", tmp / "taken" / "sub" / "out"]


def _recipe(text: str | bytes, suffix: str = ".yaml"):
    def setup(tmp, hf):
        path = tmp / f"recipe{suffix}"
        (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
        return ["compile", LINEAR, "--recipe", path, "-o", tmp / "out"]
    return setup


def _calib_npz(**arrays):
    def setup(tmp, hf):
        np.savez(tmp / "calib.npz", **arrays)
        return ["compile", hf("bert"), "--input", "input_ids=1x8:int64", "--input",
                "attention_mask=1x8:int64", "--calib", tmp / "calib.npz", "-o", tmp / "out"]
    return setup


def _calib_npy(array):
    def setup(tmp, hf):
        np.save(tmp / "calib.npy", array)
        return ["compile", LINEAR, "--calib", tmp / "calib.npy", "-o", tmp / "out"]
    return setup


def _broken_image(tmp, hf):
    (tmp / "images").mkdir()
    (tmp / "images" / "cat.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return ["compile", "tests.models:small_cnn", "--calib", tmp / "images", "-o", tmp / "out"]


def _artifact_with(**changes):
    def setup(tmp, hf):
        art = _linear_artifact(tmp)
        manifest = json.loads((art / "manifest.json").read_text())
        for key, value in changes.items():
            if value is None:
                manifest.pop(key)
            else:
                manifest[key] = value
        (art / "manifest.json").write_text(json.dumps(manifest))
        return ["run", art]
    return setup


def _foreign_manifest(tmp, hf):
    (tmp / "site").mkdir()
    (tmp / "site" / "manifest.json").write_text('{"name": "PWA", "icons": []}')
    return ["run", tmp / "site"]


def _binary_manifest(tmp, hf):
    (tmp / "art").mkdir()
    (tmp / "art" / "manifest.json").write_bytes(b"\xff\xfe\x00garbage")
    return ["run", tmp / "art"]


_ARTIFACT_CACHE: dict[str, Path] = {}


def _linear_artifact(tmp: Path) -> Path:
    """A copy of one tiny artifact (compiled once per session) to damage."""
    if "linear" not in _ARTIFACT_CACHE:
        import tempfile

        import slimc

        out = Path(tempfile.mkdtemp(prefix="slimc-rel-")) / "lin.slimc"
        slimc.compile_model(LINEAR, slimc.CompileOptions(output=out))
        _ARTIFACT_CACHE["linear"] = out
    dest = tmp / "lin.slimc"
    shutil.copytree(_ARTIFACT_CACHE["linear"], dest)
    return dest


CASES = [
    Case("output-is-a-file", _file_as_output, ("is an existing file",)),
    Case("output-under-a-file", _output_under_a_file, ("is a file",)),
    Case("recipe-options-list", _recipe("pipeline:\n  - pass: eliminate-dead-code\n"
                                        "    options: [1, 2]\n"), ("'options' must be a table",)),
    Case("recipe-binary", _recipe(b"\x00\xff\xfe\x80binary" * 20), ("not a text file",)),
    Case("recipe-pass-not-a-name", _recipe("pipeline:\n  - {pass: [1]}\n"),
         ("pass name must be a string",)),
    Case("recipe-bad-toml", _recipe("pipeline = [", ".toml"), ("not valid TOML",)),
    Case("calib-ids-out-of-range", _calib_npz(input_ids=np.full((2, 8), 300, np.int64)),
         ("outside the model's valid range 0 .. 127",)),
    Case("calib-nan", _calib_npy(np.full((4, 8), np.nan, np.float32)), ("NaN",)),
    Case("calib-strings", _calib_npy(np.array([["a"] * 8] * 4)), ("must be numbers",)),
    Case("calib-unreadable-image", _broken_image, ("Cannot read image", "cat.png")),
    Case("tvm-num-threads-abc", lambda tmp, hf: ["compile", LINEAR, "-o", tmp / "out"],
         ("TVM_NUM_THREADS='abc'",), env={"TVM_NUM_THREADS": "abc"}),
    Case("sequence-longer-than-positions",
         lambda tmp, hf: ["compile", hf("bert"), "--input", "input_ids=1x100:int64"],
         ("longer than the model's 64 positions",)),
    Case("factory-not-a-module",
         lambda tmp, hf: ["compile", "tests.reliability_models:returns_string"],
         ("must return (torch.nn.Module, example_inputs)",)),
    Case("factory-non-tensor-output",
         lambda tmp, hf: ["compile", "tests.reliability_models:non_tensor_output", "-o",
                          tmp / "out"], ("not a tensor",)),
    Case("nan-weights", lambda tmp, hf: ["compile", "tests.reliability_models:nan_weights",
                                         "-o", tmp / "out"], ("'0.weight'", "NaN")),
    Case("analyze-keep-ratio-7",
         lambda tmp, hf: ["analyze", LINEAR, "--keep-ratios", "7"], ("--keep-ratios 7",)),
    Case("analyze-bits-0", lambda tmp, hf: ["analyze", LINEAR, "--bits", "0"], ("--bits 0",)),
    Case("run-missing-manifest-field", _artifact_with(inputs=None), ("inputs", "Field required")),
    Case("run-edited-sha", _artifact_with(sha256="not-a-digest"), ("sha256",)),
    Case("run-library-outside", _artifact_with(library="/usr/lib/libc.so.6"),
         ("plain file name",)),
    Case("run-bad-dtype", _artifact_with(inputs=[{"name": "x", "shape": [2, 8],
                                                  "dtype": "complex128"}]), ("unknown dtype",)),
    Case("run-foreign-manifest", _foreign_manifest, ("not a valid slimc manifest",)),
    Case("run-binary-manifest", _binary_manifest, ("is corrupt",)),
    Case("unknown-plugin", lambda tmp, hf: ["--plugins", "nope", "passes"],
         ("nope", "not installed")),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_inventory_case_is_one_paragraph_and_exit_2(case, cli, hf_dir, tmp_path, monkeypatch):
    for key, value in (case.env or {}).items():
        monkeypatch.setenv(key, value)
    result = cli(*case.setup(tmp_path, hf_dir))
    assert result.code == 2, (result.code, result.err)
    assert "Traceback" not in result.err, result.err
    assert result.err.count("error:") == 1, result.err
    for fragment in case.fragments:
        assert fragment in result.err, result.err
    assert not (tmp_path / "out").exists()


# -- cases that need a real mount, a subprocess or a plugin package -------------------------

@contextlib.contextmanager
def _tmpfs(path: Path, options: str):
    path.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a small tmpfs")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


def test_read_only_output_directory(cli, tmp_path):
    with _tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        result = cli("compile", LINEAR, "-o", ro / "out", "-q")
    assert result.code == 2 and "Traceback" not in result.err, result.err
    assert "not writable" in result.err or "read-only" in result.err


def test_disk_full_names_the_disk(cli, tmp_path):
    with _tmpfs(tmp_path / "small", "size=16k") as small:
        result = cli("compile", "tests.reliability_models:embedding256", "-o", small / "out",
                     "-q")
        leftovers = list(small.iterdir())
    assert result.code == 2 and "Traceback" not in result.err, result.err
    assert "disk is full" in result.err and str(small) in result.err, result.err
    assert leftovers == []


def _plugin_site(tmp_path: Path, name: str, source: str) -> Path:
    """A minimal installed distribution registering ``name`` in the ``slimc`` group."""
    site = tmp_path / "site"
    dist = site / f"{name}-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[slimc]\n{name} = {name}\n")
    (site / f"{name}.py").write_text(textwrap.dedent(source))
    return site


_PASS_PLUGIN = """
    import slimc
    from slimc.passmanager import TransformPass

    class Boom(TransformPass):
        "Fails on purpose."
        name = "boom"

        def run(self, ir, ctx, options):
            {body}

    @slimc.hookimpl
    def slimc_register_passes():
        return [Boom]
"""


def _slimc(site: Path, *args, env: dict | None = None):
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]),
               **(env or {})}
    return subprocess.run([sys.executable, "-m", "slimc.cli", *map(str, args)], cwd=ROOT,
                          env=environ, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("body,fragment", [
    ("raise ValueError('kaboom')", "ValueError: kaboom"),
    ("return 42", "must return PreservedAnalyses, not int"),
])
def test_plugin_pass_failure_names_the_plugin(tmp_path, body, fragment):
    site = _plugin_site(tmp_path, "boomplug", _PASS_PLUGIN.replace("{body}", body))
    result = _slimc(site, "compile", LINEAR, "-p", "boom", "-o", tmp_path / "out", "-q")
    assert result.returncode == 2, result.stderr
    assert "plugin 'boomplug'" in result.stderr and fragment in result.stderr
    assert "Traceback" not in result.stderr


def test_plugin_selection(tmp_path, monkeypatch, cli):
    """--no-plugins / --plugins / $SLIMC_NO_PLUGINS / $SLIMC_PLUGINS choose what loads."""
    from slimc.plugins import build_registry

    site = _plugin_site(tmp_path, "boomplug", _PASS_PLUGIN.replace("{body}", "return None"))
    monkeypatch.syspath_prepend(str(site))
    for key in ("SLIMC_NO_PLUGINS", "SLIMC_PLUGINS"):
        monkeypatch.delenv(key, raising=False)
    assert "boom" in build_registry().passes
    assert "boom" in build_registry(plugins=["boomplug"]).passes
    assert "boom" not in build_registry(plugins=[]).passes
    monkeypatch.setenv("SLIMC_NO_PLUGINS", "1")
    assert "boom" not in build_registry().passes
    monkeypatch.delenv("SLIMC_NO_PLUGINS")
    monkeypatch.setenv("SLIMC_PLUGINS", "boomplug")
    assert "boom" in build_registry().passes
    monkeypatch.delenv("SLIMC_PLUGINS")
    result = cli("--no-plugins", "compile", LINEAR, "-p", "boom")
    assert result.code == 2 and "Unknown pass 'boom'" in result.err


def test_plugin_calling_sys_exit_at_import_does_not_kill_slimc(tmp_path):
    site = _plugin_site(tmp_path, "quitter", "import sys\nsys.exit(3)\n")
    result = _slimc(site, "compile", LINEAR, "-o", tmp_path / "out", "-q")
    assert result.returncode == 0, result.stderr
    assert "plugin 'quitter' is disabled" in result.stderr and "sys.exit(3)" in result.stderr
    assert (tmp_path / "out" / "manifest.json").is_file()


def test_torch_logs_no_traceback_before_the_message(tmp_path):
    """torch logs the real cause of a failed load (with a traceback) and of a failed capture
    before raising; slimc prints one paragraph instead (a subprocess, to see raw stderr)."""
    import zipfile

    bad = tmp_path / "bad.pt2"
    with zipfile.ZipFile(bad, "w") as archive:
        archive.writestr("bad/archive_format", "pt2")
        archive.writestr("bad/models/model.json", "{not json")
    for model, fragment in ((bad, "not a readable torch.export archive"),
                            ("tests.models:untraceable", "Could not capture")):
        result = subprocess.run([sys.executable, "-m", "slimc.cli", "compile", str(model), "-o",
                                 str(tmp_path / "out")], cwd=ROOT, capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr and fragment in result.stderr, result.stderr
        assert result.stderr.strip().startswith("error:"), result.stderr
