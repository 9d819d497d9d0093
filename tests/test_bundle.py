"""`--bundle`: the artifact runs on the device with the bundled TVM runtime and C runner only:
no Python, no slimc (aarch64 under qemu, and natively on the host)."""

from __future__ import annotations

import json
import platform
import subprocess

import numpy as np
import pytest


def _inputs_as_npy(artifact, work) -> list[str]:
    manifest = json.loads((artifact / "manifest.json").read_text())
    paths = []
    with np.load(artifact / "example_inputs.npz") as data:
        for spec in manifest["inputs"]:
            path = work / f"{spec['name']}.npy"
            np.save(path, data[spec["name"]])
            paths.append(str(path))
    return paths


def _reference(cli, artifact, work, *flags) -> list[np.ndarray]:
    result = cli("run", artifact, "-o", work / "ref", *flags)
    assert result.code == 0, result.err
    manifest = json.loads((artifact / "manifest.json").read_text())
    return [np.load(work / "ref" / f"{o['name']}.npy") for o in manifest["outputs"]]


def _runner_outputs(out_dir, count: int) -> list[np.ndarray]:
    return [np.load(out_dir / f"out{i}.npy") for i in range(count)]


def test_aarch64_runner_runs_the_bundle_under_qemu_without_python(cli, tmp_path,
                                                                  aarch64_emulator):
    artifact = tmp_path / "arm"
    result = cli("compile", "tests.models:two_inputs_two_outputs", "-t", "arm", "--bundle",
                 "-o", artifact, "-q")
    assert result.code == 0, result.err
    runtime = artifact / "runtime"
    assert {p.name for p in runtime.iterdir()} >= {"slimc_run", "slimc_run.c", "CMakeLists.txt",
                                                   "libtvm_runtime.so", "libtvm_ffi.so"}
    needed = subprocess.run(["readelf", "-d", str(runtime / "slimc_run")], capture_output=True,
                            text=True).stdout
    assert "libtvm_runtime.so" in needed and "python" not in needed.lower()
    out = tmp_path / "out"
    out.mkdir()
    # A bare environment: no PYTHONHOME/PYTHONPATH, nothing of slimc; qemu's -L only supplies
    # the aarch64 loader and libc/libstdc++ a board has.
    proc = subprocess.run([str(aarch64_emulator.qemu), "-L", str(aarch64_emulator.sysroot),
                           str(runtime / "slimc_run"), str(artifact / "model.so"), str(out),
                           *_inputs_as_npy(artifact, tmp_path)],
                          capture_output=True, text=True, env={}, timeout=600)
    assert proc.returncode == 0, proc.stderr
    expected = _reference(cli, artifact, tmp_path, "--emulate")
    got = _runner_outputs(out, len(expected))
    for g, e in zip(got, expected, strict=True):
        assert g.shape == e.shape and g.dtype == e.dtype
        np.testing.assert_array_equal(g, e)


@pytest.mark.skipif(platform.system() != "Linux", reason="Linux runner")
def test_host_bundle_runs_natively(cli, tmp_path):
    artifact = tmp_path / "host"
    result = cli("compile", "tests.models:two_inputs_two_outputs", "-t", "host", "--bundle",
                 "-o", artifact, "-q")
    assert result.code == 0, result.err
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run([str(artifact / "runtime" / "slimc_run"), str(artifact / "model.so"),
                           str(out), *_inputs_as_npy(artifact, tmp_path)],
                          capture_output=True, text=True, env={}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    expected = _reference(cli, artifact, tmp_path)
    for g, e in zip(_runner_outputs(out, len(expected)), expected, strict=True):
        np.testing.assert_allclose(g, e, rtol=0, atol=0)
