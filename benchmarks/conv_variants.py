"""Single MobileNet convs built under schedule variants, then each kernel timed alone, interleaved.

For choosing a tile / loop-order rule per conv shape on the host, with the same load on every
variant (the per-kernel side of an A/B; the whole model is ``benchmarks/run.py --ab``)::

    python benchmarks/conv_variants.py build DIR --cases dw144,pw144_24 --variants base,wide
    /work/wt/bench.sh python benchmarks/conv_variants.py time DIR --threads 2 --json out.json

``build`` compiles each case (one conv + folded batch norm + ReLU6 as slimc's pipeline builds
it, host target) under each variant (:data:`VARIANTS`: module constants of
``backends/tvm/schedules/cpu_matmul.py`` switched for the build) and checks it against PyTorch;
``time`` loads every library, records the conv kernel's arguments from one call (Relax VM
instrument) and times the kernel alone, ``--number`` calls back to back, best of 5, variants
interleaved round by round; it prints each variant's median over rounds relative to ``base``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

#: name -> (kind, input channels, output channels, map size, stride)
CASES = {
    "dw96s2": ("dw", 96, 96, 112, 2),  # MobileNetV2 block 2's depthwise
    "dw144": ("dw", 144, 144, 56, 1),
    "dw144s2": ("dw", 144, 144, 56, 2),
    "dw32": ("dw", 32, 32, 112, 1),
    "dw192": ("dw", 192, 192, 28, 1),
    "dw72": ("dw", 72, 72, 56, 1),  # MobileNetV3-L
    "pw144_24": ("pw", 144, 24, 56, 1),  # MobileNetV2 projections
    "pw96_24": ("pw", 96, 24, 56, 1),
    "pw144_32": ("pw", 144, 32, 28, 1),
    "pw192_32": ("pw", 192, 32, 28, 1),
    "pw72_24": ("pw", 72, 24, 56, 1),  # MobileNetV3-L projections
    "pw72_40": ("pw", 72, 40, 28, 1),
    "pw120_40": ("pw", 120, 40, 28, 1),
    "pw240_80": ("pw", 240, 80, 14, 1),
    "pw480_112": ("pw", 480, 112, 14, 1),
    "pw672_160": ("pw", 672, 160, 7, 1),
    "pw960_160": ("pw", 960, 160, 7, 1),
    "pw960_320": ("pw", 960, 320, 7, 1),  # MobileNetV2's last convs (filters > 1 MiB)
    "pw320_1280": ("pw", 320, 1280, 7, 1),
    "pw16_96": ("pw", 16, 96, 112, 1),  # an expansion (control)
    "pw24_144": ("pw", 24, 144, 56, 1),
    "pw672_112": ("pw", 672, 112, 14, 1),
    "pw32_16": ("pw", 32, 16, 112, 1),
    # ShuffleNetV2's 232-channel 1 x 1s (8-lane panels on AVX-512) beside 240 / 224 controls
    "pw240_232": ("pw", 240, 232, 7, 1),
    "pw240_240": ("pw", 240, 240, 7, 1),
    "pw240_224": ("pw", 240, 224, 7, 1),
    "pw240_256": ("pw", 240, 256, 7, 1),
    "pw144_24s": ("pw", 144, 24, 14, 1),
    "pw144_32s": ("pw", 144, 32, 14, 1),
    # MobileNetV3-L's 8-lane depthwise convs (issue 16, wt/mnv3); "dw5": a 5 x 5 window
    "dw72k5s2": ("dw5", 72, 72, 56, 2),
    "dw120k5": ("dw5", 120, 120, 28, 1),
    "dw184": ("dw", 184, 184, 14, 1),
    "dw200": ("dw", 200, 200, 14, 1),
    "dw240s2": ("dw", 240, 240, 28, 2),  # a 16-lane control
    "dw64": ("dw", 64, 64, 56, 1),  # 56 x 56 at 16-lane panels, beside dw72's 8-lane ones
    "dw80": ("dw", 80, 80, 56, 1),
    "dw88": ("dw", 88, 88, 56, 1),
    "dw128k5": ("dw5", 128, 128, 28, 1),  # dw120k5 / dw184 / dw200 padded to whole vectors
    "dw192_14": ("dw", 192, 192, 14, 1),  # cv_pad_t*.json's "dw192"
    "dw208": ("dw", 208, 208, 14, 1),
    "dw80k5s2": ("dw5", 80, 80, 56, 2),
    # ResNet-50's bottleneck convs (issue 16, wt/conv22); "k3": a dense 3 x 3
    "r256_1024": ("pw", 256, 1024, 14, 1),
    "r1024_256": ("pw", 1024, 256, 14, 1),
    "r1024_512": ("pw", 1024, 512, 14, 1),
    "r256_64": ("pw", 256, 64, 56, 1),
    "r64_256": ("pw", 64, 256, 56, 1),
    "r128_512": ("pw", 128, 512, 28, 1),
    "r512_128": ("pw", 512, 128, 28, 1),
    "r512_2048": ("pw", 512, 2048, 7, 1),
    "r3s2_512": ("k3", 512, 512, 14, 2),
    "r3s2_256": ("k3", 256, 256, 28, 2),
    "r3_512": ("k3", 512, 512, 7, 1),  # stage 4's 3 x 3 (too few tiles for Winograd)
    "stem3": ("k3", 3, 32, 224, 2),  # MobileNetV2's stem, behind the NCHW -> NHWC transpose
    # MobileNetV2's other 1 x 1 convs (issue 16, wt/conv23)
    "m32_192": ("pw", 32, 192, 28, 1),
    "m64_384": ("pw", 64, 384, 14, 1),
    "m384_64": ("pw", 384, 64, 14, 1),
    "m96_576": ("pw", 96, 576, 14, 1),
    "m576_96": ("pw", 576, 96, 14, 1),
    "m576_160": ("pw", 576, 160, 7, 1),
    "m160_960": ("pw", 160, 960, 7, 1),
    # depthwise convs over 14 x 14 / 7 x 7 on two-vector panels (issue 16, wt/cnn24)
    "dw576_14": ("dw", 576, 576, 14, 1),
    "dw960_7": ("dw", 960, 960, 7, 1),
    "dw672k5_14": ("dw5", 672, 672, 14, 1),
}

#: variant -> {constant of cpu_matmul: value}
VARIANTS: dict[str, dict] = {
    # main before this round (issue 16, wt/mob18)
    "base": {"DEPTHWISE_ROWS_OUTSIDE_BYTES": 1 << 62, "nhwc_rewrites.HALF_PANEL_MIN_PIXELS": None},
    "new": {},
    "dw": {"nhwc_rewrites.HALF_PANEL_MIN_PIXELS": None},  # the depthwise rule alone
    "mm": {"DEPTHWISE_ROWS_OUTSIDE_BYTES": 1 << 62},  # the half-panel matmuls alone
    # issue 16, wt/mnv3: one-vector-panel projections (480 / 672 -> 112) with the panel outside
    "panel": {"LARGER_OPERAND_ROWS_OUTSIDE": False},
    # every depthwise conv with its pixel rows outside
    "dwrows": {"DEPTHWISE_ROWS_OUTSIDE_BYTES": 0},
    # issue 16, wt/conv22: a dense conv's padded input copied on one thread (main before)
    "padserial": {"DENSE_PADDING_OVER_THREADS": False},
    # ... and a short innermost axis fused with the others (the NCHW -> NHWC input transpose)
    "fusedinner": {"fallback.SHORT_INNER_AXIS": 0},
    "unrollserial": {"fallback.SHORT_INNER_PARALLEL_WORK": 1 << 62},
    # issue 16, wt/conv23: 1 x 1 conv candidates
    "ku4": {"REDUCTION_UNROLL": 4},  # four reduction steps per loop iteration (main now)
    "ku1": {"REDUCTION_UNROLL": 1},  # one (main before)
    "rowsout": {"PANEL_OUTSIDE_ROWS": False},  # image rows outside the weight panels
    # issue 16, wt/cnn24 (AVX2, 16 registers): one-vector panels where 4 rows do not divide
    # the width (main now), two-vector 4-row tiles with a predicated tail (main before)
    # session 25 (Zen 5): 8-lane 1 x 1s as padded matmuls, over >= 64 pixels / any pixels
    "zen4rule": {"nhwc_rewrites.HALF_WIDTH_FMA_CPUS": ("znver4", "znver5")},
    "mm1": {"nhwc_rewrites.HALF_PANEL_MIN_PIXELS": 1},
    "mm1pad": {"nhwc_rewrites.HALF_PANEL_MIN_PIXELS": 1, "CONSTANT_PAD_MIN_ROWS": 1},
    "narrow": {"SIXTEEN_REGISTER_NARROW": True},
    "wide": {"SIXTEEN_REGISTER_NARROW": False},
    "dwnarrow": {"SIXTEEN_REGISTER_NARROW_DEPTHWISE": True},  # main now
    "dwwide": {"SIXTEEN_REGISTER_NARROW_DEPTHWISE": False},  # depthwise as main before
    "narrowall": {"SIXTEEN_REGISTER_NARROW": "all"},  # one-vector panels at every width
}


#: Fold the batch norm into the conv before building (``build --fold-bn``): slimc folds it on
#: the FX graph in a real compile, so unfolded, the kernel's epilogue has a division per
#: output the model's kernel does not have (a tenth of a 64-channel 1 x 1 conv's time).
FOLD_BN = False


def _module(kind: str, cin: int, cout: int, stride: int):
    import torch

    class Conv(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            groups = cin if kind.startswith("dw") else 1
            k = 5 if kind == "dw5" else 3 if kind in ("dw", "k3") else 1
            self.conv = torch.nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False)
            self.bn = torch.nn.BatchNorm2d(cout)

        def forward(self, x):
            return torch.clamp(self.bn(self.conv(x)), 0.0, 6.0)

    torch.manual_seed(0)
    net = Conv().eval()
    net.bn.running_mean.uniform_(-0.5, 0.5)
    net.bn.running_var.uniform_(0.5, 2.0)
    if FOLD_BN:  # as in a compiled model (and in ORT): the conv's bias, one add per output
        net.conv = torch.nn.utils.fusion.fuse_conv_bn_eval(net.conv, net.bn)
        net.bn = torch.nn.Identity()
    return net


def _owner(key: str):
    """The schedules module a VARIANTS key names (``module.CONSTANT``, default cpu_matmul)."""
    import importlib

    module = key.split(".")[0] if "." in key else "cpu_matmul"
    return importlib.import_module(f"slimc.backends.tvm.schedules.{module}")


def build(out: Path, cases: list[str], variants: list[str]) -> None:
    import numpy as np
    import torch
    from slimc.backends.tvm.build import build_library
    from slimc.backends.tvm.runtime import run_library

    from slimc.targets import resolve_target
    from tests.test_schedules import _lower

    out.mkdir(parents=True, exist_ok=True)
    spec = resolve_target("llvm")
    for case in cases:
        kind, cin, cout, size, stride = CASES[case]
        net = _module(kind, cin, cout, stride)
        x = torch.randn(1, cin, size, size)
        np.save(out / f"{case}.npy", x.numpy())
        with torch.no_grad():
            want = net(x).numpy()
        if not (out / f"{case}.onnx").exists():  # the same conv for ONNX Runtime (``--ort``)
            torch.onnx.export(net, (x,), str(out / f"{case}.onnx"), input_names=["x"],
                              dynamo=False)
        for variant in variants:
            if (out / f"{case}-{variant}.so").exists():  # built by an earlier call
                continue
            patches = [(_owner(k), k.split(".")[-1], v) for k, v in VARIANTS[variant].items()]
            assert all(hasattr(m, k) for m, k, _ in patches), patches
            saved = [(m, k, getattr(m, k)) for m, k, _ in patches]
            for m, k, v in patches:
                setattr(m, k, v)
            try:
                lib = build_library(_lower(net, (x,)), spec, out / f"{case}-{variant}.so")
            finally:
                for m, k, v in saved:
                    setattr(m, k, v)
            (got,) = run_library(lib, [x.numpy()], cross_triple=None, threads=2)
            err = float(np.linalg.norm(got - want) / np.linalg.norm(want))
            print(f"{case:12s} {variant:10s} rel.L2 {err:.2e}", flush=True)
            assert err < 1e-5, (case, variant, err)


def _ort_sessions(out: Path, cases: list[str], threads: int) -> dict:
    """``(case, "ort") -> (session, feed)``: ONNX Runtime on each case's conv, profiling on,
    flushing denormals (the ``ort-ftz`` engine), ``threads`` intra-op threads."""
    import numpy as np
    import onnxruntime as ort

    sessions = {}
    for case in cases:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.enable_profiling = True
        options.profile_file_prefix = str(out / f"{case}-ortprof")
        options.add_session_config_entry("session.set_denormal_as_zero", "1")
        session = ort.InferenceSession(str(out / f"{case}.onnx"), options,
                                       providers=["CPUExecutionProvider"])
        feed = {"x": np.load(out / f"{case}.npy")}
        for _ in range(3):
            session.run(None, feed)
        sessions[(case, "ort")] = (session, feed)
    return sessions


def _ort_conv_times(session, rounds: int, number: int) -> list[float]:
    """Per round, the Conv node's time in ORT's profiler as slimc's kernel is timed: best of 5
    means over ``number`` calls (after one untimed call), microseconds."""
    import json as _json

    events = _json.loads(Path(session.end_profiling()).read_text())
    conv = [e["dur"] for e in events if e.get("cat") == "Node"
            and e["name"].endswith("_kernel_time") and "Conv" in e["args"].get("op_name", "")]
    per_round = 1 + 5 * number
    conv = conv[-rounds * per_round:]
    out = []
    for r in range(rounds):
        chunk = conv[r * per_round + 1:(r + 1) * per_round]
        out.append(min(statistics.fmean(chunk[i * number:(i + 1) * number]) for i in range(5)))
    return out


def time_all(out: Path, threads: int, number: int, rounds: int, kernel: str = "",
             ort: bool = False) -> dict:
    """``kernel``: time the first kernel whose name contains it (default: the conv / matmul);
    ``ort``: also ONNX Runtime's Conv node on each case (its profiler), as variant ``ort``."""
    os.environ["TVM_NUM_THREADS"] = str(threads)
    import numpy as np
    import tvm
    from tvm import relax

    kernels = {}
    for lib_path in sorted(out.glob("*.so")):
        case, variant = lib_path.stem.split("-", 1)
        lib = tvm.runtime.load_module(str(lib_path))
        vm = relax.VirtualMachine(lib, tvm.cpu())
        calls = []

        def instrument(func, symbol, before, ret, *call_args, calls=calls):
            wanted = kernel in symbol if kernel else "conv2d" in symbol or "matmul" in symbol
            if before and wanted:
                calls.append((symbol, [tvm.runtime.tensor(a.numpy()) for a in call_args]))
            return 0

        vm.set_instrument(instrument)
        vm["main"](tvm.runtime.tensor(np.load(out / f"{case}.npy")))
        symbol, call_args = calls[0]
        kernels[(case, variant)] = (lib.imports[0].get_function(symbol), call_args, lib, vm)
    sessions = _ort_sessions(out, sorted({c for c, _ in kernels}), threads) if ort else {}
    tvm.get_global_func("runtime.config_threadpool")(1, threads)
    times: dict = {key: [] for key in [*kernels, *sessions]}
    for r in range(rounds):
        keys = [*kernels, *sessions]
        keys = keys[r % len(keys):] + keys[:r % len(keys)]
        for key in keys:
            if key in sessions:
                session, feed = sessions[key]
                session.run(None, feed)
                for _ in range(5 * number):
                    session.run(None, feed)
                continue
            fn, call_args = kernels[key][:2]
            fn(*call_args)
            best = float("inf")
            for _ in range(5):
                t0 = time.perf_counter()
                for _ in range(number):
                    fn(*call_args)
                best = min(best, (time.perf_counter() - t0) / number)
            times[key].append(best * 1e6)
    for key, (session, _) in sessions.items():
        times[key] = _ort_conv_times(session, rounds, number)
    result = {}
    for (case, variant), ts in sorted(times.items()):
        base = times.get((case, "base"))
        ratio = statistics.median(t / b for t, b in zip(ts, base, strict=True)) if base else None
        onnx = times.get((case, "ort"))
        vs_ort = statistics.median(t / o for t, o in zip(ts, onnx, strict=True)) if onnx else None
        result[f"{case}-{variant}"] = {"us": statistics.median(ts), "vs_base": ratio,
                                       "vs_ort": vs_ort, "all": ts}
        print(f"{case:12s} {variant:10s} {statistics.median(ts):9.1f} us"
              + (f"  vs base {ratio:.3f}" if ratio else "")
              + (f"  vs ort {vs_ort:.3f}" if vs_ort and variant != "ort" else ""), flush=True)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=("build", "time"))
    p.add_argument("dir", type=Path)
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--variants", default="base")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--number", type=int, default=20)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--fold-bn", action="store_true", help="build: fold the batch norm into "
                   "the conv first (as slimc's compile does)")
    p.add_argument("--ort", action="store_true", help="also time ONNX Runtime's Conv node "
                   "(its profiler, flushing denormals) on each case, as variant ort")
    p.add_argument("--kernel", default="", help="time the kernel whose name contains this "
                   "(e.g. transpose) instead of the conv")
    args = p.parse_args(argv)
    if args.mode == "build":
        global FOLD_BN
        FOLD_BN = args.fold_bn
        build(args.dir, args.cases.split(","), args.variants.split(","))
        return 0
    result = time_all(args.dir, args.threads, args.number, args.rounds, args.kernel,
                      args.ort)
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "kernels": result}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
