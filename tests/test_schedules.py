"""The default CPU schedules: every rule, on awkward shapes, compared with PyTorch.

Real TVM builds, no mocks. Each case also checks *which* rule scheduled the kernel, so a rule
that silently stops matching (and leaves the work to the slow fallback) is caught too. A few
cases are rebuilt for aarch64 and run under qemu, where the vector width (NEON, 128 bits) and
register count change the tile sizes.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from slimc.targets import resolve_target

F = torch.nn.functional


def _lower(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]):
    from tvm.relax.frontend.torch import from_exported_program

    program = torch.export.export(module.eval(), inputs)
    return from_exported_program(program, keep_params_as_input=False)


def _build_run(module, inputs, tmp_path: Path, target: str = "llvm", cross: str | None = None,
               caplog=None) -> tuple[list[np.ndarray], list[str]]:
    """Build ``module`` with slimc's pipeline, run it, return outputs and 'rule kernel' lines."""
    from slimc.backends.tvm.build import build_library
    from slimc.backends.tvm.runtime import run_library

    spec = resolve_target(target)
    if caplog is not None:
        caplog.clear()
        caplog.set_level(logging.DEBUG, logger="slimc.schedules")
    library = build_library(_lower(module, inputs), spec, tmp_path / "k.so")
    applied = [r.getMessage() for r in caplog.records
               if r.name == "slimc.schedules"] if caplog is not None else []
    outputs = run_library(library, [x.numpy() for x in inputs], cross_triple=cross, threads=2)
    return outputs, applied


def _check(module, inputs, tmp_path, caplog, rule: str | tuple[str, ...] | None,
           tol: float = 1e-5, **kw):
    got, applied = _build_run(module, inputs, tmp_path, caplog=caplog, **kw)
    with torch.no_grad():
        want = module(*inputs)
    want = [want] if isinstance(want, torch.Tensor) else list(want)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        w = w.numpy()
        assert g.shape == w.shape
        err = np.linalg.norm(g - w) / max(np.linalg.norm(w), 1e-12)
        assert err < tol, f"relative L2 error {err:.3g}"
    if rule is not None:
        rules = (rule,) if isinstance(rule, str) else rule
        assert any(line.startswith(f"rule {r} scheduled") for r in rules for line in applied), \
            applied
    assert not [line for line in applied if "failed" in line or "left unscheduled" in line], \
        applied


class Linear(torch.nn.Module):
    """``nn.Linear`` plus an optional activation and residual: the fused-epilogue cases."""

    def __init__(self, k: int, n: int, bias: bool = True, act: str | None = None,
                 residual: bool = False) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(k, n, bias=bias)
        self.act, self.residual = act, residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        if self.act == "gelu":
            y = F.gelu(y)
        elif self.act == "relu":
            y = torch.relu(y)
        elif self.act == "silu":
            y = F.silu(y)
        if self.residual:
            y = y + x[..., : y.shape[-1]]
        return y


@pytest.mark.parametrize("shape,k,n,kwargs", [
    ((7, 37), 37, 53, {}),  # nothing divides a tile
    ((3, 5, 48), 48, 40, {"bias": False}),  # batch > 1, no bias
    ((2, 9, 32), 32, 80, {"act": "gelu"}),  # bias + GELU epilogue
    ((1, 11, 64), 64, 64, {"act": "relu", "residual": True}),  # bias + ReLU + residual
    ((5, 33), 33, 200, {"act": "silu"}),  # 5 rows: more than a GEMV
    ((130, 16), 16, 3, {}),  # narrow output: vector axis shorter than a register
], ids=["odd", "batch", "gelu", "relu-res", "silu", "narrow"])
def test_matmul_rule(shape, k, n, kwargs, tmp_path, caplog):
    torch.manual_seed(0)
    _check(Linear(k, n, **kwargs), (torch.randn(*shape),), tmp_path, caplog, "tiled-matmul")


@pytest.mark.parametrize("shape,k,n,kwargs", [
    ((1, 1, 64), 64, 96, {}),  # decode step: two-vector panels
    ((1, 1, 40), 40, 192, {"act": "silu"}),  # fused-away epilogue
    ((2, 2, 33), 33, 7, {"bias": False}),  # 4 rows, odd sizes: 1-lane panels
], ids=["decode", "panel64", "odd"])
def test_few_row_products_use_packed_panels(shape, k, n, kwargs, tmp_path, caplog):
    """Matrix-vector products (<= ``gemv.MAX_ROWS`` rows) go to the packed-panel kernel."""
    from slimc.backends.tvm.schedules import fusion_passes

    torch.manual_seed(0)
    module, inputs = Linear(k, n, **kwargs), (torch.randn(*shape),)
    target = resolve_target("llvm").tvm_target()
    with target:
        fused = fusion_passes(target)[0](_lower(module, inputs))
        import tvm

        fused = tvm.transform.Sequential(fusion_passes(target)[1:])(fused)
    from slimc.backends.tvm.schedules.common import vector_lanes

    # The multi-row matmul's panel width (two vectors) where it divides N: a weight that both
    # a prefill matmul and a decode GEMV read is then stored once.
    wide = 2 * vector_lanes(target, 32)
    lanes = wide if n % wide == 0 and n > wide else \
        64 if n % 64 == 0 else next(t for t in (16, 8, 4, 2, 1) if n % t == 0)
    panels = [call.args[1][1].ty.shape for call in _call_tirs(fused["main"])
              if call.args[0].name_hint.startswith("slimc_linear_fp32")]
    assert [[int(d) for d in shape] for shape in panels] == [[n // lanes, k, lanes]]
    got, _ = _build_run(module, inputs, tmp_path, caplog=caplog)
    with torch.no_grad():
        want = module(*inputs).numpy()
    np.testing.assert_allclose(got[0], want, rtol=1e-5, atol=1e-5)


def _gemv_panels(module, inputs, target) -> list[list[int]]:
    """Shapes of the packed weight panels the fusion passes give the fp32 GEMV kernels."""
    import tvm
    from slimc.backends.tvm.schedules import fusion_passes

    with target:
        fused = fusion_passes(target)[0](_lower(module, inputs))
        fused = tvm.transform.Sequential(fusion_passes(target)[1:])(fused)
    return [[int(d) for d in call.args[1][1].ty.shape] for call in _call_tirs(fused["main"])
            if call.args[0].name_hint.startswith("slimc_linear_fp32")]


def test_classifier_columns_are_padded_to_whole_vector_panels(tmp_path, caplog):
    """A 1000-class classifier at batch 1 on AVX-512: only 8-lane panels divide 1000 (one
    latency-bound multiply-add chain of half a vector); its constant weight is padded with
    zero columns to 1024 and runs 32-lane panels, the output cropped back to 1000, exact
    against PyTorch. On AVX2, where 8 lanes are a whole vector, the panels stay 8 wide."""
    import tvm

    torch.manual_seed(0)
    module, inputs = Linear(64, 1000), (torch.randn(1, 64),)
    avx512 = resolve_target("x86-64-v4-vnni").tvm_target()
    assert _gemv_panels(module, inputs, avx512) == [[32, 64, 32]]
    avx2 = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu",
                              "mcpu": "x86-64-v3"})
    assert _gemv_panels(module, inputs, avx2) == [[125, 64, 8]]
    got, _ = _build_run(module, inputs, tmp_path, target="x86-64-v4-vnni", caplog=caplog)
    with torch.no_grad():
        want = module(*inputs).numpy()
    assert got[0].shape == (1, 1000)
    np.testing.assert_allclose(got[0], want, rtol=1e-5, atol=1e-5)


def _call_tirs(func) -> list:
    from tvm import relax

    calls = []
    relax.analysis.post_order_visit(func, lambda e: calls.append(e) if isinstance(
        e, relax.Call) and getattr(e.op, "name", "") == "relax.call_tir" else None)
    return calls


class BatchMatmul(torch.nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a @ b


@pytest.mark.parametrize("a,b", [
    ((3, 5, 17), (3, 17, 9)),
    ((2, 4, 33, 8), (2, 4, 8, 33)),  # attention scores, heads as a second batch axis
    ((1, 1, 1, 24), (1, 1, 24, 19)),
])
def test_batch_matmul_rule(a, b, tmp_path, caplog):
    torch.manual_seed(0)
    _check(BatchMatmul(), (torch.randn(*a), torch.randn(*b)), tmp_path, caplog, "tiled-matmul")


class ConvBnRelu(torch.nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1,
                 padding: int = 0, bn: bool = False) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups)
        self.bn = torch.nn.BatchNorm2d(cout) if bn else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return torch.relu(self.bn(y)) if self.bn is not None else y


@pytest.mark.parametrize("x,args", [
    ((2, 3, 13, 11), dict(cin=3, cout=8, kernel=3, padding=1)),
    ((1, 5, 17, 17), dict(cin=5, cout=7, kernel=3, stride=2, padding=1)),
    ((1, 8, 15, 15), dict(cin=8, cout=8, kernel=3, padding=1, groups=8)),  # depthwise
    ((1, 16, 9, 9), dict(cin=16, cout=24, kernel=1)),  # pointwise 1x1
    ((1, 6, 10, 20), dict(cin=6, cout=12, kernel=3, padding=1, bn=True)),
], ids=["3x3", "stride2", "depthwise", "1x1", "bn-relu"])
def test_conv2d_rule(x, args, tmp_path, caplog):
    torch.manual_seed(0)
    net = ConvBnRelu(**args).eval()
    if net.bn is not None:
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
    _check(net, (torch.randn(*x),), tmp_path, caplog, "tiled-matmul")


class ConvPool(torch.nn.Module):
    """Pooling after a conv (so in NHWC): vectorized across channels by the fallback."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 20, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.max_pool2d(self.conv(x), 3, 2, 1)
        return torch.cat([F.adaptive_avg_pool2d(y, 1).flatten(1), y.sum((2, 3))], 1)


def test_pooling_after_conv(tmp_path, caplog):
    torch.manual_seed(0)
    _check(ConvPool(), (torch.randn(2, 3, 15, 13),), tmp_path, caplog, "fallback")


class Norms(torch.nn.Module):
    def __init__(self, kind: str, n: int) -> None:
        super().__init__()
        self.kind = kind
        self.norm = {"layernorm": torch.nn.LayerNorm(n), "rmsnorm": torch.nn.RMSNorm(n)}.get(kind)
        if self.norm is not None:
            torch.nn.init.uniform_(self.norm.weight, 0.5, 1.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "softmax":
            return torch.softmax(x, -1)
        if self.kind == "masked-softmax":
            return torch.softmax(x.masked_fill(x > 1.0, float("-inf")), -1)
        return self.norm(x)


@pytest.mark.parametrize("kind,shape", [
    ("softmax", (2, 3, 37)),
    ("softmax", (5, 64, 1)),  # rows of one element: TVM drops the reduction, any rule may take it
    ("masked-softmax", (3, 4, 19)),
    ("layernorm", (2, 5, 37)),
    ("layernorm", (1, 1, 384)),
    ("rmsnorm", (3, 45)),
])
def test_row_reduction_rule(kind, shape, tmp_path, caplog):
    torch.manual_seed(0)
    rule = ("row-reduction", "fallback") if shape[-1] == 1 else "row-reduction"
    _check(Norms(kind, shape[-1]), (torch.randn(*shape),), tmp_path, caplog, rule)


class Elementwise(torch.nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        z = x.transpose(1, 2) + y
        return torch.tanh(z) * torch.sigmoid(z) + torch.exp(-z * z) + z.mean(-1, keepdim=True)


def test_fallback_elementwise_and_fast_math(tmp_path, caplog):
    """Transposes, broadcasts, a reduction over an odd axis and every fast-math function."""
    torch.manual_seed(0)
    _check(Elementwise(), (torch.randn(2, 7, 5), torch.randn(2, 5, 7)), tmp_path, caplog, None)


def test_every_kernel_of_small_models_is_scheduled(hf_dir):
    """No kernel of a BERT or a CNN is left as TVM's naive loops."""
    import tvm
    from slimc.backends.tvm.lower import lower_to_relax
    from slimc.backends.tvm.schedules import apply_cpu_schedules, fusion_passes

    from slimc.capture import capture, load_model
    from slimc.plugins import get_registry

    registry = get_registry()
    target = resolve_target("llvm").tvm_target()
    for model in (hf_dir("bert"), "tests.models:small_cnn"):
        ir, _ = capture(load_model(model, {}, registry))
        mod = lower_to_relax(ir, registry.converters)
        with target:
            mod = tvm.transform.Sequential(fusion_passes(target))(mod)
        mod = apply_cpu_schedules(mod, target)
        unscheduled = [gv.name_hint for gv, f in mod.functions_items()
                       if isinstance(f, tvm.tirx.PrimFunc) and not f.attrs.get("tirx.is_scheduled")]
        assert not unscheduled, f"{model}: {unscheduled}"


class _Raises:
    name = "raises"

    def apply(self, func, target):
        raise RuntimeError("this rule is broken")


def test_a_failing_rule_falls_back_to_correct_code(tmp_path):
    from slimc.backends.tvm.schedules import apply_cpu_schedules
    from slimc.backends.tvm.schedules.fallback import Fallback

    torch.manual_seed(0)
    module, x = Linear(19, 23), torch.randn(3, 19)
    target = resolve_target("llvm").tvm_target()
    import tvm
    from slimc.backends.tvm.schedules import fusion_passes
    from tvm import relax

    with target:
        mod = tvm.transform.Sequential(fusion_passes(target))(_lower(module, (x,)))
    mod = apply_cpu_schedules(mod, target, rules=(_Raises(), Fallback()))
    executable = relax.build(mod, target=target)
    vm = relax.VirtualMachine(executable, tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x.numpy()))[0].numpy()
    np.testing.assert_allclose(got, module(x).detach().numpy(), rtol=1e-5, atol=1e-5)


class ArmMix(torch.nn.Module):
    """One model touching every rule, so aarch64 needs a single build and qemu run."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.dw = torch.nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.fc = torch.nn.Linear(6 * 9, 37)
        self.norm = torch.nn.LayerNorm(37)

    def forward(self, image: torch.Tensor, tokens: torch.Tensor):
        y = torch.relu(self.dw(torch.relu(self.conv(image))))  # (2, 6, 5, 9)
        h = self.norm(F.gelu(self.fc(y.permute(0, 2, 1, 3).reshape(2, 5, 54))))
        scores = torch.softmax(h @ tokens.transpose(1, 2), -1)  # (2, 5, 11)
        return scores, h


def test_rules_on_aarch64_under_qemu(tmp_path, aarch64_emulator, caplog):
    torch.manual_seed(0)
    net = ArmMix().eval()
    inputs = (torch.randn(2, 3, 5, 9), torch.randn(2, 11, 37))
    got, applied = _build_run(net, inputs, tmp_path, target="arm", cross="aarch64-linux-gnu",
                              caplog=caplog)
    with torch.no_grad():
        want = net(*inputs)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w.numpy(), rtol=1e-4, atol=1e-4)
    for rule in ("tiled-matmul", "row-reduction"):
        assert any(line.startswith(f"rule {rule} scheduled") for line in applied), applied


def test_tiny_bert_compiles_and_verifies(hf_dir, tmp_path):
    import slimc

    result = slimc.compile_model(hf_dir("bert"), slimc.CompileOptions(output=tmp_path / "b"))
    assert result.manifest["verification"]["passed"] is True
    assert result.manifest["verification"]["relative_l2_vs_ir"] < 1e-4


def test_single_row_norm_computes_its_reduction_once():
    """A decode step's RMS norm (one row): the reduction must sit outside the column loop."""
    import tvm
    from slimc.backends.tvm.schedules import fusion_passes, schedule_prim_func

    module, inputs = Norms("rmsnorm", 576), (torch.randn(1, 1, 576),)
    target = resolve_target("llvm").tvm_target()
    with target:
        fused = tvm.transform.Sequential(fusion_passes(target))(_lower(module, inputs))
    norms = [(gv.name_hint, f) for gv, f in fused.functions_items()
             if isinstance(f, tvm.tirx.PrimFunc) and "mean" in gv.name_hint]
    assert norms
    for name, func in norms:
        text = schedule_prim_func(func, target, name=name).script()
        body = text.split("_red\"):")[0]  # the loops enclosing the reduction block
        assert "range(T.int64(576))" not in body, text


# --- Winograd convolutions ---------------------------------------------------------------------


@pytest.mark.parametrize("m", [2, 4])
def test_winograd_matrices_compute_a_correlation(m):
    """``A^T [(G g) * (B^T d)]`` is the valid correlation of ``d`` with ``g`` (1-D identity)."""
    from slimc.backends.tvm.schedules.winograd import MATRICES

    at, g, bt = (np.asarray(x, dtype=np.float64) for x in MATRICES[m])
    rng = np.random.default_rng(m)
    d, w = rng.standard_normal(m + 2), rng.standard_normal(3)
    np.testing.assert_allclose(at @ ((g @ w) * (bt @ d)), np.correlate(d, w, "valid"),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape,m", [
    ((1, 56, 56, 64, 64), 4), ((1, 28, 28, 128, 128), 4),  # ResNet-18's first two stages
    ((1, 14, 14, 256, 256), 2),  # 4x4 tiles would take 4x the filter bytes
    ((1, 7, 7, 512, 512), None),  # 9.4 MB filters: even 2x2 tiles would add 7.4 MB each
    ((1, 8, 8, 16, 16), 2), ((16, 4, 4, 16, 16), 4),  # tiles counted over the batch
    ((1, 5, 5, 64, 64), None),  # fewer than 16 tiles: direct conv
])
def test_winograd_tile_size_policy(shape, m):
    from slimc.backends.tvm.schedules.winograd import tile_size

    assert tile_size(*shape) == m


class BasicBlock(torch.nn.Module):
    """ResNet's basic block: two 3x3 convs with batch norm, ReLU and a residual add."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.conv2 = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1, self.bn2 = torch.nn.BatchNorm2d(channels), torch.nn.BatchNorm2d(channels)
        for bn in (self.bn1, self.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + x)


def _winograd_tiles(module, inputs) -> list[int]:
    """The ``m`` of every Winograd input transform in the fused module (empty: direct convs)."""
    import tvm
    from slimc.backends.tvm.schedules import fusion_passes
    from slimc.backends.tvm.schedules.winograd import TILE_ATTR

    target = resolve_target("llvm").tvm_target()
    with target:
        fused = tvm.transform.Sequential(fusion_passes(target))(_lower(module, inputs))
    tiles = []
    for _, func in fused.functions_items():
        text = func.script() if hasattr(func, "body") else ""
        if "winograd_input\"" in text:
            tiles.append(int(text.split(f'"{TILE_ATTR}": ')[1].split("}")[0]))
    return tiles


@pytest.mark.parametrize("x,args,tiles", [
    ((1, 16, 28, 28), dict(cin=16, cout=24, kernel=3, padding=1), [4]),  # whole 4x4 tiles
    ((2, 5, 30, 29), dict(cin=5, cout=7, kernel=3, padding=1), [4]),  # batch 2, cropped tiles,
    # channels no multiple of a vector
    ((1, 8, 7, 9), dict(cin=8, cout=8, kernel=3, padding=1, bn=True), [2]),  # odd map, BN
    ((1, 4, 10, 12), dict(cin=4, cout=12, kernel=3), [2]),  # no padding
    ((1, 8, 5, 5), dict(cin=8, cout=8, kernel=3, padding=1), []),  # 9 tiles: direct conv
], ids=["f4", "f4-cropped", "f2-bn", "f2-valid", "direct"])
def test_winograd_convs(x, args, tiles, tmp_path, caplog):
    torch.manual_seed(0)
    net = ConvBnRelu(**args).eval()
    if net.bn is not None:
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
    inputs = (torch.randn(*x),)
    assert _winograd_tiles(net, inputs) == tiles
    rules = ("winograd-transform", "tiled-matmul") if tiles else ("tiled-matmul",)
    _check(net, inputs, tmp_path, caplog, rules, tol=1e-5)
    if tiles:
        assert any(line.startswith("rule winograd-transform scheduled")
                   for line in caplog.messages), caplog.messages


def test_winograd_basic_block_fuses_batch_norm_relu_and_residual(tmp_path, caplog):
    torch.manual_seed(0)
    net, inputs = BasicBlock(16).eval(), (torch.randn(1, 16, 32, 32),)
    assert _winograd_tiles(net, inputs) == [4, 4]
    _check(net, inputs, tmp_path, caplog, "winograd-transform", tol=1e-5)


def test_winograd_on_aarch64_under_qemu(tmp_path, aarch64_emulator, caplog):
    torch.manual_seed(0)
    net, inputs = BasicBlock(8).eval(), (torch.randn(1, 8, 28, 20),)
    got, applied = _build_run(net, inputs, tmp_path, target="arm", cross="aarch64-linux-gnu",
                              caplog=caplog)
    with torch.no_grad():
        want = net(*inputs).numpy()
    np.testing.assert_allclose(got[0], want, rtol=1e-4, atol=1e-4)
    assert any(line.startswith("rule winograd-transform scheduled") for line in applied)


# --- Weights packed into panels at build time ---------------------------------------------------


@pytest.mark.parametrize("module,inputs,packed", [
    (Linear(48, 96), (torch.randn(2, 9, 48),), (3, 48, 32)),  # W^T [48, 96] -> [96/32, 48, 32]
    (ConvBnRelu(8, 64, 3, stride=2, padding=1), (torch.randn(1, 8, 12, 12),),
     (2, 3, 3, 8, 32)),  # HWIO [3, 3, 8, 64] -> [64/32, 3, 3, 8, 32]
], ids=["dense", "conv"])
def test_constant_operands_are_packed_at_build_time(module, inputs, packed, tmp_path, caplog):
    """The weight reaches the kernel as NR-wide panels, computed once by the build (the panel
    widths are AVX-512's, so the shapes are checked for that target whatever the host; the
    host build then runs and is compared with PyTorch)."""
    import tvm
    from slimc.backends.tvm.schedules import apply_cpu_schedules, fusion_passes, prepack_passes

    torch.manual_seed(0)
    target = resolve_target("x86-64-v4-vnni").tvm_target()
    with target:
        mod = tvm.transform.Sequential(fusion_passes(target))(_lower(module.eval(), inputs))
        mod = tvm.transform.Sequential(prepack_passes())(apply_cpu_schedules(mod, target))
    shapes = [tuple(int(d) for d in arg.ty.shape) for call in _call_tirs(mod["main"])
              for arg in call.args[1] if type(arg).__name__ == "GenericConst"]
    assert packed in shapes, shapes
    assert not [c for c in _call_tirs(mod["main"]) if "weight_prepack" in c.args[0].name_hint]
    _check(module, inputs, tmp_path, caplog, "tiled-matmul")
