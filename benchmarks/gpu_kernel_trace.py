"""Per-kernel trace of an artifact on its device: the first kernel that writes a NaN, and
where the time goes. For debugging a GPU artifact on the GPU machine.

    python benchmarks/gpu_kernel_trace.py ARTIFACT [ARTIFACT ...] [--time]

Every call the Relax VM makes is instrumented (``VirtualMachine.set_instrument``): after each
call the device is synchronised and every tensor argument is read back; the first call after
which a tensor holds a NaN that held none before is reported with its arguments' shapes,
dtypes and ranges. With ``--time`` each call is timed (device synchronised before and after;
calls of one kernel summed) and the 15 most expensive kernels are printed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np


def _tensors(args) -> list:
    return [a for a in args if hasattr(a, "numpy") and hasattr(a, "shape")]


def _summary(array: np.ndarray) -> str:
    if array.size == 0 or array.dtype.kind not in "fiub":
        return f"{array.dtype}{list(array.shape)}"
    finite = np.isfinite(array) if array.dtype.kind == "f" else np.ones(array.shape, bool)
    values = array[finite]
    low, high = (values.min(), values.max()) if values.size else (None, None)
    nan = int(np.isnan(array).sum()) if array.dtype.kind == "f" else 0
    return (f"{array.dtype}{list(array.shape)} finite range [{low}, {high}] NaN {nan} "
            f"inf {int((~finite).sum()) - nan}")


def trace(artifact_dir: Path, timing: bool, dump: Path | None = None) -> dict:
    import slimc

    model = slimc.load(artifact_dir)
    runner = model._runner
    vm, device = runner.vm, runner.device
    report: dict = {"artifact": str(artifact_dir), "first_non_finite": None}
    spent: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    state = {"start": 0.0, "bad_before": set()}

    def instrument(func, name, before_run, ret_value, *args):
        device.sync()
        tensors = _tensors(args)
        if before_run:
            if report["first_non_finite"] is None:
                state["before"] = [t.numpy() for t in tensors]
                state["bad_before"] = {i for i, t in enumerate(tensors)
                                       if _non_finite(t)}
            state["start"] = time.perf_counter()
            return 0
        spent[name] += time.perf_counter() - state["start"]
        calls[name] += 1
        if report["first_non_finite"] is None:
            bad = [i for i, t in enumerate(tensors) if _non_finite(t)]
            if set(bad) - state["bad_before"]:
                report["first_non_finite"] = {
                    "kernel": name, "args": [_summary(t.numpy()) for t in tensors]}
                if dump is not None:  # the kernel's arguments before and after, to replay
                    arrays = {f"before{i}": a for i, a in enumerate(state["before"])}
                    arrays.update({f"after{i}": t.numpy() for i, t in enumerate(tensors)})
                    np.savez(dump / f"{artifact_dir.parent.name}_nan.npz", **arrays)
        return 0

    vm.set_instrument(instrument)
    feed = model.example_inputs()
    outputs = model(**feed)
    report["outputs_finite"] = {k: bool(np.isfinite(v).all()) for k, v in outputs.items()}
    if timing:
        spent.clear()
        calls.clear()
        model(**feed)
        top = sorted(spent.items(), key=lambda kv: -kv[1])[:15]
        report["total_ms"] = round(sum(spent.values()) * 1e3, 3)
        report["top_kernels_ms"] = [(k, round(v * 1e3, 3), calls[k]) for k, v in top]
        report["calls"] = sum(calls.values())
    return report


def _non_finite(tensor) -> bool:
    """NaN anywhere (an infinity alone is legitimate: additive attention masks hold -inf)."""
    array = tensor.numpy()
    return array.dtype.kind == "f" and array.size > 0 and bool(np.isnan(array).any())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", nargs="+", type=Path)
    parser.add_argument("--time", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    reports = []
    for path in args.artifacts:
        try:
            report = trace(path, args.time, args.out.parent if args.out else None)
        except Exception as exc:  # noqa: BLE001 - report every artifact
            report = {"artifact": str(path), "error": f"{type(exc).__name__}: {exc}"[:800]}
        print(json.dumps(report), flush=True)
        reports.append(report)
    if args.out:
        args.out.write_text(json.dumps(reports, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
