"""The SIMD width the CPU schedules tile for, per target, checked on any host.

TVM's ``llvm_get_vector_width`` answers 512 for an x86 ``-mcpu`` without a triple -- which is
what the host target becomes on an AVX2-only Zen 3 or Haswell -- and kernels tiled for 512-bit
registers spilled there. These targets name their CPU explicitly, so the answer does not depend
on the machine running the test.
"""

from __future__ import annotations

import pytest
import tvm
from slimc.backends.tvm.schedules.common import simd_registers, vector_bits, vector_lanes

from slimc.isa import simd_width_bits
from slimc.targets import resolve_target


@pytest.mark.parametrize(("spec", "bits"), [
    # No triple: the host target's shape (mcpu = this CPU's LLVM name).
    ({"kind": "llvm", "mcpu": "znver3"}, 256),
    ({"kind": "llvm", "mcpu": "haswell"}, 256),
    ({"kind": "llvm", "mcpu": "x86-64-v3"}, 256),
    ({"kind": "llvm", "mcpu": "x86-64-v4"}, 512),
    ({"kind": "llvm", "mcpu": "znver4"}, 512),
    ({"kind": "llvm", "mcpu": "skylake-avx512"}, 512),
    ({"kind": "llvm", "mcpu": "x86-64-v2"}, 128),
    # With a triple (the registered portable targets' shape).
    ({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver3"}, 256),
    ({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64-v3",
      "mattr": ["+avx512f"]}, 512),
    ({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}, 128),
    ({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76"}, 128),
])
def test_vector_bits_of_explicit_targets(spec, bits):
    target = tvm.target.Target(spec)
    assert vector_bits(target) == bits
    assert vector_lanes(target) == bits // 32
    assert simd_registers(target) == (32 if bits == 512 or "aarch64" in str(spec) else 16)


@pytest.mark.parametrize(("name", "bits"), [
    ("x86-64-v2", 128), ("x86-64-v3", 256), ("x86-64-v4", 512), ("x86-64-v4-vnni", 512),
    ("arm", 128), ("raspberry-pi-4", 128), ("arm-v8.6", 128)])
def test_vector_bits_of_registered_targets(name, bits):
    assert vector_bits(resolve_target(name).tvm_target()) == bits


def test_host_target_matches_its_explicit_cpu():
    """``mcpu="@host"`` (unresolved) and the resolved host target agree with this CPU's name."""
    cpu = tvm.target.codegen.llvm_get_system_cpu()
    explicit = simd_width_bits(tvm.target.Target({"kind": "llvm", "mcpu": cpu}))
    assert simd_width_bits(tvm.target.Target({"kind": "llvm", "mcpu": "@host"})) == explicit
    assert vector_bits(resolve_target("llvm").tvm_target()) == explicit
