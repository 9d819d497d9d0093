"""Mobile-CNN and vision-transformer kernels: no layout traffic, no predicated tails.

MobileNet-style blocks (TF "same" padding as an explicit ``F.pad``, ReLU6 as ``clamp``) must
stay NHWC end to end -- the pad folded into the conv, the clip fused into its epilogue, no
transposes of activations except at the network's edges -- and compute what PyTorch computes.
Attention over a token count no tile divides (ViT's 197) runs padded, and is still exact.
Real TVM builds, compared with PyTorch.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from tests.test_schedules import _build_run, _check, _lower

F = torch.nn.functional


class TfPaddedBlock(torch.nn.Module):
    """MobileNetV2 inverted residual with TF padding: 1x1 expand, padded depthwise, 1x1 project."""

    def __init__(self, cin: int, mid: int, stride: int) -> None:
        super().__init__()
        self.expand = torch.nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(mid)
        self.dw = torch.nn.Conv2d(mid, mid, 3, stride, 0, groups=mid, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(mid)
        self.project = torch.nn.Conv2d(mid, cin, 1)
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.clamp(self.bn1(self.expand(F.pad(x, (0, 0, 0, 0)))), 0.0, 6.0)
        # TF "same": the extra row/column of padding goes after (bottom/right) for stride 2.
        pad = (0, 1, 0, 1) if self.stride == 2 else (1, 1, 1, 1)
        y = torch.clamp(self.bn2(self.dw(F.pad(y, pad))), 0.0, 6.0)
        y = self.project(y)
        return y + x if self.stride == 1 else y


def _randomize_bn(net: torch.nn.Module) -> torch.nn.Module:
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return net.eval()


def _fused(module, inputs):
    """The module after slimc's fusion passes (what the schedules see)."""
    import tvm
    from slimc.backends.tvm.schedules import fusion_passes

    target = tvm.target.Target({"kind": "llvm"})
    mod = _lower(module, inputs)
    with target, tvm.transform.PassContext(opt_level=3):
        return tvm.transform.Sequential(fusion_passes(target))(mod)


@pytest.mark.parametrize("stride,size", [(2, 14), (1, 9)], ids=["stride2-asym", "stride1"])
def test_tf_padded_block_is_exact_and_stays_nhwc(stride, size, tmp_path, caplog):
    torch.manual_seed(0)
    net = _randomize_bn(TfPaddedBlock(8, 24, stride))
    x = torch.randn(1, 8, size, size)
    _check(net, (x,), tmp_path, caplog, "tiled-matmul")

    from tvm import tirx

    kernels = {g.name_hint: f for g, f in _fused(net, (x,)).functions_items()
               if isinstance(f, tirx.PrimFunc)}
    # One kernel per conv (pad, BN, ReLU6 and residual fused in), plus the input and output
    # layout changes of the network's edges; no pad, clip or transpose kernels in between.
    convs = [n for n in kernels if "conv2d" in n]
    assert len(convs) == 3, sorted(kernels)
    assert not [n for n in kernels if "pad" in n or "clip" in n], sorted(kernels)
    assert len([n for n in kernels if "transpose" in n]) <= 2, sorted(kernels)


class Attention(torch.nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        scores = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
        return scores @ v


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "separate"])
@pytest.mark.parametrize("tokens,windows", [(197, 1), (50, 1), (49, 4)])
def test_attention_over_untiled_token_counts(tokens, windows, fused, tmp_path, caplog,
                                             monkeypatch):
    """Scores ``[.., T, T]`` with ``T`` no vector tile divides (ViT's 197 tokens, Swin's 7 x 7
    windows): exact values from the fused attention kernel, which takes these shapes, and from
    the padded separate kernels that attentions it does not take (longer, dynamic) still get."""
    from slimc.backends.tvm.schedules import fused_attention

    monkeypatch.setattr(fused_attention, "ENABLED", fused)
    torch.manual_seed(0)
    q, k, v = (torch.randn(windows, 3, tokens, 32) for _ in range(3))
    rules = ("tiled-matmul", "row-reduction")
    _check(Attention(), (q, k, v), tmp_path, caplog, None if fused else rules)
    if fused:  # one kernel: no scores matmul or softmax row reduction was scheduled apart
        applied = [r.getMessage() for r in caplog.records if r.name == "slimc.schedules"]
        assert not [m for m in applied for r in rules if m.startswith(f"rule {r} scheduled")]


def test_static_vector_tails_are_padded_only_for_run_time_operands():
    """The key axis of ``q @ k^T`` is padded; a weight's output axis never is."""
    import tvm
    from slimc.backends.tvm.schedules import cpu_matmul

    target = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu",
                                "mcpu": "skylake-avx512"})

    def pads(module, inputs) -> list[str]:
        mod = _fused(module, inputs)
        names = []
        for gvar, func in mod.functions_items():
            if isinstance(func, tvm.tirx.PrimFunc) and "matmul" in gvar.name_hint:
                sch = cpu_matmul.TiledMatmul().apply(func, target)
                assert sch is not None
                names += [sch.get(b).name_hint for b in
                          sch.get_child_blocks(sch.get_sblock("root"))]
        return [n for n in names if n.endswith("_pad")]

    class Scores(torch.nn.Module):
        def forward(self, q, k):
            return q @ k.transpose(-1, -2)

    q = torch.randn(1, 2, 197, 32)
    assert pads(Scores(), (q, q)), "the 197-wide key axis should be padded"
    # 49 keys (Swin's 7 x 7 windows) pad to 64 (+31%): still padded, a predicated tail would
    # make the whole micro-kernel scalar
    q = torch.randn(4, 3, 49, 32)
    assert pads(Scores(), (q, q)), "the 49-wide key axis should be padded"
    linear = torch.nn.Linear(32, 197).eval()  # 197 output columns of a constant weight
    assert not pads(linear, (torch.randn(5, 32),))


def test_tf_padding_folds_into_asymmetric_conv_padding():
    """``F.pad`` widths land in the conv's ``(top, left, bottom, right)`` padding, exactly."""
    import tvm
    from slimc.backends.tvm.schedules.nhwc_rewrites import nhwc_rewrites
    from tvm import relax

    class PadConv(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 4, 3, 2, (1, 0))

        def forward(self, x):
            return self.conv(F.pad(x, (0, 1, 2, 3)))  # W: (0, 1); H: (2, 3)

    torch.manual_seed(0)
    net, x = PadConv().eval(), torch.randn(1, 4, 11, 12)
    mod = nhwc_rewrites(_lower(net, (x,)))
    calls = []
    relax.analysis.post_order_visit(mod["main"], lambda e: calls.append(e) if isinstance(
        e, relax.Call) and hasattr(e.op, "name") else None)
    assert "relax.nn.pad" not in [c.op.name for c in calls]
    conv = next(c for c in calls if c.op.name == "relax.nn.conv2d")
    assert [int(p) for p in conv.attrs.padding] == [1 + 2, 0, 1 + 3, 1]
    vm = relax.VirtualMachine(relax.build(mod, "llvm"), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x.numpy()))
    got = (got[0] if isinstance(got, tvm.ir.Array) or hasattr(got, "__getitem__")
           and not hasattr(got, "numpy") else got).numpy()
    with torch.no_grad():
        want = net(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


class SqueezeExcite(torch.nn.Module):
    """EfficientNet/MobileNetV3 squeeze-excite: conv + SiLU, global pool, 1x1 reduce + SiLU,
    1x1 expand + sigmoid, the gate multiplied into the feature map, a 1x1 projection."""

    def __init__(self, cin: int = 16, channels: int = 32, reduced: int = 8) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(cin, channels, 3, padding=1)
        self.reduce = torch.nn.Conv2d(channels, reduced, 1)
        self.expand = torch.nn.Conv2d(reduced, channels, 1)
        self.project = torch.nn.Conv2d(channels, cin, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.silu(self.conv(x))
        gate = torch.sigmoid(self.expand(F.silu(self.reduce(F.adaptive_avg_pool2d(y, 1)))))
        return self.project(y * gate)


def test_squeeze_excite_gate_stays_nhwc(tmp_path, caplog):
    """The fast sigmoid/SiLU are swapped in after the convs went NHWC, so the gate and the
    activations run in the convs' layout: run before it, ``fast_math`` hid them from
    ``ConvertLayout`` and every gate became transpose -> sigmoid -> transpose."""
    from tvm import tirx

    torch.manual_seed(0)
    net, x = SqueezeExcite().eval(), torch.randn(1, 16, 14, 14)
    _check(net, (x,), tmp_path, caplog, "tiled-matmul")
    kernels = sorted(g.name_hint for g, f in _fused(net, (x,)).functions_items()
                     if isinstance(f, tirx.PrimFunc))
    gates = [n for n in kernels if "sigmoid" in n]
    assert gates, kernels
    assert not [n for n in gates if "transpose" in n], kernels
    # Only the network's edges change layout: NCHW in (here inside the first conv's Winograd
    # input transform) and NHWC -> NCHW out.
    assert len([n for n in kernels if "transpose" in n]) <= 2, kernels


def test_batchnorm_folds_into_the_conv_before_it(tmp_path):
    """Lowering folds inference batch norms into the conv weights and bias: no batch norm (or
    its decomposition's divide) is left for the kernels, and the result is PyTorch's."""
    from slimc.backends.tvm.build import build_library
    from slimc.backends.tvm.lower import lower_to_relax
    from slimc.backends.tvm.runtime import run_library
    from tvm import relax

    from slimc.capture import capture
    from slimc.loaders.base import LoadedModel
    from slimc.targets import resolve_target

    torch.manual_seed(0)
    net, x = _randomize_bn(TfPaddedBlock(8, 24, 1)), torch.randn(1, 8, 9, 9)
    ir, _ = capture(LoadedModel(name="block", module=net, example_inputs={"x": x}))
    mod = lower_to_relax(ir)
    ops = []
    relax.analysis.post_order_visit(mod["main"], lambda e: ops.append(e.op.name) if isinstance(
        e, relax.Call) and hasattr(e.op, "name") else None)
    assert "relax.nn.batch_norm" not in ops and "relax.divide" not in ops, ops
    assert ops.count("relax.nn.conv2d") == 3
    (got,) = run_library(build_library(mod, resolve_target("llvm"), tmp_path / "k.so"),
                         [x.numpy()], cross_triple=None, threads=2)
    with torch.no_grad():
        np.testing.assert_allclose(got, net(x).numpy(), rtol=1e-4, atol=1e-5)


class AudioFrontEnd(torch.nn.Module):
    """Whisper's encoder stem: conv1d k3 + GELU, conv1d k3 stride 2 + GELU, frames-major
    output plus a positional embedding."""

    def __init__(self, mels: int, width: int, frames: int) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv1d(mels, width, 3, padding=1)
        self.conv2 = torch.nn.Conv1d(width, width, 3, stride=2, padding=1)
        self.pos = torch.nn.Parameter(torch.randn(frames // 2, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.conv2(F.gelu(self.conv1(x))))
        return x.permute(0, 2, 1) + self.pos


def test_conv1d_runs_channels_last_on_output_channel_vectors(tmp_path, caplog):
    """A conv1d turns NWC like a conv2d turns NHWC: the output channels are the vector axis.
    Left NCW, the frames were (4 lanes over Whisper's 1500 frames, loaded with a stride of 2).
    The frames-major output the model asks for is then the conv's own layout: no transpose
    after the second conv."""
    import re

    from slimc.backends.tvm.schedules import schedule_prim_func
    from tvm import tirx

    from slimc.targets import resolve_target

    torch.manual_seed(0)
    net = AudioFrontEnd(16, 64, 60).eval()
    x = torch.randn(1, 16, 60)
    _check(net, (x,), tmp_path, caplog, "tiled-matmul", tol=1e-4)

    import tvm
    from slimc.backends.tvm.schedules import fusion_passes

    spec = resolve_target("x86-64-v4").tvm_target()  # AVX-512: 16 lanes
    with spec, tvm.transform.PassContext(opt_level=3):
        fused = tvm.transform.Sequential(fusion_passes(spec))(_lower(net, (x,)))
    kernels = {g.name_hint: f for g, f in fused.functions_items()
               if isinstance(f, tirx.PrimFunc)}
    convs = [n for n in kernels if "conv1d" in n]
    assert len(convs) == 2, sorted(kernels)
    # the input's NCW -> NWC is the only transpose; the positional add is in the conv epilogue
    assert len([n for n in kernels if "transpose" in n and "conv1d" not in n]) <= 1, \
        sorted(kernels)
    for name in convs:
        text = schedule_prim_func(kernels[name], spec, name=name).script()
        assert '"conv1d_nwc_update"' in text, text
        update = text[:text.index('"conv1d_nwc_update"')]
        widths = [int(w) for w in re.findall(r"T\.vectorized\(T\.int64\((\d+)\)\)", update)]
        assert widths and widths[-1] >= 16, (name, text)


# --- CNN kernel structure (issue 16: ResNet-50 / EfficientNet vs ONNX Runtime) -----------------


def _scheduled(module, inputs, target: str = "x86-64-v4-vnni") -> dict[str, str]:
    """Each kernel of ``module`` as slimc's rules schedule it for ``target``, as TVMScript."""
    import tvm
    from slimc.backends.tvm.schedules import fusion_passes, schedule_prim_func
    from tvm import tirx

    from slimc.targets import resolve_target

    spec = resolve_target(target).tvm_target()
    with spec, tvm.transform.PassContext(opt_level=3):
        fused = tvm.transform.Sequential(fusion_passes(spec))(_lower(module, inputs))
        return {g.name_hint: schedule_prim_func(f, spec, name=g.name_hint).script()
                for g, f in fused.functions_items() if isinstance(f, tirx.PrimFunc)}


def _enclosing(text: str, block: str) -> list[str]:
    """The loop lines enclosing ``T.sblock("<block>")`` in a kernel's TVMScript, outermost
    first (by indentation)."""
    lines = text.splitlines()
    at = next(i for i, ln in enumerate(lines) if f'T.sblock("{block}")' in ln)
    indent, loops = len(lines[at]) - len(lines[at].lstrip()), []
    for ln in reversed(lines[:at]):
        depth = len(ln) - len(ln.lstrip())
        if depth < indent and ln.lstrip().startswith("for "):
            loops.insert(0, ln.strip())
            indent = depth
    return loops


def _mean_kernels(net: torch.nn.Module, x: torch.Tensor) -> dict[str, str]:
    """The scheduled TIR of ``net``'s mean kernels, by name."""
    return {n: t for n, t in _scheduled(net, (x,)).items() if "mean" in n}


def _reduction_loops(text: str) -> list[str]:
    """The loops around the (non-init) reduction block of a kernel's TIR, outermost first."""
    red = next(ln.split('"')[1] for ln in text.splitlines()
               if "T.sblock(" in ln and "_red" in ln and "init" not in ln)
    return _enclosing(text, red)


class GlobalPool(torch.nn.Module):
    """A squeeze-excite squeeze on its own: the mean over H, W of an NHWC feature map."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y.mean((2, 3), keepdim=True) + y[:, :, :1, :1]


def test_spatial_mean_of_nhwc_map_sums_channel_vectors(tmp_path, caplog):
    """The mean over H, W of an NHWC map reads the map once, in memory order: the pixel loops
    outside, a group of channel vectors (accumulated in registers) inside. The row-reduction
    rule (one channel at a time, strided by a pixel) leaves it to the fallback rule; channel
    vectors outside the pixels walked the map once per vector, a cache line per pixel, and in
    the network (the map just written by two cores) those strided walks took 8x their hot time
    (EfficientNet-B0's squeezes: 0.73 ms of a 12.7 ms call, ``benchmarks/call_gap.py``)."""
    torch.manual_seed(0)
    net, x = GlobalPool(48).eval(), torch.randn(1, 48, 20, 20)
    _check(net, (x,), tmp_path, caplog, "tiled-matmul")
    assert not [m for m in caplog.messages if "row-reduction scheduled" in m and "mean" in m]
    means = _mean_kernels(net, x)
    assert means
    for name, text in means.items():
        loops = _reduction_loops(text)
        # 16 channels in one vector innermost, the 3 vectors of 48 channels unrolled around
        # it, the pixels (the reduction) outside them
        assert "T.vectorized(T.int64(16))" in loops[-1], (name, loops)
        assert "T.unroll(T.int64(3))" in loops[-2], (name, loops)
        assert any("T.int64(20)" in ln for ln in loops[:-2]), (name, loops)


@pytest.mark.parametrize("channels, size", [(40, 91), (96, 56), (30, 64)])
def test_large_spatial_mean_sums_rows_in_parallel(channels, size, tmp_path, caplog):
    """A squeeze over a large map is split by image rows over the threads (``rfactor``: one
    partial row of sums per image row, added after), so each core reads the rows the conv
    before it wrote, in order. Exact against PyTorch for odd row counts and channel counts
    that are not a whole number of 16-lane vectors (40: 8-lane vectors; 30: not vectorized,
    left to the fallback)."""
    torch.manual_seed(0)
    net, x = GlobalPool(channels).eval(), torch.randn(1, channels, size, size)
    _check(net, (x,), tmp_path, caplog, "tiled-matmul")
    means = _mean_kernels(net, x)
    assert means
    for name, text in means.items():
        partial = [ln.split('"')[1] for ln in text.splitlines()
                   if "T.sblock(" in ln and "_rf_update" in ln]
        if channels % 4:
            assert not partial, name
            continue
        assert partial, (name, text)
        loops = _enclosing(text, partial[0])
        assert loops[0].startswith("for k1 in T.parallel(") and f"T.int64({size})" in loops[0], \
            (name, loops)
        assert "T.vectorized(" in loops[-1], (name, loops)


class TokenMeanPool(torch.nn.Module):
    """Sentence embeddings: a linear layer, then the mean over tokens of each sequence."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).mean(1)


def test_token_mean_of_a_batch_stays_parallel(tmp_path, caplog):
    """A mean over the tokens of 8 sequences (8 x 384 outputs, 128 tokens each) is too wide
    for per-row partials; it reads token-major too, and its outputs stay split over threads
    (as the fallback rule split them before), exact against PyTorch."""
    torch.manual_seed(0)
    net, x = TokenMeanPool(384).eval(), torch.randn(8, 128, 384)
    _check(net, (x,), tmp_path, caplog, "tiled-matmul", tol=1e-4)
    means = _mean_kernels(net, x)
    assert means
    for name, text in means.items():
        loops = _reduction_loops(text)
        assert "T.parallel(" in loops[0] and "T.vectorized(" in loops[-1], (name, loops)
        assert any("T.int64(128)" in ln for ln in loops[1:-2]), (name, loops)


def test_pointwise_conv_reads_its_input_without_a_copy(tmp_path, caplog):
    """TVM's legalizer gives every conv a ``pad_temp`` copy of its input, padding or not; the
    1x1 convs' (ResNet-50: 34 of 53 convs) is read in place instead of copied first."""
    torch.manual_seed(0)
    # 48 outputs: a 16-lane panel, so it stays a conv on AVX-512 (40 = 8 x 5 channels run as
    # a padded matmul there, see test_half_panel_pointwise_conv_runs_on_whole_vectors)
    net, x = torch.nn.Sequential(torch.nn.Conv2d(24, 48, 1), torch.nn.ReLU()).eval(), \
        torch.randn(1, 24, 10, 12)
    _check(net, (x,), tmp_path, caplog, "tiled-matmul")
    convs = {n: t for n, t in _scheduled(net, (x,)).items() if "conv2d" in n}
    assert convs
    for name, text in convs.items():
        assert 'T.sblock("pad_temp")' not in text, name


@pytest.mark.parametrize("stride,kernel", [(1, 3), (2, 3), (2, 5)])
def test_depthwise_conv_reads_its_padding_in_place(stride, kernel, tmp_path, caplog):
    """A depthwise conv reads its zero padding in place, not from a padded copy (of the whole
    map: EfficientNet's stride-2 3 x 3 took 4x ORT's time; or of a window per tile: still half
    the conv's time): tiles inside the image load the input unguarded, only the edge tiles
    test each tap (``if_then_else``), on odd map sizes with stride 1 / 2 and 3 x 3 / 5 x 5."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(32, 32, kernel, stride, kernel // 2, groups=32), torch.nn.SiLU()).eval()
    x = torch.randn(1, 32, 19, 17)
    _check(net, (x,), tmp_path, caplog, "tiled-matmul", tol=1e-4)
    convs = {n: t for n, t in _scheduled(net, (x,)).items() if "conv2d" in n}
    assert convs
    for name, text in convs.items():
        assert 'T.sblock("pad_temp")' not in text, name
        update = next(ln.split('"')[1] for ln in text.splitlines()
                      if "T.sblock(" in ln and ln.rstrip().endswith('_update"):'))
        assert text.count(f'T.sblock("{update}")') == 2, name  # interior and edge tiles
        interior, edge = text.split("else:", 1)
        assert "T.if_then_else" not in interior and "T.if_then_else" in edge, name


def _workspaces_per_tile(module, inputs, target: str = "x86-64-v4-vnni") -> dict[str, int]:
    """Per conv / matmul kernel of ``module``: ``TVMBackendAllocWorkspace`` calls inside its
    parallel tile loop (the body TVM outlines as ``__tvm_parallel_lambda``), from the LLVM IR
    TVM generates for ``target`` (compiled, not run)."""
    import tvm
    from slimc.backends.tvm.schedules import fusion_passes, schedule_prim_func
    from tvm import tirx

    from slimc.targets import resolve_target

    spec = resolve_target(target).tvm_target()
    counts = {}
    with spec, tvm.transform.PassContext(opt_level=3):
        fused = tvm.transform.Sequential(fusion_passes(spec))(_lower(module, inputs))
        for gvar, func in fused.functions_items():
            name = gvar.name_hint
            if not isinstance(func, tirx.PrimFunc) or not ("conv" in name or "matmul" in name):
                continue
            scheduled = schedule_prim_func(func, spec, name=name)
            lib = tvm.compile(tvm.IRModule({"main": scheduled.with_attr("global_symbol", "main")}),
                              target=spec)
            lambdas = [chunk for chunk in lib.mod.inspect_source("ll").split("\ndefine ")
                       if "@__tvm_parallel_lambda" in chunk.split("\n", 1)[0]]
            assert lambdas, name  # the tile loop is parallel
            counts[name] = sum(c.count("@__TVMBackendAllocWorkspace") for c in lambdas)
    return counts


def _accumulator_buffers(module, inputs) -> list[str]:
    """Names of the accumulator tiles (``cache_write`` buffers) of the conv / matmul kernels."""
    return [ln.split("=")[0].strip() for name, text in _scheduled(module, inputs).items()
            if "conv" in name or "matmul" in name for ln in text.splitlines()
            if "sblock_alloc_buffer" in ln and "intermediate" in ln]


@pytest.mark.parametrize("case", ["pointwise", "depthwise", "linear"])
def test_small_accumulator_tiles_live_on_the_stack(case, tmp_path, caplog):
    """An accumulator tile under 1024 bytes is a global-scope buffer, which TVM puts on the
    stack (LLVM then keeps it in registers); in the default ``"local"`` scope every tile took
    a ``TVMBackendAllocWorkspace`` and a free (a depthwise 3 x 3 over 56 x 56 x 144: 0.54 ms
    -> 0.43 ms on one thread). The result is what PyTorch computes."""
    torch.manual_seed(0)
    if case == "pointwise":  # 6 x 8 tile: 192 bytes
        net, x = torch.nn.Sequential(torch.nn.Conv2d(24, 40, 1), torch.nn.ReLU()), \
            torch.randn(1, 24, 10, 12)
    elif case == "depthwise":  # 7 x 32 tile: 896 bytes
        net, x = torch.nn.Sequential(torch.nn.Conv2d(64, 64, 3, 1, 1, groups=64),
                                     torch.nn.SiLU()), torch.randn(1, 64, 14, 14)
    else:  # 6 x 16 tile of a dense layer
        net, x = torch.nn.Sequential(torch.nn.Linear(48, 80), torch.nn.GELU()), \
            torch.randn(36, 48)
    net = net.eval()
    _check(net, (x,), tmp_path, caplog, "tiled-matmul", tol=1e-4)
    buffers = _accumulator_buffers(net, (x,))
    assert buffers and all(b.endswith("_global") for b in buffers), buffers
    if case != "depthwise":  # (its per-tile padded window, 3.4 KiB, is still a workspace)
        assert set(_workspaces_per_tile(net, (x,)).values()) == {0}


def test_accumulator_tiles_of_1024_bytes_stay_local():
    """An 8 x 32 float tile (1024 bytes) would be a workspace in either scope: it keeps the
    ``"local"`` scope the micro-kernel always had."""
    net = torch.nn.Sequential(torch.nn.Conv2d(48, 64, 1), torch.nn.ReLU()).eval()
    buffers = _accumulator_buffers(net, (torch.randn(1, 48, 8, 8),))
    assert buffers and all(b.endswith("_local") for b in buffers), buffers


def test_accumulator_tiles_drop_a_row_to_live_on_the_stack(tmp_path, caplog):
    """Where 7 divides the rows as well as 8 (CNN maps 112 / 56 wide), an 8 x 32 float tile
    (1024 bytes: a workspace per tile) becomes a 7 x 32 one on the stack (MobileNetV2's 1 x 1
    16 -> 96 conv over 112 x 112: 0.66-0.87x the time). Rows 7 does not divide keep their
    8-row tile (:func:`test_accumulator_tiles_of_1024_bytes_stay_local`)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(16, 64, 1), torch.nn.ReLU6()).eval()
    x = torch.randn(1, 16, 56, 56)
    _check(net, (x,), tmp_path, caplog, "tiled-matmul", tol=1e-5,
           target="x86-64-v4-vnni")
    buffers = _accumulator_buffers(net, (x,))
    assert buffers and all(b.endswith("_global") for b in buffers), buffers
    assert set(_workspaces_per_tile(net, (x,)).values()) == {0}
    conv = next(t for n, t in _scheduled(net, (x,)).items() if "conv2d" in n)
    assert "T.unroll(T.int64(7))" in conv and "T.unroll(T.int64(8))" not in conv


@pytest.mark.parametrize("kernel", [3, 7])
def test_rgb_stem_reads_its_padding_in_place(kernel, tmp_path, caplog):
    """A conv over a 3-channel image (a network's stem) reads its zero padding in place like
    a depthwise conv: no serial, scalar padded copy of the input in front of it; tiles inside
    the image load unguarded, edge tiles test each tap. Stride 2 (3 x 3 / 1 x 1 stride-1
    convs go to Winograd), odd map sizes, vs PyTorch. A conv over more channels keeps its
    padded copy."""
    torch.manual_seed(0)
    stride = 2
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, kernel, stride, kernel // 2),
                              torch.nn.Hardswish()).eval()
    x = torch.randn(1, 3, 30, 34)
    _check(net, (x,), tmp_path, caplog, "tiled-matmul", tol=1e-5,
           target="x86-64-v4-vnni")
    conv = next(t for n, t in _scheduled(net, (x,)).items() if "conv2d" in n)
    assert 'T.sblock("pad_temp")' not in conv
    update = next(ln.split('"')[1] for ln in conv.splitlines()
                  if "T.sblock(" in ln and ln.rstrip().endswith('_update"):'))
    assert conv.count(f'T.sblock("{update}")') == 2  # interior and edge tiles
    interior, edge = conv.split("else:", 1)
    assert "T.if_then_else" not in interior and "T.if_then_else" in edge

    wide = torch.nn.Sequential(torch.nn.Conv2d(8, 16, kernel, stride, kernel // 2)).eval()
    conv = next(t for n, t in _scheduled(wide, (torch.randn(1, 8, 30, 34),)).items()
                if "conv2d" in n)
    assert 'T.sblock("pad_temp")' in conv


def test_convs_with_small_filters_walk_pixel_rows_outside(tmp_path, caplog):
    """A conv whose whole filter is at most 8 KiB (MobileNets' 1 x 1 expansions over few
    channels) splits its pixel rows, not its weight panels, over the threads: each writes a
    contiguous part of the output. A larger filter and a depthwise conv keep the panel
    outside. Results vs PyTorch."""
    torch.manual_seed(0)
    small = torch.nn.Sequential(torch.nn.Conv2d(16, 64, 1), torch.nn.ReLU6()).eval()
    x = torch.randn(1, 16, 14, 14)
    _check(small, (x,), tmp_path, caplog, "tiled-matmul", tol=1e-5,
           target="x86-64-v4-vnni")

    def parallel_loop(net, inputs):
        conv = next(t for n, t in _scheduled(net, inputs).items() if "conv2d" in n)
        return next(ln for ln in conv.splitlines() if "T.parallel(" in ln).split()[1]

    assert parallel_loop(small, (x,)).startswith("nn_yy_ff_0")
    large = torch.nn.Sequential(torch.nn.Conv2d(64, 64, 1)).eval()  # 16 KiB, image 12 KiB
    assert parallel_loop(large, (torch.randn(1, 64, 7, 7),)).startswith("ff_0")
    depthwise = torch.nn.Sequential(torch.nn.Conv2d(64, 64, 3, 1, 1, groups=64)).eval()
    assert parallel_loop(depthwise, (torch.randn(1, 64, 14, 14),)).startswith("ff_0")


def _parallel_loop(kernels: dict[str, str], name: str) -> str:
    """The loop variable of the first ``T.parallel`` loop of the kernel named ``name``."""
    text = next(t for n, t in kernels.items() if name in n)
    return next(ln for ln in text.splitlines() if "T.parallel(" in ln).split()[1]


def test_convs_split_the_larger_operand_over_threads(tmp_path, caplog):
    """A conv whose filter is smaller than its image (and <= 1 MiB) splits its pixel rows over
    the threads, so each core reads what its previous kernel wrote and writes what its next
    kernel reads; a filter larger than the image (a 7 x 7 stage's 1 x 1 conv) keeps the weight
    panels outside; a transformer-shaped linear ([batch, tokens, features]) too, however many
    tokens. Results vs PyTorch."""
    torch.manual_seed(0)
    wide = torch.nn.Sequential(torch.nn.Conv2d(64, 96, 1), torch.nn.ReLU()).eval()
    x = torch.randn(1, 64, 28, 28)  # filter 24 KiB, image 196 KiB
    assert _parallel_loop(_scheduled(wide, (x,)), "conv2d").startswith("nn_yy_ff_0")
    _check(wide, (x,), tmp_path, caplog, "tiled-matmul", tol=1e-5, target="x86-64-v4-vnni")
    deep = torch.nn.Sequential(torch.nn.Conv2d(256, 256, 1)).eval()  # 256 KiB vs 49 KiB
    assert _parallel_loop(_scheduled(deep, (torch.randn(1, 256, 7, 7),)),
                          "conv2d").startswith("ff_0")
    linear = torch.nn.Sequential(torch.nn.Linear(128, 128)).eval()  # 64 KiB vs 512 KiB
    assert _parallel_loop(_scheduled(linear, (torch.randn(1, 1024, 128),)),
                          "matmul").startswith("i1_0")  # output-column panels outermost


def test_depthwise_convs_over_large_images_split_rows_over_threads(tmp_path, caplog):
    """A depthwise conv whose (padded) input is over 256 KiB (MobileNetV2's stride-2 3 x 3 over
    112 x 112 x 96, its 56 x 56 and 14 x 14 x 384 ones, any of them at batch 8) splits its
    pixel rows over the threads, so the image is swept once instead of once per channel
    panel; a smaller one (a stride-1 one over 20 x 20) keeps the
    channel panels outside. Both exact vs PyTorch, the large
    one with TF padding (its border tiles read the padding in place)."""
    torch.manual_seed(0)
    large = torch.nn.Sequential(torch.nn.Conv2d(96, 96, 3, 2, 1, groups=96),
                                torch.nn.ReLU6()).eval()
    x = torch.randn(1, 96, 112, 112)  # 4.8 MB
    assert _parallel_loop(_scheduled(large, (x,)), "conv2d").startswith("nn_yy_ff_0")
    _check(large, (x,), tmp_path, caplog, "tiled-matmul", tol=1e-5, target="x86-64-v4-vnni")
    assert _parallel_loop(_scheduled(large, (torch.randn(1, 96, 56, 56),)),
                          "conv2d").startswith("nn_yy_ff_0")  # 1.2 MB
    stride1 = torch.nn.Sequential(torch.nn.Conv2d(96, 96, 3, 1, 1, groups=96)).eval()
    small = torch.randn(1, 96, 20, 20)  # 186 KB padded
    assert _parallel_loop(_scheduled(stride1, (small,)), "conv2d").startswith("ff_0")
    batch = torch.randn(8, 32, 56, 56)  # 0.4 MB an image, 3.3 MB the padded batch
    tf_block = _randomize_bn(TfPaddedBlock(32, 32, 2))
    dw = [t for n, t in _scheduled(tf_block, (batch,)).items() if "conv2d" in n
          and "group" in t]
    assert dw and all(_parallel_loop({"k": t}, "k").startswith("nn_yy") for t in dw)
    (tmp_path / "batch").mkdir()
    _check(tf_block, (batch,), tmp_path / "batch", caplog, "tiled-matmul", tol=1e-5,
           target="x86-64-v4-vnni")


def test_winograd_matmul_splits_tiles_over_threads(tmp_path, caplog):
    """Winograd's batched matmul ``M[k] = V[k] @ U[k]`` over a transformed filter smaller than
    the transformed tiles walks the tiles outermost (each core multiplies the tiles its input
    transform wrote, for every ``k``), not the ``k`` planes; with a filter larger than the tiles
    ``k`` stays outermost. Both exact vs PyTorch."""
    torch.manual_seed(0)
    # 32 output channels: whole 16-lane panels (24 would be padded to 32 first, a different
    # kernel: the narrow-panel padding's)
    small = torch.nn.Sequential(torch.nn.Conv2d(16, 32, 3, 1, 1), torch.nn.ReLU()).eval()
    x = torch.randn(1, 16, 28, 28)  # U 72 KiB, V 110 KiB
    kernels = _scheduled(small, (x,))
    assert any("winograd_input" in n for n in kernels)
    assert _parallel_loop(kernels, "matmul").startswith("i1_0_i0_")
    _check(small, (x,), tmp_path, caplog, ("winograd-transform", "tiled-matmul"), tol=1e-5,
           target="x86-64-v4-vnni")
    big = torch.nn.Sequential(torch.nn.Conv2d(128, 128, 3, 1, 1)).eval()
    kernels = _scheduled(big, (torch.randn(1, 128, 16, 16),))  # U 2.3 MiB, V 0.6 MiB
    assert any("winograd_input" in n for n in kernels)
    assert _parallel_loop(kernels, "matmul").startswith("i0_")


class PositionalConv(torch.nn.Module):
    """wav2vec2's positional embedding: a grouped conv1d wider than the sequence (kernel 32
    over 20 frames, padding 16), the last frame dropped, GELU, added to the input."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.conv = torch.nn.Conv1d(channels, channels, 32, padding=16, groups=groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x.transpose(1, 2))[:, :, :-1]
        return x + F.gelu(h).transpose(1, 2)


@pytest.mark.parametrize("channels,groups,lanes", [(192, 4, 16), (96, 4, 8)])
def test_grouped_conv_vector_tiles_stay_inside_a_group(channels, groups, lanes, tmp_path,
                                                      caplog):
    """Each vector tile of a grouped conv covers output channels of one group (48 per group:
    16 lanes; 24: 8), so the image element it multiplies is one broadcast, not a gather over
    two groups; the padding is not read in place (no tile of a kernel wider than the input
    lies inside it). Exact against PyTorch."""
    import re

    torch.manual_seed(0)
    net = PositionalConv(channels, groups).eval()
    x = torch.randn(1, 20, channels)
    _check(net, (x,), tmp_path, caplog, "tiled-matmul", tol=1e-4)
    kernels = _scheduled(net, (x,))
    conv = next(text for name, text in kernels.items() if "conv1d" in name)
    update = conv[:conv.index('"group_conv1d_nwc_update"')]
    widths = [int(w) for w in re.findall(r"T\.vectorized\(T\.int64\((\d+)\)\)", update)]
    assert widths and widths[-1] == lanes, conv
    assert (channels // groups) % widths[-1] == 0
    assert "if_then_else" not in conv[conv.index('"group_conv1d_nwc_update"'):], conv


def _padded_blocks(module, inputs, kind: str) -> list[str]:
    """Names of the ``*_pad`` blocks the tiled-matmul rule adds to the ``kind`` kernels."""
    import tvm
    from slimc.backends.tvm.schedules import cpu_matmul, fusion_passes

    from slimc.targets import resolve_target

    target = resolve_target("x86-64-v4-vnni").tvm_target()
    with target, tvm.transform.PassContext(opt_level=3):
        fused = tvm.transform.Sequential(fusion_passes(target))(_lower(module, inputs))
    names = []
    for gvar, func in fused.functions_items():
        if isinstance(func, tvm.tirx.PrimFunc) and kind in gvar.name_hint:
            sch = cpu_matmul.TiledMatmul().apply(func, target)
            assert sch is not None
            names += [sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))]
    return [n for n in names if n.endswith("_pad")]


def test_weight_output_tail_is_padded_when_many_rows_reuse_it(tmp_path, caplog):
    """A 1 x 1 conv to 150 channels (SegFormer's ADE20k classifier) over 16 x 16 pixels runs
    as a matmul over the NHWC pixels whose constant filters are padded to whole vector panels
    instead of a predicated, scalar micro-kernel: at build time, in the graph (160 columns,
    then a slice; :mod:`.conv_output_padding`, session 27), where the matmul rule used to copy
    them padded on every call; a 1 x 1 conv to 160 channels stays a conv; a linear layer over
    5 rows gets no per-call copy either. Exact against PyTorch."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(32, 150, 1).eval()
    x = torch.randn(1, 32, 16, 16)
    kernels = {g.name_hint for g, _ in _fused(conv, (x,)).functions_items()}
    assert not [n for n in kernels if "conv2d" in n], sorted(kernels)
    (text,) = [t for n, t in _scheduled(conv, (x,)).items() if "matmul" in n]
    assert "T.int64(160)" in text, text[:1500]  # the padded filters, a constant operand
    assert not _padded_blocks(conv, (x,), "matmul")  # nothing left to pad per call
    wide = torch.nn.Conv2d(32, 160, 1).eval()
    assert [n for n, _ in _fused(wide, (x,)).functions_items() if "conv2d" in n.name_hint]
    _check(conv, (x,), tmp_path, caplog, "tiled-matmul", tol=1e-5, target="x86-64-v4-vnni")
    linear = torch.nn.Linear(32, 150).eval()
    assert not _padded_blocks(linear, (torch.randn(5, 32),), "matmul")
    # a 3 x 3 conv to 150 channels stays a conv, its tail predicated (a conv's window indexing
    # is no einsum to pad), and still builds and is exact
    (tmp_path / "3x3").mkdir()
    _check(torch.nn.Conv2d(32, 150, 3, padding=1).eval(), (x,), tmp_path / "3x3", caplog,
           "tiled-matmul", tol=1e-5, target="x86-64-v4-vnni")

def test_quarter_panel_pointwise_conv_runs_on_whole_vectors(tmp_path, caplog):
    """A 1 x 1 conv to 116 = 4 x 29 channels (ShuffleNetV2's branches) over 14 x 14 pixels:
    only a 4-lane panel divides 116, a quarter of AVX-512's width; it runs as a matmul whose
    constant filters are padded to whole 16-lane vectors (128 columns, at build time). Over
    7 x 7 pixels it stays a conv; a 1 x 1 conv to 120 = 8 x 15 channels stays a conv at any
    size. Exact against PyTorch."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(64, 116, 1).eval()
    x = torch.randn(1, 64, 14, 14)
    kernels = {g.name_hint for g, _ in _fused(conv, (x,)).functions_items()}
    assert not [n for n in kernels if "conv2d" in n], sorted(kernels)
    (text,) = [t for n, t in _scheduled(conv, (x,)).items() if "matmul" in n]
    assert "T.int64(128)" in text, text[:1500]  # the padded filters, a constant operand
    width = re.findall(r"T\.vectorized\(T\.int64\((\d+)\)\)", _enclosing(text, "matmul_update")[-1])
    assert width and int(width[-1]) % 16 == 0, width  # whole 16-lane vectors, not 4-lane ones
    _check(conv, (x,), tmp_path, caplog, "tiled-matmul", tol=1e-5, target="x86-64-v4-vnni")
    small = torch.randn(1, 64, 7, 7)
    assert [n for n, _ in _fused(conv, (small,)).functions_items() if "conv2d" in n.name_hint]
    eight = torch.nn.Conv2d(64, 120, 1).eval()  # a conv where 8-lane panels cost nothing
    assert "conv2d" in " ".join(_kernel_names(eight, (x,), ZNVER4))


#: Zen 4 (AVX-512 executed as two 256-bit halves) and an AVX2 target, spelled out.
ZNVER4 = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver4"}
AVX2 = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64-v3"}
ZNVER5 = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver5"}


def _kernel_names(module, inputs, target: dict | str) -> list[str]:
    """Kernel names of ``module`` after slimc's fusion passes for ``target``."""
    import tvm
    from slimc.backends.tvm.schedules import fusion_passes

    from slimc.targets import resolve_target

    spec = tvm.target.Target(target) if isinstance(target, dict) \
        else resolve_target(target).tvm_target()
    with spec, tvm.transform.PassContext(opt_level=3):
        fused = tvm.transform.Sequential(fusion_passes(spec))(_lower(module, inputs))
    return [g.name_hint for g, f in fused.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]


@pytest.mark.parametrize("cout", [24, 40])
def test_half_panel_pointwise_conv_runs_on_whole_vectors(cout, tmp_path, caplog):
    """A 1 x 1 conv to 24 or 40 = 8 x odd channels (MobileNets' projections) over 14 x 14
    pixels: only an 8-lane panel divides them, half of AVX-512's width. On a full-width
    AVX-512 target it runs as a matmul whose constant filters are padded to whole 16-lane
    vectors (Zen 5 included); on Zen 4 (512-bit FMAs as two halves: an 8-lane panel loses
    nothing there), on AVX2 (8 lanes are a whole vector) and over 7 x 7 pixels it stays a
    conv. Exact against PyTorch, with the ReLU6 and folded batch norm of a MobileNet block as
    its epilogue."""
    torch.manual_seed(0)
    net = _randomize_bn(torch.nn.Sequential(torch.nn.Conv2d(144, cout, 1, bias=False),
                                            torch.nn.BatchNorm2d(cout), torch.nn.ReLU6()))
    x = torch.randn(1, 144, 14, 14)
    names = _kernel_names(net, (x,), "x86-64-v4-vnni")
    assert not [n for n in names if "conv2d" in n], names
    assert _padded_blocks(net, (x,), "matmul"), "the filter axis should be padded"
    (text,) = [t for n, t in _scheduled(net, (x,)).items() if "matmul" in n]
    width = re.findall(r"T\.vectorized\(T\.int64\((\d+)\)\)", _enclosing(text, "matmul_update")[-1])
    assert width and int(width[-1]) % 16 == 0, width
    _check(net, (x,), tmp_path, caplog, "tiled-matmul", tol=1e-5, target="x86-64-v4-vnni")
    for target in (ZNVER4, AVX2):
        assert "conv2d" in " ".join(_kernel_names(net, (x,), target)), target
    # Zen 5's 512-bit FMAs are full width: the padded matmul there too
    assert "conv2d" not in " ".join(_kernel_names(net, (x,), ZNVER5))
    assert "conv2d" in " ".join(_kernel_names(net, (torch.randn(1, 144, 7, 7),),
                                              "x86-64-v4-vnni"))


class WeightedValues(torch.nn.Module):
    def forward(self, p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return p @ v


def test_narrow_head_dim_runs_on_whole_vectors(tmp_path, caplog):
    """``P @ V`` with MobileViT's 36-wide heads: only a 4-lane panel divides 36, and two
    whole vectors (64) would add 78%; the rule pads the values to 48 columns and runs
    16-lane panels (3 vectors a row instead of 9 quarter vectors), still exact."""
    torch.manual_seed(0)
    inputs = (torch.softmax(torch.randn(4, 64, 64), -1), torch.randn(4, 64, 36))
    _check(WeightedValues(), inputs, tmp_path, caplog, "tiled-matmul",
           target="x86-64-v4-vnni")
    (text,) = [t for n, t in _scheduled(WeightedValues(), inputs).items() if "matmul" in n]
    update = _enclosing(text, "matmul_update")
    assert "T.vectorized(T.int64(16))" in update[-1], update
    assert "(T.int64(4), T.int64(64), T.int64(48))" in text  # the padded values


class IntegerPowers(torch.nn.Module):
    """GPT-2's ``gelu_new`` (``x ** 3`` inside a tanh) after a linear, plus ``x ** 2``,
    ``x ** 4`` and a fractional power of a positive tensor (which stays ``pow``)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(32, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        c = (2.0 / torch.pi) ** 0.5
        gelu = 0.5 * h * (1.0 + torch.tanh(c * (h + 0.044715 * torch.pow(h, 3.0))))
        return gelu + torch.pow(h, 2) - 0.01 * h ** 4 + torch.pow(h.abs() + 1.0, 2.5)


def test_integer_powers_are_multiplications_not_pow_calls(tmp_path, caplog):
    """``x ** n`` by a constant integer 2..4 compiles to multiplications: a vectorized ``pow``
    is one scalar ``powf`` call per lane (GPT-2 small's GELU kernel: 23.5 ms of a 164 ms
    prefill, ORT's 2.4). A fractional exponent keeps ``pow``. Exact against PyTorch."""
    torch.manual_seed(0)
    net = IntegerPowers().eval()
    x = torch.randn(1, 24, 32)
    _check(net, (x,), tmp_path, caplog, "tiled-matmul", target="x86-64-v4-vnni")
    kernels = _scheduled(net, (x,))
    pows = [text.count("T.pow(") for text in kernels.values()]
    assert sum(pows) == 1, {n: t for n, t in kernels.items() if "T.pow(" in t}
    assert any("fast_tanh" in n for n in kernels), sorted(kernels)


class HardSqueezeExcite(torch.nn.Module):
    """MobileNetV3's squeeze-excite: depthwise conv + hard-swish, ReLU reduce, hard-sigmoid gate."""

    def __init__(self, channels: int = 48, reduced: int = 16) -> None:
        super().__init__()
        self.dw = torch.nn.Conv2d(channels, channels, 5, padding=2, groups=channels)
        self.reduce = torch.nn.Conv2d(channels, reduced, 1)
        self.expand = torch.nn.Conv2d(reduced, channels, 1)
        self.project = torch.nn.Conv2d(channels, 24, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.hardswish(self.dw(x))
        gate = F.hardsigmoid(self.expand(F.relu(self.reduce(F.adaptive_avg_pool2d(y, 1)))))
        return self.project(y * gate)


@pytest.mark.parametrize("net", ["hardsigmoid"])
def test_squeeze_excite_gate_is_computed_once_per_channel(net, tmp_path, caplog):
    """The gate's bias and (hard) sigmoid run in the 1 x 1 x C conv's accumulator epilogue,
    once per channel; the broadcast into the H x W x C map is a plain multiply. Inlined into
    the broadcast, the whole sigmoid (``exp`` polynomial and a division) ran once per pixel:
    EfficientNet-B0's gate kernels took 2.5x ONNX Runtime's separate ``Mul``."""
    torch.manual_seed(0)
    module = SqueezeExcite(16, 40, 8) if net == "sigmoid" else HardSqueezeExcite()
    x = torch.randn(1, 16 if net == "sigmoid" else 48, 19, 17)
    _check(module.eval(), (x,), tmp_path, caplog, "tiled-matmul")
    kernels = _scheduled(module.eval(), (x,))
    (name, gate), = [(n, t) for n, t in kernels.items() if 'T.sblock("T_multiply")' in t
                     and "conv2d_nhwc_update" in t]
    statement = next(ln for ln in gate.splitlines() if ln.strip().startswith("T_multiply_"))
    # the broadcast multiply reads the gate and the map, and computes nothing else
    assert statement.count("*") == 1 and "/" not in statement and "T.max" not in statement, \
        (name, statement)
    loops = _enclosing(gate, "conv2d_nhwc_intermediate_global")
    assert loops and "_fused in" in loops[0], (name, loops)  # under the conv's tile loop
    writeback = gate[gate.index('T.sblock("conv2d_nhwc_intermediate_global")'):]
    writeback = writeback[:writeback.index('T.sblock("T_multiply")')]
    assert ("T.float32(1.0) /" in writeback) == (net == "sigmoid"), (name, writeback)
    assert "T.max" in writeback and "T.min" in writeback, (name, writeback)  # the (hard) gate


def test_squeeze_excite_gate_is_applied_in_the_projection_conv(tmp_path, caplog):
    """``conv1x1(y * gate)`` with a per-channel gate and a map ``y`` the squeeze reads too:
    the projection conv multiplies each tile of ``y`` by the gate as it reads it (a prologue,
    :mod:`conv_prologue`), so the gated map is never written and read back; the gate's kernel
    writes 1 x 1 x C values and the (fast) sigmoid runs once per channel, in its epilogue.
    Exact against PyTorch."""
    torch.manual_seed(0)
    module, x = SqueezeExcite(16, 144, 6).eval(), torch.randn(1, 16, 19, 17)
    _check(module, (x,), tmp_path, caplog, "tiled-matmul")
    kernels = _scheduled(module, (x,))
    (name, conv), = [(n, t) for n, t in kernels.items() if "conv2d_prologue" in n]
    statement = next(ln.strip() for ln in conv.splitlines()
                     if ln.strip().startswith("conv_prologue[") and "=" in ln)
    assert statement.count("*") == 1 and "T.max" not in statement, (name, statement)
    loops = _enclosing(conv, "conv_prologue")
    assert loops and "T.parallel(" in loops[0], (name, loops)  # per tile, not a pass
    # the gate's kernel (1 x 1 conv + sigmoid) no longer multiplies the 19 x 17 map
    gates = [t for n, t in kernels.items() if "sigmoid" in n and "conv2d_nhwc_update" in t]
    assert gates and all("T_multiply" not in t for t in gates), sorted(kernels)


def test_squeeze_excite_on_aarch64_under_qemu(tmp_path, aarch64_emulator, caplog):
    """The row-parallel squeeze (4-lane NEON vectors, 24 of them per pixel: groups of 8
    accumulators) and the gated projection conv, cross-built for aarch64 and run under qemu:
    exact against PyTorch."""
    from tests.test_schedules import _build_run

    torch.manual_seed(0)
    net, x = SqueezeExcite(16, 96, 8).eval(), torch.randn(1, 16, 56, 56)
    got, applied = _build_run(net, (x,), tmp_path, target="arm", cross="aarch64-linux-gnu",
                              caplog=caplog)
    with torch.no_grad():
        want = net(x).numpy()
    np.testing.assert_allclose(got[0], want, rtol=1e-4, atol=1e-4)
    assert any("conv2d_prologue" in line for line in applied), applied
    assert not [line for line in applied if "failed" in line or "left unscheduled" in line], \
        applied


def test_channel_scale_stays_out_of_convs_over_a_1x1_map(tmp_path, caplog):
    """SiLU before a squeeze's expand conv is ``y * sigmoid(y)`` on a 1 x 1 x C map whose
    ``y`` has two uses, like a gate: nothing to save there, so it stays the reduce conv's
    epilogue and no prologue kernel appears."""
    torch.manual_seed(0)
    module, x = SqueezeExcite(16, 48, 8).eval(), torch.randn(1, 16, 9, 9)
    kernels = _scheduled(module, (x,))
    prologues = [n for n in kernels if "conv2d_prologue" in n]
    assert len(prologues) == 1, sorted(kernels)  # the projection only
    assert "T.int64(9), T.int64(9), T.int64(48)" in kernels[prologues[0]], prologues


class LinearBatchNorm(torch.nn.Module):
    """LeViT's batch-normed linear: ``BatchNorm1d`` over the tokens of ``linear(x)``, written
    through a flatten of the leading dims and a ``reshape_as`` back."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(cin, cout, bias=False)
        self.batch_norm = torch.nn.BatchNorm1d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        return self.batch_norm(y.flatten(0, 1)).reshape_as(y)


class LinearBatchNormMlp(torch.nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.up, self.down = LinearBatchNorm(dim, hidden), LinearBatchNorm(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.hardswish(self.up(x)))


def test_batchnorm_folds_into_the_linear_before_it(tmp_path):
    """``bn(linear(x).flatten(0, 1)).reshape_as(...)`` folds into the linear's weight and a new
    bias at lowering: no batch norm (nor its decomposition's divide) is left, and the built
    library computes what PyTorch computes."""
    from slimc.backends.tvm.build import build_library
    from slimc.backends.tvm.lower import lower_to_relax
    from slimc.backends.tvm.runtime import run_library
    from tvm import relax

    from slimc.capture import capture
    from slimc.loaders.base import LoadedModel
    from slimc.targets import resolve_target

    torch.manual_seed(0)
    net = LinearBatchNormMlp(16, 32).eval()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    x = torch.randn(1, 10, 16)
    ir, _ = capture(LoadedModel(name="mlp", module=net, example_inputs={"x": x}))
    mod = lower_to_relax(ir)
    ops = []
    relax.analysis.post_order_visit(mod["main"], lambda e: ops.append(e.op.name) if isinstance(
        e, relax.Call) and hasattr(e.op, "name") else None)
    assert "relax.nn.batch_norm" not in ops, ops
    assert ops.count("relax.matmul") == 2 and ops.count("relax.add") >= 3, ops  # 2 biases
    # the reshapes between them collapsed, hard-swish and the residual add sink into the two
    # matmuls' epilogues (sink_reshapes): no elementwise kernel of their own
    import tvm
    from slimc.backends.tvm.schedules import fusion_passes
    from tvm import tirx

    target = tvm.target.Target({"kind": "llvm"})
    with target, tvm.transform.PassContext(opt_level=3):
        fused = tvm.transform.Sequential(fusion_passes(target))(mod)
    kernels = [g.name_hint for g, f in fused.functions_items() if isinstance(f, tirx.PrimFunc)]
    assert len([k for k in kernels if "matmul" in k]) == 2, kernels
    assert not [k for k in kernels if "matmul" not in k and ("add" in k or "maximum" in k)], \
        kernels
    (got,) = run_library(build_library(mod, resolve_target("llvm"), tmp_path / "k.so"),
                         [x.numpy()], cross_triple=None, threads=2)
    with torch.no_grad():
        np.testing.assert_allclose(got, net(x).numpy(), rtol=1e-4, atol=1e-5)


def test_batchnorm_over_a_regrouped_linear_output_is_not_folded():
    """A reshape that changes the last axis regroups the linear's features: the batch norm's
    channels are no longer its output features, so it stays (and the linear is unchanged)."""
    from slimc.passes.quantize.batchnorm import fold_batchnorm

    from slimc.capture import capture
    from slimc.loaders.base import LoadedModel

    class Regrouped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(8, 32, bias=False)
            self.batch_norm = torch.nn.BatchNorm1d(16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.batch_norm(self.linear(x).reshape(-1, 16))

    net = Regrouped().eval()
    ir, _ = capture(LoadedModel(name="r", module=net, example_inputs={"x": torch.randn(1, 5, 8)}))
    assert fold_batchnorm(ir) == 0
    assert [n for n in ir.graph.nodes if "batch_norm" in str(n.target)]


# --- short-M dense layers (issue 16: CLIP ViT-B/32's 50 tokens vs ONNX Runtime) ---------------


def _dense_kernel(module, inputs, target) -> str:
    """The scheduled TVMScript of ``module``'s one matmul kernel for ``target`` (a slimc
    target name or a TVM target dict)."""
    import tvm
    from slimc.backends.tvm.schedules import fusion_passes, schedule_prim_func
    from tvm import tirx

    from slimc.targets import resolve_target

    spec = tvm.target.Target(target) if isinstance(target, dict) \
        else resolve_target(target).tvm_target()
    with spec, tvm.transform.PassContext(opt_level=3):
        fused = tvm.transform.Sequential(fusion_passes(spec))(_lower(module, inputs))
        (text,) = [schedule_prim_func(f, spec, name=g.name_hint).script()
                   for g, f in fused.functions_items()
                   if isinstance(f, tirx.PrimFunc) and "matmul" in g.name_hint]
    return text


@pytest.mark.parametrize("rows,k,n,tile,prefetch", [
    (50, 256, 512, (10, 16), False),   # 5 x 32 -> 10 x 16; a small weight: no prefetch
    (50, 768, 512, (10, 16), True),    # a 1.5 MiB weight: next panel prefetched
    (30, 128, 256, (15, 16), False),   # 6 x 32 -> 15 x 16
    (128, 256, 512, (8, 32), False),   # 8-row tiles already: unchanged
    (49, 256, 512, (7, 32), False),    # Swin's 49-token windows: 7 x 32 unchanged
])
def test_short_row_dense_layers_take_tall_one_vector_tiles(rows, k, n, tile, prefetch,
                                                           tmp_path, caplog):
    """Rows that only allow a 5- or 6-row tile on two-vector (32-float) panels get a tile at
    least twice as tall on one-vector panels on AVX-512 (half the weight bytes per
    multiply-add; CLIP B/32's 50-row dense layers 0.87-0.91x the time at one thread), and
    a weight of 1 MiB or more prefetches its next panel; the result is what PyTorch
    computes. Rows with 7- or 8-row tiles keep them."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(k, n), torch.nn.GELU()).eval()
    x = torch.randn(1, rows, k)
    text = _dense_kernel(net, (x,), "x86-64-v4-vnni")
    mr, nr = tile
    assert f"T.unroll(T.int64({mr}))" in text and f"T.vectorized(T.int64({nr}))" in text, text
    assert f"T.int64({n // nr}), T.int64({k}), T.int64({nr})" in text  # panels NR wide
    assert ("llvm.prefetch" in text) == prefetch
    _check(net, (x,), tmp_path, caplog, "tiled-matmul", tol=1e-5, target="x86-64-v4-vnni")


def test_short_row_dense_layers_keep_their_tiles_on_neon():
    """The tall tiles are for AVX-512's 16-float vectors only: on aarch64 NEON a 50-row
    dense layer keeps its 5 x 8 tile on 8-float panels and gets no prefetch."""
    net = torch.nn.Linear(768, 512).eval()
    text = _dense_kernel(net, (torch.randn(1, 50, 768),),
                         {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76",
                          "mattr": ["+neon"]})
    assert "T.unroll(T.int64(5))" in text and "T.vectorized(T.int64(8))" in text, text
    assert "llvm.prefetch" not in text



# --- copies in front of convs (issue 16: ResNet-50's stride-2 3 x 3s, the RGB input transpose) --


class _StemAndStride(torch.nn.Module):
    """An RGB stride-2 stem conv (behind the NCHW -> NHWC input transpose) and a dense
    stride-2 3 x 3 conv (behind a zero-padded copy of its input)."""

    def __init__(self, width: int, out: int) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, width, 3, stride=2, padding=1)
        self.down = torch.nn.Conv2d(width, out, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.down(torch.relu(self.stem(x))))


def _block_loops(text: str, block: str) -> list[str]:
    return [ln for ln in _enclosing(text, block) if ln.startswith("for ")]


@pytest.mark.parametrize("hw,width,parallel", [
    (28, 256, True),    # a 30 x 30 x 256 padded copy (ResNet-50's 28 -> 14 conv): over the threads
    (8, 64, False),     # 10 x 10 x 64: below DENSE_PADDING_PARALLEL_ELEMENTS, one thread
])
def test_dense_conv_padding_and_rgb_transpose_loops(hw, width, parallel, tmp_path, caplog):
    """A dense conv's zero-padded input copy is split over the threads once it is large
    enough (it was one thread below 2^18 elements while the conv after it is parallel), its
    channels vectorized; the NCHW -> NHWC transpose of the RGB input unrolls its 3 channels
    instead of fusing them with the pixels (a division and modulo by 3 per element). The
    result is what PyTorch computes."""
    from slimc.backends.tvm.schedules import cpu_matmul

    torch.manual_seed(0)
    net = _StemAndStride(width, 32).eval()
    x = torch.randn(1, 3, 2 * hw, 2 * hw)
    kernels = _scheduled(net, (x,))
    (down,) = [t for t in kernels.values() if "stride" not in t and 'T.sblock("pad_temp")' in t
               and f"T.int64({width}), T.int64(32)" in t]
    pad = _block_loops(down, "pad_temp")
    assert ("T.parallel" in pad[0]) == parallel, pad
    assert any("T.vectorized(T.int64(16))" in ln for ln in pad), pad
    assert (hw + 2) ** 2 * width >= cpu_matmul.DENSE_PADDING_PARALLEL_ELEMENTS or not parallel
    (transpose,) = [t for name, t in kernels.items() if name.startswith("transpose")
                    and f'T.int64({2 * hw}), T.int64(3)), "float32")' in t]  # NHWC RGB
    loops = _block_loops(transpose, "T_transpose")
    assert loops[-1].endswith("T.unroll(T.int64(3)):"), loops
    assert "// T.int64(3)" not in transpose and "% T.int64(3)" not in transpose
    assert "T.parallel" not in transpose  # 2 hw x 2 hw x 3: below SHORT_INNER_PARALLEL_WORK
    _check(net, (x,), tmp_path, caplog, "tiled-matmul", tol=1e-5, target="x86-64-v4-vnni")


def test_a_large_rgb_input_transpose_splits_its_pixel_rows_over_the_threads():
    """From SHORT_INNER_PARALLEL_WORK elements on (a 160 x 160 RGB image) the unrolled
    transpose's pixel loops are one parallel loop: the input arrives cold, and two cores
    stream it in faster (MobileNetV2's 224 x 224 input: 66 vs 107 us in sequence)."""
    from slimc.backends.tvm.schedules import fallback

    net = torch.nn.Conv2d(3, 16, 3, stride=2, padding=1).eval()
    assert 160 * 160 * 3 >= fallback.SHORT_INNER_PARALLEL_WORK
    kernels = _scheduled(net, (torch.randn(1, 3, 160, 160),))
    (transpose,) = [t for name, t in kernels.items() if name.startswith("transpose")
                    and 'T.int64(160), T.int64(3)), "float32")' in t]
    loops = _block_loops(transpose, "T_transpose")
    assert "T.parallel(T.int64(25600))" in loops[0] and loops[-1].endswith("T.unroll(T.int64(3)):")


def test_dense_conv_padding_and_rgb_transpose_on_aarch64_under_qemu(tmp_path, aarch64_emulator,
                                                                    caplog):
    """The same two loop nests built for aarch64 (NEON) and run under qemu: what PyTorch
    computes."""
    torch.manual_seed(0)
    net = _StemAndStride(128, 16).eval()
    x = torch.randn(1, 3, 32, 32)  # an 18 x 18 x 128 padded copy: over the threads
    kernels = _scheduled(net, (x,), target="arm")
    assert any('T.sblock("pad_temp")' in t and "T.parallel" in _block_loops(t, "pad_temp")[0]
               for t in kernels.values())
    got, applied = _build_run(net, (x,), tmp_path, target="arm", cross="aarch64-linux-gnu",
                              caplog=caplog)
    with torch.no_grad():
        want = net(x).numpy()
    np.testing.assert_allclose(got[0], want, rtol=1e-4, atol=1e-4)
    assert not [line for line in applied if "failed" in line or "left unscheduled" in line]


class _PointwiseBlock(torch.nn.Module):
    """A 1 x 1 conv with bias + ReLU6, then a 3 x 3 depthwise conv: MobileNetV2's expansion."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.pw = torch.nn.Conv2d(cin, cout, 1)
        self.dw = torch.nn.Conv2d(cout, cout, 3, padding=1, groups=cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dw(torch.clamp(self.pw(x), 0.0, 6.0))


def test_pointwise_conv_tile_unrolls_four_reduction_steps(tmp_path, caplog):
    """A dense conv's 7 x 32 register tile sits under a ``T.unroll(4)`` reduction loop (four
    input channels per loop iteration: LLVM kept one, a third of the non-FMA uops were loop
    control); the depthwise conv's tile has no such loop; the result is what PyTorch
    computes."""
    from slimc.backends.tvm.schedules import cpu_matmul

    torch.manual_seed(0)
    net = _PointwiseBlock(96, 64).eval()
    x = torch.randn(1, 96, 14, 14)
    kernels = _scheduled(net, (x,))
    (pw,) = [t for t in kernels.values() if 'T.sblock("conv2d_nhwc_update")' in t
             and "T.int64(96), T.int64(64)" in t]
    loops = _block_loops(pw, "conv2d_nhwc_update")
    assert loops[-3:-2] == [f"for {loops[-3].split()[1]} in T.unroll(T.int64("
                            f"{cpu_matmul.REDUCTION_UNROLL})):"], loops
    assert loops[-2].endswith("T.unroll(T.int64(7)):") and "T.vectorized(T.int64(32))" in loops[-1]
    assert any(f"T.int64({96 // cpu_matmul.REDUCTION_UNROLL})" in ln for ln in loops), loops
    (dw,) = [t for t in kernels.values() if "T.int64(3), T.int64(3), T.int64(1), T.int64(64)" in t
             or "T.int64(64), T.int64(1), T.int64(3), T.int64(3)" in t]
    assert not any("T.unroll(T.int64(4))" in ln for ln in _enclosing(dw, next(
        m for m in re.findall(r'T\.sblock\("(\w+_update)"\)', dw))))
    _check(net, (x,), tmp_path, caplog, "tiled-matmul", tol=1e-5, target="x86-64-v4-vnni")


def test_pointwise_conv_unrolled_reduction_on_aarch64_under_qemu(tmp_path, aarch64_emulator,
                                                                 caplog):
    """The same block built for aarch64 (NEON tiles, reduction unrolled) and run under qemu:
    what PyTorch computes."""
    torch.manual_seed(0)
    net = _PointwiseBlock(48, 32).eval()
    x = torch.randn(1, 48, 14, 14)
    kernels = _scheduled(net, (x,), target="arm")
    assert any("T.unroll(T.int64(4))" in ln for t in kernels.values()
               if 'T.sblock("conv2d_nhwc_update")' in t and "T.int64(48), T.int64(32)" in t
               for ln in _block_loops(t, "conv2d_nhwc_update"))
    got, applied = _build_run(net, (x,), tmp_path, target="arm", cross="aarch64-linux-gnu",
                              caplog=caplog)
    with torch.no_grad():
        want = net(x).numpy()
    np.testing.assert_allclose(got[0], want, rtol=1e-4, atol=1e-4)
    assert not [line for line in applied if "failed" in line or "left unscheduled" in line]


def _conv_tile(text: str) -> tuple[int, int]:
    """``(rows, lanes)`` of a conv kernel's register tile: the unrolled pixel loop and the
    vectorized channel loop directly around its ``conv2d_nhwc_update`` block."""
    loops = _enclosing(text, "conv2d_nhwc_update")
    rows = re.findall(r"T\.unroll\(T\.int64\((\d+)\)\)", loops[-2])
    lanes = re.findall(r"T\.vectorized\(T\.int64\((\d+)\)\)", loops[-1])
    return int(rows[0]) if rows else 1, int(lanes[0])


def test_avx2_conv_over_odd_widths_runs_whole_one_vector_tiles(tmp_path, caplog):
    """MobileNetV2's 576 -> 96 projection over 14 x 14 and 7 x 7 pixels on an AVX2 target (16
    registers, 8 float lanes): two-vector panels allow only 4-row tiles there, and 4 does not
    divide 14 or 7, so the conv takes whole 7 x 8 tiles on one-vector panels instead; over 28
    x 28 (4 divides) it keeps 4 x 16. The AVX-512 target (32 registers) keeps its 7 x 32
    tiles. Exact against PyTorch on AVX2 with the folded batch norm and ReLU6 epilogue."""
    torch.manual_seed(0)
    net = _randomize_bn(torch.nn.Sequential(torch.nn.Conv2d(576, 96, 1, bias=False),
                                            torch.nn.BatchNorm2d(96), torch.nn.ReLU6()))

    def tile(size: int, target: str) -> tuple[int, int]:
        x = torch.randn(1, 576, size, size)
        (text,) = [t for n, t in _scheduled(net, (x,), target).items() if "conv2d" in n]
        return _conv_tile(text)

    assert tile(14, "x86-64-v3") == (7, 8)
    assert tile(7, "x86-64-v3") == (7, 8)
    assert tile(28, "x86-64-v3") == (4, 16)
    assert tile(14, "x86-64-v4-vnni") == (7, 32)
    _check(net, (torch.randn(1, 576, 7, 7),), tmp_path, caplog, "tiled-matmul", tol=1e-5,
           target="x86-64-v3")
