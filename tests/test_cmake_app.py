"""examples/cmake/app: a C program built by CMake against a `--bundle` host artifact and its
bundled TVM runtime prints the same outputs as `slimc run`."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.test_bundle import _inputs_as_npy, _reference

APP = Path(__file__).resolve().parents[1] / "examples" / "cmake" / "app"


@pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("cc") is None,
                    reason="cmake and a C compiler needed")
def test_cmake_app_matches_slimc_run(cli, tmp_path):
    import tvm_ffi

    artifact = tmp_path / "host"
    result = cli("compile", "tests.models:two_inputs_two_outputs", "-t", "host", "--bundle",
                 "-o", artifact, "-q")
    assert result.code == 0, result.err
    include = Path(tvm_ffi.__file__).parent / "include"
    build = tmp_path / "build"
    for cmd in (["cmake", "-S", str(APP), "-B", str(build), f"-DSLIMC_ARTIFACT={artifact}",
                 f"-DTVM_FFI_INCLUDE={include}"], ["cmake", "--build", str(build)]):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    proc = subprocess.run([str(build / "infer"), str(artifact / "model.so"),
                           *_inputs_as_npy(artifact, tmp_path)], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    reference = _reference(cli, artifact, tmp_path)
    assert len(lines) == len(reference) == 2
    for line, ref in zip(lines, reference, strict=True):
        head, _, values = line.partition(" values ")
        shape = [int(d) for d in head.split(" shape")[1].split()]
        printed = np.array(values.split(), dtype=np.float64).reshape(shape)
        assert list(ref.shape) == shape
        np.testing.assert_allclose(printed, ref, rtol=1e-6, atol=1e-6)
