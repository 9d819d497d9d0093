"""Portable x86 / aarch64 levels: the library uses only what its level allows, the manifest says
what it needs, and a CPU lacking it is refused (exit 2) instead of dying with SIGILL."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from slimc.isa import cpu_flags, host_arch

x86_only = pytest.mark.skipif(host_arch() != "x86_64", reason="x86 host needed")

#: AVX-512 shows up as zmm registers, opmask registers k0-k7, or the EVEX-only xmm/ymm16-31.
AVX512_OPERAND = re.compile(r"%zmm\d+|%k[0-7]\b|%[xy]mm(1[6-9]|2\d|3[01])\b")


def avx512_instructions(library) -> int:
    text = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(library)], check=True,
                          capture_output=True, text=True).stdout
    return sum(1 for line in text.splitlines() if AVX512_OPERAND.search(line))


@x86_only
@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump needed")
def test_x86_64_v3_library_has_no_avx512(cli, hf_dir, tmp_path):
    bert = hf_dir("bert")
    for target in ("x86-64-v3", "x86-64-v4"):
        result = cli("compile", bert, "-t", target, "-o", tmp_path / target, "-q",
                     "-i", "input_ids=1x16:int64", "-i", "attention_mask=1x16:int64")
        assert result.code == 0, result.err
    # The check finds AVX-512 where it is allowed (so zero below means something) ...
    assert avx512_instructions(tmp_path / "x86-64-v4" / "model.so") > 0
    # ... and the portable level has none.
    assert avx512_instructions(tmp_path / "x86-64-v3" / "model.so") == 0
    isa = json.loads((tmp_path / "x86-64-v3" / "manifest.json").read_text())["isa"]
    assert isa["level"] == "x86-64-v3" and "avx2" in isa["features"]
    assert not any(f.startswith("avx512") for f in isa["features"])


def test_x86_means_v3_and_host_says_so():
    from slimc.isa import required_isa
    from slimc.targets import resolve_target

    assert resolve_target("x86").name == "x86-64-v3"
    host = required_isa(resolve_target("host"))
    assert host["level"] == "host" and "build machine" in host["note"]
    vnni = required_isa(resolve_target("x86-64-v4-vnni"))
    assert "avx512_vnni" in vnni["features"] and "avx512f" in vnni["features"]
    assert required_isa(resolve_target("arm-v8.2"))["features"] == ["asimd", "asimddp"]
    assert "i8mm" in required_isa(resolve_target("arm-v8.6"))["features"]


def test_int8_kernel_choice_follows_the_target_not_the_host():
    """VNNI kernels only where the target level allows them, whatever this CPU has; AVX2's
    ``vpmaddwd`` kernel on the AVX2 levels without VNNI, the generic kernel below them."""
    from slimc.backends.tvm.int8_kernels import kernel_kind

    from slimc.targets import resolve_target

    assert kernel_kind(resolve_target("x86-64-v2").tvm_target()) == "generic"
    assert kernel_kind(resolve_target("x86-64-v3").tvm_target()) == "avx2"
    assert kernel_kind(resolve_target("x86").tvm_target()) == "avx2"
    assert kernel_kind(resolve_target("x86-64-v4").tvm_target()) == "avx2"
    assert kernel_kind(resolve_target("x86-64-v4-vnni").tvm_target()) == "vnni"
    assert kernel_kind(resolve_target("arm").tvm_target()) == "generic"
    assert kernel_kind(resolve_target("arm-v8.2").tvm_target()) == "sdot"


@x86_only
def test_artifact_needing_missing_cpu_feature_is_refused(cli, tmp_path):
    out = tmp_path / "m"
    result = cli("compile", "tests.models:two_inputs_two_outputs", "-t", "x86-64-v2", "-o", out,
                 "-q")
    assert result.code == 0, result.err
    assert cli("run", out, "--json").code == 0  # every x86-64 CPU slimc runs on has v2
    flags = cpu_flags() or set()
    lacking = next(f for f in ("amx_tile", "avx512_fp16", "avx10_2", "sve2", "i8mm")
                   if f not in flags)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["isa"]["features"].append(lacking)
    (out / "manifest.json").write_text(json.dumps(manifest))
    result = cli("run", out)
    assert result.code == 2
    assert lacking in result.err and "illegal instruction" in result.err

    manifest["isa"] = {**manifest["isa"], "arch": "aarch64", "features": ["asimd"]}
    (out / "manifest.json").write_text(json.dumps(manifest))
    result = cli("run", out)
    assert result.code == 2 and "aarch64" in result.err


def _tiny_library(tmp_path, target: str):
    import torch
    from slimc.backends.tvm.build import build_library
    from tvm.relax.frontend.torch import from_exported_program

    from slimc.targets import resolve_target

    torch.manual_seed(0)
    program = torch.export.export(torch.nn.Linear(8, 4).eval(), (torch.randn(1, 8),))
    module = from_exported_program(program, keep_params_as_input=False)
    return build_library(module, resolve_target(target), tmp_path / f"{target}.so")


@x86_only
def test_bare_library_records_its_instruction_set_and_is_refused_where_it_cannot_run(tmp_path):
    """A library loaded without its manifest (a test, a benchmark, `slimc.load` of a bare
    ``model.so``) is checked too: it carries its ISA record in an ELF section."""
    import numpy as np
    from slimc.backends.tvm.runtime import NativeRunner

    from slimc.isa import CpuMismatch, library_isa, required_isa
    from slimc.targets import resolve_target

    portable = _tiny_library(tmp_path, "x86-64-v2")
    assert library_isa(portable) == json.loads(json.dumps(
        required_isa(resolve_target("x86-64-v2"))))
    (out,) = NativeRunner(portable, threads=1)([np.ones((1, 8), np.float32)])
    assert out.shape == (1, 4)

    arm = _tiny_library(tmp_path, "arm")
    assert library_isa(arm)["arch"] == "aarch64"
    with pytest.raises(CpuMismatch, match="aarch64"):
        NativeRunner(arm, threads=1)
    if "avx512f" not in (cpu_flags() or {"avx512f"}):  # an AVX2 machine: AVX-512 is refused
        with pytest.raises(CpuMismatch, match="avx512f"):
            NativeRunner(_tiny_library(tmp_path, "x86-64-v4"), threads=1)
    assert library_isa(tmp_path) is None and library_isa(__file__) is None
