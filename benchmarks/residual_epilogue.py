"""The residual add of ``x + fc2(h)`` in fc2's matmul epilogue vs in a kernel of its own.

Builds ``x + linear(h)`` (Whisper-tiny's ``fc2``: 1536 -> 384 over 1500 frames by default) with
slimc's CPU pipeline twice in one process: as compiled (``sink_reshapes`` moves the reshape
past the same-shape add, one kernel) and with that step off (matmul + bias kernel, then a
``reshape + add`` kernel), checks both against numpy and times them interleaved:

    python benchmarks/residual_epilogue.py --rows 1500 --k 1536 --n 384 --threads 2
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1500)
    p.add_argument("--k", type=int, default=1536)
    p.add_argument("--n", type=int, default=384)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calls", type=int, default=40)
    p.add_argument("--target", default="x86-64-v4-vnni")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import numpy as np
    import slimc.backends.tvm.schedules.sink_reshapes as sink
    import torch
    import tvm
    from slimc.backends.tvm.schedules import cpu_pipeline, fusion_passes
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    from slimc.targets import resolve_target

    class Residual(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc2 = torch.nn.Linear(args.k, args.n)

        def forward(self, x, h):
            return x + self.fc2(h)

    torch.manual_seed(0)
    module = Residual().eval()
    x, h = torch.randn(1, args.rows, args.n), torch.randn(1, args.rows, args.k)
    with torch.no_grad():
        want = module(x, h).numpy()
    target = resolve_target(args.target).tvm_target()
    original = sink._sink_into_adds
    vms, kernels = {}, {}
    for label in ("fused", "separate"):
        sink._sink_into_adds = original if label == "fused" else (lambda func, *_: func)
        mod = from_exported_program(torch.export.export(module, (x, h)),
                                    keep_params_as_input=False)
        with target:
            fused = tvm.transform.Sequential(fusion_passes(target))(mod)
        kernels[label] = sorted(gv.name_hint for gv, f in fused.functions_items()
                                if isinstance(f, tvm.tirx.PrimFunc))
        with tvm.transform.PassContext(opt_level=3):
            ex = relax.build(mod, target=target, relax_pipeline=cpu_pipeline(target))
        vms[label] = relax.VirtualMachine(ex, tvm.cpu())
    sink._sink_into_adds = original
    feed = [tvm.runtime.tensor(x.numpy()), tvm.runtime.tensor(h.numpy())]
    times: dict[str, list[float]] = {label: [] for label in vms}
    for label, vm in vms.items():
        got = vm["main"](*feed)
        got = got[0] if isinstance(got, tvm.ir.Array | list | tuple) else got
        err = np.linalg.norm(got.numpy() - want) / np.linalg.norm(want)
        print(f"{label}: kernels {kernels[label]}, relative L2 vs torch {err:.2e}")
    for _ in range(args.calls):
        for label, vm in vms.items():
            start = time.perf_counter()
            vm["main"](*feed)
            times[label].append((time.perf_counter() - start) * 1e3)
    for label, values in times.items():
        print(f"{label}: min {min(values):.3f} ms, median {np.median(values):.3f} ms")
    print("load average", " ".join(f"{v:.2f}" for v in os.getloadavg()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
