"""`slimc bench OUT`: time an artifact's entry point(s) where it runs (host, GPU, RPC device).

Loading goes through :func:`slimc.artifact.load`, so the target's backend decides where the
library runs and refuses clearly when this machine lacks the device (exit 2). Forward-pass
artifacts are timed on their stored example inputs; generation artifacts (``--generate``) are
timed as prefill of a fixed token-id prompt plus greedy decode, reported as prefill ms and
decode tokens/s. Warm-up runs are excluded from the statistics.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from slimc.errors import UsageError


def _summary(ms: list[float]) -> dict[str, Any]:
    arr = np.asarray(ms, dtype=np.float64)
    return {"median_ms": float(np.median(arr)), "p10_ms": float(np.percentile(arr, 10)),
            "p90_ms": float(np.percentile(arr, 90)), "runs_ms": [round(x, 4) for x in ms]}


def bench(directory: str | Path, *, runs: int = 10, warmup: int = 2, threads: int | None = None,
          rpc: str | None = None, prompt_tokens: int = 8,
          new_tokens: int = 16) -> dict[str, Any]:
    """Time ``directory``'s artifact; returns a JSON-ready report (see module docstring)."""
    from slimc.artifact import load

    if runs < 1 or warmup < 0:
        raise UsageError(f"--runs must be >= 1 and --warmup >= 0 (got {runs}, {warmup}).")
    model = load(directory, threads=threads, rpc=rpc)
    where = f"rpc {rpc}" if rpc else model.manifest["target"].get("name", "host")
    report: dict[str, Any] = {"artifact": str(directory), "where": where, "runs": runs,
                              "warmup": warmup, "threads": threads}
    if model.manifest.get("generation"):
        if rpc:
            raise UsageError("slimc bench --rpc times forward-pass artifacts; a generation "
                             "artifact's KV cache lives in the local runtime.",
                             hint="Run `slimc bench OUT` on the board itself (docs/deploy.md).")
        report["generation"] = _bench_generation(model, runs, warmup, prompt_tokens, new_tokens)
        return report
    arrays = model._arrange((), model.example_inputs())
    ms: list[float] = []
    for i in range(warmup + runs):
        start = time.perf_counter()
        model.run_arrays(arrays)
        if i >= warmup:
            ms.append((time.perf_counter() - start) * 1000)
    report["forward"] = _summary(ms)
    return report


def _bench_generation(model, runs: int, warmup: int, prompt_tokens: int,
                      new_tokens: int) -> dict[str, Any]:
    spec = model.manifest["generation"]
    prompt_tokens = max(1, min(prompt_tokens, spec["max_length"] // 2))
    new_tokens = max(1, min(new_tokens, spec["max_length"] - prompt_tokens))
    ids = [1 + (7 * i) % (spec["vocab"] - 1) for i in range(prompt_tokens)]
    prefill, decode = [], []
    for i in range(warmup + runs):
        stats = model.generate(ids, new_tokens, stop=False).stats
        if i >= warmup:
            prefill.append(stats["prefill_s"] * 1000)
            if stats["decode_tokens_per_s"]:
                decode.append(stats["decode_tokens_per_s"])
    out = {"prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "prefill": _summary(prefill)}
    out["decode_tokens_per_s"] = float(np.median(decode)) if decode else None
    out["decode_runs_tokens_per_s"] = [round(x, 2) for x in decode]
    return out
