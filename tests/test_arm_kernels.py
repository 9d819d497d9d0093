"""aarch64 kernels checked at the instruction level, without a board.

The schedules pick tile sizes from the target's vector width and register count; on aarch64
that is 128-bit NEON with 32 registers. These tests build real kernels for an aarch64 target
(LLVM emits the assembly; no linker, no emulator) and check what the CPU would execute: the
dense, pointwise, depthwise and attention kernels multiply-add on full 128-bit vectors
(``fmla vD.4s``), their register tiles fit NEON's register file, and the int8 W8A8 kernel uses
the Armv8.2 dot product (``sdot``) where the target has it.
"""

from __future__ import annotations

import re
from collections import Counter

import pytest
import torch

from tests.test_schedules import _lower


@pytest.fixture(autouse=True)
def _separate_kernels(monkeypatch):
    """These tests are about the separate attention matmuls; at their lengths the fused
    attention (``fused_attention``, tests/test_fused_attention.py) would replace them."""
    from slimc.backends.tvm.schedules import fused_attention

    monkeypatch.setattr(fused_attention, "ENABLED", False)


F = torch.nn.functional
NEON = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76",
        "mattr": ["+neon", "+dotprod"]}


def _target():
    import tvm

    return tvm.target.Target(NEON)


def _functions(asm: str) -> dict[str, list[str]]:
    """Assembly text -> {function label: instruction lines}."""
    out: dict[str, list[str]] = {}
    current = None
    for line in asm.splitlines():
        label = re.match(r"^([A-Za-z_][\w.$]*):", line)
        if label and not label.group(1).startswith(".L"):
            current = label.group(1)
            out[current] = []
        elif current and line.startswith("\t") and not line.lstrip().startswith((".", "//")):
            out[current].append(line.strip())
    return out


def _asm_of_module(module: torch.nn.Module, inputs) -> dict[str, list[str]]:
    import tvm
    from slimc.backends.tvm.schedules import cpu_pipeline
    from tvm import relax

    target = _target()
    with tvm.transform.PassContext(opt_level=3):
        executable = relax.build(_lower(module, inputs), target=target,
                                 relax_pipeline=cpu_pipeline(target))
    return _functions(executable.mod.imports[0].inspect_source("asm"))


def _ops(lines: list[str]) -> Counter:
    return Counter(line.split()[0] for line in lines)


class PointwiseDepthwise(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pw = torch.nn.Conv2d(16, 32, 1)
        self.dw = torch.nn.Conv2d(32, 32, 3, padding=1, groups=32)

    def forward(self, x):
        return torch.clamp(self.dw(torch.clamp(self.pw(x), 0, 6)), 0, 6)


class Attention(torch.nn.Module):
    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v


@pytest.mark.parametrize("case", ["dense", "convs", "attention"])
def test_float_kernels_multiply_add_on_128_bit_neon_vectors(case):
    torch.manual_seed(0)
    if case == "dense":
        module, inputs = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU()), (
            torch.randn(16, 64),)
        kernels = ("matmul",)
    elif case == "convs":
        module, inputs = PointwiseDepthwise(), (torch.randn(1, 16, 12, 12),)
        kernels = ("conv2d",)
    else:
        module, inputs = Attention(), tuple(torch.randn(1, 2, 40, 16) for _ in range(3))
        kernels = ("matmul",)
    functions = _asm_of_module(module.eval(), inputs)
    compute = {name: lines for name, lines in functions.items()
               if any(k in name for k in kernels) and name.endswith("_compute_")}
    assert compute, sorted(functions)
    for name, lines in compute.items():
        ops = _ops(lines)
        vector_fma = [ln for ln in lines if re.match(r"fmla\s+v\d+\.4s", ln)]
        # Every multiply-add of the inner kernel is a 4-lane vector one: no scalar fmadd,
        # no 2-lane (64-bit) fmla.
        assert len(vector_fma) >= 4, (name, ops)
        assert not [ln for ln in lines if re.match(r"fmla\s+v\d+\.2s", ln)], name
        assert ops.get("fmadd", 0) <= len(vector_fma) // 4, (name, ops)


def test_register_tiles_fit_neon():
    """Micro-kernel tiles on aarch64: vector tile a multiple of 4 lanes, accumulators <= 24
    of the 32 NEON registers (the rest hold the loaded and broadcast operands)."""
    import tvm
    from slimc.backends.tvm.schedules import cpu_matmul, fusion_passes

    target = _target()
    for module, inputs in [
        (torch.nn.Linear(64, 96), (torch.randn(16, 64),)),
        (torch.nn.Conv2d(16, 40, 1), (torch.randn(1, 16, 9, 9),)),
        (Attention(), tuple(torch.randn(1, 2, 40, 16) for _ in range(3))),
    ]:
        with target, tvm.transform.PassContext(opt_level=3):
            mod = tvm.transform.Sequential(fusion_passes(target))(_lower(module.eval(), inputs))
        checked = 0
        for gvar, func in mod.functions_items():
            if not isinstance(func, tvm.tirx.PrimFunc) or not re.search(
                    "matmul|conv2d", gvar.name_hint):
                continue
            sch = cpu_matmul.TiledMatmul().apply(func, target)
            assert sch is not None, gvar.name_hint
            update = next(b for b in _blocks(sch) if sch.get(b).name_hint.endswith("_update"))
            loops = [sch.get(lp) for lp in sch.get_loops(update)]
            vector = [lp for lp in loops if lp.kind == tvm.tirx.ForKind.VECTORIZED]
            rows = [lp for lp in loops if lp.kind == tvm.tirx.ForKind.UNROLLED]
            assert len(vector) == 1, gvar.name_hint
            nr = int(vector[0].extent)
            mr = int(rows[-1].extent) if rows else 1
            assert nr % 4 == 0 and 4 <= nr <= 16, (gvar.name_hint, nr)
            assert mr * nr // 4 <= 24, (gvar.name_hint, mr, nr)
            checked += 1
        assert checked, sorted(g.name_hint for g, _ in mod.functions_items())


def _blocks(sch):
    out = []

    def walk(block):
        for child in sch.get_child_blocks(block):
            out.append(child)
            walk(child)

    walk(sch.get_sblock("root"))
    return out


def test_w8a8_kernel_uses_sdot_on_dotprod_targets():
    """The int8 x int8 kernel issues ``sdot vD.4s, vN.16b, vM.4b[i]`` (or ``.16b``) on
    Armv8.2+dotprod, and widening multiply-adds without it."""
    import tvm
    from slimc.backends.tvm.int8_kernels import dot_kernel, kernel_kind

    target = _target()
    assert kernel_kind(target) == "sdot"
    func = dot_kernel("sdot", 8, 64, 32)
    lib = tvm.tirx.build(func, target=target) if hasattr(tvm, "tirx") and hasattr(
        tvm.tirx, "build") else tvm.build(func, target=target)
    asm = lib.inspect_source("asm")
    sdot = re.findall(r"sdot\s+v\d+\.4s,\s*v\d+\.16b,\s*v\d+\.(?:4b\[\d\]|16b)", asm)
    assert len(sdot) >= 8, asm[:2000]
