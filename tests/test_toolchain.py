"""slimc in build toolchains: CLI basics, the Python API, recipes' settings, byte-identical
artifacts, the compile cache, depfiles and the Make example."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import slimc

ROOT = Path(__file__).resolve().parent.parent
BERT_INPUTS = ("-i", "input_ids=1x8:int64", "-i", "attention_mask=1x8:int64")


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv("SLIMC_CACHE_DIR", str(path))
    monkeypatch.setenv("SLIMC_CACHE", "1")
    return path


def test_version_help_module_and_completion(cli):
    result = cli("--version")
    assert result.code == 0 and result.out.startswith(f"slimc {slimc.__version__}")
    result = cli("-h")
    assert result.code == 0 and "compile" in result.out
    assert cli("compile", "-h").code == 0
    proc = subprocess.run([sys.executable, "-m", "slimc", "--version"], capture_output=True,
                          text=True, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.startswith("slimc ")
    # typer detects the shell from the parent processes unless told not to (its own test
    # switch); under a detached runner no shell is among them ("Shell  not supported").
    env = {**os.environ, "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"}
    proc = subprocess.run([sys.executable, "-m", "slimc", "--show-completion", "bash"],
                          capture_output=True, text=True, cwd=ROOT, env=env)
    assert proc.returncode == 0 and "complete" in proc.stdout


def test_json_errors_are_the_one_result_on_stdout(cli, tmp_path):
    result = cli("compile", "tests.models:two_inputs_two_outputs", "--target", "nonsense-cpu",
                 "-o", tmp_path / "x", "--json")
    assert result.code == 2
    error = json.loads(result.out)
    assert error["exit_code"] == 2 and "nonsense-cpu" in error["error"] and error["hint"]
    result = cli("run", tmp_path / "missing", "--json")
    assert result.code == 2 and json.loads(result.out)["exit_code"] == 2
    result = cli("compile", "--no-such-flag", "--json")
    assert result.code == 2 and "no-such-flag" in json.loads(result.out)["error"]


def test_recipe_settings_are_honoured_and_flags_win(cli, tmp_path, cache_dir):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("target: x86-64-v2\nthreads: 1\ninputs:\n  a: 5x8:float32\n"
                      "  b: 5x4:float32\npipeline:\n  - eliminate-dead-code\n")
    out = tmp_path / "m"
    result = cli("compile", "tests.models:two_inputs_two_outputs", "--recipe", recipe,
                 "-o", out, "--json")
    assert result.code == 0, result.err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target"]["name"] == "x86-64-v2" and manifest["threads"] == 1
    assert [i["shape"] for i in manifest["inputs"]] == [[5, 8], [5, 4]]
    result = cli("compile", "tests.models:two_inputs_two_outputs", "--recipe", recipe,
                 "-o", out, "--target", "x86-64-v3", "-i", "b=5x4:float32", "--json")
    assert result.code == 0, result.err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target"]["name"] == "x86-64-v3"
    assert [i["shape"] for i in manifest["inputs"]] == [[5, 8], [5, 4]]
    result = cli("compile", "tests.models:two_inputs_two_outputs", "--recipe", recipe,
                 "--pipeline", "eliminate-dead-code", "--json")
    assert result.code == 2 and "--recipe and --pipeline" in json.loads(result.out)["error"]


def test_python_api_takes_module_and_exported_program(tmp_path, cache_dir):
    from tests.models import two_inputs_two_outputs

    net, inputs = two_inputs_two_outputs()
    result = slimc.compile(net, inputs, target="host", output=tmp_path / "mod")
    expected = net(**inputs)
    outputs = slimc.load(result.output)(**{k: v.numpy() for k, v in inputs.items()})
    assert list(outputs) == [o["name"] for o in result.manifest["outputs"]]
    torch.testing.assert_close(torch.from_numpy(list(outputs.values())[0]), expected[0],
                               rtol=1e-4, atol=1e-5)

    x = torch.randn(2, 8)
    program = torch.export.export(torch.nn.Linear(8, 3).eval(), (x,))
    result = slimc.compile_model(program, slimc.CompileOptions(output=tmp_path / "ep"))
    assert result.manifest["inputs"][0]["shape"] == [2, 8]
    with pytest.raises(slimc.errors.UsageError, match="example inputs"):
        slimc.compile_model(torch.nn.Linear(8, 3))


def test_cold_compiles_are_byte_identical_and_the_cache_serves_them(cli, hf_dir, tmp_path,
                                                                      cache_dir):
    bert = hf_dir("bert")
    first = cli("compile", bert, "-o", tmp_path / "a", "--no-cache", "-q", *BERT_INPUTS)
    second = cli("compile", bert, "-o", tmp_path / "b", "-q", "--json", *BERT_INPUTS,
                 "--depfile", tmp_path / "b.d")
    assert first.code == 0 and second.code == 0, first.err + second.err
    assert json.loads(second.out)["cached"] is False
    for name in ("model.so", "manifest.json", "example_inputs.npz"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert "timings" not in manifest and (tmp_path / "a" / "timings.json").is_file()
    stages = json.loads((tmp_path / "a" / "timings.json").read_text())["stages"]
    assert {"capture_s", "lower_s", "build_s", "write_s"} <= set(stages)  # every stage timed
    assert manifest["provenance"]["files"]["config.json"]

    third = cli("compile", bert, "-o", tmp_path / "c", "--json", *BERT_INPUTS,
                "--depfile", tmp_path / "c.d")
    assert third.code == 0 and json.loads(third.out)["cached"] is True
    assert (tmp_path / "c" / "model.so").read_bytes() == (tmp_path / "a" / "model.so").read_bytes()
    depfile = (tmp_path / "c.d").read_text()
    assert depfile.startswith(f"{tmp_path / 'c' / 'model.so'}:")  # -o as given
    for name in ("config.json", "model.safetensors"):
        assert str(Path(bert).resolve() / name) in depfile
    assert (tmp_path / "b.d").read_text().split(":", 1)[1] == depfile.split(":", 1)[1]

    # Changed weights are a different input: no stale hit.
    edited = tmp_path / "bert-edited"
    shutil.copytree(bert, edited)
    with open(edited / "model.safetensors", "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"\0\0\0\0")
    from slimc.api import CompileOptions, declared_files, identity

    options = CompileOptions(inputs=BERT_INPUTS[1::2])
    keys = {identity(str(m), options, declared_files(str(m), options))["key"]
            for m in (bert, edited)}
    assert len(keys) == 2


def test_cache_evicts_least_recently_used(tmp_path):
    from slimc.cache import CompileCache

    cache = CompileCache(tmp_path, max_bytes=2500)
    for i, key in enumerate(["aa" + "0" * 62, "bb" + "0" * 62, "cc" + "0" * 62]):
        art = tmp_path / f"art{i}"
        art.mkdir()
        (art / "model.so").write_bytes(bytes(1000))
        with cache.lock(key):
            cache.store(key, art, {})
        os.utime(cache._entry(key), (time.time() - 100 + i, time.time() - 100 + i))
        if i == 1:
            assert cache.lookup("aa" + "0" * 62) is not None  # a hit refreshes "aa"
    assert cache.lookup("aa" + "0" * 62) is not None
    assert cache.lookup("bb" + "0" * 62) is None and cache.lookup("cc" + "0" * 62) is not None


@pytest.fixture(scope="module")
def shared_project(tmp_path_factory, hf_dir):
    """One model folder, recipe and compile cache for the Make and CMake examples: the same
    request from both build systems is one cold compile in all."""
    root = tmp_path_factory.mktemp("project")
    shutil.copytree(hf_dir("bert"), root / "model")
    shutil.copy(ROOT / "examples" / "make" / "recipe.yaml", root / "recipe.yaml")
    return root


def _rebuilds_exactly_when_an_input_changes(build, library: Path, project: Path) -> None:
    assert "slimc" in build() and library.is_file()  # first build compiles
    assert "slimc" not in build()  # nothing changed: a no-op
    for touched in (project / "recipe.yaml", project / "model" / "model.safetensors"):
        before = library.stat().st_mtime_ns
        time.sleep(0.05)
        touched.touch()
        assert "slimc" in build()
        assert library.stat().st_mtime_ns > before
        assert "slimc" not in build()


@pytest.mark.skipif(shutil.which("make") is None, reason="make needed")
def test_make_example_rebuilds_exactly_when_an_input_changes(shared_project, tmp_path,
                                                             monkeypatch):
    monkeypatch.setenv("SLIMC_CACHE_DIR", str(shared_project / "cache"))
    monkeypatch.setenv("SLIMC_CACHE", "1")
    work = tmp_path / "proj"
    shutil.copytree(ROOT / "examples" / "make", work)
    make = ["make", "-C", str(work), f"SLIMC={sys.executable} -m slimc",
            f"MODEL={shared_project / 'model'}", f"RECIPE={shared_project / 'recipe.yaml'}",
            "TARGET=x86-64-v3", "SLIMC_FLAGS=" + " ".join(BERT_INPUTS)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def build() -> str:
        proc = subprocess.run(make, capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.replace("Entering directory", "").replace("Leaving directory", "") \
            .replace(str(shared_project), "").replace("Nothing to be done", "")

    library = work / "build" / "model.slimc" / "model.so"
    _rebuilds_exactly_when_an_input_changes(build, library, shared_project)


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake needed")
def test_cmake_module_rebuilds_exactly_when_an_input_changes(shared_project, tmp_path,
                                                             monkeypatch):
    monkeypatch.setenv("SLIMC_CACHE_DIR", str(shared_project / "cache"))
    monkeypatch.setenv("SLIMC_CACHE", "1")
    slimc_exe = Path(sys.executable).with_name("slimc")
    build_dir = tmp_path / "build"
    configure = subprocess.run(
        ["cmake", "-S", str(ROOT / "examples" / "cmake"), "-B", str(build_dir),
         f"-DSLIMC_EXECUTABLE={slimc_exe}", f"-DMODEL={shared_project / 'model'}",
         f"-DRECIPE={shared_project / 'recipe.yaml'}", "-DTARGET=x86-64-v3",
         "-DSLIMC_INPUTS=" + ";".join(BERT_INPUTS[1::2])],
        capture_output=True, text=True, timeout=300)
    assert configure.returncode == 0, configure.stderr
    assert str(ROOT / "slimc" / "cmake") in (build_dir / "CMakeCache.txt").read_text()

    def build() -> str:
        proc = subprocess.run(["cmake", "--build", str(build_dir)], capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout.replace("encoder_slimc", "")

    library = build_dir / "encoder.slimc" / "model.so"
    _rebuilds_exactly_when_an_input_changes(build, library, shared_project)
    manifest = json.loads((build_dir / "encoder.slimc" / "manifest.json").read_text())
    assert manifest["target"]["name"] == "x86-64-v3"


def test_recipe_library_is_valid():
    from slimc.pipeline import load_recipe, recipe_items, validate
    from slimc.plugins import get_registry
    from slimc.targets import resolve_target

    recipes = sorted((ROOT / "recipes").glob("*.yaml"))
    assert {"llm-int4.yaml", "bert-int8.yaml", "cnn-edge.yaml"} <= {r.name for r in recipes}
    for path in recipes:
        data = load_recipe(path)
        assert validate(recipe_items(data, str(path)), get_registry().passes)
        resolve_target(data.get("target", "llvm"))
