"""Hostile inputs run no code and read no memory out of bounds; no user data is deleted;
Ctrl-C / SIGTERM stop a compile with 130 / 143 and leave the old artifact as it was.

Each test here failed on main at 1135eda (see docs/reliability.md)."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
EMBED = "tests.reliability_models:embedding256"


def _clean_error(result, *fragments: str) -> None:
    assert result.code == 2, (result.code, result.err)
    assert "Traceback" not in result.err, result.err
    for fragment in fragments:
        assert fragment in result.err, result.err


def _slimc(*args: str, input: str | None = None, timeout: float = 600):
    return subprocess.run([sys.executable, "-m", "slimc.cli", *map(str, args)], cwd=ROOT,
                          input=input, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def embed_artifact(tmp_path_factory) -> Path:
    """An artifact of a 256-token embedding model (compiled once for the module)."""
    import slimc

    out = tmp_path_factory.mktemp("embed") / "embed.slimc"
    slimc.compile_model(EMBED, slimc.CompileOptions(output=out))
    return out


# -- 1. a .pt2 with a pickled weight -------------------------------------------------------

class _Payload:
    """Unpickling this creates ``marker`` (a stand-in for any code an attacker runs)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _hostile_pt2(path: Path, marker: Path) -> Path:
    import pickle

    import torch

    program = torch.export.export(torch.nn.Linear(4, 2).eval(), (torch.randn(1, 4),))
    clean = path.with_name("clean.pt2")
    torch.export.save(program, clean)
    with zipfile.ZipFile(clean) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("model_weights_config.json"):
                config = json.loads(data)
                first = next(iter(config["config"].values()))
                first["use_pickle"] = True
                weight_file = first["path_name"]
                data = json.dumps(config).encode()
            dst.writestr(info, data)
        name = next(n for n in src.namelist() if n.endswith(f"data/weights/{weight_file}"))
    buffer = io.BytesIO(pickle.dumps(_Payload(marker)))
    with zipfile.ZipFile(path, "a") as dst:  # the later entry of a name wins when read
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dst.writestr(name, buffer.getvalue())
    return path


def test_pt2_with_pickled_weight_runs_no_code(cli, tmp_path):
    marker = tmp_path / "PWNED"
    hostile = _hostile_pt2(tmp_path / "hostile.pt2", marker)
    result = cli("compile", hostile, "-o", tmp_path / "out", "-q")
    _clean_error(result, "pickle", "hostile.pt2")
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_hugging_face_pickle_weights_run_no_code(hf_dir, tmp_path, cli):
    """A model folder whose ``pytorch_model.bin`` is a hostile pickle: refused by the
    weights-only unpickler, with an error that does not advise turning the protection off."""
    import pickle

    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(Path(hf_dir("bert")) / "config.json", folder / "config.json")
    marker = tmp_path / "PWNED"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"w": _Payload(marker)}))
    result = cli("compile", folder, "-o", tmp_path / "out", "-q")
    _clean_error(result, "weights-only", "safetensors")
    assert "weights_only` set to `False`" not in result.err
    assert "Warning" not in result.err
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


# -- 2. a Hugging Face folder with auto_map code --------------------------------------------

def test_remote_code_never_runs_without_opt_in(hf_dir, tmp_path, cli):
    folder = tmp_path / "custom"
    shutil.copytree(hf_dir("bert"), folder)
    marker = tmp_path / "PWNED"
    (folder / "configuration_evil.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import BertConfig\n\n"
        "class EvilConfig(BertConfig):\n    model_type = 'bert'\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig"}
    (folder / "config.json").write_text(json.dumps(config))
    result = _slimc("compile", folder, "-o", tmp_path / "out", "-q", input="y\ny\n")
    assert result.returncode == 2, result.stderr
    assert "--trust-remote-code" in result.stderr and "auto_map" in result.stderr
    assert "Traceback" not in result.stderr
    assert "[y/N]" not in result.stdout + result.stderr  # never asks on stdin
    assert not marker.exists()
    # --trust-remote-code opts in: the folder's code runs and the model compiles
    result = cli("compile", folder, "-o", tmp_path / "out", "-q", "--trust-remote-code",
                 "--input", "input_ids=1x8:int64", "--input", "attention_mask=1x8:int64")
    assert result.code == 0, result.err
    assert marker.exists()


# -- 3. token ids outside the vocabulary ----------------------------------------------------

@pytest.mark.parametrize("token", [300, 100_000, 10**9, -1])
def test_out_of_vocabulary_ids_are_rejected(cli, embed_artifact, tmp_path, token):
    import slimc
    from slimc.errors import UsageError

    manifest = json.loads((embed_artifact / "manifest.json").read_text())
    assert manifest["inputs"][0]["min"] == 0 and manifest["inputs"][0]["max"] == 255
    ids = np.full((1, 8), token, dtype=np.int64)
    np.save(tmp_path / "ids.npy", ids)
    result = cli("run", embed_artifact, "--input", f"input_ids={tmp_path / 'ids.npy'}")
    _clean_error(result, "input_ids", str(token), "0 .. 255")
    with pytest.raises(UsageError, match="outside its valid range 0 .. 255"):
        slimc.load(embed_artifact)(input_ids=ids)


def test_library_clamps_ids_for_callers_that_skip_the_check(embed_artifact):
    """A C/C++ caller of model.so gets no manifest check: the library itself clamps."""
    from slimc.backends.tvm.runtime import NativeRunner

    runner = NativeRunner(embed_artifact / "model.so")
    last = runner([np.full((1, 8), 255, dtype=np.int64)])[0]
    first = runner([np.zeros((1, 8), dtype=np.int64)])[0]
    for token in (300, 100_000, 10**9):
        out = runner([np.full((1, 8), token, dtype=np.int64)])[0]
        np.testing.assert_array_equal(out, last)
    np.testing.assert_array_equal(runner([np.full((1, 8), -7, dtype=np.int64)])[0], first)


# -- 4. manifest.json pointing outside the artifact -----------------------------------------

def _copy_with_manifest(artifact: Path, dest: Path, **changes) -> Path:
    shutil.copytree(artifact, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest.update(changes)
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


def test_manifest_library_must_be_the_artifacts_own_file(cli, embed_artifact, tmp_path):
    from slimc.manifest import sha256_of

    other = tmp_path / "elsewhere"
    shutil.copytree(embed_artifact, other)
    lib = other / "model.so"
    digest = sha256_of(lib)
    for name, library in (("dotdot", "../elsewhere/model.so"), ("absolute", str(lib))):
        art = _copy_with_manifest(embed_artifact, tmp_path / name, library=library,
                                  sha256=digest)
        _clean_error(cli("run", art), "library", "plain file name")
    linked = _copy_with_manifest(embed_artifact, tmp_path / "linked")
    (linked / "model.so").unlink()
    (linked / "model.so").symlink_to(lib)
    _clean_error(cli("run", linked), "not a regular file inside")


def test_truncated_library_is_refused_before_dlopen(cli, embed_artifact, tmp_path):
    art = tmp_path / "truncated"
    shutil.copytree(embed_artifact, art)
    lib = art / "model.so"
    lib.write_bytes(lib.read_bytes()[:4096])
    _clean_error(cli("run", art), "truncated")


# -- data loss -------------------------------------------------------------------------------

def test_foreign_directory_with_a_manifest_is_not_replaced(cli, tmp_path):
    webapp = tmp_path / "webapp"
    webapp.mkdir()
    (webapp / "manifest.json").write_text('{"name": "My PWA", "start_url": "/"}')
    (webapp / "index.html").write_text("<h1>keep me</h1>")
    result = cli("compile", "tests.reliability_models:tiny_linear", "-o", webapp, "-q")
    _clean_error(result, "is not a slimc artifact")
    assert (webapp / "index.html").read_text() == "<h1>keep me</h1>"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["webapp"]


def test_files_added_to_an_artifact_are_kept_unless_forced(cli, tmp_path):
    out = tmp_path / "lin.slimc"
    assert cli("compile", "tests.reliability_models:tiny_linear", "-o", out, "-q").code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert "model.so" in manifest["files"]
    (out / "NOTES.md").write_text("my benchmark notes")
    result = cli("compile", "tests.reliability_models:tiny_linear", "-o", out, "-q")
    _clean_error(result, "NOTES.md", "--force")
    assert (out / "NOTES.md").read_text() == "my benchmark notes"
    # a plain recompile of slimc's own files replaces them; --force also drops NOTES.md
    result = cli("compile", "tests.reliability_models:tiny_linear", "-o", out, "-q", "--force")
    assert result.code == 0, result.err
    assert not (out / "NOTES.md").exists()
    assert cli("compile", "tests.reliability_models:tiny_linear", "-o", out, "-q").code == 0


def test_stale_staging_of_dead_processes_is_cleaned(tmp_path):
    from slimc.outdir import clean_stale_staging

    final = tmp_path / "m.slimc"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".m.slimc.{dead.pid}.x1y2.partial"
    live = tmp_path / f".m.slimc.{os.getpid()}.abcd.partial"
    old = tmp_path / f".m.slimc.old-{dead.pid}"
    for d in (stale, live, old):
        d.mkdir()
    (old / "manifest.json").write_text("{}")
    clean_stale_staging(final)
    assert not stale.exists() and live.exists()
    # a swap interrupted between its two renames: the old artifact is put back
    assert (final / "manifest.json").exists() and not old.exists()


# -- signals ---------------------------------------------------------------------------------

@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_during_build_stops_and_keeps_the_old_artifact(embed_artifact, tmp_path,
                                                              signum):
    out = tmp_path / "embed.slimc"
    shutil.copytree(embed_artifact, out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    proc = subprocess.Popen([sys.executable, "-m", "slimc.cli", "compile", EMBED, "-o",
                             str(out), "-q"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob(".embed.slimc.*.partial")):  # staging: TVM is building
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signum)
    sent = time.monotonic()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err
    assert time.monotonic() - sent < 60
    assert "interrupted" in err or "stopped" in err
    assert "Traceback" not in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["embed.slimc"]


def test_cli_main_returns_130_on_keyboard_interrupt(monkeypatch):
    """typer turns KeyboardInterrupt into 130; main() must return it, not 0."""
    from slimc import cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("slimc.plugins.get_registry", interrupted)
    assert cli.main(["passes"]) == 130


def test_watchdog_ends_a_process_that_swallows_the_signal(tmp_path):
    """Code that swallows every exception (or native code that never returns) cannot keep a
    signalled slimc alive: the watchdog removes the staging folder and exits 128 + signal."""
    staging = tmp_path / ".out.1.x.partial"
    staging.mkdir()
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from slimc import interrupts\n"
        "with interrupts.handle_signals():\n"
        f"    interrupts.register_staging(Path({str(staging)!r}))\n"
        # "ready" is printed inside the try: a signal that arrives right after it must meet
        # the swallowing handler, not end the script on the way there (a race under load).
        "    ready = False\n"
        "    while True:\n"
        "        try:\n"
        "            if not ready:\n"
        "                ready = True\n"
        "                print('ready', flush=True)\n"
        "            time.sleep(60)\n"
        "        except BaseException:\n"
        "            pass\n")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "stopped by SIGTERM" in err
    assert not staging.exists()
